"""The llvmlite IR building blocks every emitter uses: types, constants, intrinsics,
memory, loops and thread splits. One definition each; what depends on the ISA (vector
width, span chunks) takes the target's ``Isa`` or its lanes, never a module constant.

Loop counters and accumulators live either in phis (``loop``) or in entry-block allocas
(``for_range``, ``Var``) that LLVM's SROA/mem2reg turns into SSA registers; the op
kernels use the first, the linear kernels the second (their nests keep several
accumulators per iteration, which allocas keep readable).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from llvmlite import ir

from sparsec.codegen.target import Isa, declare_function
from sparsec.errors import SparsecError

VOID = ir.VoidType()
I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F32 = ir.FloatType()
FPTR = F32.as_pointer()
I32PTR = I32.as_pointer()
I8PTR = I8.as_pointer()
TAIL_WIDTHS = (8, 4, 1)  # widths used for what is left of a span after the full vectors


@dataclass(frozen=True)
class Vectors:
    """The vector types of one ISA's register (AVX-512: 16 float32 lanes)."""

    lanes: int  # float32 (or int32) lanes of one register

    @property
    def f32(self) -> ir.VectorType:
        return ir.VectorType(F32, self.lanes)

    @property
    def i32(self) -> ir.VectorType:
        return ir.VectorType(I32, self.lanes)

    @property
    def i8(self) -> ir.VectorType:
        """The same register as bytes."""
        return ir.VectorType(I8, 4 * self.lanes)

    @property
    def i8_lanes(self) -> ir.VectorType:
        """One byte per float32 lane (what packing int32 lanes to int8 gives)."""
        return ir.VectorType(I8, self.lanes)

    @property
    def mask(self) -> ir.VectorType:
        """A lane mask of the float32/int32 register."""
        return ir.VectorType(I1, self.lanes)

    @property
    def mask_i8(self) -> ir.VectorType:
        """A lane mask of the byte register."""
        return ir.VectorType(I1, 4 * self.lanes)


def vectors(isa: Isa) -> Vectors:
    return Vectors(isa.lanes_f32)


def vtype(width: int) -> ir.VectorType:
    """``<width x float>``."""
    return ir.VectorType(F32, width)


# ----------------------------------------------------------------- constants


def i32(v: int) -> ir.Constant:
    return ir.Constant(I32, v)


def i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def f32(v: float) -> ir.Constant:
    return ir.Constant(F32, v)


def const(ty: ir.Type, value: float | int) -> ir.Constant:
    """A scalar constant, or a splat when ``ty`` is a vector type."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)
    return ir.Constant(ty, value)


def check_positive(**params: int) -> None:
    """Kernel parameters come from the model config: reject nonsense by name."""
    for key, value in params.items():
        if not isinstance(value, int) or value <= 0:
            raise SparsecError(f"kernel parameter {key}={value!r} must be a positive integer")


# ----------------------------------------------------------------- functions, intrinsics


def kernel_function(module: ir.Module, name: str, arg_types: list[ir.Type]) -> ir.Function:
    """A void C-ABI function; the last three parameters are (n, tid, nthreads)."""
    fn = ir.Function(module, ir.FunctionType(VOID, arg_types), name)
    fn.attributes.add("nounwind")
    return fn


def new_function(module: ir.Module, name: str, args: list[ir.Type], arg_names: list[str]):
    """A void nounwind function with named, noalias pointer arguments, and its builder."""
    if name in module.globals:
        raise ValueError(f"function {name!r} already exists in the module")
    fn = kernel_function(module, name, args)
    for arg, arg_name in zip(fn.args, arg_names, strict=True):
        arg.name = arg_name
        if isinstance(arg.type, ir.PointerType):
            arg.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    return fn, b


def intrinsic(b: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Value]) -> ir.Value:
    """Call the intrinsic ``name`` (its full mangled name, e.g. ``llvm.ctpop.i16``)."""
    fn = declare_function(b.module, name, ir.FunctionType(ret, [a.type for a in args]))
    return b.call(fn, args)


def vector_intrinsic(b: ir.IRBuilder, base: str, ty: ir.Type, args: list[ir.Value]) -> ir.Value:
    """Call an overloaded elementwise intrinsic (``llvm.fma``, ``llvm.sqrt`` ...) on ``ty``."""
    if isinstance(ty, ir.VectorType):
        suffix = f"v{ty.count}{ty.element.intrinsic_name}"
    else:
        suffix = ty.intrinsic_name
    return intrinsic(b, f"{base}.{suffix}", ty, args)


# ----------------------------------------------------------------- memory and lanes


def ptr_add(b: ir.IRBuilder, ptr: ir.Value, offset: ir.Value | int) -> ir.Value:
    """``ptr + offset`` elements (offset an i64 value or a Python int)."""
    if isinstance(offset, int):
        if offset == 0:
            return ptr
        offset = i64(offset)
    return b.gep(ptr, [offset], inbounds=True)


def gep_bytes(b: ir.IRBuilder, base, offset, to_type=None):
    """``(to_type*)((i8*)base + offset)``; offset an i64 value or Python int."""
    if isinstance(offset, int):
        offset = i64(offset)
    p = b.gep(b.bitcast(base, I8PTR), [offset], inbounds=True)
    return b.bitcast(p, to_type.as_pointer()) if to_type is not None else p


def load_vec(b: ir.IRBuilder, ptr, vec_type: ir.VectorType, align: int = 4):
    return b.load(b.bitcast(ptr, vec_type.as_pointer()), align=align)


def load(b: ir.IRBuilder, ptr: ir.Value, width: int) -> ir.Value:
    """Load ``width`` consecutive floats as a vector (unaligned)."""
    return load_vec(b, ptr, vtype(width))


def store(b: ir.IRBuilder, value: ir.Value, ptr: ir.Value, align: int = 4) -> None:
    b.store(value, b.bitcast(ptr, value.type.as_pointer()), align=align)


def masked_load(b: ir.IRBuilder, ptr, bits, vec_type: ir.VectorType):
    """Load the float lanes of ``vec_type`` at ``ptr`` selected by the integer bit mask
    ``bits`` (one bit a lane); the others are 0."""
    mask = b.bitcast(bits, ir.VectorType(I1, vec_type.count))
    return intrinsic(
        b,
        f"llvm.masked.load.v{vec_type.count}f32.p0",
        vec_type,
        [b.bitcast(ptr, vec_type.as_pointer()), i32(4), mask, const(vec_type, 0.0)],
    )


def masked_store(b: ir.IRBuilder, value, ptr, bits):
    """Store the float lanes of ``value`` selected by the integer bit mask ``bits``."""
    vec_type = value.type
    mask = b.bitcast(bits, ir.VectorType(I1, vec_type.count))
    intrinsic(
        b,
        f"llvm.masked.store.v{vec_type.count}f32.p0",
        VOID,
        [value, b.bitcast(ptr, vec_type.as_pointer()), i32(4), mask],
    )


def splat(b: ir.IRBuilder, scalar: ir.Value, width: int) -> ir.Value:
    """A ``width``-lane vector with ``scalar`` (float, integer or i1) in every lane."""
    vt = ir.VectorType(scalar.type, width)
    undef = ir.Constant(vt, ir.Undefined)
    one = b.insert_element(undef, scalar, i32(0))
    return b.shuffle_vector(one, undef, ir.Constant(ir.VectorType(I32, width), [0] * width))


def broadcast_lane(b: ir.IRBuilder, vec: ir.Value, lane: int, width: int) -> ir.Value:
    """A ``width``-wide vector holding lane ``lane`` of ``vec`` everywhere."""
    mask = ir.Constant(ir.VectorType(I32, width), [lane] * width)
    return b.shuffle_vector(vec, ir.Constant(vec.type, None), mask)


def shuffle(b: ir.IRBuilder, x: ir.Value, y: ir.Value, lanes: list[int]) -> ir.Value:
    return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(I32, len(lanes)), lanes))


def widen(b: ir.IRBuilder, vec: ir.Value, width: int) -> ir.Value:
    """Zero-extend a narrower vector to ``width`` lanes (extra lanes are 0.0)."""
    w = vec.type.count
    if w == width:
        return vec
    zero = const(vec.type, 0.0)
    return shuffle(b, vec, zero, list(range(w)) + [w] * (width - w))


# ----------------------------------------------------------------- locals and loops


def entry_alloca(
    b: ir.IRBuilder,
    ty: ir.Type,
    init: ir.Value | None = None,
    *,
    name: str = "",
    align: int | None = None,
) -> ir.Value:
    """A stack slot in the entry block (so LLVM promotes it to a register, or keeps one
    fixed buffer for the whole function), optionally set."""
    with b.goto_entry_block():
        # allocas must precede the entry block's terminator, if it already has one
        if b.block.is_terminated:
            b.position_before(b.block.terminator)
        slot = b.alloca(ty, name=name)
    if align is not None:
        slot.align = align
    if init is not None:
        b.store(init, slot)
    return slot


class Var:
    """A mutable local (entry-block alloca) that SROA promotes to a register."""

    def __init__(self, b: ir.IRBuilder, ty: ir.Type, init=None, name: str = ""):
        self.ptr = entry_alloca(b, ty, name=name)
        self.b = b
        if init is not None:
            self.set(init)

    def get(self):
        return self.b.load(self.ptr)

    def set(self, value):
        self.b.store(value, self.ptr)


@contextlib.contextmanager
def loop(
    b: ir.IRBuilder, start: ir.Value, stop: ir.Value, step: int = 1, name: str = "loop"
) -> Iterator[ir.Value]:
    """``for (i = start; i < stop; i += step)`` (signed, a phi); yields i in the body."""
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


@contextlib.contextmanager
def for_range(b: ir.IRBuilder, start, stop, step: int = 1, name: str = "i"):
    """``for (i = start; i < stop; i += step)`` over i32 or i64 values, the counter in an
    alloca (so the body may branch freely); yields ``i``."""
    ty = stop.type if isinstance(stop, ir.Value) else start.type
    if isinstance(start, int):
        start = ir.Constant(ty, start)
    if isinstance(stop, int):
        stop = ir.Constant(ty, stop)
    var = Var(b, ty, start, name)
    cond = b.append_basic_block(f"{name}.cond")
    body = b.append_basic_block(f"{name}.body")
    done = b.append_basic_block(f"{name}.done")
    b.branch(cond)
    b.position_at_end(cond)
    i = var.get()
    b.cbranch(b.icmp_signed("<", i, stop), body, done)
    b.position_at_end(body)
    yield b.load(var.ptr)
    b.store(b.add(b.load(var.ptr), ir.Constant(ty, step)), var.ptr)
    b.branch(cond)
    b.position_at_end(done)


def span_chunks(length: int, lanes: int) -> list[tuple[int, int]]:
    """The (offset, width) chunks covering a span of ``length`` floats: full vectors of
    ``lanes``, then 8/4/1."""
    chunks = [(off, lanes) for off in range(0, length - length % lanes, lanes)]
    off = length - length % lanes
    for width in TAIL_WIDTHS:
        while width < lanes and length - off >= width:
            chunks.append((off, width))
            off += width
    return chunks


def for_span(
    b: ir.IRBuilder,
    length: int,
    body: Callable[[ir.Value, int], None],
    *,
    lanes: int,
    unroll_limit: int = 8,
    name: str = "span",
) -> None:
    """Call ``body(offset: i64 value, width)`` over a compile-time span of floats.

    Up to ``unroll_limit`` full vectors are emitted straight-line; longer spans get a
    runtime loop over the full-vector part (LLVM unrolls it further as it sees fit). The
    tail (< ``lanes`` floats) is always straight-line.
    """
    nfull = length // lanes
    if nfull > unroll_limit:
        with loop(b, i64(0), i64(nfull * lanes), lanes, name=name) as off:
            body(off, lanes)
        tail = [(o, w) for o, w in span_chunks(length, lanes) if o >= nfull * lanes]
    else:
        tail = span_chunks(length, lanes)
    for off, width in tail:
        body(i64(off), width)


# ----------------------------------------------------------------- thread splits


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


def thread_range(b: ir.IRBuilder, count, tid, nthreads):
    """``thread_share`` of ``count`` (a Python int or a runtime i32) as i32 bounds."""
    c = i64(count) if isinstance(count, int) else b.sext(count, I64)
    start, end = thread_share(b, c, tid, nthreads)
    return b.trunc(start, I32), b.trunc(end, I32)


def lower_bound(b: ir.IRBuilder, table_ptr, size: int, key):
    """First index i in [0, size) with table[i] >= key (i64 table, sorted), else size."""
    lo = Var(b, I64, i64(0), "lb.lo")
    hi = Var(b, I64, i64(size), "lb.hi")
    cond = b.append_basic_block("lb.cond")
    body = b.append_basic_block("lb.body")
    done = b.append_basic_block("lb.done")
    b.branch(cond)
    b.position_at_end(cond)
    b.cbranch(b.icmp_signed("<", lo.get(), hi.get()), body, done)
    b.position_at_end(body)
    lo_v, hi_v = lo.get(), hi.get()
    mid = b.add(lo_v, b.ashr(b.sub(hi_v, lo_v), i64(1)))
    val = b.load(b.gep(table_ptr, [mid], inbounds=True))
    less = b.icmp_signed("<", val, key)
    lo.set(b.select(less, b.add(mid, i64(1)), lo_v))
    hi.set(b.select(less, hi_v, mid))
    b.branch(cond)
    b.position_at_end(done)
    return lo.get()


def balanced_thread_range(b: ir.IRBuilder, cum_table_ptr, count: int, tid, nthreads):
    """Split ``range(count)`` so each thread gets about the same cost.

    ``cum_table_ptr`` points at ``count + 1`` non-decreasing i64 cumulative costs (a
    block's cost is table[i+1] - table[i]). Thread t starts at the first block whose
    cumulative cost reaches total*t/n, so the slices partition the range exactly.
    """
    first = b.load(cum_table_ptr)
    total = b.sub(b.load(b.gep(cum_table_ptr, [i64(count)], inbounds=True)), first)
    t = b.sext(tid, I64)
    n = b.sext(nthreads, I64)

    def bound(k):
        key = b.add(first, b.sdiv(b.mul(total, k), n))
        return lower_bound(b, cum_table_ptr, count, key)

    start = bound(t)
    t1 = b.add(t, i64(1))
    end = b.select(b.icmp_signed(">=", t1, n), i64(count), bound(t1))
    return b.trunc(start, I32), b.trunc(end, I32)


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
