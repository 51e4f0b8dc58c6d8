"""Symmetric int8 quantization: weights per output row (numpy), activations per token (IR).

Activations follow the graph contract's ``PerTokenFakeQuant`` exactly:
``s = max|x_row| / 127``, ``q = clip(round_half_even(x / s), -127, 127)``, ``q = 0``
where ``s == 0``, all in float32 (a division, not a multiplication by 127/max, so the
rounding of ``x / s`` is bit-identical to the numpy/ONNX reference).

The kernel stores ``q + 128`` as uint8 because VNNI ``vpdpbusd`` multiplies unsigned
bytes by signed bytes; the linear kernels subtract ``128 * rowsum(W)`` again.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from sparsec.codegen.linear_ir import (
    F32,
    I8,
    I16,
    I32,
    I64,
    V16F32,
    V16I1,
    V16I8,
    V16I32,
    Var,
    f32,
    for_range,
    gep_bytes,
    i32,
    i64,
    intrinsic,
    load_vec,
    masked_load_f32,
    new_function,
    splat,
    store_vec,
    thread_range,
    vconst,
)

QUANT_MAX = 127
# Unsigned offset added to quantized activations for vpdpbusd (u8 x s8).
ACT_OFFSET = 128
# Quantized activation rows are padded to this many bytes (pad value = ACT_OFFSET, i.e. 0).
ROW_ALIGN = 64


def quantized_row_bytes(in_features: int) -> int:
    """Row stride in bytes of the uint8 activation buffer the quantize kernel writes."""
    return -(-in_features // ROW_ALIGN) * ROW_ALIGN


def quantize_weight_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-row symmetric int8: (q int8 [out, in], scale float32 [out])."""
    w = np.asarray(weight, dtype=np.float32)
    scale = (np.abs(w).max(axis=1) / np.float32(QUANT_MAX)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    q = np.clip(np.rint(w / safe[:, None]), -QUANT_MAX, QUANT_MAX).astype(np.int8)
    return q, scale


def quantize_tokens_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy PerTokenFakeQuant split into (q int8 [n, in], s float32 [n]); y = q * s."""
    x = np.asarray(x, dtype=np.float32)
    s = (np.abs(x).max(axis=-1) / np.float32(QUANT_MAX)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.clip(np.rint(x / s[..., None]), -QUANT_MAX, QUANT_MAX)
    q = np.where(s[..., None] == 0, 0, q).astype(np.int8)
    return q, s


def emit_quantize_tokens(
    module: ir.Module,
    name: str,
    in_features: int,
    *,
    max_tokens: int,
    x_stride: int | None = None,
) -> ir.Function:
    """Emit ``void name(const float* x, uint8_t* xq, float* xscale, i32 n, i32 tid, i32 nt)``.

    Token rows are split evenly over threads. ``xq`` rows are ``quantized_row_bytes``
    apart and hold ``q + 128``, padding included (so padded columns read as 0).
    """
    del max_tokens  # n is a runtime value; kept for a uniform emitter signature
    x_stride = in_features if x_stride is None else x_stride
    q_stride = quantized_row_bytes(in_features)
    full, tail = divmod(in_features, 16)
    fn, b = new_function(
        module,
        name,
        [F32.as_pointer(), I8.as_pointer(), F32.as_pointer(), I32, I32, I32],
        ["x", "xq", "xscale", "n_tokens", "tid", "nthreads"],
    )
    x, xq, xscale, n, tid, nthreads = fn.args
    t0, t1 = thread_range(b, n, tid, nthreads)
    tail_mask = ir.Constant(I16, (1 << tail) - 1)

    chunks = full + (1 if tail else 0)
    with for_range(b, t0, t1, name="tok") as t:
        t64 = b.sext(t, I64)
        row = b.gep(x, [b.mul(t64, i64(x_stride))], inbounds=True)
        qrow = b.gep(xq, [b.mul(t64, i64(q_stride))], inbounds=True)
        vmax = Var(b, V16F32, vconst(V16F32, 0.0), "vmax")
        with for_range(b, 0, i32(chunks), name="cmax") as c:
            v = _chunk_dynamic(b, row, c, full, tail_mask)
            vmax.set(
                intrinsic(
                    b,
                    "llvm.maxnum.v16f32",
                    V16F32,
                    [vmax.get(), intrinsic(b, "llvm.fabs.v16f32", V16F32, [v])],
                )
            )
        m = intrinsic(b, "llvm.vector.reduce.fmax.v16f32", F32, [vmax.get()])
        s = b.fdiv(m, f32(float(QUANT_MAX)))
        b.store(s, b.gep(xscale, [t64], inbounds=True))
        s_vec = splat(b, s, V16F32)
        zero_scale = splat(b, b.fcmp_ordered("==", s, f32(0.0)), V16I1)
        with for_range(b, 0, i32(chunks), name="cq") as c:
            v = _chunk_dynamic(b, row, c, full, tail_mask)
            r = intrinsic(b, "llvm.roundeven.v16f32", V16F32, [b.fdiv(v, s_vec)])
            r = intrinsic(b, "llvm.minnum.v16f32", V16F32, [r, vconst(V16F32, float(QUANT_MAX))])
            r = intrinsic(b, "llvm.maxnum.v16f32", V16F32, [r, vconst(V16F32, -float(QUANT_MAX))])
            qi = b.add(b.fptosi(r, V16I32), vconst(V16I32, ACT_OFFSET))
            qi = b.select(zero_scale, vconst(V16I32, ACT_OFFSET), qi)
            dst = b.gep(qrow, [b.mul(b.sext(c, I64), i64(16))], inbounds=True)
            store_vec(b, b.trunc(qi, V16I8), dst, align=1)
        # Padding after the last 16-column chunk up to the row stride reads as q = 0.
        for off in range(chunks * 16, q_stride, 16):
            store_vec(b, vconst(V16I8, ACT_OFFSET), gep_bytes(b, qrow, off), align=1)
    b.ret_void()
    return fn


def _chunk_dynamic(b: ir.IRBuilder, row, c, full: int, tail_mask):
    """The 16 floats of chunk ``c`` (runtime index) of ``row``; the tail chunk is masked."""
    ptr = b.gep(row, [b.mul(b.sext(c, I64), i64(16))], inbounds=True)
    if tail_mask.constant == 0:
        return load_vec(b, ptr, V16F32)
    mask = b.select(b.icmp_signed("<", c, i32(full)), ir.Constant(I16, 0xFFFF), tail_mask)
    return masked_load_f32(b, ptr, mask)
