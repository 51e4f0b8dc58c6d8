"""Multi-token int8 linear tiles on Intel AMX (``Isa.tile_dot == "amx"``).

Why: a token tile of the VNNI kernels multiplies every expanded weight vector by each
token's broadcast activations, one ``vpdpbusd`` (64 multiply-adds) per token, so the
multiply work grows with the tokens while the weight bytes do not: from about 16 tokens
(prefill chunks, 16-stream decode) the vector kernels are bound by ``vpdpbusd`` issue.
One AMX ``tdpbusd`` does a 16-token x 16-row x 64-column block (16384 multiply-adds).
Below ``Tuning.amx_min_tokens`` the vector tiles stay (measured faster: the expansion
must finish before a tile load; docs/experiments/amx.md).

The packed int8 layouts are already AMX's B operand: a block's 16 consecutive weight
vectors (``[16 rows][4 columns]`` each, the ``vpdpbusd`` dword layout) are the 16 rows
of a 16 x 64-byte B tile, and an activation row's 64 bytes of the same columns is a row
of the A tile. So a dense int8 block is loaded straight from the weights; a bitmask
int8 block is first expanded (``vpexpandb``, as decode does) into a stack buffer once
per block, and every token tile reads it from L1/L2. Results are int32 sums of the same
products as ``vpdpbusd``'s, so bit for bit the VNNI kernel's (tested).

LLVM configures the tiles (``ldtilecfg`` from the shapes, ``tilerelease`` at return);
Linux hands a process AMX state only after ``arch_prctl(ARCH_REQ_XCOMP_PERM)``, which
``sparsec.runtime.cpu.enable_amx`` requests before such code first runs.
"""

from __future__ import annotations

from llvmlite import ir

from sparsec.codegen.irbuild import (
    F32,
    I8,
    I16,
    I32,
    I64,
    const,
    entry_alloca,
    for_range,
    i32,
    i64,
    intrinsic,
    kernel_function,
    new_function,
)

TILE_ROWS = 16  # AMX tiles have at most 16 rows (tokens of A and C, k-steps of B)
TILE_BYTES = 64  # ... of at most 64 bytes (64 int8 columns; 16 int32 outputs)


class _AmxTileType(ir.Type):
    """LLVM's ``x86_amx``: an AMX tile register value (llvmlite has no such type)."""

    def _to_string(self) -> str:
        return "x86_amx"

    def __eq__(self, other) -> bool:
        return isinstance(other, _AmxTileType)

    def __hash__(self) -> int:
        return hash("x86_amx")


TILE = _AmxTileType()
# A bitmask block is expanded into a stack buffer (16 rows x in_features bytes, times
# Tuning.amx_blocks): layers wider than this keep the vector tiles, so that the
# kernel threads' stacks (8 MiB by default) are never at risk.
MAX_BLOCK_BYTES = 512 << 10


def fits(packed) -> bool:
    """Whether a layer's blocks are small enough for the AMX path (MAX_BLOCK_BYTES)."""
    return packed.k_steps * TILE_BYTES <= MAX_BLOCK_BYTES


def _private(fn: ir.Function) -> ir.Function:
    """A helper of one kernel: internal, and never inlined (its tile configuration is
    its own, written on its entry)."""
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    return fn


def _i16(v) -> ir.Value:
    return ir.Constant(I16, v) if isinstance(v, int) else v


def tile_zero(b, rows, colbytes: int):
    return intrinsic(b, "llvm.x86.tilezero.internal", TILE, [_i16(rows), _i16(colbytes)])


def tile_load(b, rows, colbytes: int, ptr, stride: int):
    ptr = b.bitcast(ptr, I8.as_pointer())
    args = [_i16(rows), _i16(colbytes), ptr, i64(stride)]
    return intrinsic(b, "llvm.x86.tileloadd64.internal", TILE, args)


def tile_store(b, rows, colbytes: int, ptr, stride: int, tile) -> None:
    ptr = b.bitcast(ptr, I8.as_pointer())
    args = [_i16(rows), _i16(colbytes), ptr, i64(stride), tile]
    intrinsic(b, "llvm.x86.tilestored64.internal", ir.VoidType(), args)


def tile_dpbusd(b, m, n_bytes: int, k_bytes: int, c, a, bt):
    """C[m x n/4] (int32) += A[m x k] (u8) . B[k/4 x n] (s8, 4-byte dword rows)."""
    args = [_i16(m), _i16(n_bytes), _i16(k_bytes), c, a, bt]
    return intrinsic(b, "llvm.x86.tdpbusd.internal", TILE, args)


def emit_amx_rows_function(module, kernel: str, x_stride: int, make_format, make_outputs):
    """``{kernel}.amx_rows(w, x, xscale, y, n, blk_lo, blk_hi)`` for calls of at most 16
    tokens (batched decode, short chunks): one token tile, so one tile configuration at
    entry for the whole call, and the weight expansion of the next block can overlap
    the tile products (a configuration per block pair serialized them: the 8-token
    SmolLM2 stack took 3.26 ms against the vector tiles' 2.18; docs/experiments/amx.md).

    ``make_format(b, w)``: linear_kernel's format hooks in this function;
    ``make_outputs(b, fmt, xscale, y)``: its ``store_outputs`` (see emit_amx_blocks)."""
    ptr, fptr = I8.as_pointer(), F32.as_pointer()
    fn, b = new_function(
        module,
        f"{kernel}.amx_rows",
        [ptr, ptr, fptr, fptr, I32, I32, I32],
        ["w", "xq", "xscale", "y", "n_tokens", "blk_lo", "blk_hi"],
    )
    _private(fn)
    w, x, xscale, y, n, blk_lo, blk_hi = fn.args
    fmt = make_format(b, w)
    m = b.trunc(n, I16)  # the tile shape, defined on entry
    emit_amx_blocks(b, fmt, blk_lo, blk_hi, n, x, x_stride, make_outputs(b, fmt, xscale, y), m)
    b.ret_void()
    return fn


def emit_amx_blocks(
    b, fmt, blk_lo, blk_hi, n, x, x_stride: int, store_outputs, one_tile=None
) -> None:
    """All tokens of row blocks blk_lo..blk_hi-1 (this thread's) of an int8 format,
    ``Tuning.amx_blocks`` blocks at a time (then the rest one by one).

    ``fmt``: linear_kernel's format hooks (weight stream, bias, finish);
    ``store_outputs(acc, blk, blk64, tok64)``: writes one token's 16 int32 sums (the
    activation offset undone) of block ``blk`` as floats into y. ``one_tile``: n <= 16,
    the i16 tile shape defined on the function's entry: the products are emitted inline
    (else a tile function is called per token tile and block group)."""
    # One function holds every product when one_tile: one block at a time, so that
    # LLVM's tile registers (8, one shape each per configuration) suffice.
    group = 1 if one_tile is not None else fmt.tuning.amx_blocks
    sums_type = ir.ArrayType(I8, group * TILE_ROWS * TILE_BYTES)
    sums = entry_alloca(b, sums_type, name="amx_sums", align=64)
    scratch = None
    if fmt.sparse:
        block_bytes = fmt.p.k_steps * fmt.vec_bytes
        scratch_type = ir.ArrayType(I8, group * block_bytes)
        scratch = entry_alloca(b, scratch_type, name="amx_blocks", align=64)
    lo = blk_lo
    if group > 1:
        grouped_end = b.add(lo, b.mul(b.sdiv(b.sub(blk_hi, lo), i32(group)), i32(group)))
        with for_range(b, lo, grouped_end, step=group, name="amx_blkg") as first:
            blks = [b.add(first, i32(g)) if g else first for g in range(group)]
            _emit_group(b, fmt, blks, n, x, x_stride, sums, scratch, store_outputs, one_tile)
        lo = grouped_end
    with for_range(b, lo, blk_hi, name="amx_blk") as blk:
        _emit_group(b, fmt, [blk], n, x, x_stride, sums, scratch, store_outputs, one_tile)


def _emit_group(b, fmt, blks, n, x, x_stride: int, sums, scratch, store_outputs, one_tile):
    """Blocks ``blks`` together: each 64-column window's A tile (the tokens) is loaded
    once for all of them, and their accumulators are independent tile chains (one chain
    would wait out tdpbusd's latency at every window)."""
    p = fmt.p
    vec = fmt.vec_bytes
    block_bytes = p.k_steps * vec
    blk64s = [b.sext(blk, I64) for blk in blks]
    bases = []
    for g, blk64 in enumerate(blk64s):
        if fmt.sparse:
            # decode's stream and prefetch distance: this loop is a single-token stream
            state = fmt.block_start(blk64, fmt.tuning.prefetch_bytes[p.fmt])
            base = b.gep(b.bitcast(scratch, I8.as_pointer()), [i64(g * block_bytes)])
            with for_range(b, i32(0), i32(p.k_steps), name="amx_expand") as k:
                ptr = b.gep(b.bitcast(base, fmt.wvec_type.as_pointer()), [k], inbounds=True)
                b.store(fmt.weight(state, k), ptr, align=64)
        else:
            off = b.add(i64(p.sections["weights"]), b.mul(blk64, i64(block_bytes)))
            base = b.gep(fmt.w, [off], inbounds=True)
        bases.append(base)
    sums_ptr = b.bitcast(sums, I8.as_pointer())

    def outputs(t0, m32):
        rows = b.bitcast(sums, fmt.v.i32.as_pointer())
        biases = [fmt.acc_init(blk64, True) for blk64 in blk64s]
        with for_range(b, i32(0), m32, name="amx_row") as i:
            tok64 = b.sext(b.add(t0, i), I64)
            for g, (blk, blk64) in enumerate(zip(blks, blk64s, strict=True)):
                row = b.add(i, i32(g * TILE_ROWS))
                acc_i = b.load(b.gep(rows, [row], inbounds=True), align=64)
                store_outputs(b.add(acc_i, biases[g]), blk, blk64, tok64)

    if one_tile is not None:
        _emit_product(b, p.k_steps, x_stride, vec, x, one_tile, sums_ptr, bases)
        outputs(i32(0), n)
        return
    product = _tile_product(b.module, b.function.name, len(blks), p.k_steps, x_stride, vec)
    with for_range(b, i32(0), n, step=TILE_ROWS, name="amx_tok") as t0:
        left = b.sub(n, t0)
        m32 = b.select(b.icmp_signed("<", left, i32(TILE_ROWS)), left, i32(TILE_ROWS))
        xtile = b.gep(x, [b.mul(b.sext(t0, I64), i64(x_stride))], inbounds=True)
        b.call(product, [xtile, b.trunc(m32, I16), sums_ptr, *bases])
        outputs(t0, m32)


def _tile_product(module, kernel: str, group: int, k_steps: int, x_stride: int, vec: int):
    """``{kernel}.amx{group}(x, m, sums, b_0 .. b_group-1)``: ``_emit_product`` as a
    function of its own, so that the tile shapes (m) are defined on entry, where LLVM
    puts the tile configuration (each call configures and releases the tiles)."""
    name = f"{kernel}.amx{group}"
    if name in module.globals:
        return module.globals[name]
    ptr = I8.as_pointer()
    fn = _private(kernel_function(module, name, [ptr, I16, ptr] + [ptr] * group))
    xtile, m, sums, *bases = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    _emit_product(b, k_steps, x_stride, vec, xtile, m, sums, bases)
    b.ret_void()
    return fn


def _emit_product(b, k_steps: int, x_stride: int, vec: int, xtile, m, sums, bases) -> None:
    """sums[g] (16 x 16 int32 at sums + g KB) = the m token rows at xtile (x_stride
    apart) times block g's packed weights at bases[g], over all k_steps."""
    windows, tail = divmod(k_steps, TILE_ROWS)
    accs = [tile_zero(b, m, TILE_BYTES) for _ in bases]
    if windows:
        accs = _window_loop(b, windows, m, accs, xtile, x_stride, bases)
    if tail:  # the last k-steps: B tiles of fewer rows, A of fewer columns
        a = tile_load(b, m, 4 * tail, b.gep(xtile, [i64(windows * TILE_BYTES)]), x_stride)
        for g, base in enumerate(bases):
            bptr = b.gep(base, [i64(windows * TILE_ROWS * vec)])
            bt = tile_load(b, tail, TILE_BYTES, bptr, vec)
            accs[g] = tile_dpbusd(b, m, TILE_BYTES, 4 * tail, accs[g], a, bt)
    for g, acc in enumerate(accs):
        out = b.gep(sums, [i64(g * TILE_ROWS * TILE_BYTES)])
        tile_store(b, m, TILE_BYTES, out, TILE_BYTES, acc)


def _window_loop(b, windows: int, m, accs, xtile, x_stride: int, bases):
    """``accs`` += every full 64-column window; the tile accumulators are phis (an AMX
    value cannot live in a stack slot as the other loop counters do)."""
    fn = b.function
    pre = b.block
    body = fn.append_basic_block("amx_k.body")
    done = fn.append_basic_block("amx_k.done")
    b.branch(body)
    b.position_at_end(body)
    w = b.phi(I32, name="amx_w")
    cs = [b.phi(TILE, name=f"amx_acc{g}") for g in range(len(accs))]
    w64 = b.sext(w, I64)
    a = tile_load(b, m, TILE_BYTES, b.gep(xtile, [b.mul(w64, i64(TILE_BYTES))]), x_stride)
    nexts = []
    for c, base in zip(cs, bases, strict=True):
        bptr = b.gep(base, [b.mul(w64, i64(TILE_ROWS * TILE_BYTES))])
        bt = tile_load(b, TILE_ROWS, TILE_BYTES, bptr, TILE_BYTES)
        nexts.append(tile_dpbusd(b, m, TILE_BYTES, TILE_BYTES, c, a, bt))
    w_next = b.add(w, i32(1))
    w.add_incoming(i32(0), pre)
    w.add_incoming(w_next, body)
    for c, acc, nxt in zip(cs, accs, nexts, strict=True):
        c.add_incoming(acc, pre)
        c.add_incoming(nxt, body)
    b.cbranch(b.icmp_signed("<", w_next, const(I32, windows)), body, done)
    b.position_at_end(done)
    return nexts
