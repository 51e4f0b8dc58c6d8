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
    sequence_rows,
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
    slot = [b.load(b.gep(args, [i64(i)])) for i in range(10)]
    fptr = ir.FloatType().as_pointer()
    pool, qkv, cos, sin, out = (b.inttoptr(v, fptr) for v in slot[:5])
    caches = b.inttoptr(slot[5], fptr.as_pointer())
    positions = b.inttoptr(slot[6], I32.as_pointer())
    k_at, v_at, n = slot[7], slot[8], b.trunc(slot[9], I32)
    rows = [caches, positions, k_at, v_at, n, tid, nthreads]
    b.call(functions["rope"], [qkv, cos, sin, *rows])
    b.call(barrier, [b.bitcast(pool, pool_ptr), tid])
    b.call(functions["attn"], [qkv, out, *rows])
    b.ret_void()


def _build_attention(out_dir, s, lay, extra=None, **options):
    """The rope_kv_write ("rope") and attention ("attn") kernels of shape ``s`` and qkv
    layout ``lay`` (``options``: e.g. kv_half), and their scale."""
    heads = dict(num_heads=s["heads"], kv_num_heads=s["kv_heads"], head_dim=s["head_dim"])
    scale = 1.0 / np.sqrt(s["head_dim"])
    kernels = build_kernels(
        out_dir,
        {
            "rope": functools.partial(
                ops.emit_rope_kv_write, **heads, capacity=CAPACITY, **lay, **options
            ),
            "attn": functools.partial(
                ops.emit_attention,
                **heads,
                capacity=CAPACITY,
                scale=scale,
                qkv_stride=lay["qkv_stride"],
                q_offset=lay["q_offset"],
                **options,
            ),  # fmt: skip
        },
        extra=extra,
    )
    return kernels, scale


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request, tmp_path_factory):
    s, padded = CONFIGS[request.param]
    lay = _layout(s, padded)
    out = tmp_path_factory.mktemp(f"attention-{request.param}")
    kernels, scale = _build_attention(out, s, lay, extra=_emit_step)
    return s, lay, scale, kernels


def _shape(s):
    return s["heads"], s["kv_heads"], s["head_dim"]


def _caches(s, filled: int, seed: int, capacity: int = CAPACITY):
    """One layer's cache, keys and values [2, KVH, C, hd], whose first ``filled`` slots
    hold earlier tokens; the rest is NaN."""
    rng = np.random.default_rng(seed)
    kv = rng.standard_normal((2, s["kv_heads"], capacity, s["head_dim"]), dtype=np.float32)
    kv[:, :, filled:] = np.nan
    return kv


def int8_rows(x: np.ndarray) -> np.ndarray:
    """Float32 rows [..., hd] as an int8 cache's rows [..., hd + 4 per 32]: symmetric int8
    values (round half to even of x * 127 / max|x| over their block of 32), then one
    float32 scale max|x| / 127 per block."""
    x = x.astype(np.float32)
    hd = x.shape[-1]
    values, scales = [], []
    for lo in range(0, hd, 32):
        block = x[..., lo : lo + 32]
        peak = np.abs(block).max(-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(peak > 0, np.float32(127) / peak, np.float32(0)).astype(np.float32)
        # a NaN block keeps its NaN scale
        values.append(np.rint(np.nan_to_num(block * inv)).astype(np.int8))
        scales.append((peak / np.float32(127)).astype(np.float32).view(np.int8))
    return np.concatenate(values + scales, axis=-1)


def dequantized(rows: np.ndarray) -> np.ndarray:
    """An int8 cache's rows [..., hd + 4 per 32] back to float32 [..., hd]."""
    hd = next(h for h in range(1, rows.shape[-1]) if h + 4 * -(-h // 32) == rows.shape[-1])
    q = rows[..., :hd].astype(np.float32)
    scales = np.ascontiguousarray(rows[..., hd:]).view(np.float32)
    return q * np.repeat(scales, 32, axis=-1)[..., :hd]


CASES = [(1, 0), (1, 15), (1, 37), (5, 0), (5, 30), (20, 0), (16, 31), (9, CAPACITY - 9)]
THREADS = [1, 2, 3]


@pytest.mark.parametrize(("n", "position"), CASES)
@pytest.mark.parametrize("nthreads", THREADS)
def test_rope_kv_write(model, n, position, nthreads):
    s, lay, _, k = model
    cos, sin = rope_tables(CAPACITY, s["head_dim"])
    rng = np.random.default_rng(n * 100 + position)
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32)
    kv = _caches(s, position, seed=position)
    arrays = {"qkv": qkv, "kv": kv}
    out = assert_shares_partition(
        lambda a, tid, nt: k(
            "rope", a["qkv"], cos, sin, *sequence_rows(a["kv"], position, n), n, tid, nt
        ),
        arrays,
        ["qkv", "kv"],
        nthreads,
    )
    offsets = (lay["q_offset"], lay["k_offset"], lay["v_offset"])
    ref_qkv, ref_k, ref_v = _ref_rope_kv_write(
        qkv, cos, sin, kv[0], kv[1], position, shape=_shape(s), offsets=offsets
    )
    assert_close(out["qkv"], ref_qkv)
    # Slots outside position..position+n-1 are untouched (NaN stays NaN, history stays).
    assert_close(out["kv"][0], ref_k)
    np.testing.assert_array_equal(out["kv"][1], ref_v.astype(np.float32))


@pytest.mark.parametrize(("n", "position"), CASES)
@pytest.mark.parametrize("nthreads", THREADS)
def test_attention(model, n, position, nthreads):
    s, lay, scale, k = model
    rng = np.random.default_rng(n * 1000 + position)
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32) * 2
    kv = _caches(s, position + n, seed=position + 7)
    rows = sequence_rows(kv, position, n)
    out_cols = s["heads"] * s["head_dim"]
    arrays = {"out": np.full((n, out_cols), np.nan, np.float32)}
    out = assert_shares_partition(
        lambda a, tid, nt: k("attn", qkv, a["out"], *rows, n, tid, nt),
        arrays,
        ["out"],
        nthreads,
    )["out"]
    ref = _ref_attention(
        qkv, kv[0], kv[1], position, shape=_shape(s), q_offset=lay["q_offset"], scale=scale
    )
    assert_close(out, ref)


def test_attention_peaked_scores_are_stable(model):
    """Huge logits (one key dominating) must not overflow the softmax."""
    s, lay, scale, k = model
    n, position = 3, 40
    rng = np.random.default_rng(5)
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32) * 40
    kv = _caches(s, position + n, seed=9)
    kv[0] *= 30
    out = np.full((n, s["heads"] * s["head_dim"]), np.nan, np.float32)
    k("attn", qkv, out, *sequence_rows(kv, position, n), n, 0, 1)
    ref = _ref_attention(
        qkv, kv[0], kv[1], position, shape=_shape(s), q_offset=lay["q_offset"], scale=scale
    )
    assert np.isfinite(out).all()
    assert_close(out, ref, rtol=1e-4)


def _bind_pool(lib):
    """The native thread pool's entry points (threadpool.c) on the kernels' library."""
    lib.spc_pool_create.restype = ctypes.c_void_p
    lib.spc_pool_create.argtypes = [ctypes.c_int32]
    lib.spc_pool_run.argtypes = [ctypes.c_void_p] * 3
    lib.spc_pool_destroy.argtypes = [ctypes.c_void_p]
    return lib


@pytest.mark.parametrize("nthreads", [2, 3])
def test_prefill_then_decode_in_thread_pool(model, nthreads):
    """rope+barrier+attention run concurrently by the native pool over several steps."""
    s, lay, scale, k = model
    lib = _bind_pool(k.lib)
    cos, sin = rope_tables(CAPACITY, s["head_dim"])
    kv = _caches(s, 0, seed=1)
    ref_k, ref_v = kv[0].astype(np.float64), kv[1].astype(np.float64)
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
            caches, positions, k_at, v_at = sequence_rows(kv, position, n)
            args = np.array(
                [pool, qkv.ctypes.data, cos.ctypes.data, sin.ctypes.data, out.ctypes.data,
                 caches.ctypes.data, positions.ctypes.data, k_at, v_at, n], np.uint64,
            )  # fmt: skip
            lib.spc_pool_run(pool, k.address("step"), args.ctypes.data)
            assert_close(out, ref_out)
            assert_close(kv[0][:, : position + n], ref_k[:, : position + n])
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


def _attention_alone(out_dir, s, capacity: int, **options):
    """The attention kernel of shape ``s`` over a fused [q | k | v] row, on its own."""
    lay = _layout(s, padded=False)
    return build_kernels(
        out_dir,
        {
            "attn": functools.partial(
                ops.emit_attention,
                num_heads=s["heads"],
                kv_num_heads=s["kv_heads"],
                head_dim=s["head_dim"],
                capacity=capacity,
                scale=1.0 / np.sqrt(s["head_dim"]),
                qkv_stride=lay["qkv_stride"],
                q_offset=0,
                **options,
            )  # fmt: skip
        },
    )


@pytest.mark.parametrize("shape", ["tiny", "smollm2"])
def test_attention_long_context(shape, tmp_path):
    """Hundreds of keys: many L1 chunks, every head of a group sharing them."""
    s, _ = CONFIGS[shape]
    lay = _layout(s, padded=False)
    capacity, position, n = 1100, 1000, 3
    scale = 1.0 / np.sqrt(s["head_dim"])
    k = _attention_alone(tmp_path, s, capacity)
    rng = np.random.default_rng(3)
    kv = _caches(s, position + n, seed=3, capacity=capacity)
    rows = sequence_rows(kv, position, n)
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32) * 3
    ref = _ref_attention(qkv, kv[0], kv[1], position, shape=_shape(s), q_offset=0, scale=scale)
    for nthreads in (1, 2):
        out = np.full((n, s["heads"] * s["head_dim"]), np.nan, np.float32)
        for tid in range(nthreads):
            k("attn", qkv, out, *rows, n, tid, nthreads)
        assert_close(out, ref)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("window", [None, 300])
def test_attention_over_many_segments(dtype, window, tmp_path):
    """A thousand keys in many segments (64 keys each at SmolLM2's head size), with a
    sliding window whose oldest key falls inside a segment: float32 caches are read in
    place, float16 ones widened (int8 ones dequantized) once per segment into the
    staging rows that every head of the group reads. Slots no query may read (past the
    newest key, before every window) hold NaN, so reading one would show. Ablation: the
    same rows without the window answer differently."""
    s, _ = CONFIGS["smollm2"]
    lay = _layout(s, padded=False)
    capacity, position, n = 1100, 1000, 3
    scale = 1.0 / np.sqrt(s["head_dim"])

    def kernel(options, name):
        (tmp_path / name).mkdir()
        return _attention_alone(tmp_path / name, s, capacity, **options)

    rng = np.random.default_rng(11)
    kv = _caches(s, position + n, seed=11, capacity=capacity)
    if window is not None:
        kv[:, :, : position - window + 1] = np.nan
    store = {"float32": lambda x: x, "float16": lambda x: x.astype(np.float16)}.get(
        dtype, int8_rows
    )
    read = dequantized if dtype == "int8" else lambda c: c.astype(np.float32)
    cache = store(kv)
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32) * 3
    want = _ref_attention(
        qkv, read(cache[0]), read(cache[1]), position, shape=_shape(s), q_offset=0,
        scale=scale, window=window,
    )  # fmt: skip
    kv_option = {"float16": {"kv_half": True}, "int8": {"kv_int8": True}}.get(dtype, {})
    options = kv_option | ({"window": window} if window else {})
    k = kernel(options, "w")
    caches = np.full(n, cache.ctypes.data, np.uint64)
    positions = np.arange(position, position + n, dtype=np.int32)
    for nthreads in (1, 2):
        out = np.full((n, s["heads"] * s["head_dim"]), np.nan, np.float32)
        for tid in range(nthreads):
            k("attn", qkv, out, caches, positions, 0, cache[0].size, n, tid, nthreads)
        assert_close(out, want, rtol=1e-4)
    if window is not None:
        cache = store(_caches(s, position + n, seed=11, capacity=capacity))
        caches = np.full(n, cache.ctypes.data, np.uint64)
        plain = kernel(kv_option, "p")
        out = np.zeros((n, s["heads"] * s["head_dim"]), np.float32)
        plain("attn", qkv, out, caches, positions, 0, cache[0].size, n, 0, 1)
        assert np.abs(out - want).max() > 1e-3


@pytest.mark.parametrize("nthreads", [1, 3])
def test_rows_of_several_sequences_in_one_step(model, nthreads):
    """A batched step: each row has its own cache and position (two sequences decoding
    at different lengths, a third prefilling two tokens); every row's output and cache
    writes equal that sequence run alone. Ablation: one shared cache (the single-sequence
    step) answers differently."""
    s, lay, scale, k = model
    lib = _bind_pool(k.lib)
    cos, sin = rope_tables(CAPACITY, s["head_dim"])
    filled = [5, 17, 0]
    caches = [_caches(s, f, seed=20 + i) for i, f in enumerate(filled)]
    rows = [(0, 5), (1, 17), (2, 0), (2, 1)]  # (sequence, position)
    n = len(rows)
    rng = np.random.default_rng(4)
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32)
    offsets = (lay["q_offset"], lay["k_offset"], lay["v_offset"])

    def expected(kvs):
        out = np.zeros((n, s["heads"] * s["head_dim"]))
        for seq in range(len(kvs)):
            mine = [i for i, (q, _) in enumerate(rows) if q == seq]
            if not mine:
                continue
            position = rows[mine[0]][1]
            ref_qkv, ref_k, ref_v = _ref_rope_kv_write(
                qkv[mine], cos, sin, kvs[seq][0], kvs[seq][1], position, shape=_shape(s),
                offsets=offsets,
            )  # fmt: skip
            out[mine] = _ref_attention(
                ref_qkv, ref_k, ref_v, position, shape=_shape(s), q_offset=lay["q_offset"],
                scale=scale,
            )  # fmt: skip
        return out

    def run(which):
        kvs = [c.copy() for c in caches]
        out = np.full((n, s["heads"] * s["head_dim"]), np.nan, np.float32)
        pointers = np.array([kvs[which(q)].ctypes.data for q, _ in rows], np.uint64)
        positions = np.array([p for _, p in rows], np.int32)
        step_qkv = qkv.copy()
        args = np.array(
            [pool, step_qkv.ctypes.data, cos.ctypes.data, sin.ctypes.data, out.ctypes.data,
             pointers.ctypes.data, positions.ctypes.data, 0, kvs[0][0].size, n], np.uint64,
        )  # fmt: skip
        lib.spc_pool_run(pool, k.address("step"), args.ctypes.data)
        return out, kvs

    pool = lib.spc_pool_create(nthreads)
    try:
        out, kvs = run(lambda q: q)
        assert_close(out, expected(caches))
        for seq, (kv, f) in enumerate(zip(kvs, filled, strict=True)):
            written = f + sum(1 for q, _ in rows if q == seq)
            np.testing.assert_array_equal(np.isnan(kv[:, :, written:]), True)
            assert not np.isnan(kv[:, :, :written]).any()
        shared, _ = run(lambda q: 0)
        assert not np.allclose(shared, expected(caches), atol=1e-3, equal_nan=True)
    finally:
        lib.spc_pool_destroy(pool)


def _rope_then_attend(k, qkv, cos, sin, cache, position: int, out_width: int):
    """Rows qkv of one sequence from ``position`` through kernels "rope" then "attn" (two
    threads' shares each) on ``cache``, one layer's keys then values in the cache's
    element type; returns the attention output."""
    n = qkv.shape[0]
    x, out = qkv.copy(), np.full((n, out_width), np.nan, np.float32)
    positions = np.arange(position, position + n, dtype=np.int32)
    caches = np.full(n, cache.ctypes.data, np.uint64)
    v_at = cache[0].size  # in the cache's elements
    for tid in range(2):
        k("rope", x, cos, sin, caches, positions, 0, v_at, n, tid, 2)
    for tid in range(2):
        k("attn", x, out, caches, positions, 0, v_at, n, tid, 2)
    return out


@pytest.mark.parametrize("shape", ["tiny", "smollm2"])
@pytest.mark.parametrize(("n", "position"), [(1, 37), (5, 30), (16, 31)])
def test_float16_kv_cache(shape, n, position, tmp_path):
    """``kv_half``: keys and values are stored as float16 and read back widened; the
    output equals attention over the float16-rounded cache. Ablation: the float32
    kernels on the same history answer attention over the unrounded cache, which the
    half-precision answer is measurably not."""
    s, _ = CONFIGS[shape]
    lay = _layout(s, padded=False)

    def kernels(half):
        out = tmp_path / f"half{half}"
        out.mkdir()
        options = {"kv_half": True} if half else {}
        return _build_attention(out, s, lay, **options)[0]

    scale = 1.0 / np.sqrt(s["head_dim"])
    cos, sin = rope_tables(CAPACITY, s["head_dim"])
    rng = np.random.default_rng(n + position)
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32)
    history32 = _caches(s, position, seed=position)
    history = history32.astype(np.float16)
    offsets = (lay["q_offset"], lay["k_offset"], lay["v_offset"])
    ref_qkv, ref_k, ref_v = _ref_rope_kv_write(
        qkv, cos, sin, history[0], history[1], position, shape=_shape(s), offsets=offsets
    )
    written = slice(position, position + n)
    k16, v16 = ref_k.astype(np.float16), ref_v.astype(np.float16)
    want = _ref_attention(
        ref_qkv, k16, v16, position, shape=_shape(s), q_offset=lay["q_offset"], scale=scale
    )

    def run(k, cache):
        return _rope_then_attend(k, qkv, cos, sin, cache, position, s["heads"] * s["head_dim"])

    half = history.copy()
    out = run(kernels(True), half)
    np.testing.assert_allclose(half[0][:, written], k16[:, written].astype(np.float32), rtol=1e-3)
    np.testing.assert_array_equal(half[1][:, written], v16[:, written])
    assert_close(out, want, rtol=1e-4)
    exact = run(kernels(False), history32.copy())
    assert np.abs(exact - want).max() > 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("shape", ["tiny", "smollm2"])
@pytest.mark.parametrize(("n", "position"), [(1, 37), (5, 30), (16, 31), (3, 150)])
def test_int8_kv_cache(shape, n, position, tmp_path):
    """``kv_int8``: each new key (after RoPE) and value row is written as int8 values and
    a scale per 32, and attention reads the dequantized rows: the output equals attention
    over the int8-rounded cache, the written rows equal numpy's quantization (values
    within 1 where a product rounds on a .5), and rows past the newest are never read
    (their scales are NaN). Ablation: the float32 kernels on the same history answer
    attention over the unrounded cache, which the int8 answer is measurably not."""
    s, _ = CONFIGS[shape]
    lay = _layout(s, padded=False)
    capacity = 200
    heads = dict(num_heads=s["heads"], kv_num_heads=s["kv_heads"], head_dim=s["head_dim"])
    scale = 1.0 / np.sqrt(s["head_dim"])
    rope = dict(k_offset=lay["k_offset"], v_offset=lay["v_offset"])
    kernels = {}
    for name, options in (("int8", {"kv_int8": True}), ("f32", {})):
        (tmp_path / name).mkdir()
        kernels[name] = build_kernels(
            tmp_path / name,
            {
                "rope": functools.partial(
                    ops.emit_rope_kv_write, **heads, capacity=capacity,
                    qkv_stride=lay["qkv_stride"], q_offset=0, **rope, **options,
                ),
                "attn": functools.partial(
                    ops.emit_attention, **heads, capacity=capacity, scale=scale,
                    qkv_stride=lay["qkv_stride"], q_offset=0, **options,
                ),
            },
        )  # fmt: skip
    cos, sin = rope_tables(capacity, s["head_dim"])
    rng = np.random.default_rng(n + position)
    qkv = rng.standard_normal((n, lay["qkv_stride"]), dtype=np.float32)
    history32 = _caches(s, position, seed=position, capacity=capacity)
    cache8 = int8_rows(np.nan_to_num(history32))
    cache8[:, :, position:, s["head_dim"] :] = -1  # every scale's bytes 0xff: NaN
    offsets = (lay["q_offset"], lay["k_offset"], lay["v_offset"])
    history = dequantized(cache8)
    ref_qkv, ref_k, ref_v = _ref_rope_kv_write(
        qkv, cos, sin, history[0], history[1], position, shape=_shape(s), offsets=offsets
    )
    written = slice(position, position + n)
    new_rows = int8_rows(np.stack([ref_k[:, written], ref_v[:, written]]))
    k8, v8 = ref_k.copy(), ref_v.copy()
    k8[:, written], v8[:, written] = dequantized(new_rows[0]), dequantized(new_rows[1])
    want = _ref_attention(
        ref_qkv, k8, v8, position, shape=_shape(s), q_offset=lay["q_offset"], scale=scale
    )

    def run(k, cache):
        return _rope_then_attend(k, qkv, cos, sin, cache, position, s["heads"] * s["head_dim"])

    cache = cache8.copy()
    out = run(kernels["int8"], cache)
    got_rows = cache[:, :, written]
    hd = s["head_dim"]
    assert np.abs(got_rows[..., :hd].astype(int) - new_rows[..., :hd]).max() <= 1
    np.testing.assert_allclose(dequantized(got_rows), dequantized(new_rows), atol=0.02)
    assert_close(out, want, rtol=1e-3)
    history32[:, :, position:] = np.nan
    exact = run(kernels["f32"], np.ascontiguousarray(history32))
    assert np.abs(exact - want).max() > 1e-3 * np.abs(want).max()
