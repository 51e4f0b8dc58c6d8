"""Attention kernels: RoPE + KV-cache write, and grouped-query causal attention.

Layouts (all float32, row-major): ``qkv`` is [n, qkv_stride] with q, k, v at column
offsets q_offset / k_offset / v_offset; the RoPE tables are [max_pos, head_dim/2] in
the rotate-half (non-interleaved) form.

Rows are independent: row i is a token of some sequence at position ``positions[i]``
whose KV cache starts at ``caches[i]`` (a whole sequence's cache, float32 [layers][2]
[kv_num_heads][capacity][head_dim]; the layer's keys are at float offset ``k_at``
from it and its values at ``v_at``, slot j holding the token at position j). One
sequence's prefill is rows with the same cache and consecutive positions; a batched
decode step is one row per sequence, each with its own cache (docs/runtime.md).

``kv_half``: the caches hold float16 (``sparsec compile --kv-cache float16``): keys and
values are rounded to half precision when written (``vcvtps2ph``) and widened when read
(``vcvtph2ps``); the math stays float32. Half the KV bytes to read per step and to hold
per sequence. ``kv_int8`` (``--kv-cache int8``): each key and value row is stored as
head_dim symmetric int8 values and a float32 scale per 32 of them (``_Cache.store_row``), and
dequantized once per segment for the group; about a quarter of float32's bytes.

Attention keeps a running max and sum (online softmax) over segments of 64 keys (at
head_dim 64; 32 KiB of float32 keys and values, which stay in L1): each head of a kv
group in turn computes the segment's scores (16 q.k dot products per block as 16
vectors of partial sums, reduced together by one transpose-add butterfly), rescales
its running sum and outputs once, and accumulates the weighted value rows with
broadcast FMAs. A query thus streams over its keys and values once, whatever the
context length, with a few KiB of per-head state, and the group's cache is read from
memory once. A float16 cache is widened (an int8 one dequantized) into float32 staging
rows once per segment, not once per head.

Measured on the Intel Xeon (Sapphire Rapids class), SmolLM2 shapes, 8 rows at
position ~300, float16 cache, one thread, keys and values in L2: 5.5 ns per (key,
head) (a per-16-key online softmax, which put max, exp and rescale on one dependency
chain per block, took 7.6). In a batched decode step (8 rows at position 110, 2
threads) the cache streams from memory and the whole step went 4.08 -> 3.87 ms.
"""

from __future__ import annotations

import math

from llvmlite import ir

from sparsec.codegen.irbuild import (
    F32,
    FPTR,
    I8,
    I32,
    I64,
    check_positive,
    const,
    entry_alloca,
    i64,
    kernel_function,
    load,
    load_vec,
    loop,
    ptr_add,
    span_chunks,
    splat,
    store,
    thread_share,
    vector_intrinsic,
    vtype,
    widen,
)
from sparsec.codegen.target import AVX512, Isa
from sparsec.codegen.vmath import fma, fmax, hmax, hsum, transpose_sums, vexp, vtanh
from sparsec.contract import KV_INT8_BLOCK, kv_row_elements
from sparsec.errors import SparsecError

# The per-row arguments that end both kernels' parameters (before n, tid, nthreads):
# every row's cache and position, then the layer's key and value offsets in a cache.
ROW_ARGS = [FPTR.as_pointer(), I32.as_pointer(), I64, I64]


HALF = ir.HalfType()


class _Cache:
    """Rows of the KV cache in its element type, read and written as float32.

    float32 and float16 caches are loaded and stored a vector at a time (pointers typed
    in the element, offsets counting elements). An int8 cache is quantized and
    dequantized a whole row at a time (``store_row``/``load_row``): head_dim int8 values,
    then a float32 scale per KV_INT8_BLOCK of them, ``row`` elements in all."""

    def __init__(self, b: ir.IRBuilder, half: bool = False, int8: bool = False, head_dim=0):
        if half and int8:
            raise SparsecError("a KV cache is float16 or int8, not both")
        self.b = b
        self.half = half
        self.int8 = int8
        self.elem = HALF if half else I8 if int8 else F32
        self.head_dim = head_dim
        self.row = kv_row_elements(head_dim, "int8" if int8 else "float32")

    def base(self, pointer):
        return self.b.bitcast(pointer, self.elem.as_pointer()) if self.elem != F32 else pointer

    def load(self, ptr, width: int):
        assert not self.int8, "int8 rows are read whole (load_row)"
        if not self.half:
            return load(self.b, ptr, width)
        return self.b.fpext(
            load_vec(self.b, ptr, ir.VectorType(HALF, width), align=2), vtype(width)
        )

    def store(self, value, ptr) -> None:
        assert not self.int8, "int8 rows are written whole (store_row)"
        if self.half:
            value = self.b.fptrunc(value, ir.VectorType(HALF, value.type.count))
            store(self.b, value, ptr, align=2)
        else:
            store(self.b, value, ptr)

    def _scale_ptr(self, row, block: int):
        at = self.head_dim + 4 * block
        return self.b.bitcast(ptr_add(self.b, row, at), F32.as_pointer())

    def _blocks(self, lanes: int):
        """The row's chunks (offset, width), grouped by KV_INT8_BLOCK."""
        blocks: dict[int, list] = {}
        for off, w in span_chunks(self.head_dim, lanes):
            assert off // KV_INT8_BLOCK == (off + w - 1) // KV_INT8_BLOCK
            blocks.setdefault(off // KV_INT8_BLOCK, []).append((off, w))
        return blocks.items()

    def store_row(self, src, row, lanes: int) -> None:
        """Quantize the float32 head row at ``src`` into the int8 cache row ``row``, per
        block of KV_INT8_BLOCK values: scale = max|x| / 127, q = round-half-even(x * 127 /
        max|x|) (0 for a zero block)."""
        b = self.b
        for block, chunks in self._blocks(lanes):
            values = [load(b, ptr_add(b, src, off), w) for off, w in chunks]
            peak = None
            for v in values:
                mag = widen(b, vector_intrinsic(b, "llvm.fabs", v.type, [v]), lanes)
                peak = mag if peak is None else fmax(b, peak, mag)
            peak = hmax(b, peak)
            positive = b.fcmp_ordered(">", peak, const(F32, 0.0))
            inv = b.select(positive, b.fdiv(const(F32, 127.0), peak), const(F32, 0.0))
            for (off, w), v in zip(chunks, values, strict=True):
                q = b.fmul(v, splat(b, inv, w))
                q = vector_intrinsic(b, "llvm.roundeven", v.type, [q])
                q = b.trunc(b.fptosi(q, ir.VectorType(I32, w)), ir.VectorType(I8, w))
                store(b, q, ptr_add(b, row, off), align=1)
            b.store(b.fdiv(peak, const(F32, 127.0)), self._scale_ptr(row, block), align=1)

    def load_row(self, row, dst, lanes: int) -> None:
        """Dequantize the int8 cache row ``row`` into float32 at ``dst``."""
        b = self.b
        for block, chunks in self._blocks(lanes):
            scale = b.load(self._scale_ptr(row, block), align=1)
            for off, w in chunks:
                q = load_vec(b, ptr_add(b, row, off), ir.VectorType(I8, w), align=1)
                v = b.fmul(b.sitofp(q, vtype(w)), splat(b, scale, w))
                store(b, v, ptr_add(b, dst, off))


def _check_heads(num_heads: int, kv_num_heads: int, head_dim: int) -> None:
    check_positive(num_heads=num_heads, kv_num_heads=kv_num_heads, head_dim=head_dim)
    if num_heads % kv_num_heads:
        raise SparsecError(
            f"num_heads={num_heads} is not a multiple of kv_num_heads={kv_num_heads}; "
            "grouped-query attention needs whole groups"
        )


def emit_rope_kv_write(
    module: ir.Module,
    name: str,
    *,
    num_heads: int,
    kv_num_heads: int,
    head_dim: int,
    capacity: int,
    qkv_stride: int,
    q_offset: int,
    k_offset: int,
    v_offset: int,
    rotary_dim: int | None = None,
    qk_norm_eps: float | None = None,
    kv_half: bool = False,
    kv_int8: bool = False,
    rope: bool = True,
    isa: Isa = AVX512,
) -> ir.Function:
    """``void name(float* qkv, const float* cos, const float* sin, [const float* q_norm,
    const float* k_norm,] float** caches, const int32* positions, int64 k_at, int64 v_at,
    int32 n, tid, nthreads)``.

    Row i (position p = positions[i]): rotates its q and k heads in place and writes
    rope(k) and v into slot p of its cache (``caches[i]``, see the module docstring).
    Work units are (token, q or kv head). The caller guarantees 0 <= p < capacity, p
    within the RoPE table, and no two rows with the same cache and position.
    ``rotary_dim``: only the first features of a head rotate (partial rotary; None:
    all). ``qk_norm_eps``: each q and k head is first RMS-normalized and scaled by
    ``q_norm``/``k_norm`` ``[head_dim]`` (Qwen3; None: no norm, no such arguments).
    ``rope=False``: no rotation (learned positions, ALiBi) and no ``cos``/``sin``
    arguments: k and v are written to the cache as they are, q is left alone (unless
    the q/k norm applies); the work units are then the kv heads only when there is no
    q norm.
    """
    _check_heads(num_heads, kv_num_heads, head_dim)
    check_positive(capacity=capacity, qkv_stride=qkv_stride)
    if not rope and rotary_dim is not None:
        raise SparsecError("rotary_dim is meaningless without RoPE (rope=False)")
    rotary = head_dim if rotary_dim is None else rotary_dim
    if rotary % 2 or not 0 < rotary <= head_dim:
        raise SparsecError(
            f"rotary_dim={rotary} must be even and in 1..head_dim={head_dim} for rotate-half RoPE"
        )
    if qk_norm_eps is not None and not (math.isfinite(qk_norm_eps) and qk_norm_eps >= 0):
        raise SparsecError(f"q/k norm epsilon {qk_norm_eps!r} must be finite and >= 0")
    half = rotary // 2
    lanes = isa.lanes_f32
    norms = 0 if qk_norm_eps is None else 2
    tables = 2 if rope else 0
    fn = kernel_function(module, name, [FPTR] * (1 + tables + norms) + ROW_ARGS + [I32] * 3)
    qkv, *weights, caches, positions, k_at, v_at, n, tid, nthreads = fn.args
    (cos, sin), norm_weights = (weights[:2], weights[2:]) if rope else ((None, None), weights)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    kv = _Cache(b, kv_half, kv_int8, head_dim)
    # Without RoPE or a q norm the q heads have nothing to do: no work units for them.
    q_units = num_heads if rope or norms else 0
    per_token = q_units + kv_num_heads
    begin, end = thread_share(b, b.mul(b.sext(n, I64), i64(per_token)), tid, nthreads)

    def normalize(x, weight):
        """x = x / sqrt(mean(x^2) + eps) * weight over one head, in place."""
        total = None
        for off, width in span_chunks(head_dim, lanes):
            v = load(b, ptr_add(b, x, off), width)
            sq = widen(b, b.fmul(v, v), lanes)
            total = sq if total is None else b.fadd(total, sq)
        mean = b.fmul(hsum(b, total), const(F32, 1.0 / head_dim))
        rms = vector_intrinsic(b, "llvm.sqrt", F32, [b.fadd(mean, const(F32, qk_norm_eps))])
        inv = b.fdiv(const(F32, 1.0), rms)
        for off, width in span_chunks(head_dim, lanes):
            v = b.fmul(load(b, ptr_add(b, x, off), width), splat(b, inv, width))
            store(b, b.fmul(v, load(b, ptr_add(b, weight, off), width)), ptr_add(b, x, off))

    def rotate(x, cos_row, sin_row, cache_dst=None):
        """Rotate the head at ``x`` in place; also write it to ``cache_dst`` if given."""
        dsts = [(x, store)] + ([(cache_dst, lambda _, v, p: kv.store(v, p))] if cache_dst else [])
        for off, width in span_chunks(half, lanes):
            x1 = load(b, ptr_add(b, x, off), width)
            x2 = load(b, ptr_add(b, x, half + off), width)
            c = load(b, ptr_add(b, cos_row, off), width)
            s = load(b, ptr_add(b, sin_row, off), width)
            out1 = b.fsub(b.fmul(x1, c), b.fmul(x2, s))
            out2 = b.fadd(b.fmul(x2, c), b.fmul(x1, s))
            for dst, put in dsts:
                put(b, out1, ptr_add(b, dst, off))
                put(b, out2, ptr_add(b, dst, half + off))
        for off, width in span_chunks(head_dim - rotary, lanes):  # features not rotated
            v = load(b, ptr_add(b, x, rotary + off), width)
            if cache_dst is not None:
                kv.store(v, ptr_add(b, cache_dst, rotary + off))

    def copy_to_cache(x, cache_dst):
        for off, width in span_chunks(head_dim, lanes):
            kv.store(load(b, ptr_add(b, x, off), width), ptr_add(b, cache_dst, off))

    def q_unit(row, head, cos_row, sin_row):
        q = ptr_add(b, row, b.add(i64(q_offset), b.mul(head, i64(head_dim))))
        if norms:
            normalize(q, norm_weights[0])
        if rope:
            rotate(q, cos_row, sin_row)

    def kv_unit(token, row, group, pos, cos_row, sin_row):
        col = b.mul(group, i64(head_dim))
        slot = b.mul(b.add(b.mul(group, i64(capacity)), pos), i64(kv.row))
        cache = kv.base(b.load(ptr_add(b, caches, token)))
        k = ptr_add(b, row, b.add(i64(k_offset), col))
        if norms:
            normalize(k, norm_weights[1])
        k_slot = ptr_add(b, ptr_add(b, cache, k_at), slot)
        if kv.int8:  # whole rows: rotate k in place, then quantize it
            if rope:
                rotate(k, cos_row, sin_row)
            kv.store_row(k, k_slot, lanes)
        elif rope:
            rotate(k, cos_row, sin_row, k_slot)
        else:
            copy_to_cache(k, k_slot)
        v = ptr_add(b, row, b.add(i64(v_offset), col))
        v_slot = ptr_add(b, ptr_add(b, cache, v_at), slot)
        if kv.int8:
            kv.store_row(v, v_slot, lanes)
        else:
            copy_to_cache(v, v_slot)

    with loop(b, begin, end, name="unit") as unit:
        token = b.udiv(unit, i64(per_token))
        head = b.sub(unit, b.mul(token, i64(per_token)))
        pos = b.sext(b.load(ptr_add(b, positions, token)), I64)
        row = ptr_add(b, qkv, b.mul(token, i64(qkv_stride)))
        cos_row = sin_row = None
        if rope:
            cos_row = ptr_add(b, cos, b.mul(pos, i64(half)))
            sin_row = ptr_add(b, sin, b.mul(pos, i64(half)))
        if q_units:
            with b.if_else(b.icmp_unsigned("<", head, i64(q_units))) as (is_q, is_kv):
                with is_q:
                    q_unit(row, head, cos_row, sin_row)
                with is_kv:
                    group = b.sub(head, i64(q_units))
                    kv_unit(token, row, group, pos, cos_row, sin_row)
        else:
            kv_unit(token, row, head, pos, cos_row, sin_row)
    b.ret_void()
    return fn


def emit_attention(
    module: ir.Module,
    name: str,
    *,
    num_heads: int,
    kv_num_heads: int,
    head_dim: int,
    capacity: int,
    scale: float,
    qkv_stride: int,
    q_offset: int,
    window: int | None = None,
    kv_half: bool = False,
    kv_int8: bool = False,
    alibi: tuple[float, ...] | None = None,
    softcap: float | None = None,
    isa: Isa = AVX512,
) -> ir.Function:
    """``void name(const float* qkv, float* out[n, num_heads*head_dim], float** caches,
    const int32* positions, int64 k_at, int64 v_at, int32 n, tid, nthreads)``.

    Query i (position p = positions[i], cache ``caches[i]``: see the module docstring),
    head h, kv group g = h // (num_heads / kv_num_heads): out = softmax_j(scale * q .
    k_cache[g, j]) . v_cache[g, j] over j = 0..p, or j = p-window+1..p with a sliding
    ``window`` (Mistral; None: all).

    ``softcap``: scores s = scale * q . k become softcap * tanh(s / softcap) (Gemma 2's
    attn_logit_softcapping). ``alibi``: one slope per query head; head h's score
    against key slot j then gets + alibi[h] * (j - p) (MPT; after the soft-cap).

    Work units are (kv group, token, head within the group), in that order, split
    contiguously among threads. A decode step (n = 1) thus spreads its heads over the
    threads. The heads of one group and token that fall in a thread's share are
    processed together: each block of 16 keys and values is loaded from memory once
    and reused from L1 for all of them. Tokens are visited in zigzag order (0, n-1,
    1, n-2, ...) so that in a prefill every thread gets a similar mix of short and
    long causal rows.
    """
    _check_heads(num_heads, kv_num_heads, head_dim)
    check_positive(capacity=capacity, qkv_stride=qkv_stride)
    if not math.isfinite(scale):
        raise SparsecError(f"attention scale {scale!r} must be finite")
    if window is not None:
        check_positive(window=window)
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise SparsecError(f"attention soft-cap {softcap!r} must be finite and positive")
    slopes = None
    if alibi is not None:
        alibi = tuple(float(a) for a in alibi)
        if len(alibi) != num_heads or not all(math.isfinite(a) for a in alibi):
            raise SparsecError(
                f"alibi needs {num_heads} finite slopes (one per query head), got {alibi!r}"
            )
        slopes = ir.GlobalVariable(module, ir.ArrayType(F32, num_heads), f"{name}.alibi")
        slopes.global_constant = True
        slopes.linkage = "internal"
        slopes.initializer = ir.Constant(ir.ArrayType(F32, num_heads), list(alibi))
    group = num_heads // kv_num_heads
    fn = kernel_function(module, name, [FPTR] * 2 + ROW_ARGS + [I32] * 3)
    qkv, out, caches, positions, k_at, v_at, n, tid, nthreads = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    kv_cache = _Cache(b, kv_half, kv_int8, head_dim)
    state = _GroupState(b, group, head_dim, isa.lanes_f32, kv_cache)
    state.softcap = softcap
    if slopes is not None:
        state.slope = entry_alloca(b, F32)
    n64 = b.sext(n, I64)
    begin, end = thread_share(b, b.mul(n64, i64(num_heads)), tid, nthreads)

    unit_slot = entry_alloca(b, I64, begin)
    head_bb = b.append_basic_block("unit.head")
    body_bb = b.append_basic_block("unit.body")
    done_bb = b.append_basic_block("unit.end")
    b.branch(head_bb)
    b.position_at_end(head_bb)
    unit = b.load(unit_slot)
    b.cbranch(b.icmp_signed("<", unit, end), body_bb, done_bb)
    b.position_at_end(body_bb)

    group_token = b.udiv(unit, i64(group))
    kv = b.udiv(group_token, n64)
    t = b.sub(group_token, b.mul(kv, n64))
    half = b.lshr(t, i64(1))
    odd = b.trunc(t, ir.IntType(1))
    token = b.select(odd, b.sub(b.sub(n64, i64(1)), half), half)
    cache = state.kv.base(b.load(ptr_add(b, caches, token)))
    cache_off = b.mul(kv, i64(capacity * state.kv.row))
    keys = ptr_add(b, ptr_add(b, cache, k_at), cache_off)
    values = ptr_add(b, ptr_add(b, cache, v_at), cache_off)
    first = b.urem(unit, i64(group))  # first head within the group
    # Heads first .. first+count-1 of this group and token are in this thread's share.
    count = b.sub(i64(group), first)
    count = b.select(b.icmp_signed("<", b.sub(end, unit), count), b.sub(end, unit), count)
    b.store(b.add(unit, count), unit_slot)

    head = b.add(b.mul(kv, i64(group)), first)
    q_col = b.add(i64(q_offset), b.mul(head, i64(head_dim)))
    q = ptr_add(b, qkv, b.add(b.mul(token, i64(qkv_stride)), q_col))
    out_col = b.mul(head, i64(head_dim))
    dst = ptr_add(b, out, b.add(b.mul(token, i64(num_heads * head_dim)), out_col))
    pos = b.sext(b.load(ptr_add(b, positions, token)), I64)
    if slopes is not None:
        state.slopes = b.gep(slopes, [i64(0), head], inbounds=True)
    _attend_heads(b, state, q, count, keys, values, pos, dst, scale, window)
    b.branch(head_bb)

    b.position_at_end(done_bb)
    b.ret_void()
    return fn


# Keys per segment: a segment's key and value rows (32 KiB) stay in L1 while every
# head of the group works through them.
SEGMENT_BYTES = 32 * 1024


def segment_keys(head_dim: int, lanes: int) -> int:
    """Keys per segment (of float32 rows, as read: the cache's or the staging rows), a
    multiple of the 16-key block, at least one block."""
    return max(lanes, SEGMENT_BYTES // (2 * 4 * head_dim) // lanes * lanes)


class _GroupState:
    """Online-softmax state of up to ``group`` heads of one query.

    Per head r, in stack arrays: the scaled query, the running max, a 16-lane running
    sum, and two output accumulators (even and odd keys, which halves the FMA
    dependency chains); and one buffer of a segment's scores (then weights), reused by
    every head. While a head works through a segment its state is copied into fixed
    stack slots that LLVM promotes to registers.
    """

    def __init__(self, b: ir.IRBuilder, group: int, head_dim: int, lanes: int, kv: _Cache):
        self.kv = kv  # how cache rows are read
        self.head_dim = head_dim
        self.lanes = lanes  # of one vector: keys per block, lanes of the running sum
        self.chunks = span_chunks(head_dim, lanes)
        self.segment = segment_keys(head_dim, lanes)
        self.b = b

        def array(ty, count):
            return b.bitcast(entry_alloca(b, ir.ArrayType(ty, count), align=64), ty.as_pointer())

        self.q_arr = array(F32, group * head_dim)
        self.max_arr = array(F32, group)
        self.total_arr = array(vtype(lanes), group)
        self.acc_arr = array(F32, group * 2 * head_dim)
        self.scores = array(F32, self.segment)
        # A float16 or int8 cache is widened once per segment into float32 staging rows,
        # which every head of the group then reads (see _stage); their base is set per
        # segment.
        self.staging: _Rows | None = None
        if kv.half or kv.int8:
            floats = self.segment * head_dim
            staged = (array(F32, floats), array(F32, floats))
            self.staging = _Rows(*staged, None, _Cache(b, half=False))
        # The working copy of one head's state.
        self.q = [entry_alloca(b, vtype(w)) for _, w in self.chunks]
        self.max = entry_alloca(b, F32)
        self.total = entry_alloca(b, vtype(lanes))
        self.acc = [[entry_alloca(b, vtype(w)) for _, w in self.chunks] for _ in range(2)]
        self.block_max = entry_alloca(b, vtype(lanes))
        # Options of the scores (emit_attention sets them): a soft-cap, and the address
        # of the ALiBi slope of the group's first head being processed (head r's slope
        # is copied into ``slope`` with its state).
        self.softcap: float | None = None
        self.slopes: ir.Value | None = None
        self.slope: ir.Value | None = None  # an entry-block slot, with ALiBi

    def _places(self, r: ir.Value):
        """(working slot, array address, width) pairs of head r's state."""
        b, hd = self.b, self.head_dim
        q = ptr_add(self.b, self.q_arr, b.mul(r, i64(hd)))
        acc = ptr_add(self.b, self.acc_arr, b.mul(r, i64(2 * hd)))
        places = [(self.max, ptr_add(b, self.max_arr, r), 0)]
        places.append((self.total, b.gep(self.total_arr, [r], inbounds=True), 0))
        for k, (off, w) in enumerate(self.chunks):
            places.append((self.q[k], ptr_add(b, q, off), w))
            for half in range(2):
                places.append((self.acc[half][k], ptr_add(b, acc, half * hd + off), w))
        return places

    def load(self, r: ir.Value) -> None:
        for slot, addr, width in self._places(r):
            self.b.store(load(self.b, addr, width) if width else self.b.load(addr), slot)
        if self.slopes is not None:
            self.b.store(self.b.load(ptr_add(self.b, self.slopes, r)), self.slope)

    def save(self, r: ir.Value) -> None:
        for slot, addr, width in self._places(r):
            if width:
                store(self.b, self.b.load(slot), addr)
            else:
                self.b.store(self.b.load(slot), addr)


def _attend_heads(b, state, q, count, keys, values, pos, dst, scale, window=None):
    """Attention of ``count`` consecutive heads (one kv group) of one query at ``pos``
    (over keys ``pos-window+1..pos`` with a ``window``).

    Keys are visited in segments (``state.segment`` keys, aligned to 16-key blocks from
    the block of the oldest visible key); each head of the group works through a whole
    segment before the next head: its scores, then one max and rescale for the segment,
    then its weighted values. The rescale of the running sum and outputs thus happens
    once per segment rather than once per block, and the scores of a segment have no
    dependency on each other: a per-block online softmax put exp, max and rescale on
    one dependency chain per 16 keys, which bounded decode at ~25 cycles per (key, head)
    whatever the number of FMAs.
    """
    hd, chunks, lanes = state.head_dim, state.chunks, state.lanes
    with loop(b, i64(0), count, name="init") as r:
        src = ptr_add(b, q, b.mul(r, i64(hd)))
        for k, (off, w) in enumerate(chunks):
            scaled = b.fmul(load(b, ptr_add(b, src, off), w), const(vtype(w), scale))
            b.store(scaled, state.q[k])
            for half in range(2):
                b.store(const(vtype(w), 0.0), state.acc[half][k])
        b.store(const(F32, -math.inf), state.max)
        b.store(const(vtype(lanes), 0.0), state.total)
        state.save(r)

    nkeys = b.add(pos, i64(1))
    oldest = i64(0)
    if window is not None:
        oldest = b.sub(nkeys, i64(window))
        oldest = b.select(b.icmp_signed("<", oldest, i64(0)), i64(0), oldest)
    first = b.and_(oldest, i64(-lanes))  # blocks stay aligned: the first is masked below
    with loop(b, first, nkeys, state.segment, name="segment") as s0:
        s_end = b.add(s0, i64(state.segment))
        s_end = b.select(b.icmp_signed("<", nkeys, s_end), nkeys, s_end)
        source = _Rows(keys, values, None, state.kv)
        if state.staging is not None:
            _stage(b, state, keys, values, s0, s_end)
            staged = state.staging
            source = _Rows(staged.keys, staged.values, s0, staged.reader)
        with loop(b, i64(0), count, name="head") as r:
            state.load(r)
            _segment(b, state, source, s0, s_end, pos, oldest, window is not None)
            state.save(r)

    with loop(b, i64(0), count, name="finish") as r:
        state.load(r)
        inv = b.fdiv(const(F32, 1.0), hsum(b, b.load(state.total)))
        out = ptr_add(b, dst, b.mul(r, i64(hd)))
        for k, (off, w) in enumerate(chunks):
            acc = b.fadd(b.load(state.acc[0][k]), b.load(state.acc[1][k]))
            store(b, b.fmul(acc, splat(b, inv, w)), ptr_add(b, out, off))


class _Rows:
    """Where a segment's key and value rows are read: the cache itself (``base`` None:
    row j at j * head_dim), or staging buffers holding rows base.. (row j at
    (j - base) * head_dim); ``reader`` loads them as float32."""

    def __init__(self, keys, values, base, reader: _Cache):
        self.keys, self.values, self.base, self.reader = keys, values, base, reader

    def at(self, b, which, j, head_dim: int):
        row = j if self.base is None else b.sub(j, self.base)
        return ptr_add(b, which, b.mul(row, i64(head_dim)))


def _stage(b, state, keys, values, s0, s_end) -> None:
    """Widen the float16 (or dequantize the int8) key and value rows s0..s_end-1 into the
    float32 staging buffers: once per segment instead of once per head (``vcvtph2ps``
    takes the FMAs' ports, and every head of a group read each row)."""
    hd, lanes = state.head_dim, state.lanes
    staged = (state.staging.keys, state.staging.values)
    if state.kv.int8:  # row by row: each has its own scale
        with loop(b, s0, s_end, name="stage") as j:
            at, to = b.mul(j, i64(state.kv.row)), b.mul(b.sub(j, s0), i64(hd))
            for src, dst in zip((keys, values), staged, strict=True):
                state.kv.load_row(ptr_add(b, src, at), ptr_add(b, dst, to), lanes)
        return
    start = b.mul(s0, i64(hd))
    with loop(b, i64(0), b.mul(b.sub(s_end, s0), i64(hd)), lanes, name="stage") as i:
        at = b.add(start, i)
        for src, dst in zip((keys, values), staged, strict=True):
            store(b, state.kv.load(ptr_add(b, src, at), lanes), ptr_add(b, dst, i), align=64)


def _segment(b, state, rows, s0, s_end, pos, oldest, windowed):
    """Fold keys s0..s_end-1 (s0 a multiple of 16, s_end <= pos + 1) into the working
    head's state: keys before ``oldest`` (a sliding window) or past ``pos`` get weight 0
    and their rows are never read."""
    lanes, seg = state.lanes, state.scores
    neg_inf = const(vtype(lanes), -math.inf)
    b.store(neg_inf, state.block_max)
    # 1. The segment's scores, block by block; only edge blocks pay for the mask. Their
    # hidden lanes read the segment's last row instead (visible, and staged with it).
    last = b.sub(s_end, i64(1))
    with loop(b, s0, s_end, lanes, name="scores") as j0:
        full = b.icmp_signed("<=", b.add(j0, i64(lanes)), s_end)
        if windowed:
            full = b.and_(full, b.icmp_signed(">=", j0, oldest))
        with b.if_else(full) as (inner, edge):
            with inner:
                scores = _block_scores(b, state, rows, j0, pos, masked=False)
                store(b, scores, ptr_add(b, seg, b.sub(j0, s0)), align=64)
            with edge:
                edge_oldest = oldest if windowed else None
                scores = _block_scores(
                    b, state, rows, j0, pos, masked=True, oldest=edge_oldest, clamp=last
                )
                store(b, scores, ptr_add(b, seg, b.sub(j0, s0)), align=64)
        scores = load_vec(b, ptr_add(b, seg, b.sub(j0, s0)), vtype(lanes), align=64)
        b.store(fmax(b, b.load(state.block_max), scores), state.block_max)

    # 2. One rescale for the segment: new max, weights exp(s - max), running sum.
    old_max = b.load(state.max)
    new_max = fmax(b, old_max, hmax(b, b.load(state.block_max)))
    b.store(new_max, state.max)
    alpha = vexp(b, b.fsub(old_max, new_max))
    b.store(b.fmul(b.load(state.total), splat(b, alpha, lanes)), state.total)
    with loop(b, s0, s_end, lanes, name="weights") as j0:
        at = ptr_add(b, seg, b.sub(j0, s0))
        weights = vexp(b, b.fsub(load_vec(b, at, vtype(lanes), align=64), splat(b, new_max, lanes)))
        store(b, weights, at, align=64)
        b.store(b.fadd(b.load(state.total), weights), state.total)
    for k, (_, w) in enumerate(state.chunks):
        for half in range(2):
            slot = state.acc[half][k]
            b.store(b.fmul(b.load(slot), splat(b, alpha, w)), slot)

    # 3. The visible keys' values, two keys a step (one accumulator set each).
    first = b.select(b.icmp_signed("<", s0, oldest), oldest, s0) if windowed else s0
    pairs_end = b.sub(s_end, b.and_(b.sub(s_end, first), i64(1)))
    with loop(b, first, pairs_end, 2, name="values") as j:
        for half in range(2):
            _add_value(b, state, rows, s0, b.add(j, i64(half)), half)
    with b.if_then(b.icmp_signed("<", pairs_end, s_end)):
        _add_value(b, state, rows, s0, pairs_end, 0)


def _add_value(b, state, rows, s0, j, half) -> None:
    """acc[half] += weight of key j (in the segment buffer) * value row j."""
    weight = b.load(ptr_add(b, state.scores, b.sub(j, s0)))
    row = rows.at(b, rows.values, j, state.head_dim)
    for k, (off, w) in enumerate(state.chunks):
        slot = state.acc[half][k]
        v = rows.reader.load(ptr_add(b, row, off), w)
        b.store(fma(b, splat(b, weight, w), v, b.load(slot)), slot)


def _adjust_scores(b, state, scores, j0, pos):
    """The options' changes to a block's (scaled) scores of keys j0..j0+lanes-1: the
    soft-cap, then the ALiBi bias slope * (j - pos)."""
    ty = scores.type
    if state.softcap is not None:
        capped = vtanh(b, b.fmul(scores, const(ty, 1.0 / state.softcap)))
        scores = b.fmul(capped, const(ty, float(state.softcap)))
    if state.slopes is not None:
        distance = b.sitofp(b.sub(j0, pos), F32)  # j0 - pos, exact below 2^24
        lane = ir.Constant(ty, [float(i) for i in range(ty.count)])
        distance = b.fadd(splat(b, distance, ty.count), lane)
        scores = fma(b, distance, splat(b, b.load(state.slope), ty.count), scores)
    return scores


def _block_scores(b, state, rows, j0, pos, *, masked, oldest=None, clamp=None):
    """The working head's scores of keys j0..j0+15. ``masked``: keys past ``pos`` (the
    causal limit) or before ``oldest`` (a sliding window) score -inf and are never read
    (their loads use row ``clamp``, a visible one)."""
    hd, chunks, lanes = state.head_dim, state.chunks, state.lanes
    slots = []
    for lane in range(lanes):
        j = b.add(j0, i64(lane))
        if masked:
            visible = b.icmp_signed("<=", j, pos)
            if oldest is not None:
                visible = b.and_(visible, b.icmp_signed(">=", j, oldest))
            j = b.select(visible, j, clamp)
        slots.append(rows.at(b, rows.keys, j, hd))

    # 16 vectors of partial dot products, reduced to one vector of 16 scores.
    qs = [b.load(slot) for slot in state.q]
    partials = []
    for k_row in slots:
        part = None
        for (off, w), qc in zip(chunks, qs, strict=True):
            kc = rows.reader.load(ptr_add(b, k_row, off), w)
            if w == lanes:
                part = b.fmul(qc, kc) if part is None else fma(b, qc, kc, part)
            else:
                tail = widen(b, b.fmul(qc, kc), lanes)
                part = tail if part is None else b.fadd(part, tail)
        partials.append(part)
    scores = transpose_sums(b, partials)
    scores = _adjust_scores(b, state, scores, j0, pos)
    if masked:
        offsets = ir.Constant(ir.VectorType(I64, lanes), list(range(lanes)))
        j = b.add(splat(b, j0, lanes), offsets)
        in_range = b.icmp_signed("<=", j, splat(b, pos, lanes))
        if oldest is not None:
            in_range = b.and_(in_range, b.icmp_signed(">=", j, splat(b, oldest, lanes)))
        scores = b.select(in_range, scores, const(vtype(lanes), -math.inf))
    return scores
