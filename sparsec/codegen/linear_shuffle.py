"""Bitmask decode without expand loads (AVX2): the mask bits index a constant table
of shuffle controls that move a full vector loaded from the value stream into place.

AVX2 has no ``vexpandps``/``vpexpandb``; LLVM would scalarise ``masked.expandload``.
Instead each step loads one vector from the stream (the packed streams end with a
vector of slack, so the load never leaves the blob) and:

- fp32 (8 lanes, ``u8`` mask): ``vpermps`` by the mask's table row. A row holds, per
  lane, the rank of that lane among the set bits (low 3 bits, all vpermps reads) and
  the sign bit when the lane is set, which selects between the permuted value and 0.
- int8 (32 bytes, ``u32`` mask): ``vpshufb`` shuffles within each 16-byte half, so the
  two halves are loaded separately (the high half starts after the low half's
  popcount(mask & 0xffff) values) and each half's 16 control bytes are two 8-byte
  table rows, one per mask byte. The second byte's row must count on from the first
  byte's popcount p: the table holds 9 copies of the 256 rows, copy p with p added to
  every set lane (unset lanes hold 0x80, which vpshufb turns into 0).

The tables are module constants (8 KiB and 18 KiB), shared by every kernel of a model.
"""

from __future__ import annotations

from llvmlite import ir

from sparsec.codegen.irbuild import I8, I32, I64, Vectors, gep_bytes, i32, i64, intrinsic

_F32_TABLE = "sparsec.shuffle_decode.f32"
_I8_TABLE = "sparsec.shuffle_decode.i8"
_ZERO_LANE = 0x80  # a vpshufb control byte with the high bit set writes 0


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


def i8_table_rows() -> list[int]:
    """``9 * 256`` vpshufb controls of 8 bytes (little-endian int64): copy ``p`` of mask
    byte ``m`` sends lane j to value ``p + rank(j)`` when bit j of m is set."""
    rows = []
    for first in range(9):
        for mask in range(256):
            value, rank = 0, first
            for lane in range(8):
                if mask >> lane & 1:
                    byte, rank = rank, rank + 1
                else:
                    byte = _ZERO_LANE
                value |= byte << (8 * lane)
            rows.append(value - (1 << 64) if value >= 1 << 63 else value)
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


def shuffle_decode_i8(b: ir.IRBuilder, vptr, mask, v: Vectors):
    """(the step's 32 weight bytes, bytes of the stream it used) for int8 ``mask``."""
    if v.i8.count != 32:
        raise ValueError("the int8 shuffle decode is written for 32-byte vectors")
    rows = i8_table_rows()
    table = _table(b.module, _I8_TABLE, ir.ArrayType(I64, len(rows)), rows)

    def popcount(x):
        return intrinsic(b, "llvm.ctpop.i32", I32, [x])

    def mask_byte(index):
        return b.and_(b.lshr(mask, i32(8 * index)), i32(0xFF)) if index else b.and_(mask, i32(0xFF))

    def row(copy, byte):
        index = b.add(b.mul(copy, i32(256)), byte) if copy is not None else byte
        return b.load(b.gep(table, [i64(0), b.zext(index, I64)], inbounds=True), align=8)

    bytes_ = [mask_byte(i) for i in range(4)]
    copies = [None, popcount(bytes_[0]), None, popcount(bytes_[2])]
    # Each row is broadcast from memory (a load, no shuffle port) and the four are
    # blended (vpblendd): inserting them lane by lane costs a shuffle each, and the
    # shuffle port is what bounds this loop.
    quad = ir.VectorType(I64, 4)
    rows = [
        b.shuffle_vector(
            b.insert_element(ir.Constant(quad, None), row(copy, byte), i32(0)),
            ir.Constant(quad, None),
            ir.Constant(ir.VectorType(I32, 4), [0, 0, 0, 0]),
        )
        for copy, byte in zip(copies, bytes_, strict=True)
    ]
    low_pair = b.shuffle_vector(rows[0], rows[1], ir.Constant(ir.VectorType(I32, 4), [0, 5, 2, 3]))
    high_pair = b.shuffle_vector(rows[2], rows[3], ir.Constant(ir.VectorType(I32, 4), [0, 1, 2, 7]))
    control = b.shuffle_vector(
        low_pair, high_pair, ir.Constant(ir.VectorType(I32, 4), [0, 1, 6, 7])
    )
    half = ir.VectorType(I8, 16)
    low_count = popcount(b.and_(mask, i32(0xFFFF)))
    low = b.load(b.bitcast(vptr, half.as_pointer()), align=1)
    high = b.load(gep_bytes(b, vptr, b.zext(low_count, I64), half), align=1)
    values = b.shuffle_vector(low, high, ir.Constant(ir.VectorType(I32, 32), list(range(32))))
    weights = intrinsic(b, "llvm.x86.avx2.pshuf.b", v.i8, [values, b.bitcast(control, v.i8)])
    return weights, popcount(mask)
