"""Does the optimized graph compute what the exported one did? Logits and caches compared
at prefill, decode and chunked shapes, including writes into a partly filled cache.

The exported graph runs under onnxruntime with its Concat-append cache; the optimized
graph runs under onnxruntime (its sparsec ops as ONNX functions) or under the numpy
references (``reference.evaluate``), with fixed-capacity buffers whose slots beyond
the cached tokens hold garbage that must stay unread and unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsec import contract
from sparsec.errors import SparsecError


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq: int  # new tokens
    past: int  # tokens already cached
    then_decode: bool = False  # feed the presents back for one more token


CASES = (
    Case("prefill", 1, 7, 0),
    Case("decode", 2, 1, 6),
    Case("chunk into a partly filled cache", 1, 3, 5),
    Case("prefill then decode", 1, 4, 0, then_decode=True),
)
SPARE = 5  # capacity beyond what a case writes


@dataclass
class CaseResult:
    case: str
    logits_rel: float  # max |Δ logits| / max |logits|
    cache_rel: float  # the same over the cache slots written
    untouched: bool  # slots beyond the written ones kept their garbage

    def ok(self, tolerance: float) -> bool:
        return self.logits_rel <= tolerance and self.cache_rel <= tolerance and self.untouched


def _session(model):
    from sparsec.passes.functions import ort_session

    return ort_session(model)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))


def _config(model) -> contract.ModelConfig:
    from sparsec import metadata

    cfg = metadata.config(model.metadata_props, "the exported graph")
    if cfg is None:
        raise SparsecError("the exported graph has no sparsec.config metadata")
    return cfg


def compare(exported, optimized, *, engine: str = "onnxruntime", cases=CASES, seed: int = 0):
    """``[CaseResult]`` of ``optimized`` against ``exported`` (both ``onnx_ir.Model``)."""
    from sparsec.passes import reference

    cfg = _config(exported)
    layers, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    ref_session = _session(exported)
    ref_names = [o.name for o in ref_session.get_outputs()]
    if engine == "onnxruntime":
        opt_session = _session(optimized)
        opt_names = [o.name for o in opt_session.get_outputs()]

        def run_optimized(feeds):
            return dict(zip(opt_names, opt_session.run(None, feeds), strict=True))
    elif engine == "numpy":

        def run_optimized(feeds):
            return reference.evaluate(optimized, feeds)
    else:
        raise ValueError(f"unknown engine {engine!r}")

    rng = np.random.default_rng(seed)
    results = []
    for case in cases:
        b, s, p = case.batch, case.seq, case.past
        capacity = p + s + 1 + SPARE
        ids = rng.integers(0, cfg.vocab_size, (b, s + 1), dtype=np.int64)
        past = [
            rng.standard_normal((b, kv_heads, p, head_dim), dtype=np.float32)
            for _ in range(2 * layers)
        ]
        buffers = []
        for tensor in past:
            buf = rng.standard_normal((b, kv_heads, capacity, head_dim), dtype=np.float32) * 100
            buf[:, :, :p] = tensor
            buffers.append(buf)
        steps = [(ids[:, :s], p)] + ([(ids[:, s:], p + s)] if case.then_decode else [])
        logits_rel = cache_rel = 0.0
        untouched = True
        for step_ids, start in steps:
            n = step_ids.shape[1]
            positions = np.tile(np.arange(start, start + n, dtype=np.int64), (b, 1))
            feeds = {
                contract.INPUT_IDS: step_ids,
                contract.ATTENTION_MASK: np.ones((b, start + n), np.int64),
                contract.POSITION_IDS: positions,
            }
            opt_feeds = {contract.INPUT_IDS: step_ids, contract.POSITION_IDS: positions}
            for i in range(layers):
                feeds[contract.past_key(i)], feeds[contract.past_value(i)] = (
                    past[2 * i],
                    past[2 * i + 1],
                )
                opt_feeds[contract.past_key(i)] = buffers[2 * i]
                opt_feeds[contract.past_value(i)] = buffers[2 * i + 1]
            want = dict(zip(ref_names, ref_session.run(None, feeds), strict=True))
            got = run_optimized(opt_feeds)
            logits_rel = max(logits_rel, _rel(got[contract.LOGITS], want[contract.LOGITS]))
            new_past, new_buffers = [], []
            for i in range(layers):
                for j, name in enumerate((contract.present_key(i), contract.present_value(i))):
                    written = start + n
                    cache_rel = max(cache_rel, _rel(got[name][:, :, :written], want[name]))
                    before = buffers[2 * i + j]
                    untouched &= bool(
                        np.array_equal(got[name][:, :, written:], before[:, :, written:])
                    )
                    new_past.append(want[name])
                    new_buffers.append(got[name])
            past, buffers = new_past, new_buffers
        results.append(CaseResult(case.name, logits_rel, cache_rel, untouched))
    return results
