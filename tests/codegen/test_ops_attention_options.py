"""The optional parts of the attention kernels: a sliding window (Mistral), partial
rotary (Phi-3/4) and per-head q/k RMSNorm (Qwen3), each against the numpy reference
of ``sparsec.CachedAttention`` (``sparsec.passes.reference``), with ablations: the
same inputs through the kernel without the option give a different answer."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from test_ops_support import assert_close, build_kernels, sequence_rows

from sparsec.codegen import ops
from sparsec.errors import SparsecError
from sparsec.passes import reference

HEADS, KV_HEADS, HD = 4, 2, 16
STRIDE = (HEADS + 2 * KV_HEADS) * HD
Q_OFF, K_OFF, V_OFF = 0, HEADS * HD, (HEADS + KV_HEADS) * HD
CAPACITY = 96
EPS = 1e-6

# name -> (window, rotary_dim, q/k norm)
OPTIONS = {
    "window5": (5, None, False),
    "window16": (16, None, False),  # a multiple of the 16-key block
    "rotary8": (None, 8, False),
    "qk_norm": (None, None, True),
    "all": (7, 8, True),
}
CASES = [(1, 0), (1, 4), (1, 5), (1, 40), (6, 0), (6, 13), (20, 30), (33, 60)]


def _build(tmp_path, window, rotary_dim, qk_norm):
    shape = dict(num_heads=HEADS, kv_num_heads=KV_HEADS, head_dim=HD, capacity=CAPACITY)
    rope = dict(qkv_stride=STRIDE, q_offset=Q_OFF, k_offset=K_OFF, v_offset=V_OFF)
    if rotary_dim is not None:
        rope["rotary_dim"] = rotary_dim
    if qk_norm:
        rope["qk_norm_eps"] = EPS
    attn = dict(scale=HD**-0.5, qkv_stride=STRIDE, q_offset=Q_OFF)
    if window is not None:
        attn["window"] = window
    return build_kernels(
        tmp_path,
        {
            "rope": functools.partial(ops.emit_rope_kv_write, **shape, **rope),
            "attn": functools.partial(ops.emit_attention, **shape, **attn),
        },
    )


@pytest.fixture(scope="module", params=list(OPTIONS))
def kernels(request, tmp_path_factory):
    options = OPTIONS[request.param]
    plain = _build(tmp_path_factory.mktemp("plain"), None, None, False)
    return options, _build(tmp_path_factory.mktemp(request.param), *options), plain


def _inputs(n: int, position: int, rotary: int, seed: int):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((n, STRIDE), dtype=np.float32) * 2
    k_cache = rng.standard_normal((KV_HEADS, CAPACITY, HD), dtype=np.float32)
    v_cache = rng.standard_normal((KV_HEADS, CAPACITY, HD), dtype=np.float32)
    k_cache[:, position:] = np.nan  # slots not yet written must never be read
    v_cache[:, position:] = np.nan
    angles = np.outer(np.arange(CAPACITY), 1.0 / 10000 ** (np.arange(0, rotary, 2) / rotary))
    norms = [rng.uniform(0.5, 1.5, HD).astype(np.float32) for _ in range(2)]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return qkv, k_cache, v_cache, cos, sin, norms


def _run(k, qkv, k_cache, v_cache, cos, sin, norms, position, nthreads, qk_norm):
    qkv, kv = qkv.copy(), np.stack([k_cache, v_cache])
    n = qkv.shape[0]
    out = np.full((n, HEADS * HD), np.nan, np.float32)
    extra = norms if qk_norm else []
    rows = sequence_rows(kv, position, n)
    for tid in range(nthreads):
        k("rope", qkv, cos, sin, *extra, *rows, n, tid, nthreads)
    for tid in range(nthreads):
        k("attn", qkv, out, *rows, n, tid, nthreads)
    return out, kv[0], kv[1]


def _reference(qkv, k_cache, v_cache, cos, sin, norms, position, window, rotary_dim, qk_norm):
    n = qkv.shape[0]
    q, k, v = (qkv[None, :, o : o + w] for o, w in ((Q_OFF, HEADS * HD), (K_OFF, KV_HEADS * HD),
                                                     (V_OFF, KV_HEADS * HD)))  # fmt: skip
    y, pk, pv = reference.cached_attention(
        q, k, v, k_cache[None], v_cache[None], position + np.arange(n)[None], cos, sin,
        *(norms if qk_norm else []),
        num_heads=HEADS, kv_num_heads=KV_HEADS, scale=HD**-0.5,
        rotary_dim=rotary_dim or 0, window=window or 0, qk_norm_epsilon=EPS,
    )  # fmt: skip
    return y[0], pk[0], pv[0]


@pytest.mark.parametrize(("n", "position"), CASES)
@pytest.mark.parametrize("nthreads", [1, 3])
def test_matches_the_reference(kernels, n, position, nthreads):
    (window, rotary_dim, qk_norm), k, _ = kernels
    qkv, kc, vc, cos, sin, norms = _inputs(n, position, rotary_dim or HD, seed=n + position)
    out, k_cache, v_cache = _run(k, qkv, kc, vc, cos, sin, norms, position, nthreads, qk_norm)
    y, pk, pv = _reference(qkv, kc, vc, cos, sin, norms, position, window, rotary_dim, qk_norm)
    assert_close(out, y, rtol=2e-5)
    written = slice(0, position + n)
    assert_close(k_cache[:, written], pk[:, written])
    np.testing.assert_array_equal(v_cache[:, written], pv[:, written])
    assert np.isnan(k_cache[:, position + n :]).all()  # slots beyond stay unwritten


def test_without_the_option_the_answer_differs(kernels):
    """Ablation: the plain kernels on the same inputs miss what the option does."""
    (window, rotary_dim, qk_norm), k, plain = kernels
    n, position = 6, 30  # past every test window
    rotary = rotary_dim or HD
    qkv, kc, vc, cos, sin, norms = _inputs(n, position, rotary, seed=1)
    want, _, _ = _reference(qkv, kc, vc, cos, sin, norms, position, window, rotary_dim, qk_norm)
    _, _, _, cos, sin, _ = _inputs(n, position, HD, seed=1)  # the plain kernel's full tables
    got, _, _ = _run(plain, qkv, kc, vc, cos, sin, norms, position, 1, qk_norm=False)
    assert np.abs(got - want).max() > 1e-2


def test_bad_options_are_refused():
    base = dict(num_heads=HEADS, kv_num_heads=KV_HEADS, head_dim=HD, capacity=8,
                qkv_stride=STRIDE, q_offset=0)  # fmt: skip
    from llvmlite import ir

    with pytest.raises(SparsecError, match="rotary_dim=7 must be even"):
        ops.emit_rope_kv_write(ir.Module(), "r", **base, k_offset=K_OFF, v_offset=V_OFF,
                               rotary_dim=7)  # fmt: skip
    with pytest.raises(SparsecError, match="window"):
        ops.emit_attention(ir.Module(), "a", **base, scale=0.25, window=0)
