"""Bitmask decode without expand loads (AVX2): the mask bits index a constant table
of shuffle controls that move full vectors loaded from the value stream into place.

AVX2 has no ``vexpandps``/``vpexpandb``; LLVM would scalarise ``masked.expandload``.
Instead each step loads from the stream (the packed streams end with a vector of slack,
so the loads never leave the blob) and shuffles:

- fp32 (8 lanes, ``u8`` mask): ``vpermps`` by the mask's table row. A row holds, per
  lane, the rank of that lane among the set bits (the low 3 bits, all vpermps reads)
  and the sign bit when the lane is set, which selects between the permuted value and 0.
- int8 (32 bytes, a ``u16`` mask of byte pairs): ``vpshufb`` per 16-byte half, each
  half's control one table row indexed by its mask byte
  (docs/experiments/avx2-bitmask-int8.md: why pairs, not bytes).

The tables (8 KiB and 4 KiB) are module constants shared by every kernel of a model.
"""

from __future__ import annotations

from llvmlite import ir

from sparsec.codegen.irbuild import I8, I32, I64, Vectors, gep_bytes, i32, i64, intrinsic

_F32_TABLE = "sparsec.shuffle_decode.f32"
_PAIRS_TABLE = "sparsec.shuffle_decode.i8_pairs"
_ZERO_BYTE = 0x80  # a vpshufb control byte with the high bit set writes 0


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


def pair_table_rows() -> list[list[int]]:
    """Per mask byte: the 16 vpshufb control bytes of a half vector of 8 byte pairs
    (pair j takes the two bytes of the rank of j among the set bits, or zeros)."""
    rows = []
    for mask in range(256):
        row, rank = [], 0
        for pair in range(8):
            if mask >> pair & 1:
                row += [2 * rank, 2 * rank + 1]
                rank += 1
            else:
                row += [_ZERO_BYTE, _ZERO_BYTE]
        rows.append(row)
    return rows


def shuffle_decode_i8_pairs(b: ir.IRBuilder, vptr, mask, v: Vectors):
    """(the step's 32 weight bytes, bytes of the stream it used) for the 16-bit pair
    ``mask`` of an AVX2 bitmask int8 step (8 rows x 4 columns = 16 pairs of one row's
    two adjacent columns). vpshufb shuffles within 16-byte halves, so each half (rows
    0-3, rows 4-7: one mask byte each) gets its control from one table row and its
    values from its own load (the high half's start after the low half's pairs)."""
    if v.i8.count != 32:
        raise ValueError("the pair shuffle decode is written for 32-byte vectors")
    half = ir.VectorType(I8, 16)
    table_type = ir.ArrayType(half, 256)
    rows = [ir.Constant(half, r) for r in pair_table_rows()]
    table = _table(b.module, _PAIRS_TABLE, table_type, rows)
    mask32 = b.zext(mask, I32)
    low_bits = b.and_(mask32, i32(0xFF))
    high_bits = b.lshr(mask32, i32(8))

    def control(bits):
        return b.load(b.gep(table, [i64(0), b.zext(bits, I64)], inbounds=True), align=16)

    def popcount(x):
        return intrinsic(b, "llvm.ctpop.i32", I32, [x])

    join = ir.Constant(ir.VectorType(I32, 32), list(range(32)))
    controls = b.shuffle_vector(control(low_bits), control(high_bits), join)
    low_bytes = b.shl(popcount(low_bits), i32(1))
    low = b.load(b.bitcast(vptr, half.as_pointer()), align=1)
    high = b.load(gep_bytes(b, vptr, b.zext(low_bytes, I64), half), align=1)
    values = b.shuffle_vector(low, high, join)
    weights = intrinsic(b, "llvm.x86.avx2.pshuf.b", v.i8, [values, controls])
    return weights, b.shl(popcount(mask32), i32(1))
