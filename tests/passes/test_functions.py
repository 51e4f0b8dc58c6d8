"""The ONNX function bodies of the sparsec ops, run by onnxruntime, against the numpy
references that define them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest

from sparsec.passes import functions, reference


def _run(op: str, inputs: dict[str, np.ndarray], n_out: int, consts=None, **attrs):
    consts = consts or {}
    graph_inputs = [
        oh.make_tensor_value_info(name, oh.np_dtype_to_tensor_dtype(a.dtype), a.shape)
        for name, a in inputs.items()
    ]
    outs = [f"out{i}" for i in range(n_out)]
    node = oh.make_node(op, [*inputs, *consts], outs, domain="sparsec", **attrs)
    graph = oh.make_graph(
        [node],
        "g",
        graph_inputs,
        [oh.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outs],
        initializer=[onnx.numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    model = oh.make_model(
        graph,
        opset_imports=[oh.make_opsetid("", functions.OPSET), oh.make_opsetid("sparsec", 1)],
        functions=functions.function_protos([op]),
        ir_version=functions.MIN_IR_VERSION,
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def _rope_tables(positions: int, head_dim: int, theta: float = 10000.0):
    inv = (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv[None]
    return np.cos(angles), np.sin(angles)


def test_skip_rms_normalization():
    rng = np.random.default_rng(0)
    x, skip = (
        rng.standard_normal((2, 3, 32), np.float32),
        rng.standard_normal((2, 3, 32), np.float32),
    )
    scale = rng.standard_normal(32).astype(np.float32)
    y, total = _run(
        "SkipRMSNormalization", {"x": x, "skip": skip}, 2, {"scale": scale}, epsilon=1e-6
    )
    ref_y, ref_sum = reference.skip_rms_normalization(x, skip, scale, epsilon=1e-6)
    np.testing.assert_array_equal(total, ref_sum)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)


def test_per_token_fake_quant_matches_reference_including_zero_rows():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 48), np.float32) * 3
    x[0, 1] = 0.0  # s = 0: y must be 0, not NaN
    (y,) = _run("PerTokenFakeQuant", {"x": x}, 1)
    ref = reference.per_token_fake_quant(x)
    np.testing.assert_array_equal(y, ref)
    assert np.all(y[0, 1] == 0)
    # at most 255 distinct levels per token, and the grid is s * integer
    s = np.abs(x[1, 2]).max() / np.float32(127)
    np.testing.assert_allclose(ref[1, 2] / s, np.round(ref[1, 2] / s), atol=1e-4)


@pytest.mark.parametrize("quantize", [0, 1])
def test_swiglu(quantize):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 16), np.float32)
    wg, wu = (rng.standard_normal((16, 40), np.float32) for _ in range(2))
    wd = rng.standard_normal((40, 16), np.float32)
    (y,) = _run(
        "SwiGLU",
        {"x": x},
        1,
        {"w_gate": wg, "w_up": wu, "w_down": wd},
        quantize_activations=quantize,
    )
    ref = reference.swiglu(x, wg, wu, wd, quantize_activations=quantize)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    if quantize:  # the flag really changes the computation
        plain = reference.swiglu(x, wg, wu, wd)
        assert np.abs(plain - ref).max() > 1e-3


@pytest.mark.parametrize(
    "batch,seq,past,capacity",
    [(1, 5, 0, 8), (2, 1, 6, 9), (2, 3, 4, 12)],
    ids=["prefill", "decode", "chunk-into-partly-filled-cache"],
)
def test_cached_attention(batch, seq, past, capacity):
    heads, kv_heads, head_dim = 4, 2, 16
    rng = np.random.default_rng(3)
    cos, sin = _rope_tables(32, head_dim)
    q = rng.standard_normal((batch, seq, heads * head_dim), np.float32)
    k, v = (rng.standard_normal((batch, seq, kv_heads * head_dim), np.float32) for _ in range(2))
    # slots >= past hold garbage that must be ignored
    past_k, past_v = (
        rng.standard_normal((batch, kv_heads, capacity, head_dim), np.float32) * 50
        for _ in range(2)
    )
    pos = np.tile(np.arange(past, past + seq), (batch, 1)).astype(np.int64)
    inputs = {"q": q, "k": k, "v": v, "past_key": past_k, "past_value": past_v, "position_ids": pos}
    attrs = dict(num_heads=heads, kv_num_heads=kv_heads, scale=float(1 / np.sqrt(head_dim)))
    got = _run("CachedAttention", inputs, 3, {"cos_cache": cos, "sin_cache": sin}, **attrs)
    ref = reference.cached_attention(q, k, v, past_k, past_v, pos, cos, sin, **attrs)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # only the new slots changed
    np.testing.assert_array_equal(ref[1][:, :, past + seq :], past_k[:, :, past + seq :])
    np.testing.assert_array_equal(ref[1][:, :, :past], past_k[:, :, :past])
    # attention ignores the garbage: same y with a zeroed tail
    tail_free = [a.copy() for a in (past_k, past_v)]
    for a in tail_free:
        a[:, :, past + seq :] = 0
    ref2 = reference.cached_attention(q, k, v, *tail_free, pos, cos, sin, **attrs)
    np.testing.assert_allclose(ref2[0], ref[0], rtol=1e-6, atol=1e-6)


def test_cached_attention_reference_is_plain_causal_attention():
    """Independent check of the reference: a dense causal softmax with repeated kv heads."""
    heads, kv_heads, head_dim, seq = 4, 2, 8, 5
    rng = np.random.default_rng(4)
    cos, sin = _rope_tables(16, head_dim)
    cos[:], sin[:] = 1.0, 0.0  # RoPE off: rotation by 0
    q = rng.standard_normal((1, seq, heads * head_dim), np.float32)
    k, v = (rng.standard_normal((1, seq, kv_heads * head_dim), np.float32) for _ in range(2))
    empty = np.zeros((1, kv_heads, seq, head_dim), np.float32)
    pos = np.arange(seq)[None]
    y, pk, pv = reference.cached_attention(
        q, k, v, empty, empty, pos, cos, sin, num_heads=heads, kv_num_heads=kv_heads
    )
    qh = q.reshape(seq, heads, head_dim).transpose(1, 0, 2)
    kh = np.repeat(k.reshape(seq, kv_heads, head_dim).transpose(1, 0, 2), 2, axis=0)
    vh = np.repeat(v.reshape(seq, kv_heads, head_dim).transpose(1, 0, 2), 2, axis=0)
    scores = qh @ kh.transpose(0, 2, 1) / np.sqrt(head_dim)
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    expect = (w @ vh).transpose(1, 0, 2).reshape(1, seq, -1)
    np.testing.assert_allclose(y, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pk[0].transpose(1, 0, 2).reshape(seq, -1), k[0])
