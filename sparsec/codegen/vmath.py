"""IR building blocks for the op kernels: vector loads/stores, loops, reductions, exp.

Everything here emits llvmlite IR inline at the builder's position. Vectors are
``<W x float>`` with W = 16 (one zmm register) for the bulk of a span and 8, 4, 1 for
its compile-time tail, so a kernel specialized for any dimension runs full-width
vector code without runtime remainder checks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

from llvmlite import ir

from sparsec.codegen.target import declare_function
from sparsec.errors import SparsecError

F32 = ir.FloatType()
I32 = ir.IntType(32)
I64 = ir.IntType(64)
FPTR = F32.as_pointer()
I32PTR = I32.as_pointer()
VOID = ir.VoidType()

VW = 16  # floats per zmm register
TAIL_WIDTHS = (8, 4, 1)  # widths used for what is left of a span after the 16-wide part


def vtype(width: int) -> ir.VectorType:
    return ir.VectorType(F32, width)


def const(ty: ir.Type, value: float | int) -> ir.Constant:
    """A scalar constant, or a splat when ``ty`` is a vector type."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)
    return ir.Constant(ty, value)


def i64(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def i32(value: int) -> ir.Constant:
    return ir.Constant(I32, value)


def check_positive(**params: int) -> None:
    """Kernel parameters come from the model config: reject nonsense by name."""
    for key, value in params.items():
        if not isinstance(value, int) or value <= 0:
            raise SparsecError(f"kernel parameter {key}={value!r} must be a positive integer")


def kernel_function(module: ir.Module, name: str, arg_types: list[ir.Type]) -> ir.Function:
    """A void C-ABI function; the last three parameters are (n, tid, nthreads)."""
    fn = ir.Function(module, ir.FunctionType(VOID, arg_types), name)
    fn.attributes.add("nounwind")
    return fn


def intrinsic(b: ir.IRBuilder, base: str, ty: ir.Type, args: list[ir.Value]) -> ir.Value:
    """Call an overloaded elementwise intrinsic (``llvm.fma``, ``llvm.sqrt`` ...) on ``ty``."""
    if isinstance(ty, ir.VectorType):
        suffix = f"v{ty.count}{ty.element.intrinsic_name}"
    else:
        suffix = ty.intrinsic_name
    name = f"{base}.{suffix}"
    fn = declare_function(b.module, name, ir.FunctionType(ty, [ty] * len(args)))
    return b.call(fn, args)


# ----------------------------------------------------------------- memory and lanes


def ptr_add(b: ir.IRBuilder, ptr: ir.Value, offset: ir.Value | int) -> ir.Value:
    """``ptr + offset`` elements (offset an i64 value or a Python int)."""
    if isinstance(offset, int):
        if offset == 0:
            return ptr
        offset = i64(offset)
    return b.gep(ptr, [offset], inbounds=True)


def load(b: ir.IRBuilder, ptr: ir.Value, width: int) -> ir.Value:
    """Load ``width`` consecutive floats as a vector (unaligned)."""
    return b.load(b.bitcast(ptr, vtype(width).as_pointer()), align=4)


def store(b: ir.IRBuilder, value: ir.Value, ptr: ir.Value) -> None:
    b.store(value, b.bitcast(ptr, value.type.as_pointer()), align=4)


def splat(b: ir.IRBuilder, scalar: ir.Value, width: int) -> ir.Value:
    """A ``width``-lane vector with ``scalar`` (float or integer) in every lane."""
    vt = ir.VectorType(scalar.type, width)
    one = b.insert_element(ir.Constant(vt, None), scalar, i32(0))
    return b.shuffle_vector(
        one, ir.Constant(vt, None), ir.Constant(ir.VectorType(I32, width), [0] * width)
    )


def broadcast_lane(b: ir.IRBuilder, vec: ir.Value, lane: int, width: int) -> ir.Value:
    """A ``width``-wide vector holding lane ``lane`` of ``vec`` everywhere."""
    mask = ir.Constant(ir.VectorType(I32, width), [lane] * width)
    return b.shuffle_vector(vec, ir.Constant(vec.type, None), mask)


def shuffle(b: ir.IRBuilder, x: ir.Value, y: ir.Value, lanes: list[int]) -> ir.Value:
    return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(I32, len(lanes)), lanes))


def widen(b: ir.IRBuilder, vec: ir.Value, width: int = VW) -> ir.Value:
    """Zero-extend a narrower vector to ``width`` lanes (extra lanes are 0.0)."""
    w = vec.type.count
    if w == width:
        return vec
    zero = const(vec.type, 0.0)
    return shuffle(b, vec, zero, list(range(w)) + [w] * (width - w))


def fmax(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """max(x, y); a single vmaxps (which NaN wins is irrelevant here)."""
    return b.select(b.fcmp_ordered(">", x, y), x, y)


def fma(b: ir.IRBuilder, x: ir.Value, y: ir.Value, z: ir.Value) -> ir.Value:
    """x * y + z, fused."""
    return intrinsic(b, "llvm.fma", x.type, [x, y, z])


def _reduce(b: ir.IRBuilder, vec: ir.Value, combine) -> ir.Value:
    # Halve the vector until one lane is left: log2(width) shuffle+op steps.
    width = vec.type.count
    while width > 1:
        half = width // 2
        lo = shuffle(b, vec, vec, list(range(half)))
        hi = shuffle(b, vec, vec, list(range(half, width)))
        vec = combine(lo, hi)
        width = half
    return b.extract_element(vec, i32(0))


def hsum(b: ir.IRBuilder, vec: ir.Value) -> ir.Value:
    """Sum of all lanes (width a power of two)."""
    return _reduce(b, vec, b.fadd)


def hmax(b: ir.IRBuilder, vec: ir.Value) -> ir.Value:
    return _reduce(b, vec, lambda x, y: fmax(b, x, y))


def transpose_sums(b: ir.IRBuilder, vecs: list[ir.Value]) -> ir.Value:
    """For 16 vectors of 16 partial sums, one vector whose lane i is the sum of vecs[i].

    A butterfly: each level adds the two halves of every lane block of a pair of
    vectors while packing the pair into one vector, so 16 horizontal sums cost 15
    shuffle pairs + 15 adds instead of 16 separate reductions.
    """
    assert len(vecs) == VW and all(v.type.count == VW for v in vecs)
    block = VW // 2
    while len(vecs) > 1:
        first, second = [], []
        for k in range(VW // (2 * block)):
            first += list(range(2 * block * k, 2 * block * k + block))
            second += list(range(2 * block * k + block, 2 * block * (k + 1)))
        lanes_a = first + [VW + i for i in first]
        lanes_b = second + [VW + i for i in second]
        vecs = [
            b.fadd(shuffle(b, x, y, lanes_a), shuffle(b, x, y, lanes_b))
            for x, y in zip(vecs[0::2], vecs[1::2], strict=True)
        ]
        block //= 2
    return vecs[0]


# ----------------------------------------------------------------- control flow


def entry_alloca(b: ir.IRBuilder, ty: ir.Type, init: ir.Value | None = None) -> ir.Value:
    """A stack slot in the entry block (so LLVM promotes it to a register), optionally set."""
    with b.goto_entry_block():
        slot = b.alloca(ty)
    if init is not None:
        b.store(init, slot)
    return slot


@contextlib.contextmanager
def loop(
    b: ir.IRBuilder, start: ir.Value, stop: ir.Value, step: int = 1, name: str = "loop"
) -> Iterator[ir.Value]:
    """``for (i = start; i < stop; i += step)`` (signed); yields i inside the body."""
    pre = b.block
    head = b.append_basic_block(f"{name}.head")
    body = b.append_basic_block(f"{name}.body")
    done = b.append_basic_block(f"{name}.end")
    b.branch(head)
    b.position_at_end(head)
    index = b.phi(start.type, name=f"{name}.i")
    index.add_incoming(start, pre)
    b.cbranch(b.icmp_signed("<", index, stop), body, done)
    b.position_at_end(body)
    yield index
    index.add_incoming(b.add(index, ir.Constant(start.type, step)), b.block)
    b.branch(head)
    b.position_at_end(done)


def thread_share(
    b: ir.IRBuilder, total: ir.Value, tid: ir.Value, nthreads: ir.Value
) -> tuple[ir.Value, ir.Value]:
    """[begin, end) of thread ``tid``'s contiguous share of ``total`` (i64) work units.

    begin = total * tid / nthreads: deterministic, disjoint, and together complete.
    """
    t = b.sext(tid, I64)
    nt = b.sext(nthreads, I64)
    begin = b.sdiv(b.mul(total, t), nt)
    end = b.sdiv(b.mul(total, b.add(t, i64(1))), nt)
    return begin, end


def span_chunks(length: int) -> list[tuple[int, int]]:
    """The (offset, width) chunks covering a span of ``length`` floats: 16s, then 8/4/1."""
    chunks = [(off, VW) for off in range(0, length - length % VW, VW)]
    off = length - length % VW
    for width in TAIL_WIDTHS:
        while length - off >= width:
            chunks.append((off, width))
            off += width
    return chunks


def for_span(
    b: ir.IRBuilder,
    length: int,
    body: Callable[[ir.Value, int], None],
    *,
    unroll_limit: int = 8,
    name: str = "span",
) -> None:
    """Call ``body(offset: i64 value, width)`` over a compile-time span of floats.

    Up to ``unroll_limit`` full vectors are emitted straight-line; longer spans get a
    runtime loop over the 16-wide part (LLVM unrolls it further as it sees fit). The
    tail (< 16 floats) is always straight-line.
    """
    nfull = length // VW
    if nfull > unroll_limit:
        with loop(b, i64(0), i64(nfull * VW), VW, name=name) as off:
            body(off, VW)
        tail = [(o, w) for o, w in span_chunks(length) if o >= nfull * VW]
    else:
        tail = span_chunks(length)
    for off, width in tail:
        body(i64(off), width)


def for_row_blocks(
    b: ir.IRBuilder,
    n: ir.Value,
    row_len: int,
    block: int,
    tid: ir.Value,
    nthreads: ir.Value,
    body: Callable[[ir.Value, ir.Value, int], None],
) -> None:
    """Split n rows of ``row_len`` floats into blocks and run this thread's share.

    Work units are (row, block of ``block`` columns), so a single row (decode) is
    still shared among threads. ``body(row: i64, col: i64, length: int)`` handles one
    unit; ``length`` is a compile-time constant (the last block of a row may be short).
    """
    nblocks = -(-row_len // block)
    last_len = row_len - (nblocks - 1) * block
    begin, end = thread_share(b, b.mul(b.sext(n, I64), i64(nblocks)), tid, nthreads)
    with loop(b, begin, end, name="unit") as unit:
        row = b.udiv(unit, i64(nblocks))
        blk = b.sub(unit, b.mul(row, i64(nblocks)))
        col = b.mul(blk, i64(block))
        if last_len == block:
            body(row, col, block)
        else:
            with b.if_else(b.icmp_signed("==", blk, i64(nblocks - 1))) as (last, full):
                with last:
                    body(row, col, last_len)
                with full:
                    body(row, col, block)


# ----------------------------------------------------------------- exp and friends

_LOG2E = 1.4426950408889634
# ln 2 split so that n * LN2_HI is exact for |n| < 2^9 (Cody-Waite range reduction).
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
# exp(r) = 1 + r + r^2 * P(r) on |r| <= ln2/2: minimax polynomial coefficients
# (the classic Cephes expf set), about 1 ulp in float32.
_EXP_POLY = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)
# Below EXP_LO exp(x) is smaller than the least float32 denormal and returns 0;
# above EXP_HI it overflows to inf.
EXP_LO = -104.0
EXP_HI = 88.72283


def vexp(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """exp(x) for float or float vectors: ~1e-7 relative error, 0 below -104, inf above 88.7.

    -inf gives 0 (masked softmax scores rely on this); NaN stays NaN.
    """
    ty = x.type
    ity = ir.VectorType(I32, ty.count) if isinstance(ty, ir.VectorType) else I32
    # Clamp so that the integer exponent stays in range; the selects below fix the ends.
    xc = b.select(b.fcmp_ordered("<", x, const(ty, EXP_LO)), const(ty, EXP_LO), x)
    xc = b.select(b.fcmp_ordered(">", xc, const(ty, EXP_HI)), const(ty, EXP_HI), xc)
    n = intrinsic(b, "llvm.rint", ty, [b.fmul(xc, const(ty, _LOG2E))])
    r = fma(b, n, const(ty, -_LN2_HI), xc)
    r = fma(b, n, const(ty, -_LN2_LO), r)
    poly = const(ty, _EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        poly = fma(b, poly, r, const(ty, c))
    er = b.fadd(fma(b, poly, b.fmul(r, r), r), const(ty, 1.0))
    # Scale by 2^n as 2^(n//2) * 2^(n - n//2): n spans [-150, 128], beyond what one
    # exponent field holds, while both halves are normal floats and the product
    # rounds into the denormal range or up to the float maximum correctly.
    ni = b.fptosi(n, ity)
    n1 = b.ashr(ni, const(ity, 1))
    n2 = b.sub(ni, n1)
    bias, shift = const(ity, 127), const(ity, 23)
    pow1 = b.bitcast(b.shl(b.add(n1, bias), shift), ty)
    pow2 = b.bitcast(b.shl(b.add(n2, bias), shift), ty)
    result = b.fmul(b.fmul(er, pow1), pow2)
    result = b.select(b.fcmp_ordered("<", x, const(ty, EXP_LO)), const(ty, 0.0), result)
    return b.select(b.fcmp_ordered(">", x, const(ty, EXP_HI)), const(ty, math.inf), result)


def silu_mul(b: ir.IRBuilder, gate: ir.Value, up: ir.Value) -> ir.Value:
    """silu(gate) * up = gate * up / (1 + exp(-gate))."""
    ty = gate.type
    denom = b.fadd(const(ty, 1.0), vexp(b, b.fsub(const(ty, 0.0), gate)))
    return b.fdiv(b.fmul(gate, up), denom)
