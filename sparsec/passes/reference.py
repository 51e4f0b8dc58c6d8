"""Numpy references of every op an optimized graph may contain, and an interpreter.

These functions *are* the semantics of docs/graph-contract.md section 3: the ONNX
function bodies in ``functions.py``, the generated kernels and the tests of every
stage are checked against them. They favour clarity over speed, compute in float32
like the kernels, and take the arrays and attributes the ops take.

``evaluate(model, feeds)`` runs a whole optimized graph with them (no onnxruntime), so
"the optimized graph computes what the exported one did" can be checked in pure numpy.
"""

from __future__ import annotations

import os

import numpy as np

from sparsec.errors import SparsecError

QMAX = 127  # symmetric int8 grid: -127..127


def rms_normalization(
    x: np.ndarray, scale: np.ndarray, *, epsilon: float = 1e-5, axis: int = -1
) -> np.ndarray:
    """ONNX ``RMSNormalization`` (opset 23, stash_type float32):
    ``x / sqrt(mean(x², axes=axis..-1) + epsilon) * scale``."""
    axes = tuple(range(axis % x.ndim, x.ndim))
    x32 = x.astype(np.float32)
    mean_square = np.mean(np.square(x32), axis=axes, keepdims=True)
    return (x32 / np.sqrt(mean_square + np.float32(epsilon)) * scale).astype(x.dtype)


def skip_rms_normalization(
    x: np.ndarray, skip: np.ndarray, scale: np.ndarray, *, epsilon: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
    """``sparsec.SkipRMSNormalization``: ``sum = x + skip``, ``y = RMSNorm(sum) * scale``;
    returns ``(y, sum)``."""
    total = x + skip
    return rms_normalization(total, scale, epsilon=epsilon), total


def layer_normalization(
    x: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    epsilon: float = 1e-5,
    axis: int = -1,
) -> np.ndarray:
    """ONNX ``LayerNormalization`` (stash_type float32): ``(x - mean) / sqrt(var +
    epsilon) * scale (+ bias)`` over ``axis..-1``, ``var`` the mean of squared
    deviations."""
    axes = tuple(range(axis % x.ndim, x.ndim))
    x32 = x.astype(np.float32)
    centered = x32 - np.mean(x32, axis=axes, keepdims=True)
    var = np.mean(np.square(centered), axis=axes, keepdims=True)
    y = centered / np.sqrt(var + np.float32(epsilon)) * scale
    return (y if bias is None else y + bias).astype(x.dtype)


def skip_layer_normalization(
    x: np.ndarray,
    skip: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    epsilon: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """``sparsec.SkipLayerNormalization``: ``sum = x + skip``, ``y = LayerNorm(sum) *
    scale (+ bias)``; returns ``(y, sum)``."""
    total = x + skip
    return layer_normalization(total, scale, bias, epsilon=epsilon), total


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """ONNX ``Gelu``: ``0.5 x (1 + erf(x / sqrt 2))``, or with ``approximate = "tanh"``
    ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``; computed in float64."""
    from math import erf, pi, sqrt

    x64 = x.astype(np.float64)
    if approximate == "tanh":
        inner = np.tanh(sqrt(2 / pi) * (x64 + 0.044715 * x64**3))
    else:
        inner = np.vectorize(erf, otypes=[np.float64])(x64 / sqrt(2))
    return (0.5 * x64 * (1 + inner)).astype(x.dtype)


def rotary_embedding(
    x: np.ndarray,
    positions: np.ndarray,
    cos_cache: np.ndarray,
    sin_cache: np.ndarray,
    *,
    rotary_dim: int = 0,
) -> np.ndarray:
    """Rotate-half RoPE of ``x [B, S, heads, hd]`` at ``positions [B, S]``:
    ``[x1*cos - x2*sin, x2*cos + x1*sin]`` with ``cos, sin = cache[position]``, on the
    first ``rotary_dim`` features (0: all); the rest pass through (partial rotary)."""
    rotary_dim = rotary_dim or x.shape[-1]
    half = rotary_dim // 2
    cos = cos_cache[positions][:, :, None, :]  # [B, S, 1, rotary_dim/2]
    sin = sin_cache[positions][:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    return np.concatenate([*rotated, x[..., rotary_dim:]], axis=-1)


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def cached_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    past_key: np.ndarray,
    past_value: np.ndarray,
    position_ids: np.ndarray,
    cos_cache: np.ndarray | None = None,
    sin_cache: np.ndarray | None = None,
    q_norm: np.ndarray | None = None,
    k_norm: np.ndarray | None = None,
    *,
    num_heads: int,
    kv_num_heads: int,
    scale: float | None = None,
    rotary_dim: int = 0,
    window: int = 0,
    qk_norm_epsilon: float = 1e-6,
    alibi_slopes: list[float] | None = None,
    softcap: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sparsec.CachedAttention``: RoPE on q and k, the new keys/values written into
            the fixed-capacity caches at ``position_ids``, causal grouped-query attention over
            slots ``0..position``. Returns ``(y [B, S, H*hd], present_key, present_value)``.

            Optional parts (docs/graph-contract.md section 3): ``q_norm``/``k_norm`` ``[hd]``
            scales of a per-head RMSNorm of q and k before RoPE (Qwen3), ``rotary_dim`` (only
            the first features rotate; 0: all; no ``cos_cache``/``sin_cache``: no RoPE, for
            learned positions), ``alibi_slopes`` (one per head: the score of slot ``j`` from a
        query at ``p`` gets ``+ slope * (j - p)``, MPT), ``softcap`` (scores become ``softcap *
    tanh(scores / softcap)`` first, Gemma 2), ``window`` (a query at position p sees slots
            ``p-window+1..p`` only; 0: all)."""
    batch, seq, _ = q.shape
    capacity, head_dim = past_key.shape[2], past_key.shape[3]
    if num_heads % kv_num_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of kv_num_heads")
    if position_ids.min(initial=0) < 0 or position_ids.max(initial=0) >= capacity:
        raise ValueError(f"a position in position_ids is outside the cache capacity {capacity}")
    if scale is None:
        scale = 1.0 / np.sqrt(head_dim)
    positions = position_ids.astype(np.int64)
    qh = q.reshape(batch, seq, num_heads, head_dim)
    kh = k.reshape(batch, seq, kv_num_heads, head_dim)
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm come together")
    if q_norm is not None:
        qh = rms_normalization(qh, q_norm, epsilon=qk_norm_epsilon)
        kh = rms_normalization(kh, k_norm, epsilon=qk_norm_epsilon)
    if cos_cache is not None:
        qh = rotary_embedding(qh, positions, cos_cache, sin_cache, rotary_dim=rotary_dim)
        kh = rotary_embedding(kh, positions, cos_cache, sin_cache, rotary_dim=rotary_dim)
    vh = v.reshape(batch, seq, kv_num_heads, head_dim)
    present_key, present_value = past_key.copy(), past_value.copy()
    for b in range(batch):
        present_key[b, :, positions[b]] = kh[b]  # (index dims first: [S, KVH, hd])
        present_value[b, :, positions[b]] = vh[b]
    group = num_heads // kv_num_heads
    y = np.zeros((batch, seq, num_heads, head_dim), np.float32)
    for b in range(batch):
        for s in range(seq):
            last = positions[b, s] + 1  # attends to slots 0..position
            first = max(0, last - window) if window else 0
            for h in range(num_heads):
                keys = present_key[b, h // group, first:last]
                values = present_value[b, h // group, first:last]
                scores = np.float32(scale) * (keys @ qh[b, s, h])
                if softcap is not None:
                    cap = np.float32(softcap)
                    scores = (cap * np.tanh(scores / cap)).astype(np.float32)
                if alibi_slopes is not None:
                    distance = np.arange(first, last) - positions[b, s]
                    scores = scores + np.float32(alibi_slopes[h]) * distance.astype(np.float32)
                weights = _softmax(scores)
                y[b, s, h] = weights @ values
    return y.reshape(batch, seq, num_heads * head_dim), present_key, present_value


def per_token_fake_quant(x: np.ndarray) -> np.ndarray:
    """``sparsec.PerTokenFakeQuant``: ``s = max|x| / 127`` over the last axis,
    ``y = clip(round(x / s), -127, 127) * s`` (round half to even; ``y = 0`` where
    ``s = 0``)."""
    s = np.abs(x).max(axis=-1, keepdims=True) / np.float32(QMAX)
    safe = np.where(s > 0, s, np.float32(1))
    return (np.clip(np.round(x / safe), -QMAX, QMAX) * s).astype(x.dtype)


def silu(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-a) = inf for very negative a gives 0, as wanted
        return a * (np.float32(1) / (np.float32(1) + np.exp(-a)))


def swiglu(
    x: np.ndarray,
    w_gate: np.ndarray,
    w_up: np.ndarray,
    w_down: np.ndarray,
    *,
    quantize_activations: int = 0,
    activation: str = "silu",
) -> np.ndarray:
    """``sparsec.SwiGLU``: ``(silu(x @ w_gate) * (x @ w_up)) @ w_down``, with x and the
    hidden activation each per-token fake-quantized when ``quantize_activations``;
    ``activation="gelu_tanh"``: GeGLU (Gemma)."""
    if quantize_activations:
        x = per_token_fake_quant(x)
    gate = x @ w_gate
    act = silu(gate) if activation == "silu" else gelu(gate, "tanh")
    hidden = act * (x @ w_up)
    if quantize_activations:
        hidden = per_token_fake_quant(hidden)
    return hidden @ w_down


def dequantize_linear(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, *, axis: int = 1
) -> np.ndarray:
    """ONNX ``DequantizeLinear`` (per-tensor or per-axis): ``(x - zero_point) * scale``."""
    xi = x.astype(np.int32)
    if zero_point is not None:
        xi = xi - _along(zero_point.astype(np.int32), axis, x.ndim)
    return (xi.astype(np.float32) * _along(scale.astype(np.float32), axis, x.ndim)).astype(
        np.float32
    )


def _along(t: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if t.ndim == 0:
        return t
    shape = [1] * ndim
    shape[axis % ndim] = t.shape[0]
    return t.reshape(shape)


# --- the interpreter --------------------------------------------------------------------


def _attrs(node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def _run_node(node, args: list) -> list[np.ndarray]:
    op = (node.domain or "", node.op_type)
    a = _attrs(node)
    if op == ("", "Gather"):
        return [np.take(args[0], args[1], axis=a.get("axis", 0))]
    if op == ("", "MatMul"):
        return [np.matmul(args[0], args[1])]
    if op == ("", "Add"):
        return [args[0] + args[1]]
    if op == ("", "RMSNormalization"):
        return [
            rms_normalization(
                args[0], args[1], epsilon=a.get("epsilon", 1e-5), axis=a.get("axis", -1)
            )
        ]
    if op == ("", "LayerNormalization"):
        return [layer_normalization(*args, epsilon=a.get("epsilon", 1e-5), axis=a.get("axis", -1))]
    if op == ("", "Relu"):
        return [np.maximum(args[0], np.float32(0))]
    if op == ("", "Gelu"):
        return [gelu(args[0], a.get("approximate", "none"))]
    if op == ("", "DequantizeLinear"):
        zp = args[2] if len(args) > 2 else None
        return [dequantize_linear(args[0], args[1], zp, axis=a.get("axis", 1))]
    if op == ("sparsec", "SkipRMSNormalization"):
        return list(skip_rms_normalization(*args, epsilon=a.get("epsilon", 1e-5)))
    if op == ("sparsec", "SkipLayerNormalization"):
        return list(skip_layer_normalization(*args, epsilon=a.get("epsilon", 1e-5)))
    if op == ("sparsec", "CachedAttention"):
        return list(
            cached_attention(
                *args,
                num_heads=a["num_heads"],
                kv_num_heads=a["kv_num_heads"],
                scale=a.get("scale"),
                rotary_dim=a.get("rotary_dim", 0),
                window=a.get("window", 0),
                qk_norm_epsilon=a.get("qk_norm_epsilon", 1e-6),
                alibi_slopes=a.get("alibi_slopes"),
                softcap=a.get("softcap"),
            )
        )
    if op == ("sparsec", "SwiGLU"):
        return [
            swiglu(
                *args,
                quantize_activations=a.get("quantize_activations", 0),
                activation=a.get("activation", "silu"),
            )
        ]
    if op == ("sparsec", "SoftCap"):
        cap = np.float32(a["cap"])
        return [(cap * np.tanh(args[0] / cap)).astype(np.float32)]
    if op == ("", "Mul"):
        return [args[0] * args[1]]
    if op == ("sparsec", "PerTokenFakeQuant"):
        return [per_token_fake_quant(args[0])]
    name = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
    raise SparsecError(
        f"node {node.name!r}: op {name} is outside the optimized-graph contract "
        "(docs/graph-contract.md section 3), so the numpy interpreter cannot run it"
    )


def evaluate(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an optimized graph (``onnx_ir.Model`` or path) on ``feeds`` with the numpy
    references; returns every graph output by name."""
    import onnx_ir as ir

    if isinstance(model, (str, os.PathLike)):
        model = ir.load(model)
    graph = model.graph
    env: dict[str, np.ndarray] = {}
    for name, value in graph.initializers.items():
        env[name] = value.const_value.numpy()
    for value in graph.inputs:
        if value.name not in feeds:
            raise SparsecError(f"evaluate: no value fed for graph input {value.name!r}")
        env[value.name] = np.asarray(feeds[value.name])
    for node in graph:
        args = []
        for value in node.inputs:
            if value is None:
                continue
            if value.name not in env:
                raise SparsecError(f"node {node.name!r} reads {value.name!r} before it is computed")
            args.append(env[value.name])
        for out, result in zip(node.outputs, _run_node(node, args), strict=False):
            env[out.name] = result
    return {value.name: env[value.name] for value in graph.outputs}
