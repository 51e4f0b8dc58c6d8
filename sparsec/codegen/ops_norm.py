"""RMSNorm and LayerNorm kernels, plain and fused with the residual add before them.

Rows (tokens) are split among threads; a row is normalized by one thread because
its mean needs the whole row and kernels contain no barriers. At decode (one row)
this costs a few hundred cycles on one thread, far below a matmul.
"""

from __future__ import annotations

import math

from llvmlite import ir

from sparsec.codegen.irbuild import (
    F32,
    FPTR,
    I32,
    I64,
    check_positive,
    const,
    entry_alloca,
    for_span,
    i64,
    kernel_function,
    load,
    loop,
    ptr_add,
    splat,
    store,
    thread_share,
    vector_intrinsic,
    vtype,
    widen,
)
from sparsec.codegen.target import AVX512, Isa
from sparsec.codegen.vmath import hsum
from sparsec.errors import SparsecError


def emit_rmsnorm(
    module: ir.Module, name: str, *, dim: int, eps: float, residual: bool, isa: Isa = AVX512
) -> ir.Function:
    """RMSNorm over rows of ``dim`` floats.

    residual=False: ``void name(const float* x, const float* w, float* y, int32 n, tid,
    nthreads)``: y = x / sqrt(mean(x^2) + eps) * w.

    residual=True: ``void name(float* resid, const float* delta, const float* w, float* y,
    int32 n, tid, nthreads)``: resid += delta in place (the residual stream), then
    y = rmsnorm(resid) * w.
    """
    check_positive(dim=dim)
    if not (isinstance(eps, float | int) and math.isfinite(eps) and eps >= 0):
        raise SparsecError(f"rmsnorm epsilon {eps!r} must be a finite non-negative number")
    n_ptrs = 4 if residual else 3
    fn = kernel_function(module, name, [FPTR] * n_ptrs + [I32, I32, I32])
    *ptrs, n, tid, nthreads = fn.args
    if residual:
        src, delta, weight, y = ptrs
    else:
        (src, weight, y), delta = ptrs, None
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    lanes = isa.lanes_f32
    sumsq = entry_alloca(b, vtype(lanes))
    begin, end = thread_share(b, b.sext(n, I64), tid, nthreads)
    with loop(b, begin, end, name="row") as row:
        base = b.mul(row, i64(dim))
        x_row, y_row = ptr_add(b, src, base), ptr_add(b, y, base)
        d_row = ptr_add(b, delta, base) if residual else None
        b.store(const(vtype(lanes), 0.0), sumsq)

        def square(off, width):
            px = ptr_add(b, x_row, off)
            v = load(b, px, width)
            if residual:
                v = b.fadd(v, load(b, ptr_add(b, d_row, off), width))
                store(b, v, px)
            b.store(b.fadd(b.load(sumsq), widen(b, b.fmul(v, v), lanes)), sumsq)

        for_span(b, dim, square, lanes=lanes, name="sq")
        mean = b.fmul(hsum(b, b.load(sumsq)), const(F32, 1.0 / dim))
        rms = vector_intrinsic(b, "llvm.sqrt", F32, [b.fadd(mean, const(F32, float(eps)))])
        inv = b.fdiv(const(F32, 1.0), rms)

        def scale(off, width):
            v = b.fmul(load(b, ptr_add(b, x_row, off), width), splat(b, inv, width))
            store(b, b.fmul(v, load(b, ptr_add(b, weight, off), width)), ptr_add(b, y_row, off))

        for_span(b, dim, scale, lanes=lanes, name="scale")
    b.ret_void()
    return fn


def emit_layernorm(
    module: ir.Module,
    name: str,
    *,
    dim: int,
    eps: float,
    residual: bool,
    bias: bool,
    isa: Isa = AVX512,
) -> ir.Function:
    """LayerNorm over rows of ``dim`` floats (ONNX LayerNormalization, last axis).

    residual=False: ``void name(const float* x, const float* w, [const float* b,]
    float* y, int32 n, tid, nthreads)``: y = (x - mean) / sqrt(var + eps) * w (+ b),
    var = mean((x - mean)^2).

    residual=True: ``void name(float* resid, const float* delta, const float* w,
    [const float* b,] float* y, int32 n, tid, nthreads)``: resid += delta in place (the
    residual stream), then y = layernorm(resid).

    ``bias=False``: no ``b`` argument. The variance is a second pass over the row
    (of x - mean), not E[x^2] - mean^2, which cancels for rows with a large mean.
    """
    check_positive(dim=dim)
    if not (isinstance(eps, float | int) and math.isfinite(eps) and eps >= 0):
        raise SparsecError(f"layernorm epsilon {eps!r} must be a finite non-negative number")
    n_ptrs = 3 + int(residual) + int(bias)
    fn = kernel_function(module, name, [FPTR] * n_ptrs + [I32, I32, I32])
    *ptrs, n, tid, nthreads = fn.args
    delta = ptrs.pop(1) if residual else None
    src, weight, *rest = ptrs
    shift = rest[0] if bias else None
    y = rest[-1]
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    lanes = isa.lanes_f32
    acc = entry_alloca(b, vtype(lanes))
    begin, end = thread_share(b, b.sext(n, I64), tid, nthreads)
    with loop(b, begin, end, name="row") as row:
        base = b.mul(row, i64(dim))
        x_row, y_row = ptr_add(b, src, base), ptr_add(b, y, base)
        d_row = ptr_add(b, delta, base) if residual else None
        b.store(const(vtype(lanes), 0.0), acc)

        def total(off, width):
            px = ptr_add(b, x_row, off)
            v = load(b, px, width)
            if residual:
                v = b.fadd(v, load(b, ptr_add(b, d_row, off), width))
                store(b, v, px)
            b.store(b.fadd(b.load(acc), widen(b, v, lanes)), acc)

        for_span(b, dim, total, lanes=lanes, name="sum")
        mean = b.fmul(hsum(b, b.load(acc)), const(F32, 1.0 / dim))
        b.store(const(vtype(lanes), 0.0), acc)

        def square(off, width):
            d = b.fsub(load(b, ptr_add(b, x_row, off), width), splat(b, mean, width))
            b.store(b.fadd(b.load(acc), widen(b, b.fmul(d, d), lanes)), acc)

        for_span(b, dim, square, lanes=lanes, name="sq")
        var = b.fmul(hsum(b, b.load(acc)), const(F32, 1.0 / dim))
        std = vector_intrinsic(b, "llvm.sqrt", F32, [b.fadd(var, const(F32, float(eps)))])
        inv = b.fdiv(const(F32, 1.0), std)

        def scale(off, width):
            d = b.fsub(load(b, ptr_add(b, x_row, off), width), splat(b, mean, width))
            v = b.fmul(b.fmul(d, splat(b, inv, width)), load(b, ptr_add(b, weight, off), width))
            if bias:
                v = b.fadd(v, load(b, ptr_add(b, shift, off), width))
            store(b, v, ptr_add(b, y_row, off))

        for_span(b, dim, scale, lanes=lanes, name="scale")
    b.ret_void()
    return fn
