"""Packed weight layouts of the linear kernels, their packing and a numpy reference.

All formats group output rows in blocks of R = the ISA's float32 lanes (16 for
AVX-512; ``PackedLinear.rows``), "rows in lanes": lane r of a vector belongs to output
row ``R*block + r``, so the kernels broadcast activations and never reduce
horizontally, and the last block is zero padded. Below, R = 16.

- ``dense_f32``: ``[block][in][16]`` float32; one 64-byte vector per input column.
- ``bitmask_f32``: per block a stream ``masks u16[in]`` (bit r: row r nonzero in that
  column) then the nonzero floats in (column, row) order, read with ``vexpandps``.
- ``dense_i8``: ``[block][in/4][16][4]`` int8 (lane r holds 4 consecutive columns of
  row r, the ``vpdpbusd`` dword layout).
- ``bitmask_i8``: per block a stream ``masks u64[in/4]`` (bit 4r+j: row r, column 4c+j)
  then the nonzero int8 values in that order, read with ``vpexpandb``.

The value streams end with a vector of zero slack: kernels that expand from a register
(``Tuning.sparse_expand``) and the AVX2 shuffle decode load a full vector from the
stream each step, never past the blob.

On AVX2 (R = 8) the same layouts hold 8 rows, and the kernels shuffle the nonzeros into
place (``Isa.sparse_decode``): bitmask fp32 has ``u8``
masks; bitmask int8 masks cover byte *pairs* (``Isa.bitmask_i8_unit`` = 2, bit 2r+h:
columns 4c+2h and 4c+2h+1 of row r, stored if either is nonzero) in ``u16`` masks, and
its values are those pairs (``PackedLinear.mask_unit`` records the unit).

Sparse formats also hold a table of ``nblocks + 1`` int64 byte offsets of the block
streams (also the cumulative byte cost that balances threads). int8 formats hold per
row ``bias = -offset * rowsum(q)`` (int32, undoes the activation offset: 128 for
vpdpbusd, 0 on AVX2's vpmaddubsw) and the weight scale (float32). Every section starts
at a multiple of 64 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparsec.codegen.quantize import quantize_tokens_reference, quantize_weight_rows
from sparsec.codegen.target import AVX512, Isa
from sparsec.errors import SparsecError

LINEAR_FORMATS = ("dense_f32", "bitmask_f32", "dense_i8", "bitmask_i8")
ALIGN = 64


@dataclass
class PackedLinear:
    """One linear layer's weights in a kernel format (``data`` is the blob the kernel reads)."""

    fmt: str
    out_features: int
    in_features: int
    data: np.ndarray  # uint8, length a multiple of 64
    nnz: int
    sparsity: float
    # Byte offsets of the sections inside ``data`` (see the module docstring):
    # "weights" (dense) or "table" (sparse); "bias" and "scale" for int8 formats.
    sections: dict[str, int] = field(default_factory=dict)
    rows: int = 16  # output rows per block: the packing ISA's float32 lanes
    mask_unit: int = 0  # bitmask formats: bytes one mask bit covers (4 fp32; 1 or 2 int8)

    @property
    def kernel_key(self) -> tuple:
        """Equal keys (and equal emit options) give identical kernel code.

        The code depends on the format and shape only, never on the weight values (the
        sparse structure is read from ``data`` at run time): emit one kernel per key and
        call it with each layer's ``w`` pointer to keep compile time down.
        """
        return (
            self.fmt,
            self.out_features,
            self.in_features,
            tuple(sorted(self.sections.items())),
            self.rows,
            self.mask_unit,
        )

    @property
    def nblocks(self) -> int:
        return -(-self.out_features // self.rows)

    @property
    def precision(self) -> str:
        return "int8" if self.fmt.endswith("_i8") else "fp32"

    @property
    def k_steps(self) -> int:
        """Vector steps along the input: columns (fp32) or column quads (int8)."""
        return self.in_features if self.precision == "fp32" else -(-self.in_features // 4)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Blob:
    """Concatenates 64-byte aligned sections. The parts are kept as they are given (no
    copy; a dense layer's part is a transposed view of the weight) and copied once into
    the result: packing a dense layer holds its weight and the result, where byte
    strings and their joins held it eight times."""

    def __init__(self):
        self.parts: list[tuple[int, np.ndarray]] = []
        self.size = 0

    def add(self, raw, zeros: int = 0) -> int:
        """Append ``raw`` (bytes or an array, a strided view too: its elements in C
        order) and ``zeros`` zero bytes, padded to 64 bytes; returns its offset."""
        part = np.frombuffer(raw, np.uint8) if isinstance(raw, bytes | bytearray) else raw
        offset = self.size
        self.parts.append((offset, part))
        self.size += _align(part.nbytes + zeros)
        return offset

    def array(self) -> np.ndarray:
        data = np.zeros(max(self.size, ALIGN), dtype=np.uint8)
        for offset, part in self.parts:  # a strided copy for views
            target = data[offset : offset + part.nbytes].view(part.dtype).reshape(part.shape)
            np.copyto(target, part)
        return data


def _padded_rows(w: np.ndarray, rows: int, cols: int | None = None) -> np.ndarray:
    out, inp = w.shape
    cols = inp if cols is None else cols
    if out % rows == 0 and cols == inp:
        return w  # nothing to pad: no copy
    padded = np.zeros((-(-out // rows) * rows, cols), dtype=w.dtype)
    padded[:out, :inp] = w
    return padded


def _sparse_streams(blocks: np.ndarray, mask_dtype, table_base: int) -> tuple[bytes, bytearray]:
    """(offset table, concatenated streams) for ``blocks [nblk, k, lanes]`` of values.

    A block stream is ``masks[k]`` (bit i: lane i nonzero) then the nonzero values in
    (k, lane) order, padded to 8 bytes. ``table_base`` is where the streams will start.
    """
    nblk, k, lanes = blocks.shape
    nz = blocks != 0
    # bit i = lane i: little-endian bits, then the mask's bytes read as one integer
    masks = np.packbits(nz, axis=2, bitorder="little").view(mask_dtype).reshape(nblk, k)
    values = blocks[nz]
    counts = nz.reshape(nblk, -1).sum(axis=1)
    item = blocks.dtype.itemsize
    mask_bytes = k * np.dtype(mask_dtype).itemsize
    sizes = [(mask_bytes + int(c) * item + 7) // 8 * 8 for c in counts]
    offsets = np.zeros(nblk + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(sizes)
    offsets += table_base
    streams = bytearray(int(offsets[-1] - table_base))
    vstart = 0
    for i in range(nblk):
        o = int(offsets[i] - table_base)
        streams[o : o + mask_bytes] = masks[i].tobytes()
        c = int(counts[i])
        streams[o + mask_bytes : o + mask_bytes + c * item] = values[vstart : vstart + c].tobytes()
        vstart += c
    return offsets.tobytes(), streams


def sparse_unit(fmt: str, isa: Isa) -> np.dtype:
    """What one mask bit covers: a float32, an int8 byte, or an int8 byte pair (AVX2)."""
    if fmt == "bitmask_f32":
        return np.dtype(np.float32)
    return np.dtype(np.int16 if isa.bitmask_i8_unit == 2 else np.int8)


def mask_unit(fmt: str, isa: Isa) -> int:
    """``PackedLinear.mask_unit`` of ``fmt`` packed for ``isa`` (0: a dense format)."""
    return sparse_unit(fmt, isa).itemsize if fmt.startswith("bitmask") else 0


def mask_dtype(fmt: str, rows: int, unit: np.dtype) -> np.dtype:
    """The per-step mask of a bitmask format: one bit per unit of the weight vector."""
    bits = rows * 4 // unit.itemsize
    return np.dtype({8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}[bits])


def _pack(fmt, isa, w_blocks, n_out, n_in, nnz, extra_sections=()) -> PackedLinear:
    rows = isa.lanes_f32
    blob = _Blob()
    sections = {}
    for name, raw in extra_sections:
        sections[name] = blob.add(raw)
    if fmt.startswith("dense"):
        sections["weights"] = blob.add(w_blocks)
    else:
        nblk, k = w_blocks.shape[:2]
        table_at = blob.size
        streams_at = table_at + _align((nblk + 1) * 8)
        unit = sparse_unit(fmt, isa)
        lanes = np.ascontiguousarray(w_blocks).reshape(nblk, k, -1)  # [blk, k, lanes]
        units = lanes.view(unit)  # int8 pairs as int16
        table, streams = _sparse_streams(units, mask_dtype(fmt, rows, unit), streams_at)
        sections["table"] = blob.add(table)
        assert blob.size == streams_at
        blob.add(streams, zeros=isa.vector_bytes)
    total = n_out * n_in
    return PackedLinear(
        fmt=fmt,
        out_features=n_out,
        in_features=n_in,
        data=blob.array(),
        nnz=nnz,
        sparsity=1.0 - nnz / total if total else 0.0,
        sections=sections,
        rows=rows,
        mask_unit=mask_unit(fmt, isa),
    )


def _check(weight: np.ndarray, fmt: str, isa: Isa) -> np.ndarray:
    if fmt not in LINEAR_FORMATS:
        raise SparsecError(f"unknown linear format {fmt!r}; use one of {', '.join(LINEAR_FORMATS)}")
    if fmt not in isa.formats:
        raise SparsecError(
            f"linear format {fmt!r} has no {isa.name} kernel; use one of {', '.join(isa.formats)}"
        )
    w = np.asarray(weight)
    if w.ndim != 2 or 0 in w.shape:
        raise SparsecError(f"linear weight must be a non-empty 2-D [out, in] array, got {w.shape}")
    return w


def pack_linear(weight: np.ndarray, fmt: str, isa: Isa = AVX512) -> PackedLinear:
    """Pack a float32 ``[out, in]`` weight for ``isa``; int8 formats quantize per output
    row first."""
    w = _check(weight, fmt, isa)
    if fmt.endswith("_i8"):
        q, scale = quantize_weight_rows(w)
        return pack_linear_quantized(q, scale, fmt, isa)
    if not np.all(np.isfinite(w)):
        raise SparsecError("linear weight contains NaN or Inf; fix the model weights")
    w = np.asarray(w, dtype=np.float32)  # no copy when it is float32 already
    nnz = int(np.count_nonzero(w))
    out, inp = w.shape
    rows = isa.lanes_f32
    blocks = _padded_rows(w, rows).reshape(-1, rows, inp).transpose(0, 2, 1)  # [blk, in, 16]
    return _pack(fmt, isa, blocks, out, inp, nnz)  # a view: the blob copies it once


def pack_linear_quantized(
    q: np.ndarray, scale: np.ndarray, fmt: str, isa: Isa = AVX512
) -> PackedLinear:
    """Pack already quantized int8 weights ``q [out, in]`` with per-row ``scale [out]``."""
    q = _check(q, fmt, isa)
    if not fmt.endswith("_i8"):
        raise SparsecError(f"pack_linear_quantized needs an int8 format, not {fmt!r}")
    if q.dtype != np.int8 or np.any(q == -128):
        raise SparsecError("quantized weight must be int8 in [-127, 127] (symmetric)")
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    if scale.shape != (q.shape[0],):
        raise SparsecError(f"weight scale has shape {scale.shape}, expected ({q.shape[0]},)")
    out, inp = q.shape
    kq = -(-inp // 4)
    rows = isa.lanes_f32
    qp = _padded_rows(q, rows, kq * 4)  # [out_pad, kq*4]
    bias = -isa.act_offset * qp.sum(axis=1, dtype=np.int32)
    scale_p = np.zeros(qp.shape[0], dtype=np.float32)
    scale_p[:out] = scale
    # [blk, kq, 16 rows, 4 cols]: 64 bytes per column quad (a view; dense copies it once)
    blocks = qp.reshape(-1, rows, kq, 4).transpose(0, 2, 1, 3)
    extra = (("bias", bias.astype(np.int32).tobytes()), ("scale", scale_p.tobytes()))
    nnz = int(np.count_nonzero(q))
    return _pack(fmt, isa, blocks, out, inp, nnz, extra)


def _section(packed: PackedLinear, name: str, dtype, count: int) -> np.ndarray:
    start = packed.sections[name]
    return packed.data[start : start + count * np.dtype(dtype).itemsize].view(dtype)


def unpack_blocks(packed: PackedLinear) -> np.ndarray:
    """The block array ``[nblk, k_steps, lanes]`` (float32 or int8) decoded from ``data``."""
    nblk, k = packed.nblocks, packed.k_steps
    rows = packed.rows
    dtype, lanes = (np.float32, rows) if packed.precision == "fp32" else (np.int8, rows * 4)
    if packed.fmt.startswith("dense"):
        return _section(packed, "weights", dtype, nblk * k * lanes).reshape(nblk, k, lanes)
    unit = np.dtype(np.float32 if packed.precision == "fp32" else f"i{packed.mask_unit}")
    units = rows * 4 // unit.itemsize
    masks_type = mask_dtype(packed.fmt, rows, unit)
    table = _section(packed, "table", np.int64, nblk + 1)
    out = np.zeros((nblk, k, units), dtype=unit)
    bits = np.left_shift(np.ones(1, dtype=np.uint64), np.arange(units, dtype=np.uint64))
    mask_bytes = k * masks_type.itemsize
    for i in range(nblk):
        o = int(table[i])
        masks = packed.data[o : o + mask_bytes].view(masks_type).astype(np.uint64)
        nz = (masks[:, None] & bits) != 0
        c = int(nz.sum())
        vals = packed.data[o + mask_bytes : o + mask_bytes + c * unit.itemsize]
        out[i][nz] = vals.view(unit)
    return out.view(dtype)


def unpack_weight(packed: PackedLinear) -> np.ndarray:
    """fp32: the float weight ``[out, in]``; int8: the int8 weight ``q [out, in]``."""
    blocks = unpack_blocks(packed)
    out, inp = packed.out_features, packed.in_features
    if packed.precision == "fp32":
        return blocks.transpose(0, 2, 1).reshape(-1, inp)[:out]
    q = blocks.reshape(packed.nblocks, packed.k_steps, packed.rows, 4).transpose(0, 2, 1, 3)
    return q.reshape(packed.nblocks * packed.rows, -1)[:out, :inp]


def weight_scale(packed: PackedLinear) -> np.ndarray:
    count = packed.nblocks * packed.rows
    return _section(packed, "scale", np.float32, count)[: packed.out_features]


def reference_linear(
    packed: PackedLinear, x: np.ndarray, y: np.ndarray | None = None
) -> np.ndarray:
    """numpy ``x @ W.T`` from the packed data (``+ y`` if given, like ``accumulate``).

    int8 formats simulate W8A8 exactly as the kernel does: per-token quantized
    activations, an exact integer dot product, then ``float(acc) * wscale * xscale``.
    """
    x = np.asarray(x, dtype=np.float32)
    if packed.precision == "fp32":
        w = unpack_weight(packed)
        res = (x.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)
    else:
        q = unpack_weight(packed).astype(np.float64)
        xq, xs = quantize_tokens_reference(x)
        # exact integer dot (float64 holds it), then the kernel's int32 -> float32 rounding
        acc = (xq.astype(np.float64) @ q.T).astype(np.float32)
        res = acc * weight_scale(packed)[None, :] * xs[:, None]
    return res if y is None else (np.asarray(y, dtype=np.float32) + res)
