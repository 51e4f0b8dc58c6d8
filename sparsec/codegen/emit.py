"""Turn a lowered ``Program`` into one LLVM module plus the packed weights blob.

The module holds one kernel per program instruction (each specialized to its shapes,
strides, weight layout and sparsity) and ``sparsec_forward_body(ctx, tid, nthreads)``,
which every pool thread runs once per forward step: the kernels in program order with
a barrier between them. ``native/driver.c`` provides the ABI entry points around it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import numpy as np
from llvmlite import ir

from sparsec.codegen import linear, ops
from sparsec.codegen.irbuild import entry_alloca, intrinsic
from sparsec.codegen.program import Instr, Program, View, buffer_lifetimes
from sparsec.codegen.quantize import emit_quantize_tokens, quantized_row_bytes
from sparsec.codegen.target import Target, declare_function
from sparsec.contract import kv_row_elements
from sparsec.errors import SparsecError

ALIGN = 64
I8P = ir.IntType(8).as_pointer()
F32P = ir.FloatType().as_pointer()
I32 = ir.IntType(32)
I64 = ir.IntType(64)

# Byte offsets of spc_ctx fields (native/driver.c).
CTX_FIELDS = {
    "weights": (0, I8P),
    "kv_cache": (8, F32P),
    "pool": (16, I8P),
    "scratch": (24, I8P),
    "tokens": (32, I32.as_pointer()),
    "n_tokens": (40, I32),
    "all_logits": (44, I32),
    "logits": (48, F32P),
    "caches": (56, F32P.as_pointer()),  # per row: the KV cache of its sequence
    "positions": (64, I32.as_pointer()),  # per row: its position in that sequence
}


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class WeightsBlob:
    """The packed constants of a model, each at a 64-byte aligned offset.

    Written to an unnamed temporary file (``TMPDIR``) as each layer is packed, and mapped
    read-only by ``to_array``: the packed model is never held in memory a second time
    beside the graph's weights (it was, as a list of chunks and then their join: 2x the
    weights at the peak of a compile). The file has no name, so nothing is left behind
    by a failed or interrupted compile; it needs the weights' size of free disk.
    """

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="sparsec-weights-")
        self.size = 0

    def add(self, data) -> int:
        raw = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        offset = self.size
        pad = _align(len(raw)) - len(raw)
        try:
            self.file.write(raw)
            self.file.write(b"\0" * pad)
        except OSError as exc:
            raise SparsecError(
                f"cannot write the packed weights to a temporary file in "
                f"{tempfile.gettempdir()} ({exc.strerror or exc}); free some space there or "
                "point TMPDIR at a disk with room for the model's weights"
            ) from exc
        self.size += len(raw) + pad
        return offset

    def to_array(self) -> np.ndarray:
        """The whole blob (read-only, mapped from the file)."""
        self.file.flush()
        if not self.size:
            return np.zeros(0, np.uint8)
        return np.memmap(self.file, dtype=np.uint8, mode="r", shape=(self.size,))


@dataclass
class LayerRecord:
    name: str
    shape: list[int]
    sparsity: float
    pattern: str
    kernel: str
    bytes: int
    flops: int


@dataclass
class Emitted:
    module: ir.Module
    weights: np.ndarray
    scratch_bytes: int
    layers: list[LayerRecord] = field(default_factory=list)
    # where token embeddings come from: "rows" (a float table) or the tied LM head's
    # packed weights ("dense_f32", "dense_i8"); see ops_elementwise.emit_embedding
    embedding: str = "rows"
    # with profile=True: what each of PROFILE_COUNTERS' slots times, in program order
    profile_ops: list[dict] | None = None


# Exported by a model compiled with ``--profile``: int64 [ops], the time-stamp counter
# cycles thread 0 spent in each op of the forward step (its barrier included), summed
# over the steps run since the runtime last zeroed it (sparsec.runtime.profile).
PROFILE_COUNTERS = "sparsec_profile_cycles"


def profile_op(ins: Instr) -> dict:
    """What a profile slot times: the op and, where it has one, its layer or weight name."""
    a = ins.args
    where = a.get("name", a.get("layer"))
    return {"op": ins.op} if where is None else {"op": ins.op, "name": str(where)}


def _allocate_scratch(prog: Program, max_tokens: int, reserved: int) -> tuple[dict[str, int], int]:
    """Offsets for float buffers ``[max_tokens, width]``, reusing dead buffers' space."""
    spans = buffer_lifetimes(prog)
    free: list[tuple[int, int, int]] = []  # (offset, size, free after instr)
    offsets: dict[str, int] = {}
    top = reserved
    for name in sorted(spans, key=lambda b: spans[b][0]):
        if name == "logits":
            continue
        start, end = spans[name]
        size = _align(max_tokens * prog.buffers[name] * 4)
        slot = next((s for s in free if s[2] < start and s[1] >= size), None)
        if slot is not None:
            free.remove(slot)
            offsets[name] = slot[0]
            free.append((slot[0], slot[1], end))
        else:
            offsets[name] = top
            free.append((top, size, end))
            top += size
    return offsets, top


class _Emitter:
    def __init__(
        self,
        prog: Program,
        *,
        precision: str,
        kernels: str,
        max_tokens: int,
        capacity: int,
        choose,
        target: Target,
        kv_cache: str = "float32",
        profile: bool = False,
    ):
        self.prog = prog
        self.profile = profile
        self.target = target
        # Only a float16 or int8 cache changes the attention kernels (float32 keeps their
        # code).
        self.kv_options = {"float16": {"kv_half": True}, "int8": {"kv_int8": True}}.get(
            kv_cache, {}
        )
        self.precision = precision
        self.kernels = kernels
        self.max_tokens = max_tokens
        self.capacity = capacity
        self.choose = choose
        self.module = ir.Module(name="sparsec_model")
        self.module.triple = target.triple
        self.blob = WeightsBlob()
        self.tables = dict(prog.tables)
        # (LM head instr, its packed weights, blob offset if it also serves the embedding)
        # when the head is tied to the embedding, so it is packed once
        self.tied_head = self._tie_embedding()
        self.table_offsets = {n: self.blob.add(t) for n, t in self.tables.items()}
        self.layers: list[LayerRecord] = []
        cfg = prog.config
        # elements of one layer's keys (or values) in a sequence's cache
        row = kv_row_elements(cfg.head_dim, kv_cache)
        self.kv_layer_floats = cfg.num_key_value_heads * capacity * row
        max_in = max((ins.args["x"].width for ins in prog.linears()), default=0)
        # One quantized-activation region serves every int8 linear: each is quantized
        # right before its linear, so their lifetimes never overlap.
        self.xq_bytes = _align(max_tokens * quantized_row_bytes(max(max_in, 1)))
        self.xs_bytes = _align(max_tokens * 4)
        reserved = self.xq_bytes + self.xs_bytes
        self.buf_offsets, self.scratch_bytes = _allocate_scratch(prog, max_tokens, reserved)
        self.n_kernels = 0
        self.linear_kernels: dict[tuple, ir.Function] = {}

    # -- kernels -------------------------------------------------------------------------
    def _shared_kernel(self, emit, **params) -> ir.Function:
        """The op kernel ``emit(**params)`` for this target's ISA, emitted once."""
        return ops.shared_kernel(self.module, emit, isa=self.target.isa, **params)

    def _kname(self, op: str) -> str:
        self.n_kernels += 1
        return f"k{self.n_kernels:04d}_{op}"

    @property
    def shared_head(self) -> tuple[Instr, linear.PackedLinear, int] | None:
        """The tied LM head when its packed weights also serve as the embedding table."""
        return self.tied_head if self.tied_head and self.tied_head[2] is not None else None

    def _tie_embedding(self) -> tuple[Instr, linear.PackedLinear, int | None] | None:
        """The LM head tied to the embedding table, packed, and its blob offset when its
        packed weights also serve as the table (else None: the table is stored).

        With tied embeddings (SmolLM2) the Gather table and the LM head are one matrix,
        and storing the table again would add vocab x hidden x 4 bytes (113 MB) to the .so.
        A ``dense_f32`` head gives back the rows exactly. An int8 head puts the embedding
        on its int8 grid as well (what ``sparsec.testing.fake_quant_w8a8`` does), whatever
        kernel it gets: a ``dense_i8`` head serves the rows, a sparse one has no fixed
        place for each row's values, so the table is stored, dequantized from the head.
        """
        table = self.tables.get("embedding")
        head = next((i for i in self.prog.linears() if i.args["logits"]), None)
        if table is None or head is None or len(head.args["weights"]) != 1:
            return None
        w = head.args["weights"][0].value
        if w.shape != table.shape or not np.array_equal(w, table):
            return None
        packed = self._pack(head, w)
        del w
        if packed.fmt in ("dense_f32", "dense_i8"):
            del self.tables["embedding"]
            return head, packed, self.blob.add(packed.data)
        if packed.precision == "int8":
            q = linear.unpack_weight(packed).astype(np.float32)
            self.tables["embedding"] = q * linear.weight_scale(packed)[:, None]
        return head, packed, None

    def _pack(self, ins: Instr, w: np.ndarray) -> linear.PackedLinear:
        """``ins``'s layer packed; ``w``: its stacked float weights (read by the caller:
        each layer's weights are read from the graph once, and one layer at a time)."""
        weights = ins.args["weights"]
        pre_quantized = all(wt.int8 is not None for wt in weights)
        precision = "int8" if (self.precision == "int8" or self.prog.activation_quant) else "fp32"
        fmt = self.choose(w, precision, self.kernels)
        if pre_quantized and fmt.endswith("_i8"):
            q = _stacked([wt.int8 for wt in weights])
            s = _stacked([wt.scale for wt in weights])
            return linear.pack_linear_quantized(q, s, fmt, self.target.isa)
        return linear.pack_linear(w, fmt, self.target.isa)

    def _linear_kernel(self, ins: Instr):
        a = ins.args
        w = _stacked([wt.value for wt in a["weights"]])
        if self.tied_head and self.tied_head[0] is ins:
            _, packed, offset = self.tied_head
        else:
            packed, offset = self._pack(ins, w), None
        fmt = packed.fmt
        is_int8 = fmt.endswith("_i8")
        # int8 kernels read the quantized copy, laid out by the quantize kernel
        x_stride = None if is_int8 else self.prog.buffers[a["x"].buf]
        y_stride = self.prog.buffers[a["y"].buf]
        # Kernel code depends on format and shape only (the sparse structure is read
        # from the weights at run time), so layers of one shape share one kernel.
        key = (packed.kernel_key, x_stride, y_stride)
        fn = self.linear_kernels.get(key)
        if fn is None:
            fn = linear.emit_linear(
                self.module,
                self._kname("linear"),
                packed,
                max_tokens=self.max_tokens,
                x_stride=x_stride,
                y_stride=y_stride,
                target=self.target,
            )
            self.linear_kernels[key] = fn
        nnz = int(np.count_nonzero(w))
        self.layers.append(
            LayerRecord(
                name=a["name"],
                shape=list(w.shape),
                sparsity=round(1 - nnz / w.size, 4),
                pattern=_pattern(self.prog, a["weights"], w),
                kernel=fmt,
                bytes=int(packed.data.nbytes),
                flops=2 * nnz,
            )
        )
        return fn, self.blob.add(packed.data) if offset is None else offset, is_int8

    # -- body ----------------------------------------------------------------------------
    def emit(self) -> Emitted:
        mod = self.module
        barrier = declare_function(mod, "spc_barrier", ir.FunctionType(ir.VoidType(), [I8P, I32]))
        body = ir.Function(
            mod, ir.FunctionType(ir.VoidType(), [I8P, I32, I32]), "sparsec_forward_body"
        )
        ctx, tid, nth = body.args
        b = ir.IRBuilder(body.append_basic_block("entry"))
        self.b = b
        f = {
            k: b.load(b.bitcast(b.gep(ctx, [ir.Constant(I64, off)]), t.as_pointer()))
            for k, (off, t) in CTX_FIELDS.items()
        }
        self.f, self.tid, self.nth = f, tid, nth
        clock = _ProfileClock(b, mod, tid, len(self.prog.instrs)) if self.profile else None
        for i, ins in enumerate(self.prog.instrs):
            getattr(self, f"emit_{ins.op}")(ins)
            b.call(barrier, [f["pool"], tid])
            if clock is not None:
                clock.lap(i)
        b.ret_void()
        return Emitted(
            mod,
            self.blob.to_array(),
            self.scratch_bytes,
            self.layers,
            self._embedding_layout()["layout"],
            [profile_op(ins) for ins in self.prog.instrs] if self.profile else None,
        )

    def call(self, fn, args):
        cast = [
            self.b.bitcast(a, p.type) if isinstance(a.type, ir.PointerType) else a
            for a, p in zip(args, fn.args, strict=False)
        ]
        return self.b.call(
            fn,
            cast + [self.f["n_tokens"], self.tid, self.nth][len(cast) - len(fn.args) :]
            if len(cast) < len(fn.args)
            else cast,
        )

    def ptr(self, view: View, row=None):
        off = self.buf_offsets[view.buf] + view.offset * 4
        p = self.b.gep(self.f["scratch"], [ir.Constant(I64, off)])
        if row is not None:
            stride = self.prog.buffers[view.buf] * 4
            p = self.b.gep(p, [self.b.mul(self.b.sext(row, I64), ir.Constant(I64, stride))])
        return self.b.bitcast(p, F32P)

    def weights_at(self, offset: int):
        return self.b.gep(self.f["weights"], [ir.Constant(I64, offset)])

    def table(self, name: str):
        return self.b.bitcast(self.weights_at(self.table_offsets[name]), F32P)

    def row_args(self, layer: int) -> list:
        """The attention kernels' per-row arguments (ops_attention.ROW_ARGS): every row's
        cache and position, and the float offsets of layer ``layer``'s keys and values in
        a sequence's cache [L][2][KVH][C][head_dim]."""
        at = [ir.Constant(I64, (2 * layer + which) * self.kv_layer_floats) for which in (0, 1)]
        return [self.f["caches"], self.f["positions"], *at]

    def _embedding_layout(self) -> dict:
        if not self.shared_head:
            return {"layout": "rows"}
        packed = self.shared_head[1]
        if packed.fmt == "dense_f32":
            return {"layout": "dense_f32", "rows": packed.rows}
        return {
            "layout": "dense_i8",
            "scale_at": packed.sections["scale"] - packed.sections["weights"],
            "rows": packed.rows,
        }

    def emit_embed(self, ins: Instr) -> None:
        cfg = self.prog.config
        fn = self._shared_kernel(
            ops.emit_embedding,
            vocab=ins.args["vocab"],
            dim=cfg.hidden_size,
            **self._embedding_layout(),
        )
        if self.shared_head:
            _, packed, offset = self.shared_head
            table = self.b.bitcast(self.weights_at(offset + packed.sections["weights"]), F32P)
        else:
            table = self.table("embedding")
        self.call(fn, [table, self.f["tokens"], self.ptr(ins.args["out"])])

    def emit_rmsnorm(self, ins: Instr) -> None:
        a = ins.args
        fn = self._shared_kernel(ops.emit_rmsnorm, dim=a["x"].width, eps=a["eps"], residual=False)
        self.call(fn, [self.ptr(a["x"]), self.table(a["w"]), self.ptr(a["y"])])

    def emit_embed_positions(self, ins: Instr) -> None:
        # The token embedding's kernel, indexed by each row's position (learned positions).
        fn = self._shared_kernel(
            ops.emit_embedding, vocab=ins.args["rows"], dim=self.prog.config.hidden_size
        )
        self.call(fn, [self.table("positions"), self.f["positions"], self.ptr(ins.args["out"])])

    def emit_layernorm(self, ins: Instr) -> None:
        a = ins.args
        fn = self._shared_kernel(
            ops.emit_layernorm,
            dim=a["x"].width,
            eps=a["eps"],
            residual=False,
            bias=a["b"] is not None,
        )
        bias = [self.table(a["b"])] if a["b"] is not None else []
        self.call(fn, [self.ptr(a["x"]), self.table(a["w"]), *bias, self.ptr(a["y"])])

    def emit_skip_layernorm(self, ins: Instr) -> None:
        a = ins.args
        fn = self._shared_kernel(
            ops.emit_layernorm,
            dim=a["resid"].width,
            eps=a["eps"],
            residual=True,
            bias=a["b"] is not None,
        )
        bias = [self.table(a["b"])] if a["b"] is not None else []
        self.call(
            fn,
            [
                self.ptr(a["resid"]),
                self.ptr(a["delta"]),
                self.table(a["w"]),
                *bias,
                self.ptr(a["y"]),
            ],
        )

    def emit_activation(self, ins: Instr) -> None:
        x = ins.args["x"]
        fn = self._shared_kernel(
            ops.emit_activation,
            dim=x.width,
            stride=self.prog.buffers[x.buf],
            kind=ins.args["kind"],
        )
        self.call(fn, [self.ptr(x)])

    def emit_scale(self, ins: Instr) -> None:
        x = ins.args["x"]
        fn = self._shared_kernel(
            ops.emit_scale, dim=x.width, stride=self.prog.buffers[x.buf], factor=ins.args["factor"]
        )
        self.call(fn, [self.ptr(x)])

    def emit_softcap(self, ins: Instr) -> None:
        # The logits rows the LM head wrote: every row, or the last one (decode)
        vocab, b = ins.args["x"].width, self.b
        all_rows = b.icmp_signed("!=", self.f["all_logits"], ir.Constant(I32, 0))
        n = b.select(all_rows, self.f["n_tokens"], ir.Constant(I32, 1))
        fn = self._shared_kernel(ops.emit_softcap, dim=vocab, stride=vocab, cap=ins.args["cap"])
        self._call_n(fn, [self.f["logits"]], n)

    def emit_skip_rmsnorm(self, ins: Instr) -> None:
        a = ins.args
        fn = self._shared_kernel(
            ops.emit_rmsnorm,
            dim=a["resid"].width,
            eps=a["eps"],
            residual=True,
        )
        self.call(
            fn, [self.ptr(a["resid"]), self.ptr(a["delta"]), self.table(a["w"]), self.ptr(a["y"])]
        )

    def emit_add(self, ins: Instr) -> None:
        fn = self._shared_kernel(ops.emit_residual_add, dim=ins.args["acc"].width)
        self.call(fn, [self.ptr(ins.args["acc"]), self.ptr(ins.args["x"])])

    def emit_bias_add(self, ins: Instr) -> None:
        fn = self._shared_kernel(ops.emit_bias_add, dim=ins.args["y"].width)
        self.call(fn, [self.ptr(ins.args["y"]), self.table(ins.args["bias"])])

    def emit_swiglu_act(self, ins: Instr) -> None:
        extra = {"activation": ins.args["activation"]} if "activation" in ins.args else {}
        fn = self._shared_kernel(ops.emit_swiglu_act, ffn_dim=ins.args["ffn"], **extra)
        self.call(fn, [self.ptr(ins.args["gu"]), self.ptr(ins.args["h"])])

    def _attn_common(self, a: dict) -> dict:
        if a["max_positions"] < self.capacity:
            raise SparsecError(
                f"max context {self.capacity} exceeds the model's position table "
                f"({a['max_positions']} positions); use --max-context {a['max_positions']} or less"
            )
        return dict(
            num_heads=a["heads"],
            kv_num_heads=a["kv_heads"],
            head_dim=a["head_dim"],
            capacity=self.capacity,
            qkv_stride=self.prog.buffers[a["qkv"]],
        )

    def emit_rope_kv(self, ins: Instr) -> None:
        a = ins.args
        # Optional parts only when present: Llama's kernels keep their names and code.
        options = {k: a[k] for k in ("rotary_dim", "qk_norm_eps", "rope") if k in a}
        fn = self._shared_kernel(
            ops.emit_rope_kv_write,
            **self._attn_common(a),
            q_offset=a["q_offset"],
            k_offset=a["k_offset"],
            v_offset=a["v_offset"],
            **options,
            **self.kv_options,
        )
        qkv = self.ptr(View(a["qkv"], 0, self.prog.buffers[a["qkv"]]))
        norms = [self.table(a[k]) for k in ("q_norm", "k_norm") if k in a]
        name = a.get("tables", "rope")
        tables = (
            [self.table(f"{name}.cos"), self.table(f"{name}.sin")] if a.get("rope", True) else []
        )
        self.call(
            fn,
            [
                qkv,
                *tables,
                *norms,
                *self.row_args(a["layer"]),
            ],
        )

    def emit_attention(self, ins: Instr) -> None:
        a = ins.args
        fn = self._shared_kernel(
            ops.emit_attention,
            **self._attn_common(a),
            scale=a["scale"],
            q_offset=a["q_offset"],
            **{k: a[k] for k in ("window", "alibi", "softcap") if k in a},
            **self.kv_options,
        )
        qkv = self.ptr(View(a["qkv"], 0, self.prog.buffers[a["qkv"]]))
        self.call(
            fn,
            [
                qkv,
                self.ptr(a["out"]),
                *self.row_args(a["layer"]),
            ],
        )

    def emit_linear(self, ins: Instr) -> None:
        a = ins.args
        fn, w_off, is_int8 = self._linear_kernel(ins)
        b = self.b
        if a["logits"]:
            # Decode needs only the last token's logits: the largest matrix of the
            # model is then read once per step for one row instead of n.
            last = b.sub(self.f["n_tokens"], ir.Constant(I32, 1))
            all_rows = b.icmp_signed("!=", self.f["all_logits"], ir.Constant(I32, 0))
            row0 = b.select(all_rows, ir.Constant(I32, 0), last)
            n = b.select(all_rows, self.f["n_tokens"], ir.Constant(I32, 1))
            x, y = self.ptr(a["x"], row=row0), self.f["logits"]
        else:
            n, x, y = self.f["n_tokens"], self.ptr(a["x"]), self.ptr(a["y"])
        w = self.weights_at(w_off)
        if is_int8:
            xq = self.f["scratch"]
            xs = b.bitcast(b.gep(self.f["scratch"], [ir.Constant(I64, self.xq_bytes)]), F32P)
            qfn = self._shared_kernel(
                emit_quantize_tokens,
                in_features=a["x"].width,
                max_tokens=self.max_tokens,
                x_stride=self.prog.buffers[a["x"].buf],
            )
            self._call_n(qfn, [x, xq, xs], n)
            b.call(
                declare_function(
                    self.module, "spc_barrier", ir.FunctionType(ir.VoidType(), [I8P, I32])
                ),
                [self.f["pool"], self.tid],
            )
            self._call_n(fn, [w, xq, xs, y], n)
        else:
            self._call_n(fn, [w, x, y], n)

    def _call_n(self, fn, args, n) -> None:
        cast = [
            self.b.bitcast(a, p.type) if isinstance(a.type, ir.PointerType) else a
            for a, p in zip(args, fn.args, strict=False)
        ]
        self.b.call(fn, cast + [n, self.tid, self.nth])


class _ProfileClock:
    """Thread 0's time-stamp counter at the start of the step and after each op's
    barrier: the cycles between two laps are added to op i's slot of PROFILE_COUNTERS.
    After the barrier, so an op's time is the slowest thread's (what the step waits
    for). One rdtsc and one add per op on one thread: ~0.1% of a SmolLM2 step."""

    def __init__(self, b: ir.IRBuilder, module: ir.Module, tid, n_ops: int):
        self.b = b  # in the body's entry block
        ty = ir.ArrayType(I64, n_ops)
        self.counters = ir.GlobalVariable(module, ty, PROFILE_COUNTERS)
        self.counters.initializer = ir.Constant(ty, [0] * n_ops)
        self.is_first = b.icmp_signed("==", tid, ir.Constant(I32, 0))
        self.last = entry_alloca(b, I64, self._now(), name="profile.last")

    def _now(self):
        return intrinsic(self.b, "llvm.readcyclecounter", I64, [])

    def lap(self, i: int) -> None:
        b = self.b
        with b.if_then(self.is_first):
            now = self._now()
            slot = b.gep(self.counters, [ir.Constant(I64, 0), ir.Constant(I64, i)])
            b.store(b.add(b.load(slot), b.sub(now, b.load(self.last))), slot)
            b.store(now, self.last)


def _stacked(parts: list[np.ndarray]) -> np.ndarray:
    """The fused layer's rows (a single part as it is: no copy of a large LM head)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _pattern(prog: Program, weights, w: np.ndarray) -> str:
    """The graph's recorded pattern when all parts agree, else classified here."""
    from sparsec.passes.sparsity import classify

    recorded = {prog.sparsity.get(wt.name, {}).get("pattern") for wt in weights}
    if len(recorded) == 1 and None not in recorded:
        return recorded.pop()
    return classify(w.T)[1]  # classify takes the graph's [in, out] layout


def emit_program(
    prog: Program,
    *,
    precision: str,
    kernels: str,
    max_tokens: int,
    capacity: int,
    choose,
    target: Target,
    kv_cache: str = "float32",
    profile: bool = False,
) -> Emitted:
    """Emit ``prog`` as an LLVM module for ``target`` and pack its weights (see module
    docstring). ``profile``: also count each op's cycles (``_ProfileClock``)."""
    if precision not in ("fp32", "int8"):
        raise SparsecError(f"unknown precision {precision!r}; choose fp32 or int8")
    return _Emitter(
        prog,
        precision=precision,
        kernels=kernels,
        max_tokens=max_tokens,
        capacity=capacity,
        choose=choose,
        target=target,
        kv_cache=kv_cache,
        profile=profile,
    ).emit()
