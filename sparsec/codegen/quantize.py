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

from sparsec.codegen.irbuild import (
    F32,
    I8,
    I32,
    I64,
    Var,
    const,
    f32,
    for_range,
    gep_bytes,
    i32,
    i64,
    intrinsic,
    load_vec,
    masked_load,
    new_function,
    splat,
    store,
    thread_range,
    vector_intrinsic,
    vectors,
)
from sparsec.codegen.target import AVX512, Isa

QUANT_MAX = 127
# Quantized activations are stored as q + Isa.act_offset (128 where vpdpbusd wants
# unsigned bytes). Rows are padded to this many bytes (pad value: the offset, i.e. q = 0).
ROW_ALIGN = 64


def quantized_row_bytes(in_features: int) -> int:
    """Row stride in bytes of the uint8 activation buffer the quantize kernel writes."""
    return -(-in_features // ROW_ALIGN) * ROW_ALIGN


# Rows quantized at a time: the float temporaries stay at a few MB whatever the layer
# (a 128256 x 2048 LM head would otherwise need three 1 GB float copies at once).
QUANTIZE_ROWS = 256


def quantize_weight_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-row symmetric int8: (q int8 [out, in], scale float32 [out])."""
    w = np.asarray(weight, dtype=np.float32)
    q = np.empty(w.shape, dtype=np.int8)
    scale = np.empty(w.shape[0], dtype=np.float32)
    for start in range(0, w.shape[0], QUANTIZE_ROWS):
        rows = w[start : start + QUANTIZE_ROWS]
        s = (np.abs(rows).max(axis=1) / np.float32(QUANT_MAX)).astype(np.float32)
        safe = np.where(s == 0, np.float32(1), s)
        q[start : start + QUANTIZE_ROWS] = np.clip(
            np.rint(rows / safe[:, None]), -QUANT_MAX, QUANT_MAX
        )
        scale[start : start + QUANTIZE_ROWS] = s
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
    isa: Isa = AVX512,
) -> ir.Function:
    """Emit ``void name(const float* x, uint8_t* xq, float* xscale, i32 n, i32 tid, i32 nt)``.

    Token rows are split evenly over threads. ``xq`` rows are ``quantized_row_bytes``
    apart and hold ``q + isa.act_offset``, padding included (so padded columns read as
    0). Rows are read in chunks of the ISA's float32 lanes (L below; 16 on AVX-512).
    """
    del max_tokens  # n is a runtime value; kept for a uniform emitter signature
    v = vectors(isa)
    lanes = v.lanes
    x_stride = in_features if x_stride is None else x_stride
    q_stride = quantized_row_bytes(in_features)
    full, tail = divmod(in_features, lanes)
    lane_bits = ir.IntType(lanes)
    fn, b = new_function(
        module,
        name,
        [F32.as_pointer(), I8.as_pointer(), F32.as_pointer(), I32, I32, I32],
        ["x", "xq", "xscale", "n_tokens", "tid", "nthreads"],
    )
    x, xq, xscale, n, tid, nthreads = fn.args
    t0, t1 = thread_range(b, n, tid, nthreads)
    tail_mask = ir.Constant(lane_bits, (1 << tail) - 1)

    chunks = full + (1 if tail else 0)
    with for_range(b, t0, t1, name="tok") as t:
        t64 = b.sext(t, I64)
        row = b.gep(x, [b.mul(t64, i64(x_stride))], inbounds=True)
        qrow = b.gep(xq, [b.mul(t64, i64(q_stride))], inbounds=True)
        vmax = Var(b, v.f32, const(v.f32, 0.0), "vmax")
        with for_range(b, 0, i32(chunks), name="cmax") as c:
            x_chunk = _chunk_dynamic(b, row, c, full, tail_mask, v)
            vmax.set(
                vector_intrinsic(
                    b,
                    "llvm.maxnum",
                    v.f32,
                    [vmax.get(), vector_intrinsic(b, "llvm.fabs", v.f32, [x_chunk])],
                )
            )
        m = intrinsic(b, f"llvm.vector.reduce.fmax.v{lanes}f32", F32, [vmax.get()])
        s = b.fdiv(m, f32(float(QUANT_MAX)))
        b.store(s, b.gep(xscale, [t64], inbounds=True))
        s_vec = splat(b, s, lanes)
        zero_scale = splat(b, b.fcmp_ordered("==", s, f32(0.0)), lanes)
        with for_range(b, 0, i32(chunks), name="cq") as c:
            x_chunk = _chunk_dynamic(b, row, c, full, tail_mask, v)
            r = vector_intrinsic(b, "llvm.roundeven", v.f32, [b.fdiv(x_chunk, s_vec)])
            r = vector_intrinsic(b, "llvm.minnum", v.f32, [r, const(v.f32, float(QUANT_MAX))])
            r = vector_intrinsic(b, "llvm.maxnum", v.f32, [r, const(v.f32, -float(QUANT_MAX))])
            qi = b.fptosi(r, v.i32)
            if isa.act_offset:
                qi = b.add(qi, const(v.i32, isa.act_offset))
            qi = b.select(zero_scale, const(v.i32, isa.act_offset), qi)
            dst = b.gep(qrow, [b.mul(b.sext(c, I64), i64(lanes))], inbounds=True)
            store(b, b.trunc(qi, v.i8_lanes), dst, align=1)
        # Padding after the last L-column chunk up to the row stride reads as q = 0.
        for off in range(chunks * lanes, q_stride, lanes):
            store(b, const(v.i8_lanes, isa.act_offset), gep_bytes(b, qrow, off), align=1)
    b.ret_void()
    return fn


def _chunk_dynamic(b: ir.IRBuilder, row, c, full: int, tail_mask, v):
    """The L floats of chunk ``c`` (runtime index) of ``row``; the tail chunk is masked."""
    ptr = b.gep(row, [b.mul(b.sext(c, I64), i64(v.lanes))], inbounds=True)
    if tail_mask.constant == 0:
        return load_vec(b, ptr, v.f32)
    every = ir.Constant(tail_mask.type, (1 << v.lanes) - 1)
    mask = b.select(b.icmp_signed("<", c, i32(full)), every, tail_mask)
    return masked_load(b, ptr, mask, v.f32)
