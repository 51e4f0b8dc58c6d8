"""Row-wise and elementwise kernels: embedding lookup, residual add, SwiGLU/GeGLU
activation, in-place activations (ReLU, GELU), learned position embeddings, soft-capping.

Every kernel is a void C function whose last three parameters are
``(int32 n, int32 tid, int32 nthreads)``: ``n`` rows (tokens) this step, and the
calling thread's index among ``nthreads``. A thread handles a deterministic,
disjoint share of the work; the shares of tids 0..nthreads-1 together cover it all.
"""

from __future__ import annotations

import math

from llvmlite import ir

from sparsec.codegen.irbuild import (
    FPTR,
    I8PTR,
    I32,
    I32PTR,
    I64,
    check_positive,
    const,
    for_row_blocks,
    for_span,
    i64,
    kernel_function,
    load,
    loop,
    ptr_add,
    store,
    thread_share,
    vtype,
)
from sparsec.codegen.target import AVX512, Isa
from sparsec.codegen.vmath import fmax, gelu, gelu_tanh_mul, silu_mul, vtanh
from sparsec.errors import SparsecError

# Columns per work unit of the elementwise kernels: 1 KiB of each operand, enough
# work to be worth a unit, small enough that one decode row splits across threads.
ELEMENTWISE_BLOCK = 256


EMBEDDING_LAYOUTS = ("rows", "dense_f32", "dense_i8")


def emit_embedding(
    module: ir.Module,
    name: str,
    *,
    vocab: int,
    dim: int,
    layout: str = "rows",
    scale_at: int = 0,
    rows: int = 0,
    isa: Isa = AVX512,
) -> ir.Function:
    """``void name(const void* table, const int32_t* tokens, float* out[n, dim],
    int32 n, int32 tid, int32 nthreads)``: out[i] = row tokens[i] of the table.

    ``layout`` says what ``table`` points at:

    - ``rows``: a float32 ``[vocab, dim]`` matrix.
    - ``dense_f32``: a tied LM head's weights in the linear layout ``[vocab/R][dim][R]``
      (R = ``rows``, the packed blocks' rows: 16 on AVX-512),
      so the model stores that matrix once; a row is read at a 64-byte stride, 36 KiB a
      token for SmolLM2, nothing next to the weights a decode step streams.
    - ``dense_i8``: a tied int8 LM head's weights, ``[vocab/R][dim/4][R][4]`` int8, with
      its float32 per-row scales ``scale_at`` bytes after ``table``; a row is
      ``q * scale``, the head's own int8 grid (9 KiB a token for SmolLM2).

    A token id outside [0, vocab) yields a zero row instead of reading out of bounds;
    the runtime validates ids before they get here.
    """
    check_positive(vocab=vocab, dim=dim)
    if layout not in EMBEDDING_LAYOUTS:
        raise ValueError(f"embedding layout must be one of {EMBEDDING_LAYOUTS}, not {layout!r}")
    if layout != "rows":
        check_positive(rows=rows)
    fn = kernel_function(module, name, [FPTR, I32PTR, FPTR, I32, I32, I32])
    table, tokens, out, n, tid, nthreads = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    begin, end = thread_share(b, b.sext(n, I64), tid, nthreads)
    with loop(b, begin, end, name="row") as row:
        token = b.load(ptr_add(b, tokens, row))
        dst = ptr_add(b, out, b.mul(row, i64(dim)))
        in_range = b.icmp_unsigned("<", token, ir.Constant(I32, vocab))
        with b.if_else(in_range) as (valid, invalid):
            with valid:
                t = b.zext(token, I64)
                if layout == "dense_f32":
                    block, lane = b.udiv(t, i64(rows)), b.urem(t, i64(rows))
                    src = ptr_add(b, table, b.add(b.mul(block, i64(dim * rows)), lane))
                    with loop(b, i64(0), i64(dim), name="col") as col:
                        value = b.load(ptr_add(b, src, b.mul(col, i64(rows))))
                        b.store(value, ptr_add(b, dst, col))
                elif layout == "dense_i8":
                    block, lane = b.udiv(t, i64(rows)), b.urem(t, i64(rows))
                    _dequantize_vnni_row(
                        b, table, block, lane, dst, dim=dim, scale_at=scale_at, rows=rows
                    )
                else:
                    src = ptr_add(b, table, b.mul(t, i64(dim)))

                    def copy(off, width, src=src):
                        store(b, load(b, ptr_add(b, src, off), width), ptr_add(b, dst, off))

                    for_span(b, dim, copy, lanes=isa.lanes_f32, name="copy")
            with invalid:
                for_span(
                    b,
                    dim,
                    lambda off, width: store(b, const(vtype(width), 0.0), ptr_add(b, dst, off)),
                    lanes=isa.lanes_f32,
                    name="zero",
                )
    b.ret_void()
    return fn


def _dequantize_vnni_row(b, table, block, lane, dst, *, dim: int, scale_at: int, rows: int):
    """dst[c] = q[row, c] * scale[row] for the row in ``lane`` of ``block`` of a
    ``dense_i8`` weight: column c sits at byte ``(c/4)*4R + lane*4 + c%4`` of the block."""
    base = b.bitcast(table, I8PTR)
    quads = -(-dim // 4)
    row = b.add(b.mul(block, i64(rows)), lane)
    scales = b.bitcast(ptr_add(b, base, i64(scale_at)), FPTR)
    scale = b.load(ptr_add(b, scales, row))
    src = ptr_add(b, base, b.add(b.mul(block, i64(quads * rows * 4)), b.mul(lane, i64(4))))
    with loop(b, i64(0), i64(dim), name="col") as col:
        byte = b.add(b.mul(b.udiv(col, i64(4)), i64(rows * 4)), b.urem(col, i64(4)))
        q = b.sitofp(b.load(ptr_add(b, src, byte)), ir.FloatType())
        b.store(b.fmul(q, scale), ptr_add(b, dst, col))


def _emit_add(module: ir.Module, name: str, dim: int, isa: Isa, *, every_row: bool):
    """acc[n, dim] += x, where x is [n, dim] or, with ``every_row``, one [dim] row."""
    check_positive(dim=dim)
    fn = kernel_function(module, name, [FPTR, FPTR, I32, I32, I32])
    acc, x, n, tid, nthreads = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))

    def unit(row, col, length):
        base = b.add(b.mul(row, i64(dim)), col)
        a_row, x_row = ptr_add(b, acc, base), ptr_add(b, x, col if every_row else base)

        def add(off, width):
            pa = ptr_add(b, a_row, off)
            store(b, b.fadd(load(b, pa, width), load(b, ptr_add(b, x_row, off), width)), pa)

        for_span(b, length, add, lanes=isa.lanes_f32, name="bias" if every_row else "add")

    for_row_blocks(b, n, dim, ELEMENTWISE_BLOCK, tid, nthreads, unit)
    b.ret_void()
    return fn


def emit_residual_add(module: ir.Module, name: str, *, dim: int, isa: Isa = AVX512) -> ir.Function:
    """``void name(float* acc[n, dim], const float* x[n, dim], int32 n, tid, nthreads)``:
    acc += x."""
    return _emit_add(module, name, dim, isa, every_row=False)


def emit_bias_add(module: ir.Module, name: str, *, dim: int, isa: Isa = AVX512) -> ir.Function:
    """``void name(float* y[n, dim], const float* bias[dim], int32 n, tid, nthreads)``:
    y[r] += bias for every row r (a linear's bias, Qwen2's q/k/v)."""
    return _emit_add(module, name, dim, isa, every_row=True)


GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def emit_swiglu_act(
    module: ir.Module,
    name: str,
    *,
    ffn_dim: int,
    activation: str = "silu",
    isa: Isa = AVX512,
) -> ir.Function:
    """``void name(const float* gu[n, 2*ffn_dim], float* h[n, ffn_dim], int32 n, tid,
    nthreads)``: h = silu(gate) * up with gate = gu[:, :ffn_dim], up = gu[:, ffn_dim:].

    ``activation``: "silu" (SwiGLU), "gelu_tanh" (GeGLU with the tanh GELU: Gemma) or
    "gelu" (GeGLU with the exact GELU) is applied to the gate.
    """
    check_positive(ffn_dim=ffn_dim)
    if activation not in GATED_ACTIVATIONS:
        raise SparsecError(
            f"gated activation must be one of {GATED_ACTIVATIONS}, not {activation!r}"
        )
    fn = kernel_function(module, name, [FPTR, FPTR, I32, I32, I32])
    gu, h, n, tid, nthreads = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))

    def unit(row, col, length):
        gate = ptr_add(b, gu, b.add(b.mul(row, i64(2 * ffn_dim)), col))
        up = ptr_add(b, gate, ffn_dim)
        dst = ptr_add(b, h, b.add(b.mul(row, i64(ffn_dim)), col))

        def act(off, width):
            g = load(b, ptr_add(b, gate, off), width)
            u = load(b, ptr_add(b, up, off), width)
            if activation == "silu":
                value = silu_mul(b, g, u)
            elif activation == "gelu_tanh":
                value = gelu_tanh_mul(b, g, u)
            else:
                value = b.fmul(gelu(b, g), u)
            store(b, value, ptr_add(b, dst, off))

        for_span(b, length, act, lanes=isa.lanes_f32, name="act")

    for_row_blocks(b, n, ffn_dim, ELEMENTWISE_BLOCK, tid, nthreads, unit)
    b.ret_void()
    return fn


def _emit_in_place(module: ir.Module, name: str, dim: int, stride: int, isa: Isa, op):
    """``void name(float* x, int32 n, tid, nthreads)``: x[r, :dim] = op(x[r, :dim]) for
    rows ``stride`` floats apart."""
    check_positive(dim=dim, stride=stride)
    if stride < dim:
        raise SparsecError(f"row stride {stride} is shorter than the row ({dim} floats)")
    fn = kernel_function(module, name, [FPTR, I32, I32, I32])
    x, n, tid, nthreads = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))

    def unit(row, col, length):
        x_row = ptr_add(b, x, b.add(b.mul(row, i64(stride)), col))

        def apply(off, width):
            px = ptr_add(b, x_row, off)
            store(b, op(b, load(b, px, width)), px)

        for_span(b, length, apply, lanes=isa.lanes_f32, name="act")

    for_row_blocks(b, n, dim, ELEMENTWISE_BLOCK, tid, nthreads, unit)
    b.ret_void()
    return fn


ACTIVATIONS = ("relu", "gelu", "gelu_tanh")


def _relu(b: ir.IRBuilder, v: ir.Value) -> ir.Value:
    return fmax(b, v, const(v.type, 0.0))


def emit_activation(
    module: ir.Module, name: str, *, dim: int, stride: int, kind: str, isa: Isa = AVX512
) -> ir.Function:
    """``void name(float* x, int32 n, tid, nthreads)``: x = act(x) in place on the
    first ``dim`` floats of each row, rows ``stride`` floats apart (stride >= dim).

    ``kind``: "relu" (max(x, 0)), "gelu" (exact: 0.5 x (1 + erf(x / sqrt 2))) or
    "gelu_tanh" (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))).
    """
    ops = {"relu": _relu, "gelu": gelu, "gelu_tanh": gelu_tanh_mul}
    if kind not in ops:
        raise SparsecError(f"activation must be one of {ACTIVATIONS}, not {kind!r}")
    return _emit_in_place(module, name, dim, stride, isa, ops[kind])


def emit_softcap(
    module: ir.Module, name: str, *, dim: int, stride: int, cap: float, isa: Isa = AVX512
) -> ir.Function:
    """``void name(float* x, int32 n, tid, nthreads)``: x = cap * tanh(x / cap) in place
    on the first ``dim`` floats of rows ``stride`` floats apart (Gemma 2's final logit
    soft-capping)."""
    if not (isinstance(cap, float | int) and math.isfinite(cap) and cap > 0):
        raise SparsecError(f"soft-cap {cap!r} must be a finite positive number")

    def capped(b, v):
        inv = const(v.type, 1.0 / cap)
        return b.fmul(vtanh(b, b.fmul(v, inv)), const(v.type, float(cap)))

    return _emit_in_place(module, name, dim, stride, isa, capped)


def emit_scale(
    module: ir.Module, name: str, *, dim: int, stride: int, factor: float, isa: Isa = AVX512
) -> ir.Function:
    """``void name(float* x, int32 n, tid, nthreads)``: x *= factor in place on the first
    ``dim`` floats of rows ``stride`` floats apart (Gemma's embeddings times
    sqrt(hidden))."""
    if not (isinstance(factor, float | int) and math.isfinite(factor)):
        raise SparsecError(f"scale factor {factor!r} must be a finite number")
    return _emit_in_place(
        module, name, dim, stride, isa, lambda b, v: b.fmul(v, const(v.type, float(factor)))
    )
