"""Small llvmlite IR helpers shared by the linear-layer and quantization emitters.

Loop counters and accumulators live in entry-block allocas; LLVM's SROA/mem2reg turns
them into SSA registers, which keeps the emitters free of hand-written phi nodes.
"""

from __future__ import annotations

from contextlib import contextmanager

from llvmlite import ir

from sparsec.codegen.target import declare_function

VOID = ir.VoidType()
I1 = ir.IntType(1)
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F32 = ir.FloatType()
V16F32 = ir.VectorType(F32, 16)
V16I32 = ir.VectorType(I32, 16)
V64I8 = ir.VectorType(I8, 64)
V16I1 = ir.VectorType(I1, 16)
V64I1 = ir.VectorType(I1, 64)
V16I8 = ir.VectorType(I8, 16)


def i32(v: int) -> ir.Constant:
    return ir.Constant(I32, v)


def i64(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def f32(v: float) -> ir.Constant:
    return ir.Constant(F32, v)


def splat(b: ir.IRBuilder, scalar, vec_type: ir.VectorType):
    """Broadcast a scalar value into every lane of ``vec_type``."""
    n = vec_type.count
    undef = ir.Constant(vec_type, ir.Undefined)
    v = b.insert_element(undef, scalar, i32(0))
    return b.shuffle_vector(v, undef, ir.Constant(ir.VectorType(I32, n), [0] * n))


def vconst(vec_type: ir.VectorType, value) -> ir.Constant:
    return ir.Constant(vec_type, [value] * vec_type.count)


def intrinsic(b: ir.IRBuilder, name: str, ret, args: list):
    fn = declare_function(b.module, name, ir.FunctionType(ret, [a.type for a in args]))
    return b.call(fn, args)


def gep_bytes(b: ir.IRBuilder, base, offset, to_type=None):
    """``(to_type*)((i8*)base + offset)``; offset an i64 value or Python int."""
    if isinstance(offset, int):
        offset = i64(offset)
    p = b.gep(b.bitcast(base, I8.as_pointer()), [offset], inbounds=True)
    return b.bitcast(p, to_type.as_pointer()) if to_type is not None else p


def load_vec(b: ir.IRBuilder, ptr, vec_type: ir.VectorType, align: int = 4):
    return b.load(b.bitcast(ptr, vec_type.as_pointer()), align=align)


def store_vec(b: ir.IRBuilder, value, ptr, align: int = 4):
    b.store(value, b.bitcast(ptr, value.type.as_pointer()), align=align)


def masked_load_f32(b: ir.IRBuilder, ptr, mask_i16):
    """Load the lanes of 16 floats at ``ptr`` selected by the i16 bit mask (others 0)."""
    mask = b.bitcast(mask_i16, V16I1)
    return intrinsic(
        b,
        "llvm.masked.load.v16f32.p0",
        V16F32,
        [b.bitcast(ptr, V16F32.as_pointer()), i32(4), mask, vconst(V16F32, 0.0)],
    )


def masked_store_f32(b: ir.IRBuilder, value, ptr, mask_i16):
    mask = b.bitcast(mask_i16, V16I1)
    intrinsic(
        b,
        "llvm.masked.store.v16f32.p0",
        VOID,
        [value, b.bitcast(ptr, V16F32.as_pointer()), i32(4), mask],
    )


def new_function(module: ir.Module, name: str, args: list[ir.Type], arg_names: list[str]):
    if name in module.globals:
        raise ValueError(f"function {name!r} already exists in the module")
    fn = ir.Function(module, ir.FunctionType(VOID, args), name)
    fn.attributes.add("nounwind")
    for arg, arg_name in zip(fn.args, arg_names, strict=True):
        arg.name = arg_name
        if isinstance(arg.type, ir.PointerType):
            arg.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    return fn, b


class Var:
    """A mutable local (entry-block alloca) that SROA promotes to a register."""

    def __init__(self, b: ir.IRBuilder, ty: ir.Type, init=None, name: str = ""):
        with b.goto_entry_block():
            # allocas must precede the entry block's terminator, if it already has one
            if b.block.is_terminated:
                b.position_before(b.block.terminator)
            self.ptr = b.alloca(ty, name=name)
        self.b = b
        if init is not None:
            self.set(init)

    def get(self):
        return self.b.load(self.ptr)

    def set(self, value):
        self.b.store(value, self.ptr)


@contextmanager
def for_range(b: ir.IRBuilder, start, stop, step: int = 1, name: str = "i"):
    """``for (i = start; i < stop; i += step)`` over i32 or i64 values; yields ``i``."""
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


def thread_range(b: ir.IRBuilder, count, tid, nthreads):
    """Even contiguous split of ``range(count)``: [count*tid/n, count*(tid+1)/n) as i32.

    ``count`` is a Python int or a runtime i32 value.
    """
    c = i64(count) if isinstance(count, int) else b.sext(count, I64)
    t = b.sext(tid, I64)
    n = b.sext(nthreads, I64)
    start = b.sdiv(b.mul(c, t), n)
    end = b.sdiv(b.mul(c, b.add(t, i64(1))), n)
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
