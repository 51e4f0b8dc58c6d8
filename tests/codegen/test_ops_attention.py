"""RoPE + KV-cache write and grouped-query causal attention, alone and in a thread pool."""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import pytest
from llvmlite import ir
from test_ops_support import (
    ODD,
    SMOLLM2,
    TINY,
    _ref_attention,
    _ref_rope_kv_write,
    assert_close,
    assert_shares_partition,
    build_kernels,
    rope_tables,
)

from sparsec.codegen import ops
from sparsec.codegen.irbuild import I32, I64, VOID, i64
from sparsec.errors import SparsecError

CAPACITY = 80


def _layout(s, padded: bool):
    """qkv column layout: fused [q | k | v], or v first with padding columns around."""
    q_cols, kv_cols = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    if not padded:
        return dict(qkv_stride=q_cols + 2 * kv_cols, q_offset=0, k_offset=q_cols,
                    v_offset=q_cols + kv_cols)  # fmt: skip
    return dict(qkv_stride=q_cols + 2 * kv_cols + 7, q_offset=kv_cols + 3,
                k_offset=q_cols + kv_cols + 5, v_offset=1)  # fmt: skip


CONFIGS = {
    "tiny": (TINY, False),
    "smollm2": (SMOLLM2, False),
    "odd-padded": (ODD, True),
}


def _emit_step(module, functions):
    """step(i64* args, tid, nthreads): rope_kv_write; spc_barrier; attention — one
    decoder layer's attention part as the lowering would emit it."""
    pool_ptr = ir.IntType(8).as_pointer()
    barrier = ir.Function(module, ir.FunctionType(VOID, [pool_ptr, I32]), "spc_barrier")
    fn = ir.Function(module, ir.FunctionType(VOID, [I64.as_pointer(), I32, I32]), "step")
    args, tid, nthreads = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    slot = [b.load(b.gep(args, [i64(i)])) for i in range(9)]
    fptr = ir.FloatType().as_pointer()
    pool, qkv, cos, sin, kc, vc, out = (b.inttoptr(v, fptr) for v in slot[:7])
    position, n = b.trunc(slot[7], I32), b.trunc(slot[8], I32)
    b.call(functions["rope"], [qkv, cos, sin, kc, vc, position, n, tid, nthreads])
    b.call(barrier, [b.bitcast(pool, pool_ptr), tid])
    b.call(functions["attn"], [qkv, kc, vc, out, position, n, tid, nthreads])
    b.ret_void()


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request, tmp_path_factory):
    s, padded = CONFIGS[request.param]
    lay = _layout(s, padded)
    heads = dict(num_heads=s["heads"], kv_num_heads=s["kv_heads"], head_dim=s["head_dim"])
    scale = 1.0 / np.sqrt(s["head_dim"])
    kernels = build_kernels(
        tmp_path_factory.mktemp(f"attention-{request.param}"),
        {
            "rope": functools.partial(ops.emit_rope_kv_write, **heads, capacity=CAPACITY, **lay),
            "attn": functools.partial(
                ops.emit_attention,
                **heads,
                capacity=CAPACITY,
                scale=scale,
                qkv_stride=lay["qkv_stride"],
                q_offset=lay["q_offset"],
            ),  # fmt: skip
        },
        extra=_emit_step,
    )
    return s, lay, scale, kernels


def _shape(s):
    return s["heads"], s["kv_heads"], s["head_dim"]


def _caches(s, filled: int, seed: int):
    """Caches whose first ``filled`` slots hold earlier tokens; the rest is NaN."""
    rng = np.random.default_rng(seed)
    shape = (s["kv_heads"], CAPACITY, s["head_dim"])
    k, v = (
        rng.standard_normal(shape, dtype=np.float32),
        rng.standard_normal(shape, dtype=np.float32),
    )
    k[:, filled:] = np.nan
    v[:, filled:] = np.nan
    return k, v


CASES = [(1, 0), (1, 15), (1, 37), (5, 0), (5, 30), (20, 0), (16, 31), (9, CAPACITY - 9)]
THREADS = [1, 2, 3]


@pytest.mark.parametrize(("n", "position"), CASES)
@pytest.mark.parametrize("nthreads", THREADS)
def test_rope_kv_write(model, n, position, nthreads):
    s, lay, _, k = model
    cos, sin = rope_tables(CAPACITY, s["head_dim"])
    rng = np.random.default_rng(n * 100 + position)
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32)
    k_cache, v_cache = _caches(s, position, seed=position)
    arrays = {"qkv": qkv, "k": k_cache, "v": v_cache}
    out = assert_shares_partition(
        lambda a, tid, nt: k("rope", a["qkv"], cos, sin, a["k"], a["v"], position, n, tid, nt),
        arrays,
        ["qkv", "k", "v"],
        nthreads,
    )
    offsets = (lay["q_offset"], lay["k_offset"], lay["v_offset"])
    ref_qkv, ref_k, ref_v = _ref_rope_kv_write(
        qkv, cos, sin, k_cache, v_cache, position, shape=_shape(s), offsets=offsets
    )
    assert_close(out["qkv"], ref_qkv)
    # Slots outside position..position+n-1 are untouched (NaN stays NaN, history stays).
    assert_close(out["k"], ref_k)
    np.testing.assert_array_equal(out["v"], ref_v.astype(np.float32))


@pytest.mark.parametrize(("n", "position"), CASES)
@pytest.mark.parametrize("nthreads", THREADS)
def test_attention(model, n, position, nthreads):
    s, lay, scale, k = model
    rng = np.random.default_rng(n * 1000 + position)
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32) * 2
    k_cache, v_cache = _caches(s, position + n, seed=position + 7)
    out_cols = s["heads"] * s["head_dim"]
    arrays = {"out": np.full((n, out_cols), np.nan, np.float32)}
    out = assert_shares_partition(
        lambda a, tid, nt: k("attn", qkv, k_cache, v_cache, a["out"], position, n, tid, nt),
        arrays,
        ["out"],
        nthreads,
    )["out"]
    ref = _ref_attention(
        qkv, k_cache, v_cache, position, shape=_shape(s), q_offset=lay["q_offset"], scale=scale
    )
    assert_close(out, ref)


def test_attention_peaked_scores_are_stable(model):
    """Huge logits (one key dominating) must not overflow the softmax."""
    s, lay, scale, k = model
    n, position = 3, 40
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32) * 40
    k_cache, v_cache = _caches(s, position + n, seed=9)
    k_cache *= 30
    out = np.full((n, s["heads"] * s["head_dim"]), np.nan, np.float32)
    k("attn", qkv, k_cache, v_cache, out, position, n, 0, 1)
    ref = _ref_attention(
        qkv, k_cache, v_cache, position, shape=_shape(s), q_offset=lay["q_offset"], scale=scale
    )
    assert np.isfinite(out).all()
    assert_close(out, ref, rtol=1e-4)


@pytest.mark.parametrize("nthreads", [2, 3])
def test_prefill_then_decode_in_thread_pool(model, nthreads):
    """rope+barrier+attention run concurrently by the native pool over several steps."""
    s, lay, scale, k = model
    lib = k.lib
    lib.spc_pool_create.restype = ctypes.c_void_p
    lib.spc_pool_create.argtypes = [ctypes.c_int32]
    lib.spc_pool_run.argtypes = [ctypes.c_void_p] * 3
    lib.spc_pool_destroy.argtypes = [ctypes.c_void_p]
    cos, sin = rope_tables(CAPACITY, s["head_dim"])
    k_cache, v_cache = _caches(s, 0, seed=1)
    ref_k, ref_v = k_cache.astype(np.float64), v_cache.astype(np.float64)
    rng = np.random.default_rng(2)
    pool = lib.spc_pool_create(nthreads)
    try:
        position = 0
        for n in [7, 1, 1, 4, 1]:
            qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32)
            out = np.full((n, s["heads"] * s["head_dim"]), np.nan, np.float32)
            ref_qkv, ref_k, ref_v = _ref_rope_kv_write(
                qkv, cos, sin, ref_k, ref_v, position, shape=_shape(s),
                offsets=(lay["q_offset"], lay["k_offset"], lay["v_offset"]),
            )  # fmt: skip
            ref_out = _ref_attention(
                ref_qkv, ref_k, ref_v, position, shape=_shape(s), q_offset=lay["q_offset"],
                scale=scale,
            )  # fmt: skip
            args = np.array(
                [pool, qkv.ctypes.data, cos.ctypes.data, sin.ctypes.data, k_cache.ctypes.data,
                 v_cache.ctypes.data, out.ctypes.data, position, n], np.uint64,
            )  # fmt: skip
            lib.spc_pool_run(pool, k.address("step"), args.ctypes.data)
            assert_close(out, ref_out)
            assert_close(k_cache[:, : position + n], ref_k[:, : position + n])
            position += n
    finally:
        lib.spc_pool_destroy(pool)


def test_bad_head_config_is_rejected():
    with pytest.raises(SparsecError, match="not a multiple of kv_num_heads"):
        ops.emit_attention(ir.Module(), "a", num_heads=9, kv_num_heads=2, head_dim=64,
                           capacity=8, scale=0.125, qkv_stride=1, q_offset=0)  # fmt: skip
    with pytest.raises(SparsecError, match="rotary_dim=7 must be even"):
        ops.emit_rope_kv_write(ir.Module(), "r", num_heads=2, kv_num_heads=1, head_dim=7,
                               capacity=8, qkv_stride=28, q_offset=0, k_offset=14,
                               v_offset=21)  # fmt: skip


@pytest.mark.parametrize("shape", ["tiny", "smollm2"])
def test_attention_long_context(shape, tmp_path):
    """Hundreds of keys: many L1 chunks, every head of a group sharing them."""
    s, _ = CONFIGS[shape]
    lay = _layout(s, padded=False)
    capacity, position, n = 1100, 1000, 3
    scale = 1.0 / np.sqrt(s["head_dim"])
    k = build_kernels(
        tmp_path,
        {
            "attn": functools.partial(
                ops.emit_attention,
                num_heads=s["heads"],
                kv_num_heads=s["kv_heads"],
                head_dim=s["head_dim"],
                capacity=capacity,
                scale=scale,
                qkv_stride=lay["qkv_stride"],
                q_offset=0,
            )  # fmt: skip
        },
    )
    rng = np.random.default_rng(3)
    cache_shape = (s["kv_heads"], capacity, s["head_dim"])
    k_cache = rng.standard_normal(cache_shape, dtype=np.float32)
    v_cache = rng.standard_normal(cache_shape, dtype=np.float32)
    k_cache[:, position + n :] = np.nan
    v_cache[:, position + n :] = np.nan
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32) * 3
    ref = _ref_attention(qkv, k_cache, v_cache, position, shape=_shape(s), q_offset=0, scale=scale)
    for nthreads in (1, 2):
        out = np.full((n, s["heads"] * s["head_dim"]), np.nan, np.float32)
        for tid in range(nthreads):
            k("attn", qkv, k_cache, v_cache, out, position, n, tid, nthreads)
        assert_close(out, ref)
