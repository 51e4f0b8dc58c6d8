"""The IR emitter of the linear kernels: ``y[t, :] (+)= x[t, :] @ W.T`` for one layer.

One loop nest serves all four formats (see linear_pack.py for the layouts); a format
contributes only how a weight vector is fetched (dense load, or mask + expand-load)
and how it is multiplied in (fp32 FMA, or int8 VNNI ``vpdpbusd``).

Loop order: groups of row blocks of this thread (outer) x token tiles x input steps
(inner). A block's weights are fetched once per token tile and used for every token of
the tile, so prefill reads each weight (and decodes each mask) once per tile, while the
blocks stay in L1/L2 across tiles; multi-token tiles also cover 2-3 blocks at once so
each broadcast activation serves several weight vectors. Decode (tile of 1 token)
instead splits the input steps over several accumulators to hide the FMA/VNNI latency.

The code depends only on the format and shape: the sparse structure is data (block
offset table, masks), so one kernel serves every layer with the same ``kernel_key``.
Thread ``tid`` takes a contiguous range of row blocks: equal counts for dense formats,
equal bytes (binary search in the offset table) for sparse ones.
"""

from __future__ import annotations

from llvmlite import ir

from sparsec.codegen import amx
from sparsec.codegen.amx import TILE_ROWS, emit_amx_blocks, emit_amx_rows_function
from sparsec.codegen.irbuild import (
    F32,
    I8,
    I16,
    I32,
    I64,
    Var,
    balanced_thread_range,
    const,
    for_range,
    gep_bytes,
    i32,
    i64,
    intrinsic,
    load_vec,
    masked_load,
    masked_store,
    new_function,
    splat,
    store,
    thread_range,
    vector_intrinsic,
    vectors,
)
from sparsec.codegen.linear_pack import PackedLinear, mask_unit
from sparsec.codegen.linear_shuffle import shuffle_decode_f32, shuffle_decode_i8_pairs
from sparsec.codegen.quantize import quantized_row_bytes
from sparsec.codegen.target import Target, default_target
from sparsec.codegen.tuning import decode_group
from sparsec.errors import SparsecError

# The tiling constants (token tiles, row-block groups, decode accumulators, prefetch
# distance) are per-CPU data: ``Target.tuning`` (tuning.py).


class _Format:
    """What differs between the four formats and the ISAs, as IR-emitting hooks."""

    def __init__(self, packed: PackedLinear, b: ir.IRBuilder, w, target: Target):
        self.p = packed
        self.b = b
        self.w = w
        self.target = target
        self.isa = target.isa
        self.tuning = target.tuning
        self.vec_bytes = target.isa.vector_bytes
        self.v = v = vectors(target.isa)
        self.int8 = packed.precision == "int8"
        self.sparse = packed.fmt.startswith("bitmask")
        self.acc_type = v.i32 if self.int8 else v.f32
        self.wvec_type = v.i8 if self.int8 else v.f32
        # one mask bit per unit of the weight vector (a float; an int8 byte or pair)
        self.mask_type = ir.IntType(self.vec_bytes // max(packed.mask_unit, 1))

    # -- weight stream of one block --------------------------------------------------
    def block_start(self, blk64, prefetch_bytes: int):
        """State for streaming block ``blk64``'s weights from step 0, prefetching
        ``prefetch_bytes`` ahead."""
        b, p = self.b, self.p
        if not self.sparse:
            off = b.add(i64(p.sections["weights"]), b.mul(blk64, i64(p.k_steps * self.vec_bytes)))
            return {"base": gep_bytes(b, self.w, off), "prefetch": prefetch_bytes}
        table = gep_bytes(b, self.w, p.sections["table"], I64)
        stream = gep_bytes(b, self.w, b.load(b.gep(table, [blk64], inbounds=True)))
        mask_bytes = p.k_steps * (self.mask_type.width // 8)
        values = Var(b, I8.as_pointer(), gep_bytes(b, stream, mask_bytes), "vals")
        return {
            "masks": b.bitcast(stream, self.mask_type.as_pointer()),
            "values": values,
            "prefetch": prefetch_bytes,
        }

    def weight(self, state, k):
        """The weight vector of input step ``k`` (i32 value); advances sparse streams."""
        b = self.b
        if not self.sparse:
            ptr = b.gep(b.bitcast(state["base"], self.wvec_type.as_pointer()), [k], inbounds=True)
            self.prefetch(ptr, state["prefetch"])
            return b.load(ptr, align=4)
        align = min(2, self.mask_type.width // 8)
        mask = b.load(b.gep(state["masks"], [k], inbounds=True), align=align)
        vptr = state["values"].get()
        # Hardware prefetchers lose the value stream (variable stride per step): fetch
        # ahead explicitly (measured: up to 1.8x on the 30-layer stack from DRAM).
        self.prefetch(vptr, state["prefetch"])
        if self.isa.sparse_decode == "shuffle":
            decode = shuffle_decode_i8_pairs if self.int8 else shuffle_decode_f32
            vec, nbytes = decode(b, vptr, mask, self.v)
        else:
            vec, nbytes = self.expand(vptr, mask)
        state["values"].set(b.gep(vptr, [b.zext(nbytes, I64)], inbounds=True))
        return vec

    def expand(self, vptr, mask):
        """(the step's weight vector, bytes of the stream it used): the nonzeros at
        ``vptr`` expanded into the lanes set in ``mask``, by ``Tuning.sparse_expand``."""
        b, v = self.b, self.v
        vec_type, lane_mask = (v.i8, v.mask_i8) if self.int8 else (v.f32, v.mask)
        lanes = b.bitcast(mask, lane_mask)
        zero = const(vec_type, 0 if self.int8 else 0.0)
        elem = "i8" if self.int8 else "f32"
        if self.tuning.sparse_expand[self.p.fmt] == "register":
            # a full vector of the stream (its slack keeps the load inside the blob),
            # then the register form of the expand. LLVM folds a plain load into the
            # expand's memory operand: an empty asm hands the expand an opaque register.
            values = b.load(b.bitcast(vptr, vec_type.as_pointer()), align=1)
            opaque = ir.FunctionType(vec_type, [vec_type])
            values = b.asm(opaque, "", "=v,0", [values], side_effect=False)
            name = f"llvm.x86.avx512.mask.expand.v{vec_type.count}{elem}"
            vec = intrinsic(b, name, vec_type, [values, zero, lanes])
        else:
            ptr = vptr if self.int8 else b.bitcast(vptr, F32.as_pointer())
            name = f"llvm.masked.expandload.v{vec_type.count}{elem}"
            vec = intrinsic(b, name, vec_type, [ptr, lanes, zero])
        count = intrinsic(b, f"llvm.ctpop.i{mask.type.width}", mask.type, [mask])
        return vec, count if self.int8 else b.mul(count, ir.Constant(mask.type, 4))

    def prefetch(self, ptr, distance: int):
        """Prefetch ``distance`` bytes ahead of ``ptr`` (may point past the blob: never
        faults)."""
        b = self.b
        ahead = b.gep(b.bitcast(ptr, I8.as_pointer()), [i64(distance)])  # not inbounds
        # llvm.prefetch(ptr, rw = 0 read, locality = 3, cache = 1 data)
        intrinsic(b, "llvm.prefetch.p0", ir.VoidType(), [ahead, i32(0), i32(3), i32(1)])

    # -- math ------------------------------------------------------------------------
    def x_broadcast(self, xrow, k):
        """Activation(s) of step ``k`` of one token, broadcast to every lane."""
        b = self.b
        if self.int8:
            word = b.load(b.gep(b.bitcast(xrow, I32.as_pointer()), [k], inbounds=True), align=1)
            return b.bitcast(splat(b, word, self.v.lanes), self.v.i8)
        return splat(b, b.load(b.gep(xrow, [k], inbounds=True), align=4), self.v.lanes)

    def madd(self, acc, xv, wv):
        b = self.b
        if not self.int8:
            return vector_intrinsic(b, "llvm.fma", self.v.f32, [xv, wv, acc])
        if self.isa.int8_dot == "vnni":
            # vpdpbusd: unsigned bytes (activations + 128) times signed bytes (weights)
            return intrinsic(b, self.isa.vnni_intrinsic, self.v.i32, [acc, xv, wv])
        # AVX2: |w| (unsigned) times x with w's sign (signed), so vpmaddubsw's i16 pair
        # sums stay within 2 * 127 * 127 and never saturate; vpmaddwd by 1 widens the
        # pairs to the four-byte int32 sums vpdpbusd would give.
        v = self.v
        i16s = ir.VectorType(I16, 2 * v.lanes)
        wabs = vector_intrinsic(b, "llvm.abs", v.i8, [wv, ir.Constant(ir.IntType(1), 0)])
        xsigned = intrinsic(b, "llvm.x86.avx2.psign.b", v.i8, [xv, wv])
        pairs = intrinsic(b, "llvm.x86.avx2.pmadd.ub.sw", i16s, [wabs, xsigned])
        quads = intrinsic(b, "llvm.x86.avx2.pmadd.wd", v.i32, [pairs, const(i16s, 1)])
        return b.add(acc, quads)

    def acc_init(self, blk64, first: bool):
        if self.int8 and first and self.isa.act_offset:
            # bias = -offset * rowsum(q) undoes the activation offset
            off = self.b.add(i64(self.p.sections["bias"]), self.b.mul(blk64, i64(self.vec_bytes)))
            return load_vec(self.b, gep_bytes(self.b, self.w, off), self.v.i32)
        return const(self.acc_type, 0 if self.int8 else 0.0)

    def add(self, a, c):
        return self.b.add(a, c) if self.int8 else self.b.fadd(a, c)

    def finish(self, acc, blk64, xscale, tok64):
        """The float outputs of a block (one per lane) for one token."""
        if not self.int8:
            return acc
        b = self.b
        off = b.add(i64(self.p.sections["scale"]), b.mul(blk64, i64(self.vec_bytes)))
        wscale = load_vec(b, gep_bytes(b, self.w, off), self.v.f32)
        xs = b.load(b.gep(xscale, [tok64], inbounds=True))
        f32 = self.v.f32
        return b.fmul(b.fmul(b.sitofp(acc, f32), wscale), splat(b, xs, self.v.lanes))


def emit_linear_kernel(
    module: ir.Module,
    name: str,
    packed: PackedLinear,
    *,
    max_tokens: int,
    accumulate: bool = False,
    x_stride: int | None = None,
    y_stride: int | None = None,
    target: Target | None = None,
) -> ir.Function:
    p = packed
    target = target or default_target()
    isa = target.isa
    if p.rows != isa.lanes_f32 or p.fmt not in isa.formats or p.mask_unit != mask_unit(p.fmt, isa):
        raise SparsecError(
            f"linear kernel {name}: {p.fmt} weights packed in {p.rows}-row blocks have no "
            f"{isa.name} kernel (pack them for that ISA: pack_linear(..., isa))"
        )
    if max_tokens < 1:
        raise SparsecError(f"max_tokens must be >= 1, got {max_tokens} (linear kernel {name})")
    int8 = p.precision == "int8"
    min_x_stride = quantized_row_bytes(p.in_features) if int8 else p.in_features
    x_stride = min_x_stride if x_stride is None else x_stride
    y_stride = p.out_features if y_stride is None else y_stride
    if x_stride < min_x_stride or y_stride < p.out_features:
        raise SparsecError(
            f"linear kernel {name}: x_stride {x_stride} / y_stride {y_stride} smaller than a "
            f"row ({min_x_stride} / {p.out_features})"
        )
    if int8:
        arg_types = [I8.as_pointer(), I8.as_pointer(), F32.as_pointer(), F32.as_pointer()]
        arg_names = ["w", "xq", "xscale", "y"]
    else:
        arg_types = [I8.as_pointer(), F32.as_pointer(), F32.as_pointer()]
        arg_names = ["w", "x", "y"]
    fn, b = new_function(
        module, name, [*arg_types, I32, I32, I32], [*arg_names, "n_tokens", "tid", "nthreads"]
    )
    if int8:
        w, x, xscale, y, n, tid, nthreads = fn.args
    else:
        (w, x, y, n, tid, nthreads), xscale = fn.args, None
    fmt = _Format(p, b, w, target)

    nblk = p.nblocks
    if fmt.sparse:
        table = gep_bytes(b, w, p.sections["table"], I64)
        blk_lo, blk_hi = balanced_thread_range(b, table, nblk, tid, nthreads)
    else:
        blk_lo, blk_hi = thread_range(b, nblk, tid, nthreads)

    def blocks(first, group, tiles):
        """All token tiles of the ``group`` consecutive blocks starting at ``first``."""
        blks = [b.add(first, i32(g)) if g else first for g in range(group)]
        out = [(b.sext(blk, I64), _store_mask(b, p, blk)) for blk in blks]
        done = Var(b, I32, i32(0), "tok")
        for tile in tiles:
            start = done.get()
            count = b.sdiv(b.sub(n, start), i32(tile))
            with for_range(b, i32(0), count, name=f"tile{tile}") as j:
                t0 = b.add(start, b.mul(j, i32(tile)))
                # the decode nest (tiles == (1,)) streams its whole group together;
                # prefill's single-token leftovers go one block at a time
                tile_group = group if tile > 1 or len(tiles) == 1 else 1
                for g0 in range(0, group, tile_group):
                    _emit_tile(
                        b,
                        fmt,
                        tile,
                        t0,
                        out[g0 : g0 + tile_group],
                        x,
                        x_stride,
                        y,
                        y_stride,
                        xscale,
                        accumulate,
                    )
            done.set(b.add(start, b.mul(count, i32(tile))))

    def block_loops(group, tiles):
        lo = blk_lo
        if group > 1:
            span = b.sub(blk_hi, lo)
            grouped_end = b.add(lo, b.mul(b.sdiv(span, i32(group)), i32(group)))
            with for_range(b, lo, grouped_end, step=group, name="blkg") as blk:
                blocks(blk, group, tiles)
            lo = grouped_end
        with for_range(b, lo, blk_hi, name="blk") as blk:
            blocks(blk, 1, tiles)

    # Decode (one token) and prefill get separate loop nests: they want different
    # row-block groupings (see Tuning.decode_group and Tuning.block_group).
    tuning = target.tuning
    is_decode = b.icmp_signed("==", n, i32(1))
    with b.if_else(is_decode) as (decode, prefill):
        with decode:
            block_loops(decode_group(tuning, p.fmt, p.in_features), (1,))
        with prefill:

            def vector_tiles():
                block_loops(tuning.block_group[p.precision], tuning.token_tiles)

            if int8 and isa.tile_dot == "amx" and amx.fits(p):
                args = (w, x, xscale, y, n, blk_lo, blk_hi)
                _emit_amx_or_vector(
                    b, fmt, name, args, x_stride, y_stride, accumulate, vector_tiles
                )
            else:
                vector_tiles()
    b.ret_void()
    return fn


def _emit_tile(b, fmt, tile, t0, blks, x, x_stride, y, y_stride, xscale, accumulate):
    """Outputs of the row blocks ``blks`` ((index, store mask) pairs) for tokens t0 ..
    t0+tile-1: each weight vector is fetched once and used for every token."""
    p = fmt.p
    unroll = max(1, fmt.tuning.decode_accumulators // len(blks)) if tile == 1 else 1
    unroll = max(1, min(unroll, p.k_steps))
    toks = [b.sext(b.add(t0, i32(i)), I64) for i in range(tile)]
    xrows = [b.gep(x, [b.mul(t, i64(x_stride))], inbounds=True) for t in toks]
    accs = [
        [
            [
                Var(b, fmt.acc_type, fmt.acc_init(blk64, u == 0), f"acc{i}_{u}")
                for u in range(unroll)
            ]
            for i in range(tile)
        ]
        for blk64, _ in blks
    ]
    tuning = fmt.tuning
    # A multi-token tile spends longer on each weight vector: it prefetches further.
    distance = tuning.prefetch_bytes[p.fmt] if tile == 1 else tuning.tile_prefetch_bytes
    states = [fmt.block_start(blk64, distance) for blk64, _ in blks]

    def step(k, u):
        wvs = [fmt.weight(state, k) for state in states]
        for i in range(tile):
            xv = fmt.x_broadcast(xrows[i], k)
            for g, wv in enumerate(wvs):
                accs[g][i][u].set(fmt.madd(accs[g][i][u].get(), xv, wv))

    main = p.k_steps - p.k_steps % unroll
    if main:
        with for_range(b, i32(0), i32(main), step=unroll, name="k") as k:
            for u in range(unroll):
                step(b.add(k, i32(u)) if u else k, u)
    for k in range(main, p.k_steps):
        step(i32(k), 0)

    for g, (blk64, mask) in enumerate(blks):
        for i in range(tile):
            acc = accs[g][i][0].get()
            for u in range(1, unroll):
                acc = fmt.add(acc, accs[g][i][u].get())
            _store_token(b, fmt, acc, blk64, mask, toks[i], xscale, y, y_stride, accumulate)


def _emit_amx_or_vector(b, fmt, name, args, x_stride, y_stride, accumulate, vector_tiles):
    """A multi-token call on an AMX target: AMX tiles from Tuning.amx_min_tokens tokens
    (below, the vector tiles measure faster), one tile configuration per call up to 16
    tokens (``.amx_rows``), a tile function per token tile beyond."""
    p, target = fmt.p, fmt.target
    w, x, xscale, y, n, blk_lo, blk_hi = args

    def make_outputs(b, fmt, xscale, y):
        def store_outputs(acc, blk, blk64, tok64):
            mask = _store_mask(b, p, blk)
            _store_token(b, fmt, acc, blk64, mask, tok64, xscale, y, y_stride, accumulate)

        return store_outputs

    rows_fn = emit_amx_rows_function(
        b.module, name, x_stride, lambda b, w: _Format(p, b, w, target), make_outputs
    )
    use_amx = b.icmp_signed(">=", n, i32(fmt.tuning.amx_min_tokens))
    is_one_tile = b.icmp_signed("<=", n, i32(TILE_ROWS))
    with b.if_else(use_amx) as (tiles, vector):
        with tiles:
            with b.if_else(is_one_tile) as (one_tile, several):
                with one_tile:
                    b.call(rows_fn, list(args))
                with several:
                    outputs = make_outputs(b, fmt, xscale, y)
                    emit_amx_blocks(b, fmt, blk_lo, blk_hi, n, x, x_stride, outputs)
        with vector:
            vector_tiles()


def _store_mask(b, p, blk):
    """The lanes of block ``blk`` that are real rows (None: all, no block is padded)."""
    tail_rows = p.out_features - (p.nblocks - 1) * p.rows
    if tail_rows == p.rows:
        return None
    # the last block has padded rows: masked loads/stores of y
    last = b.icmp_signed("==", blk, i32(p.nblocks - 1))
    bits = ir.IntType(p.rows)
    return b.select(
        last, ir.Constant(bits, (1 << tail_rows) - 1), ir.Constant(bits, (1 << p.rows) - 1)
    )


def _store_token(b, fmt, acc, blk64, mask, tok64, xscale, y, y_stride, accumulate):
    """One token's outputs of one block (its accumulator) into y (masked in the last
    block when it has padded rows)."""
    out = fmt.finish(acc, blk64, xscale, tok64)
    offset = b.add(b.mul(tok64, i64(y_stride)), b.mul(blk64, i64(fmt.p.rows)))
    yptr = b.gep(y, [offset], inbounds=True)
    if mask is None:
        if accumulate:
            out = b.fadd(load_vec(b, yptr, fmt.v.f32), out)
        store(b, out, yptr)
    else:
        if accumulate:
            out = b.fadd(masked_load(b, yptr, mask, fmt.v.f32), out)
        masked_store(b, out, yptr, mask)
