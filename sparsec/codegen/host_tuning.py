"""The tuning knobs ``sparsec compile`` measures on the CPU it compiles for, cached.

``tuning.py`` holds values measured on named CPUs; a CPU without a row gets its ISA's
default, measured on another microarchitecture. Where the best value of a knob is known
to differ between CPUs by more than the noise (``KNOBS``), compiling for this host
times each candidate here instead: the kernels of representative layers are built with
each value, timed alternately (one thread, weights streamed from memory as in a
decode step), and a candidate replaces the table's value only when it is at least
``MARGIN`` faster over those layers (geometric mean), in two runs. Results are cached
per CPU model, ISA, LLVM cpu and sparsec version (``tuning.json`` beside the per-layer
format cache), so each CPU model measures once (about 10 s).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable

import numpy as np

from sparsec.codegen import autotune
from sparsec.codegen.linear_pack import pack_linear
from sparsec.codegen.target import Target, host_cpu_model
from sparsec.codegen.tuning import SPARSE_EXPANDS, Tuning

CACHE_FILE = "tuning.json"
MARGIN = 0.05  # a candidate must be this much faster than the table's value


@dataclasses.dataclass(frozen=True)
class Knob:
    """One per-format field of ``Tuning``, the values to try on the host and the layers
    ((out, in) shapes) to time them on."""

    field: str  # a ``Tuning`` field holding a dict keyed by linear format
    fmt: str
    values: tuple
    shapes: tuple[tuple[int, int], ...]


# Layers timed, (out, in): SmolLM2's q/o, MLP up and down projections, a 1B model's down
# projection. "Narrow" ones have fewer than Tuning.wide_decode_inputs inputs.
NARROW = ((1536, 576), (576, 576))
WIDE = ((576, 1536), (2048, 8192))
MIXED = ((1536, 576), (2048, 8192))
# In this order (each measured with the values chosen before it). The expand: a tie on
# the Intel Xeon (Sapphire Rapids class), while a micro-benchmark on AMD Zen 4 (the
# sparse-kernels issue) favours the register form 2x. The decode groups (weight streams
# in flight): the other candidate fix for Zen 4; on the Intel Xeon the host
# measurement agrees with the table (1 thread, 70%, us: bitmask_i8 1536x576 groups
# 1/2/4 17.7/19.3/18.2, 2048x8192 wide groups 271/252/249; bitmask_f32 1536x576 groups
# 2/4/6 65.8/54.7/53.2, 2048x8192 984/888/897), so each keeps its value there.
KNOBS = (
    Knob("sparse_expand", "bitmask_i8", SPARSE_EXPANDS, MIXED),
    Knob("sparse_expand", "bitmask_f32", SPARSE_EXPANDS, MIXED),
    Knob("decode_group", "bitmask_i8", (1, 2, 4), NARROW),
    Knob("wide_decode_group", "bitmask_i8", (1, 2, 4), WIDE),
    Knob("decode_group", "bitmask_f32", (4, 6), MIXED),
)
SPARSITY = 0.7
REPS = 9

# (kernels to time, each with its target) -> median seconds of each; autotune's by default
Measure = Callable[[list], list[float]]


def knobs_for(tgt: Target) -> tuple[Knob, ...]:
    """The knobs measured for ``tgt``'s ISA: the AVX-512 ones (AVX2's shuffle decode has
    no expand to choose, and its groups were never measured against another CPU)."""
    if tgt.isa.sparse_decode != "expand":
        return ()
    return tuple(k for k in KNOBS if k.fmt in tgt.isa.formats)


def with_value(tuning: Tuning, knob: Knob, value) -> Tuning:
    table = dict(getattr(tuning, knob.field))
    table[knob.fmt] = value
    return dataclasses.replace(tuning, **{knob.field: table})


def _layers(knob: Knob, isa) -> list:
    rng = np.random.default_rng(0)
    packs = []
    for shape in knob.shapes:
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        w[rng.random(shape) < SPARSITY] = 0.0
        packs.append(pack_linear(w, knob.fmt, isa))
    return packs


def _time_kernels(kernels: list) -> list[float]:
    return autotune.measure_kernels(kernels, reps=REPS)


def measure_tuning(base: Target, measure: Measure | None = None) -> tuple[Tuning, dict]:
    """The tuning of ``base`` with each knob set to its fastest value on this host, and
    the seconds behind each choice ({"field/fmt": {value: [seconds per layer, then per
    layer of the confirming run where there was one]}}).
    ``measure``: times kernels (tests pass a fake; default ``_time_kernels``)."""
    measure = measure or _time_kernels
    tuning = base.tuning
    seconds = {}
    for knob in knobs_for(base):
        packs = _layers(knob, base.isa)

        def timed(values, packs=packs, knob=knob, tuning=tuning):
            """{value: seconds per layer}, the values' kernels timed alternately."""
            kernels = [
                (p, dataclasses.replace(base, measured=with_value(tuning, knob, v)))
                for v in values
                for p in packs
            ]
            times = measure(kernels)
            n = len(packs)
            return {v: times[i * n : (i + 1) * n] for i, v in enumerate(values)}

        per_value = timed(knob.values)
        current = getattr(tuning, knob.field)[knob.fmt]
        ratios = {v: _ratio(per_value[v], per_value[current]) for v in knob.values}
        best = min(knob.values, key=ratios.get)
        if ratios[best] <= 1 - MARGIN:
            # a second run of the two must agree: one noisy round (another process
            # busy meanwhile) would otherwise be cached for this CPU for good
            again = timed((current, best))
            if _ratio(again[best], again[current]) <= 1 - MARGIN:
                tuning = with_value(tuning, knob, best)
            per_value = {v: per_value[v] + again.get(v, []) for v in knob.values}
        seconds[f"{knob.field}/{knob.fmt}"] = per_value
    return tuning, seconds


def host_tuned(
    tgt: Target, *, use_cache: bool = True, quiet: bool = False, measure: Measure | None = None
) -> Target:
    """``tgt`` with its knobs measured on this host (cached). The caller has checked that
    ``tgt`` is this host's CPU: measuring here for another CPU would be meaningless."""
    from sparsec import __version__
    from sparsec.progress import stage

    knobs = knobs_for(tgt)
    if not knobs:
        return tgt
    key = json.dumps(
        [
            host_cpu_model(),
            tgt.isa.name,
            tgt.cpu,
            [dataclasses.astuple(k) for k in knobs],
            SPARSITY,
            __version__,
        ]
    )
    path = autotune.cache_dir() / CACHE_FILE
    hit = autotune.load_cache(path).get(key) if use_cache else None
    tuning = tgt.tuning
    if isinstance(hit, dict) and _valid(hit.get("values"), knobs):
        for knob in knobs:
            tuning = with_value(tuning, knob, hit["values"][f"{knob.field}/{knob.fmt}"])
    else:
        what = f"measuring kernel tuning on this CPU (once per CPU model, cached in {path})"
        with stage(what, quiet=quiet):
            tuning, seconds = measure_tuning(tgt, measure)
        values = {f"{k.field}/{k.fmt}": getattr(tuning, k.field)[k.fmt] for k in knobs}
        if not quiet:
            chosen = ", ".join(f"{name} {value}" for name, value in values.items())
            print(f"tuning for this CPU: {chosen}", file=sys.stderr)
        if use_cache:
            autotune.store_cache(path, key, {"values": values, "seconds": seconds})
    return dataclasses.replace(tgt, measured=tuning)


def _ratio(times: list[float], base: list[float]) -> float:
    """Geometric mean over the layers of ``times`` over ``base``."""
    logs = [math.log(t / b) for t, b in zip(times, base, strict=True)]
    return math.exp(sum(logs) / len(logs))


def _valid(values, knobs) -> bool:
    """A cache entry that names a known value for every knob (else: measure again)."""
    return isinstance(values, dict) and all(
        values.get(f"{k.field}/{k.fmt}") in k.values for k in knobs
    )
