"""Bitmask decode without expand loads (AVX2): the mask bits index a constant table
of permutations that move a full vector loaded from the value stream into place.

AVX2 has no ``vexpandps``; LLVM would scalarise ``masked.expandload``. Instead each
step loads 8 floats from the stream (the packed streams end with a vector of slack, so
the load never leaves the blob) and permutes them with ``vpermps`` by the mask's table
row. A row holds, per lane, the rank of that lane among the set bits (the low 3 bits,
all vpermps reads) and the sign bit when the lane is set, which selects between the
permuted value and 0. The table (8 KiB) is a module constant shared by every kernel of
a model. (int8 has no AVX2 bitmask kernel: docs/experiments/avx2-bitmask-int8.md.)
"""

from __future__ import annotations

from llvmlite import ir

from sparsec.codegen.irbuild import I64, Vectors, i64, intrinsic

_F32_TABLE = "sparsec.shuffle_decode.f32"


def f32_table_rows(lanes: int) -> list[list[int]]:
    """Per mask value: the vpermps control of each lane, the sign bit set when the lane
    is kept (as signed int32)."""
    rows = []
    for mask in range(1 << lanes):
        row, rank = [], 0
        for lane in range(lanes):
            if mask >> lane & 1:
                row.append(rank - (1 << 31))
                rank += 1
            else:
                row.append(0)
        rows.append(row)
    return rows


def _table(module: ir.Module, name: str, ty: ir.ArrayType, values) -> ir.GlobalVariable:
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    table = ir.GlobalVariable(module, ty, name)
    table.linkage = "private"
    table.global_constant = True
    table.unnamed_addr = True
    table.align = 64
    table.initializer = ir.Constant(ty, values)
    return table


def shuffle_decode_f32(b: ir.IRBuilder, vptr, mask, v: Vectors):
    """(the step's weight vector, bytes of the stream it used) for fp32 ``mask``."""
    lanes = v.lanes
    row_type = v.i32
    table_type = ir.ArrayType(row_type, 1 << lanes)
    rows = [ir.Constant(row_type, r) for r in f32_table_rows(lanes)]
    table = _table(b.module, _F32_TABLE, table_type, rows)
    control = b.load(b.gep(table, [i64(0), b.zext(mask, I64)], inbounds=True), align=32)
    values = b.load(b.bitcast(vptr, v.f32.as_pointer()), align=4)
    permuted = intrinsic(b, "llvm.x86.avx2.permps", v.f32, [values, control])
    keep = b.icmp_signed("<", control, ir.Constant(row_type, [0] * lanes))
    weights = b.select(keep, permuted, ir.Constant(v.f32, [0.0] * lanes))
    count = intrinsic(b, f"llvm.ctpop.i{mask.type.width}", mask.type, [mask])
    return weights, b.mul(count, ir.Constant(mask.type, 4))
