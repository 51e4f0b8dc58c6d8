"""Where a forward step's time goes, op by op (``sparsec profile``).

A model compiled with ``sparsec compile --profile`` counts, on its thread 0, the
time-stamp-counter cycles from the end of one op's barrier to the end of the next's
(``codegen.emit._ProfileClock``), one int64 per op of the step, in an array it exports
(``manifest["profile"]``: the array's name and what each slot times). This module runs
steps of a chosen shape on the model's own native context and turns the counts into
microseconds per step: a batched decode step (``rows`` sequences, one token each, at
``position``) or one sequence's prefill chunk (``prefill`` tokens from ``position``).

Each op's time is its median over the steps (a step the OS interrupted does not
count), converted with the counter's rate measured on the same steps (the median of
each step's counted cycles / its wall time); the ops then add up to about the median
step less the thread pool's dispatch (a few microseconds). The time-stamp counter ticks
at a constant rate on every CPU sparsec targets.
"""

from __future__ import annotations

import ctypes
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from sparsec.errors import SparsecError
from sparsec.runtime.arguments import check_bool, is_int, show


@dataclass
class OpTime:
    op: str  # the op kind (linear, attention, rmsnorm, ...)
    name: str  # its layer or weight name ("" for the ops without one)
    seconds: float  # per step


@dataclass
class Profile:
    rows: int  # rows of each step
    position: int  # of the first row
    prefill: bool  # one sequence's chunk (else one row per sequence)
    steps: int
    threads: int
    step_seconds: float  # wall time of one step, median of the profiled ones
    ops: list[OpTime]  # in program order

    def grouped(self) -> list[tuple[str, float]]:
        """Seconds per step by op kind (linears by weight, every layer together), the
        largest first."""
        total: dict[str, float] = defaultdict(float)
        for op in self.ops:
            total[group_name(op.op, op.name)] += op.seconds
        return sorted(total.items(), key=lambda kv: -kv[1])

    def to_dict(self) -> dict:
        return {**asdict(self), "grouped": dict(self.grouped())}


_LAYER = re.compile(r"^.*\blayers?\.\d+\.")


def group_name(op: str, name: str) -> str:
    """``linear q_proj+k_proj+v_proj`` for a fused linear of any layer; the op otherwise."""
    if op != "linear" or not name:
        return op
    parts = [_LAYER.sub("", part).split(".")[-1] for part in name.split("+")]
    return f"linear {'+'.join(parts)}"


def _check_int(value, what: str, low: int, high: int) -> int:
    if not is_int(value) or not low <= value <= high:
        raise SparsecError(f"{what} must be an integer from {low} to {high}, got {show(value)}")
    return value


def profile(model, rows: int = 1, position: int = 0, prefill: bool = False, steps: int = 100):
    """Run ``steps`` forward steps (after a few unprofiled ones) and return a Profile.

    ``rows``: tokens per step: one per sequence at ``position`` (batched decode, as
    ``sparsec serve`` runs it), or with ``prefill`` one sequence's chunk at
    ``position..``. The steps use KV caches of their own (the model's stays as it is;
    memory: ``rows`` caches for decode, one for prefill); their contents are zeros, which
    costs what real keys cost. The model is held for the duration, like a generate call.
    """
    model._check_open()
    spec = model.manifest.get("profile")
    if not spec:
        raise SparsecError(
            f"{model.path} counts no op times: it was compiled without --profile; "
            "recompile it with `sparsec compile --profile` (a copy for profiling: the "
            "counters cost ~0.1% of a step)"
        )
    prefill = check_bool(prefill, "prefill")
    limit = model.max_tokens_per_call
    _check_int(rows, "rows", 1, limit)
    last = model.max_context - (rows if prefill else 1)
    if last < 0:
        raise SparsecError(
            f"a prefill of {rows} tokens does not fit the model's context of "
            f"{model.max_context} tokens"
        )
    _check_int(position, "position", 0, last)
    _check_int(steps, "steps", 1, 1_000_000)

    from sparsec.runtime.model import aligned_zeros, kv_caches

    ops = spec["ops"]
    sequences = 1 if prefill else rows
    caches = kv_caches(
        model,
        sequences,
        f"profiling {sequences} sequences needs KV caches of",
        "profile fewer --rows (or one sequence's chunk with --prefill)",
    )
    tokens = aligned_zeros((limit,), np.int32)
    positions = aligned_zeros((limit,), np.int32)
    row_caches = aligned_zeros((limit,), np.uint64)
    logits = aligned_zeros((limit, model.vocab_size), np.float32)
    first = model.encode("a", add_special_tokens=False)[:1] or [0]
    tokens[:rows] = first[0]
    if prefill:
        positions[:rows] = np.arange(position, position + rows)
        row_caches[:rows] = caches[0].ctypes.data
    else:
        positions[:rows] = position
        row_caches[:rows] = [caches[i].ctypes.data for i in range(rows)]
    pointers = [a.ctypes.data for a in (tokens, positions, row_caches, logits)]
    all_logits = int(not prefill)  # a prefill chunk: only its last row's logits (as served)

    model._claim("a profile")
    try:
        native = model._native
        counters = native.exported(ctypes.c_int64 * len(ops), spec["counters"])

        def step() -> float:
            start = time.perf_counter()
            rc = native.forward_rows(native.ctx, pointers[0], rows, *pointers[1:], all_logits)
            if rc:
                raise SparsecError(f"{model.path}: native forward failed with code {rc}")
            return time.perf_counter() - start

        for _ in range(min(10, steps)):
            step()
        counts = np.ctypeslib.as_array(counters)
        snapshots = [counts.copy()]
        walls = []
        for _ in range(steps):
            walls.append(step())
            snapshots.append(counts.copy())
    finally:
        model._release_claim()
    cycles = np.diff(np.array(snapshots, dtype=np.float64), axis=0)  # [steps, ops]
    # Counter ticks per second, step by step: a step the OS interrupted is long in both.
    rates = cycles.sum(axis=1) / np.array(walls)
    rate = float(np.median(rates))
    if not rate > 0:
        raise SparsecError(f"{model.path}: its op counters did not advance; is it damaged?")
    # Medians over the steps, so that an interrupted step does not count.
    per_op = np.median(cycles, axis=0) / rate
    times = [OpTime(o["op"], o.get("name", ""), float(t)) for o, t in zip(ops, per_op, strict=True)]
    return Profile(rows, position, prefill, steps, model.threads, float(np.median(walls)), times)


def format_profile(prof: Profile, path: str, top: int | None = None) -> str:
    """The table ``sparsec profile`` prints."""
    kind = (
        f"one sequence's prefill of {prof.rows} tokens from position {prof.position}"
        if prof.prefill
        else f"{prof.rows} row{'s' * (prof.rows > 1)} (one per sequence) at position "
        f"{prof.position}"
    )
    lines = [
        f"{path}: {kind}, {prof.threads} thread{'s' * (prof.threads > 1)}, {prof.steps} "
        f"steps: {prof.step_seconds * 1e3:.3f} ms a step (median)",
        f"{'op':<40} {'us/step':>10} {'share':>7}",
    ]
    grouped = prof.grouped()
    total = sum(seconds for _, seconds in grouped) or 1.0
    for name, seconds in grouped[:top]:
        lines.append(f"{name:<40} {seconds * 1e6:>10.1f} {100 * seconds / total:>6.1f}%")
    return "\n".join(lines)
