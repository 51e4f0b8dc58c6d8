"""The op kernels of the OPT, GPT-2, MPT and Gemma 2/3 families: LayerNorm (plain and
fused with the residual add, with and without bias), in-place ReLU/GELU activations,
GeGLU, learned position embeddings, soft-capping, vector erf/tanh, RoPE-less KV-cache
writes, and attention with ALiBi and/or soft-capped scores.

Every kernel runs on each ISA this CPU has (the ``isa`` fixture) against a float64
numpy reference, over several token counts and thread counts (each tid's share run in
turn); every option has an ablation (the kernel without it gives another answer).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from isa_helpers import host_target_or_skip
from llvmlite import ir
from test_ops_support import Kernels, assert_close, assert_shares_partition

from sparsec.codegen import irbuild, ops, target, vmath
from sparsec.codegen.irbuild import FPTR, I64, kernel_function, load, ptr_add, store
from sparsec.errors import SparsecError

p = functools.partial
DIMS = [64, 72, 100]
NS = [1, 3, 17]
THREADS = [1, 2]
EPS = 1e-5
EMBED_SCALE = 45.25  # Gemma 2B: sqrt(2048); any finite factor
CAP = 30.0
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _build(isa, emitters: dict) -> Kernels:
    """Emit ``emitters`` (name -> emit(module, name, isa=...)) for ``isa``, compile, load."""
    tgt = host_target_or_skip(isa)
    module = ir.Module(name="families_test")
    functions = {name: emit(module, name, isa=isa) for name, emit in emitters.items()}
    return Kernels(target.build_and_load(module, target=tgt), functions)


# ----------------------------------------------------------------- float64 references


def ref_layernorm(x, w, b, eps):
    x = x.astype(np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * w
    return y if b is None else y + b


def ref_gelu(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def ref_gelu_tanh(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


REF_ACT = {"relu": lambda x: np.maximum(x.astype(np.float64), 0.0), "gelu": ref_gelu,
           "gelu_tanh": ref_gelu_tanh}  # fmt: skip


def assert_act_close(y, ref, x):
    """The activations' bound: |error| <= 2e-6 * max(1, |x|)."""
    err = np.abs(y.astype(np.float64) - ref) / np.maximum(1.0, np.abs(x.astype(np.float64)))
    assert err.max() <= 2e-6, (err.max(), x.flat[err.argmax()])


# ----------------------------------------------------------------- row kernels


def _emit_map(op):
    """void name(const float* x, float* y, i32 count): y = op(x) a vector at a time."""

    def emit(module, name, *, isa):
        lanes = isa.lanes_f32
        fn = kernel_function(module, name, [FPTR, FPTR, irbuild.I32])
        x, y, count = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        with irbuild.loop(b, irbuild.i64(0), b.sext(count, I64), lanes) as i:
            store(b, op(b, load(b, ptr_add(b, x, i), lanes)), ptr_add(b, y, i))
        b.ret_void()
        return fn

    return emit


def _emit_scalar_map(op):
    def emit(module, name, *, isa):
        fn = kernel_function(module, name, [FPTR, FPTR, irbuild.I32])
        x, y, count = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        with irbuild.loop(b, irbuild.i64(0), b.sext(count, I64)) as i:
            b.store(op(b, b.load(ptr_add(b, x, i))), ptr_add(b, y, i))
        b.ret_void()
        return fn

    return emit


def _stride(dim):
    return dim + 5  # rows with padding: the kernels must leave it alone


@pytest.fixture(scope="module")
def k(isa):
    emitters = {
        "erf": _emit_map(vmath.verf),
        "tanh": _emit_map(vmath.vtanh),
        "erf1": _emit_scalar_map(vmath.verf),
        "tanh1": _emit_scalar_map(vmath.vtanh),
    }
    for dim in DIMS:
        for residual in (False, True):
            for bias in (False, True):
                emitters[f"ln{dim}_{residual}_{bias}"] = p(
                    ops.emit_layernorm, dim=dim, eps=EPS, residual=residual, bias=bias
                )
        for kind in REF_ACT:
            emitters[f"{kind}{dim}"] = p(
                ops.emit_activation, dim=dim, stride=_stride(dim), kind=kind
            )
        emitters[f"scale{dim}"] = p(
            ops.emit_scale, dim=dim, stride=_stride(dim), factor=EMBED_SCALE
        )
        emitters[f"cap{dim}"] = p(ops.emit_softcap, dim=dim, stride=_stride(dim), cap=CAP)
        for act in ("silu", "gelu_tanh", "gelu"):
            emitters[f"glu_{act}{dim}"] = p(ops.emit_swiglu_act, ffn_dim=dim, activation=act)
    return _build(isa, emitters)


def _map(k, name, x):
    x = np.ascontiguousarray(x, np.float32)
    pad = (-x.size) % 16
    xp = np.concatenate([x, np.zeros(pad, np.float32)])
    y = np.empty_like(xp)
    k(name, xp, y, xp.size)
    return y[: x.size]


def _wide_inputs():
    return np.concatenate([
        np.linspace(-12, 12, 96_001),
        np.random.default_rng(0).standard_normal(20_000) * 3,
        np.geomspace(1e-30, 1.0, 2000),
        -np.geomspace(1e-30, 1.0, 2000),
        [0.0, -0.0, 0.625, -0.625, 0.9296875, -0.9296875, 3.99, 4.0, 4.01, 9.0, 30.0, 1e4],
    ]).astype(np.float32)  # fmt: skip


def test_erf_and_tanh_are_accurate_to_about_an_ulp(k):
    x = _wide_inputs()
    xd = x.astype(np.float64)
    for names, ref in ((("erf", "erf1"), _erf(xd)), (("tanh", "tanh1"), np.tanh(xd))):
        ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
        ulp = np.maximum(ulp, 2.0**-149)
        for name in names:
            y = _map(k, name, x)
            assert (np.abs(y - ref) / ulp).max() <= 2.0, (name, x[np.argmax(np.abs(y - ref) / ulp)])
    big = np.array([10.0, 50.0, 1e30, np.inf], np.float32)
    for name in ("erf", "tanh"):
        np.testing.assert_array_equal(_map(k, name, big), 1.0)
        np.testing.assert_array_equal(_map(k, name, -big), -1.0)
        tiny = np.array([1e-38, -1e-20, 0.0], np.float32)
        got = _map(k, name, tiny)
        scale = 2 / math.sqrt(math.pi) if name == "erf" else 1.0
        np.testing.assert_allclose(got, tiny.astype(np.float64) * scale, rtol=2e-7)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kind", list(REF_ACT))
def test_activation_over_the_whole_range(k, kind, dim):
    x = _wide_inputs()
    rows = -(-x.size // dim)
    xs = np.zeros((rows, _stride(dim)), np.float32)
    xs[:, :dim].flat[: x.size] = x
    xs[:, dim:] = np.nan  # the padding between rows must stay untouched
    y = xs.copy()
    k(f"{kind}{dim}", y, rows, 0, 1)
    assert np.isnan(y[:, dim:]).all()
    assert_act_close(y[:, :dim], REF_ACT[kind](xs[:, :dim]), xs[:, :dim])


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("dim", DIMS)
def test_activation_shares(k, n, nthreads, dim):
    x = np.random.default_rng(n * dim).standard_normal((n, _stride(dim))).astype(np.float32)
    x *= 3
    for kind, ref in REF_ACT.items():
        out = assert_shares_partition(
            lambda a, tid, nt, kind=kind: k(f"{kind}{dim}", a["x"], n, tid, nt),
            {"x": x},
            ["x"],
            nthreads,
        )["x"]
        np.testing.assert_array_equal(out[:, dim:], x[:, dim:])
        assert_act_close(out[:, :dim], ref(x[:, :dim]), x[:, :dim])
    # the three differ (the ablation of ``kind``)
    outs = [x.copy() for _ in REF_ACT]
    for kind, o in zip(REF_ACT, outs, strict=True):
        k(f"{kind}{dim}", o, n, 0, 1)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2
    assert np.abs(outs[1] - outs[2]).max() > 1e-5


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bias", [False, True])
def test_layernorm(k, n, nthreads, dim, bias):
    rng = np.random.default_rng(n + dim)
    x = (rng.standard_normal((n, dim)) * 3 + 50).astype(np.float32)  # a large mean
    w = rng.standard_normal(dim).astype(np.float32)
    bb = rng.standard_normal(dim).astype(np.float32)
    extra = [bb] if bias else []
    arrays = {"y": np.full((n, dim), np.nan, np.float32)}
    name = f"ln{dim}_False_{bias}"
    y = assert_shares_partition(
        lambda a, tid, nt: k(name, x, w, *extra, a["y"], n, tid, nt), arrays, ["y"], nthreads
    )["y"]
    want = ref_layernorm(x, w, bb if bias else None, EPS)
    assert_close(y, want, rtol=2e-5)
    ablation = ref_layernorm(x, w, None if bias else bb, EPS)
    assert np.abs(y - ablation).max() > 0.1


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bias", [False, True])
def test_layernorm_with_residual(k, n, nthreads, dim, bias):
    rng = np.random.default_rng(100 + n + dim)
    resid = rng.standard_normal((n, dim)).astype(np.float32)
    delta = rng.standard_normal((n, dim)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    bb = rng.standard_normal(dim).astype(np.float32)
    extra = [bb] if bias else []
    arrays = {"resid": resid, "y": np.full((n, dim), np.nan, np.float32)}
    name = f"ln{dim}_True_{bias}"
    out = assert_shares_partition(
        lambda a, tid, nt: k(name, a["resid"], delta, w, *extra, a["y"], n, tid, nt),
        arrays,
        ["resid", "y"],
        nthreads,
    )
    total = resid + delta  # the float32 add the kernel does
    np.testing.assert_array_equal(out["resid"], total)
    assert_close(out["y"], ref_layernorm(total, w, bb if bias else None, EPS), rtol=2e-5)
    # ablation: the residual add matters
    assert np.abs(out["y"] - ref_layernorm(resid, w, bb if bias else None, EPS)).max() > 0.1


def test_layernorm_constant_row_uses_eps(k):
    x = np.full((2, 72), 7.25, np.float32)
    y = np.full_like(x, np.nan)
    bb = np.arange(72, dtype=np.float32)
    k("ln72_False_True", x, np.ones(72, np.float32), bb, y, 2, 0, 1)
    np.testing.assert_array_equal(y, np.broadcast_to(bb, y.shape))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("dim", DIMS)
def test_scale(k, n, nthreads, dim):
    rng = np.random.default_rng(200 + n + dim)
    x = rng.standard_normal((n, _stride(dim))).astype(np.float32)
    out = assert_shares_partition(
        lambda a, tid, nt: k(f"scale{dim}", a["x"], n, tid, nt), {"x": x}, ["x"], nthreads
    )["x"]
    np.testing.assert_array_equal(out[:, :dim], x[:, :dim] * np.float32(EMBED_SCALE))
    np.testing.assert_array_equal(out[:, dim:], x[:, dim:])  # the padding is untouched


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("dim", DIMS)
def test_softcap(k, n, nthreads, dim):
    rng = np.random.default_rng(300 + n + dim)
    x = (rng.standard_normal((n, _stride(dim))) * 40).astype(np.float32)
    x[0, :4] = [1e-3, -200.0, 1e6, 0.0]
    out = assert_shares_partition(
        lambda a, tid, nt: k(f"cap{dim}", a["x"], n, tid, nt), {"x": x}, ["x"], nthreads
    )["x"]
    np.testing.assert_array_equal(out[:, dim:], x[:, dim:])
    want = CAP * np.tanh(x[:, :dim].astype(np.float64) / CAP)
    np.testing.assert_allclose(out[:, :dim], want, rtol=1e-6, atol=1e-6)
    assert np.abs(out[:, :dim]).max() <= CAP
    assert np.abs(x[:, :dim] - out[:, :dim]).max() > 1.0  # it clips (the ablation)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("dim", DIMS)
def test_geglu(k, n, nthreads, dim):
    gu = np.random.default_rng(400 + n + dim).standard_normal((n, 2 * dim)).astype(np.float32)
    gu *= 3
    gu[0, :3] = [-30.0, 30.0, 0.0]
    g, u = gu[:, :dim], gu[:, dim:].astype(np.float64)
    outs = {}
    for act, ref in (("gelu_tanh", ref_gelu_tanh), ("gelu", ref_gelu)):
        arrays = {"h": np.full((n, dim), np.nan, np.float32)}
        h = assert_shares_partition(
            lambda a, tid, nt, act=act: k(f"glu_{act}{dim}", gu, a["h"], n, tid, nt),
            arrays,
            ["h"],
            nthreads,
        )["h"]
        want = ref(g) * u
        err = np.abs(h - want) / np.maximum(1.0, np.abs(g) * np.abs(u))
        assert err.max() <= 2e-6
        outs[act] = h
    silu = np.full((n, dim), np.nan, np.float32)
    k(f"glu_silu{dim}", gu, silu, n, 0, 1)
    assert np.abs(silu - outs["gelu_tanh"]).max() > 1e-2  # the activation is used
    assert np.abs(outs["gelu"] - outs["gelu_tanh"]).max() > 1e-6


def test_bad_parameters_are_refused():
    m = ir.Module()
    with pytest.raises(SparsecError, match="activation must be one of"):
        ops.emit_activation(m, "a", dim=8, stride=8, kind="swish")
    with pytest.raises(SparsecError, match="stride"):
        ops.emit_activation(m, "b", dim=8, stride=4, kind="relu")
    with pytest.raises(SparsecError, match="soft-cap"):
        ops.emit_softcap(m, "c", dim=8, stride=8, cap=0.0)
    with pytest.raises(SparsecError, match="gated activation"):
        ops.emit_swiglu_act(m, "d", ffn_dim=8, activation="relu")
    with pytest.raises(SparsecError, match="epsilon"):
        ops.emit_layernorm(m, "e", dim=8, eps=-1.0, residual=False, bias=True)
    shape = dict(num_heads=4, kv_num_heads=2, head_dim=16, capacity=8, qkv_stride=128,
                 q_offset=0)  # fmt: skip
    with pytest.raises(SparsecError, match="alibi needs 4"):
        ops.emit_attention(m, "f", **shape, scale=0.25, alibi=(0.5, 0.25))
    with pytest.raises(SparsecError, match="soft-cap"):
        ops.emit_attention(m, "g", **shape, scale=0.25, softcap=-1.0)
    with pytest.raises(SparsecError, match="rotary_dim"):
        ops.emit_rope_kv_write(m, "h", **shape, k_offset=64, v_offset=96, rope=False,
                               rotary_dim=8)  # fmt: skip


# ----------------------------------------------------------------- attention

HEADS, KV_HEADS, HD = 6, 2, 20  # groups of 3; head_dim needs the tail code
STRIDE = (HEADS + 2 * KV_HEADS) * HD + 3
Q_OFF, K_OFF, V_OFF = 3, 3 + HEADS * HD, 3 + (HEADS + KV_HEADS) * HD
CAPACITY = 72
SCALE = HD**-0.5
SLOPES = tuple(2.0 ** (-8.0 * (h + 1) / HEADS) for h in range(HEADS))  # MPT's slopes
SOFTCAP = 1.5  # below the test scores' spread: it clips

# name -> attention options (kv_half also applies to the rope kernel)
ATTN = {
    "plain": {},
    "alibi": {"alibi": SLOPES},
    "softcap": {"softcap": SOFTCAP},
    "alibi_softcap_window": {"alibi": SLOPES, "softcap": SOFTCAP, "window": 9},
    "alibi_half": {"alibi": SLOPES, "kv_half": True},
    "softcap_window_half": {"softcap": SOFTCAP, "window": 16, "kv_half": True},
}
# name -> rope kernel options
ROPE = {
    "norope": {"rope": False},
    "norope_half": {"rope": False, "kv_half": True},
    "norope_norm": {"rope": False, "qk_norm_eps": EPS},
}
CASES = [(1, 0), (1, 5), (1, 40), (3, 13), (17, 0), (17, 30)]


@pytest.fixture(scope="module")
def ka(isa):
    shape = dict(num_heads=HEADS, kv_num_heads=KV_HEADS, head_dim=HD, capacity=CAPACITY)
    layout = dict(qkv_stride=STRIDE, q_offset=Q_OFF, k_offset=K_OFF, v_offset=V_OFF)
    emitters = {
        f"attn_{name}": p(
            ops.emit_attention, **shape, scale=SCALE, qkv_stride=STRIDE, q_offset=Q_OFF, **opts
        )  # fmt: skip
        for name, opts in ATTN.items()
    }
    for name, opts in ROPE.items():
        emitters[f"rope_{name}"] = p(ops.emit_rope_kv_write, **shape, **layout, **opts)
    return _build(isa, emitters)


def ref_attention(q, k_cache, v_cache, positions, *, window=None, alibi=None, softcap=None):
    """q [n, heads, hd]; caches [kv_heads, capacity, hd]; float64 out [n, heads * hd]."""
    n = q.shape[0]
    group = HEADS // KV_HEADS
    out = np.zeros((n, HEADS, HD))
    for i in range(n):
        pos = int(positions[i])
        lo = 0 if window is None else max(0, pos - window + 1)
        j = np.arange(lo, pos + 1)
        for h in range(HEADS):
            keys = k_cache[h // group, lo : pos + 1].astype(np.float64)
            values = v_cache[h // group, lo : pos + 1].astype(np.float64)
            s = SCALE * (keys @ q[i, h].astype(np.float64))
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            if alibi is not None:
                s = s + alibi[h] * (j - pos)
            w = np.exp(s - s.max())
            out[i, h] = w @ values / w.sum()
    return out.reshape(n, HEADS * HD)


def _attn_inputs(n, position, seed, half=False):
    rng = np.random.default_rng(seed)
    qkv = (rng.standard_normal((n, STRIDE)) * 2).astype(np.float32)
    kv = rng.standard_normal((2, KV_HEADS, CAPACITY, HD)).astype(np.float32)
    kv[:, :, position + n :] = np.nan  # slots never written must never be read
    return qkv, kv.astype(np.float16) if half else kv


def _rows(kv, position, n):
    """(caches, positions, k_at, v_at) for ``n`` rows of one sequence whose cache is
    ``kv`` [2, KVH, C, hd] (float32 or float16: offsets count its elements)."""
    assert kv.flags.c_contiguous
    positions = np.arange(position, position + n, dtype=np.int32)
    return np.full(n, kv.ctypes.data, np.uint64), positions, 0, kv[0].size


def _q(qkv):
    return qkv[:, Q_OFF : Q_OFF + HEADS * HD].reshape(-1, HEADS, HD)


def _run_attention(ka, name, qkv, kv, position, nthreads):
    n = qkv.shape[0]
    out = np.full((n, HEADS * HD), np.nan, np.float32)
    rows = _rows(kv, position, n)
    for tid in range(nthreads):
        ka(f"attn_{name}", qkv, out, *rows, n, tid, nthreads)
    return out


@pytest.mark.parametrize(("n", "position"), CASES)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("name", list(ATTN))
def test_attention_options(ka, name, n, position, nthreads):
    opts = ATTN[name]
    half = opts.get("kv_half", False)
    qkv, kv = _attn_inputs(n, position, seed=n * 1000 + position, half=half)
    out = _run_attention(ka, name, qkv, kv, position, nthreads)
    positions = position + np.arange(n)
    ref_opts = {key: opts[key] for key in ("window", "alibi", "softcap") if key in opts}
    want = ref_attention(_q(qkv), kv[0], kv[1], positions, **ref_opts)
    assert_close(out, want, rtol=1e-5 if not half else 1e-4)


@pytest.mark.parametrize("name", [name for name in ATTN if name != "plain"])
def test_attention_without_the_option_the_answer_differs(ka, name):
    """Ablation: the reference with any one of the kernel's options left out is off."""
    opts = ATTN[name]
    n, position = 3, 40
    qkv, kv = _attn_inputs(n, position, seed=7, half=opts.get("kv_half", False))
    qkv *= 3  # scores well beyond the soft-cap
    out = _run_attention(ka, name, qkv, kv, position, 1)
    positions = position + np.arange(n)
    ref_opts = {key: opts[key] for key in ("window", "alibi", "softcap") if key in opts}
    want = ref_attention(_q(qkv), kv[0], kv[1], positions, **ref_opts)
    assert_close(out, want, rtol=1e-4)
    for key in ref_opts:
        ablated = {k_: v for k_, v in ref_opts.items() if k_ != key}
        other = ref_attention(_q(qkv), kv[0], kv[1], positions, **ablated)
        assert np.abs(out - other).max() > 1e-2, key


def _rms(x, w):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS) * w


@pytest.mark.parametrize(("n", "position"), CASES)
@pytest.mark.parametrize("nthreads", THREADS)
@pytest.mark.parametrize("name", list(ROPE))
def test_kv_write_without_rope(ka, name, n, position, nthreads):
    """rope=False: no cos/sin arguments; k (q/k-normalized with qk_norm_eps) and v go to
    the cache slots as they are, q is untouched unless normalized."""
    opts = ROPE[name]
    half = opts.get("kv_half", False)
    norm = "qk_norm_eps" in opts
    qkv, kv = _attn_inputs(n, position, seed=n + position, half=half)
    kv[:, :, position:] = np.nan  # the slots written now
    rng = np.random.default_rng(3)
    norms = [rng.uniform(0.5, 1.5, HD).astype(np.float32) for _ in range(2)] if norm else []
    out = assert_shares_partition(
        lambda a, tid, nt: ka(
            f"rope_{name}", a["qkv"], *norms, *_rows(a["kv"], position, n), n, tid, nt
        ),
        {"qkv": qkv, "kv": kv},
        ["qkv", "kv"],
        nthreads,
    )
    q = qkv[:, Q_OFF : Q_OFF + HEADS * HD].reshape(n, HEADS, HD).astype(np.float64)
    k = qkv[:, K_OFF : K_OFF + KV_HEADS * HD].reshape(n, KV_HEADS, HD).astype(np.float64)
    v = qkv[:, V_OFF : V_OFF + KV_HEADS * HD].reshape(n, KV_HEADS, HD)
    want_qkv = qkv.astype(np.float64)
    if norm:
        q, k = _rms(q, norms[0]), _rms(k, norms[1])
        want_qkv[:, Q_OFF : Q_OFF + HEADS * HD] = q.reshape(n, -1)
        want_qkv[:, K_OFF : K_OFF + KV_HEADS * HD] = k.reshape(n, -1)
    assert_close(out["qkv"], want_qkv)
    written = slice(position, position + n)
    elem = np.float16 if half else np.float32
    got_k = out["kv"][0][:, written].astype(np.float64)
    np.testing.assert_allclose(got_k, k.transpose(1, 0, 2).astype(elem), rtol=2e-6, atol=1e-6)
    np.testing.assert_array_equal(out["kv"][1][:, written], v.transpose(1, 0, 2).astype(elem))
    np.testing.assert_array_equal(out["kv"][:, :, :position], kv[:, :, :position])
    assert np.isnan(out["kv"][:, :, position + n :].astype(np.float32)).all()


def test_kv_write_without_rope_then_alibi_attention(ka):
    """The MPT pair: rope=False then ALiBi attention; a prefill of 17 rows at 20."""
    n, position = 17, 20
    qkv, kv = _attn_inputs(n, position, seed=11)
    kv[:, :, position:] = np.nan
    rows = _rows(kv, position, n)
    ka("rope_norope", qkv, *rows, n, 0, 1)
    out = np.full((n, HEADS * HD), np.nan, np.float32)
    ka("attn_alibi", qkv, out, *rows, n, 0, 1)
    want = ref_attention(_q(qkv), kv[0], kv[1], position + np.arange(n), alibi=SLOPES)
    assert_close(out, want)
