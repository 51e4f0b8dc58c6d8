"""Shared helpers for the op kernel tests: build and call kernels, numpy references.

(Named test_ops_* to live with the op tests; it defines no tests itself.)
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import numpy as np
from llvmlite import ir

from sparsec.codegen import target

NATIVE = Path(__file__).resolve().parents[2] / "sparsec" / "codegen" / "native"
THREADPOOL_C = NATIVE / "threadpool.c"

# Model shapes the kernels are tested at.
TINY = dict(dim=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=256)
SMOLLM2 = dict(dim=576, heads=9, kv_heads=3, head_dim=64, ffn=1536, vocab=49152)
# Odd sizes: every dimension needs the 8/4/1-wide tail code.
ODD = dict(dim=45, heads=6, kv_heads=3, head_dim=10, ffn=37, vocab=19)


class Kernels:
    """Kernels of one compiled module, callable with numpy arrays and ints."""

    def __init__(self, lib: ctypes.CDLL, functions: dict[str, ir.Function]):
        self.lib = lib
        self.functions = functions

    def __call__(self, name: str, *args) -> None:
        fn = self.functions[name]
        assert len(args) == len(fn.args), f"{name} takes {len(fn.args)} args"
        c_args = []
        for value, param in zip(args, fn.args, strict=True):
            if isinstance(param.type, ir.PointerType):
                assert isinstance(value, np.ndarray) and value.flags.c_contiguous
                c_args.append(ctypes.c_void_p(value.ctypes.data))
            elif param.type.width == 64:
                c_args.append(ctypes.c_int64(int(value)))
            else:
                c_args.append(ctypes.c_int32(int(value)))
        getattr(self.lib, name)(*c_args)

    def address(self, name: str) -> int:
        return ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value


def sequence_rows(kv: np.ndarray, position: int, n: int):
    """The per-row arguments of the attention kernels for ``n`` rows of one sequence at
    ``position..``, whose cache ``kv`` is one layer's keys and values, [2, KVH, C, hd]:
    (caches, positions, k_at, v_at)."""
    assert kv.flags.c_contiguous and kv.dtype == np.float32
    positions = np.arange(position, position + n, dtype=np.int32)
    caches = np.full(n, kv.ctypes.data, np.uint64)
    return caches, positions, 0, kv[0].size


def build_kernels(
    out_dir: Path, emitters: dict[str, Callable[[ir.Module, str], ir.Function]], extra=None
) -> Kernels:
    """Emit ``emitters`` (name -> emit(module, name)) into one module, compile, load."""
    module = ir.Module(name="ops_test")
    functions = {name: emit(module, name) for name, emit in emitters.items()}
    if extra is not None:
        extra(module, functions)
    path = target.build_library(module, [THREADPOOL_C], out=out_dir / "kernels.so")
    return Kernels(target.load_library(path), functions)


def run_all_threads(call: Callable[[int, int], None], nthreads: int) -> None:
    """Run a kernel's shares one after another (tid 0..nthreads-1), as a pool would."""
    for tid in range(nthreads):
        call(tid, nthreads)


def _changed(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    same = (new == old) | (np.isnan(new) & np.isnan(old))
    return ~same


def assert_shares_partition(
    call: Callable[[dict[str, np.ndarray], int, int], None],
    arrays: dict[str, np.ndarray],
    outputs: list[str],
    nthreads: int,
) -> dict[str, np.ndarray]:
    """Check that each tid writes a disjoint part and all tids together write everything.

    ``call(arrays, tid, nthreads)`` runs one share on the given arrays. Returns the
    arrays after all shares ran (in tid order) for comparison with a reference.
    """
    full = {k: v.copy() for k, v in arrays.items()}
    run_all_threads(lambda tid, nt: call(full, tid, nt), nthreads)
    counts = {k: np.zeros(arrays[k].shape, np.int32) for k in outputs}
    for tid in range(nthreads):
        alone = {k: v.copy() for k, v in arrays.items()}
        call(alone, tid, nthreads)
        for k in outputs:
            counts[k] += _changed(alone[k], arrays[k])
    for k in outputs:
        assert counts[k].max(initial=0) <= 1, f"{k}: threads overlap"
        np.testing.assert_array_equal(
            counts[k], _changed(full[k], arrays[k]), err_msg=f"{k}: shares incomplete"
        )
    return full


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5) -> None:
    """Relative tolerance, with an absolute floor scaled to the data (values near 0)."""
    scale = float(np.nanmax(np.abs(expected))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------- numpy references


def _ref_embedding(table: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    return table[tokens]


def _ref_rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _ref_silu_mul(gu: np.ndarray, ffn: int) -> np.ndarray:
    g, u = gu[:, :ffn].astype(np.float64), gu[:, ffn:].astype(np.float64)
    return g / (1.0 + np.exp(-g)) * u


def rope_tables(max_pos: int, head_dim: int, theta: float = 10000.0):
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(max_pos, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _ref_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: [n, heads, hd]; cos, sin: [n, hd/2] (the rows of each token's position)."""
    half = x.shape[-1] // 2
    x = x.astype(np.float64)
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _ref_rope_kv_write(qkv, cos, sin, k_cache, v_cache, position, *, shape, offsets):
    """Returns (qkv, k_cache, v_cache) after the kernel, in float64."""
    heads, kv_heads, hd = shape
    q_off, k_off, v_off = offsets
    n = qkv.shape[0]
    pos = position + np.arange(n)
    qkv, k_cache, v_cache = (a.astype(np.float64) for a in (qkv, k_cache, v_cache))
    q = qkv[:, q_off : q_off + heads * hd].reshape(n, heads, hd)
    k = qkv[:, k_off : k_off + kv_heads * hd].reshape(n, kv_heads, hd)
    v = qkv[:, v_off : v_off + kv_heads * hd].reshape(n, kv_heads, hd)
    q, k = _ref_rope(q, cos[pos], sin[pos]), _ref_rope(k, cos[pos], sin[pos])
    qkv[:, q_off : q_off + heads * hd] = q.reshape(n, -1)
    qkv[:, k_off : k_off + kv_heads * hd] = k.reshape(n, -1)
    k_cache[:, pos] = k.transpose(1, 0, 2)
    v_cache[:, pos] = v.transpose(1, 0, 2)
    return qkv, k_cache, v_cache


def _ref_attention(qkv, k_cache, v_cache, position, *, shape, q_offset, scale, window=None):
    heads, kv_heads, hd = shape
    n = qkv.shape[0]
    group = heads // kv_heads
    q = qkv[:, q_offset : q_offset + heads * hd].reshape(n, heads, hd).astype(np.float64)
    out = np.zeros((n, heads, hd))
    for i in range(n):
        p = position + i
        lo = 0 if window is None else max(0, p - window + 1)
        for h in range(heads):
            keys = k_cache[h // group, lo : p + 1].astype(np.float64)
            values = v_cache[h // group, lo : p + 1].astype(np.float64)
            s = scale * keys @ q[i, h]
            w = np.exp(s - s.max())
            out[i, h] = w @ values / w.sum()
    return out.reshape(n, heads * hd)
