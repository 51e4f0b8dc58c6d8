"""Lower an optimized graph (docs/graph-contract.md section 3) to a kernel program.

A ``Program`` is the forward step as a straight list of kernel calls on scratch
buffers of ``[max_tokens, width]`` rows, with every weight resolved to a numpy array.
No LLVM here: ``emit.py`` turns the program into code. What this module decides:

- MatMuls that read the same activation become one linear over concatenated weights
  (Q|K|V, gate|up), so one kernel launch covers them and threads balance better;
  their outputs are column views of one buffer.
- ``SkipRMSNormalization`` updates the residual stream in place.
- Scratch buffers are reused once their value is dead (liveness over the program).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from sparsec import contract, metadata
from sparsec.codegen.graph_check import FIX, check_graph, check_program, disagree, malformed
from sparsec.errors import SparsecError

ALLOWED_OPS = {
    ("", "Gather"),
    ("", "MatMul"),
    ("", "Add"),
    ("", "RMSNormalization"),
    ("", "LayerNormalization"),
    ("", "Relu"),
    ("", "Gelu"),
    ("", "Mul"),
    ("", "DequantizeLinear"),
    (contract.DOMAIN, "SkipRMSNormalization"),
    (contract.DOMAIN, "SkipLayerNormalization"),
    (contract.DOMAIN, "CachedAttention"),
    (contract.DOMAIN, "SwiGLU"),
    (contract.DOMAIN, "PerTokenFakeQuant"),
    (contract.DOMAIN, "SoftCap"),
}


# CachedAttention attributes the kernels implement (docs/graph-contract.md section 3).
ATTENTION_ATTRIBUTES = {
    "num_heads",
    "kv_num_heads",
    "scale",
    "rotary_dim",
    "window",
    "qk_norm_epsilon",
    "alibi_slopes",
    "softcap",
}


@dataclass(frozen=True)
class View:
    """Columns ``offset .. offset+width`` of every row of scratch buffer ``buf``."""

    buf: str
    offset: int
    width: int


@dataclass
class Weight:
    """A linear weight, ``float32 [out, in]`` (PyTorch layout), maybe pre-quantized.

    ``value`` reads it from the graph each time it is asked for (a graph's weights can
    be files of many GB or lazy reads of a checkpoint: the packer loads one layer at a
    time and none is held by the program); ``source`` is an array or that reader."""

    name: str
    shape: tuple[int, int]  # [out, in]
    source: np.ndarray | Callable[[], np.ndarray]
    int8: np.ndarray | None = None  # [out, in] when the graph carried DequantizeLinear
    scale: np.ndarray | None = None  # [out]

    @property
    def value(self) -> np.ndarray:
        return self.source() if callable(self.source) else self.source

    @classmethod
    def of(cls, name: str, array: np.ndarray, int8=None, scale=None) -> Weight:
        return cls(name, tuple(array.shape), array, int8, scale)


@dataclass
class Instr:
    op: str  # embed | rmsnorm | skip_rmsnorm | linear | bias_add | rope_kv | attention | ...
    args: dict


@dataclass
class Program:
    config: contract.ModelConfig
    buffers: dict[str, int] = field(default_factory=dict)  # name -> row width (floats)
    instrs: list[Instr] = field(default_factory=list)
    tables: dict[str, np.ndarray] = field(default_factory=dict)  # non-linear constants
    activation_quant: bool = False  # the graph carries W8A8 activation quantization
    sparsity: dict = field(default_factory=dict)  # the graph's sparsec.sparsity record

    def linears(self) -> list[Instr]:
        return [i for i in self.instrs if i.op == "linear"]


def _const(value, what: str) -> np.ndarray:
    if value is None or value.const_value is None:
        raise SparsecError(f"{what} must be a constant initializer, got a computed value")
    array = value.const_value.numpy()
    # A NaN or inf weight poisons every logit after it; the kernels would not even agree
    # with the reference on where (int8 quantization maps them to finite values).
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise SparsecError(
            f"{what} ({value.name}) holds NaN or infinite values; the weights are damaged: "
            "re-export the model from a good checkpoint"
        )
    return array


def _attr(node, name: str, default=None, kind: type | None = None):
    """Attribute ``name`` of ``node`` (``default`` when absent). ``kind`` int or float:
    the value must be one (a finite one), else the graph is refused by name; a missing
    attribute without a default is refused too."""
    a = node.attributes.get(name)
    if a is None:
        if default is None and kind is not None:
            raise SparsecError(
                f"node {node.name!r} ({node.op_type}) has no attribute {name!r}; re-export "
                "the model with `sparsec export`"
            )
        return default if kind is None else kind(default)
    value = a.value
    if kind is None:
        return value
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and kind is int:
        ok = isinstance(value, int)
    if ok and kind is float:
        ok = math.isfinite(value)
    if not ok:
        expected = "an integer" if kind is int else "a finite number"
        raise SparsecError(
            f"node {node.name!r} ({node.op_type}): attribute {name!r} is {str(value)[:40]!r}, "
            f"expected {expected}; re-export the model with `sparsec export`"
        )
    return kind(value)


def _on_int8_grid(w: np.ndarray) -> bool:
    """Whether float ``w [out, in]`` is its own per-row int8 quantization (up to float
    rounding): what the int8 kernels compute from it then equals the graph's weight."""
    from sparsec.codegen.quantize import quantize_weight_rows

    q, scale = quantize_weight_rows(w)
    error = np.abs(q.astype(np.float32) * scale[:, None] - w)
    return bool(np.all(error <= np.float32(1e-3) * scale[:, None]))


class _Lowering:
    def __init__(self, model, where: str):
        self.graph = model.graph
        self.where = where
        meta = metadata.read(model.metadata_props, where, require_config=True)
        config = meta.config
        check_graph(model, config, where)
        self.prog = Program(config=config)
        self.prog.sparsity = meta.sparsity
        self.views: dict[str, View] = {}
        # W8A8: outputs of PerTokenFakeQuant, and the linears that read an activation
        # no quantizer produced (the int8 kernels would quantize it all the same)
        self.fake_quant: set[str] = set()
        self.unquantized: list[str] = []
        # value -> the weight of the linear that computes it (for error messages)
        self.weight_of: dict[str, str] = {}
        self.counter = 0
        self.consumers: dict[str, list] = {}
        for node in self.graph:
            for v in node.inputs:
                if v is not None:
                    self.consumers.setdefault(v.name, []).append(node)
        self.fused_matmuls: dict[int, tuple[str, View]] = {}  # id(node) -> output view

    # -- helpers -----------------------------------------------------------------------
    def new_buffer(self, width: int, hint: str) -> View:
        self.counter += 1
        name = f"{hint}{self.counter}"
        self.prog.buffers[name] = width
        return View(name, 0, width)

    def view(self, value) -> View:
        if value.name not in self.views:
            raise SparsecError(f"value {value.name!r} is used before it is computed")
        return self.views[value.name]

    def weight(self, value, what: str) -> Weight:
        """A MatMul ``B`` input: an initializer ``[in, out]`` or DequantizeLinear of one."""
        producer = value.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            q = _const(producer.inputs[0], f"{what}: DequantizeLinear input")
            scale = _const(producer.inputs[1], f"{what}: DequantizeLinear scale")
            zp = producer.inputs[2] if len(producer.inputs) > 2 else None
            if (
                q.dtype != np.int8
                or q.ndim != 2
                or scale.dtype != np.float32
                or _attr(producer, "axis", 1, kind=int) not in (1, -1)
                or _attr(producer, "block_size", 0, kind=int)
            ):
                raise SparsecError(
                    f"{what}: expected int8 weights [in, out] with float32 per-output-channel "
                    f"scales (axis=1), got {q.dtype} {list(q.shape)} with {scale.dtype} scales"
                )
            qname, sname = producer.inputs[0].name, producer.inputs[1].name
            if scale.shape != (q.shape[1],):
                raise malformed(
                    self.where,
                    f"{what}: DequantizeLinear scale {sname!r} is {list(scale.shape)}, but its "
                    f"int8 weight {qname!r} [in, out] = {list(q.shape)} has {q.shape[1]} "
                    "output channels",
                )
            if not np.all(np.isfinite(scale)):
                raise malformed(
                    self.where, f"{what}: DequantizeLinear scale {sname!r} is not finite"
                )
            if zp is not None:
                z = _const(zp, f"{what}: zero point")
                if z.shape not in ((), scale.shape) or z.dtype != np.int8:
                    raise malformed(
                        self.where,
                        f"{what}: zero point {zp.name!r} is {z.dtype} {list(z.shape)}, expected "
                        f"int8 {list(scale.shape)} like its scale {sname!r}",
                    )
                if np.any(z):
                    raise SparsecError(f"{what}: asymmetric weight quantization is not supported")
            wq = np.ascontiguousarray(q.T)
            # Named after the int8 initializer, as the sparsity record keys it.
            name = producer.inputs[0].name
            return Weight.of(name, wq.astype(np.float32) * scale[:, None], wq, scale.copy())
        w = _const(value, what)  # read once here to check it; packing reads it again
        if w.ndim != 2 or w.dtype != np.float32:
            raise SparsecError(
                f"{what}: expected a float32 [in, out] weight, got {w.dtype} {w.shape}"
            )
        shape = (int(w.shape[1]), int(w.shape[0]))
        del w
        tensor = value.const_value

        def load() -> np.ndarray:
            return np.ascontiguousarray(tensor.numpy().T)

        return Weight(value.name, shape, load)

    # -- the walk ----------------------------------------------------------------------
    def run(self) -> Program:
        for node in self.graph:
            key = (node.domain or "", node.op_type)
            if key not in ALLOWED_OPS:
                raise SparsecError(
                    f"node {node.name!r}: op {node.domain + '.' if node.domain else ''}"
                    f"{node.op_type} is not in the optimized-graph contract; run "
                    "`sparsec optimize` first, or report the unfused pattern"
                )
            getattr(self, f"lower_{node.op_type}")(node)
        logits = next((v for v in self.graph.outputs if v.name == contract.LOGITS), None)
        if logits is None or logits.name not in self.views:
            raise SparsecError("the graph has no 'logits' output computed by a MatMul")
        if "embedding" not in self.prog.tables:
            raise malformed(self.where, "the graph has no input_ids embedding Gather")
        if self.prog.activation_quant and self.unquantized:
            raise SparsecError(
                f"{self.where}: node {self.unquantized[0]!r} reads an activation that is not "
                "quantized, while the graph quantizes the inputs of other linears (W8A8): the "
                "int8 kernels would quantize it too; re-export the model with every decoder "
                "linear quantized"
            )
        check_program(self.prog, self.where)
        return self.prog

    def lower_DequantizeLinear(self, node) -> None:
        for out in node.outputs:
            users = self.consumers.get(out.name, [])
            if any(u.op_type not in ("MatMul", "SwiGLU") for u in users):
                raise SparsecError(f"node {node.name!r}: DequantizeLinear must feed weights only")

    def lower_Gather(self, node) -> None:
        table = _const(node.inputs[0], f"node {node.name!r}: embedding table")
        if node.inputs[1].name == contract.POSITION_IDS:
            self._lower_positions(node, table)
            return
        if (
            node.inputs[1].name != contract.INPUT_IDS
            or table.ndim != 2
            or _attr(node, "axis", 0, kind=int) != 0
            or "embedding" in self.prog.tables
        ):
            raise SparsecError(
                f"node {node.name!r}: only the input_ids embedding Gather and a position_ids "
                "position table Gather are supported"
            )
        name, cfg = node.inputs[0].name, self.prog.config
        if table.dtype != np.float32:
            raise malformed(self.where, f"embedding table {name!r} is {table.dtype}, not float32")
        for what, got, key, expected in (
            ("rows", table.shape[0], "vocab_size", cfg.vocab_size),
            ("columns", table.shape[1], "hidden_size", cfg.hidden_size),
        ):
            if got != expected:
                what = f"the number of {what} of the embedding table {name!r}"
                raise disagree(self.where, what, got, key, expected)
        self.prog.tables["embedding"] = np.ascontiguousarray(table, dtype=np.float32)
        out = self.new_buffer(table.shape[1], "x")
        self.prog.instrs.append(Instr("embed", {"out": out, "vocab": table.shape[0]}))
        self.views[node.outputs[0].name] = out

    def _lower_positions(self, node, table: np.ndarray) -> None:
        """Learned absolute positions (OPT, GPT-2): row ``p`` of the table is position
        ``p``; gathered per row like the token embedding, into its own buffer."""
        name, cfg = node.inputs[0].name, self.prog.config
        if (
            cfg.positions != "learned"
            or table.ndim != 2
            or _attr(node, "axis", 0, kind=int) != 0
            or "positions" in self.prog.tables
        ):
            raise SparsecError(
                f"node {node.name!r}: a position table Gather needs sparsec.config positions "
                f"'learned' (is {cfg.positions!r}) and one 2-D table"
            )
        if table.dtype != np.float32:
            raise malformed(self.where, f"position table {name!r} is {table.dtype}, not float32")
        if table.shape[1] != cfg.hidden_size:
            what = f"the number of columns of the position table {name!r}"
            raise disagree(self.where, what, table.shape[1], "hidden_size", cfg.hidden_size)
        if table.shape[0] < cfg.max_position_embeddings:
            what = f"the number of rows (positions) of the position table {name!r}"
            positions = cfg.max_position_embeddings
            raise disagree(self.where, what, table.shape[0], "max_position_embeddings", positions)
        self.prog.tables["positions"] = np.ascontiguousarray(table[: cfg.max_position_embeddings])
        out = self.new_buffer(table.shape[1], "p")
        self.prog.instrs.append(
            Instr("embed_positions", {"out": out, "rows": cfg.max_position_embeddings})
        )
        self.views[node.outputs[0].name] = out

    def _norm_weight(self, node, value, width: int, what: str = "norm scale") -> str:
        name = f"norm.{value.name}"
        scale = _const(value, f"node {node.name!r}: {what}")
        if scale.shape != (width,):
            raise malformed(
                self.where,
                f"node {node.name!r}: {what} {value.name!r} is {list(scale.shape)}, but it "
                f"normalizes {width} features",
            )
        self.prog.tables[name] = scale.astype(np.float32)
        return name

    def lower_RMSNormalization(self, node) -> None:
        x = self.view(node.inputs[0])
        if _attr(node, "axis", -1, kind=int) not in (-1, 2):
            raise SparsecError(f"node {node.name!r}: RMSNormalization must normalize the last axis")
        self._check_norm(node, "rms")
        y = self.new_buffer(x.width, "h")
        self.prog.instrs.append(
            Instr(
                "rmsnorm",
                {
                    "x": x,
                    "w": self._norm_weight(node, node.inputs[1], x.width),
                    "y": y,
                    "eps": _attr(node, "epsilon", 1e-5, kind=float),
                },
            )
        )
        self.views[node.outputs[0].name] = y

    def _check_norm(self, node, kind: str) -> None:
        """A norm of the kind sparsec.config says the model's norms are."""
        cfg = self.prog.config
        if cfg.norm != kind:
            raise SparsecError(
                f"{self.where}: node {node.name!r} is a {node.op_type}, but sparsec.config "
                f"norm is {cfg.norm!r}; {FIX}"
            )

    def _layer_norm_args(self, node, scale_at: int, width: int) -> dict:
        """A LayerNorm's scale, bias (exactly when sparsec.config's norm_bias says) and
        epsilon, its scale at input ``scale_at``."""
        self._check_norm(node, "layer")
        bias = node.inputs[scale_at + 1] if len(node.inputs) > scale_at + 1 else None
        if (bias is not None) != self.prog.config.norm_bias:
            raise SparsecError(
                f"{self.where}: node {node.name!r} has {'a' if bias is not None else 'no'} "
                f"bias, but sparsec.config norm_bias is {self.prog.config.norm_bias}; {FIX}"
            )
        return {
            "w": self._norm_weight(node, node.inputs[scale_at], width),
            "b": None if bias is None else self._norm_weight(node, bias, width, "norm bias"),
            "eps": _attr(node, "epsilon", 1e-5, kind=float),
        }

    def lower_LayerNormalization(self, node) -> None:
        x = self.view(node.inputs[0])
        if (
            _attr(node, "axis", -1, kind=int) not in (-1, 2)
            or _attr(node, "stash_type", 1, kind=int) != 1
            or any(o is not None and o.uses() for o in node.outputs[1:])
        ):
            raise SparsecError(
                f"node {node.name!r}: LayerNormalization must normalize the last axis in "
                "float32, with only its first output read"
            )
        y = self.new_buffer(x.width, "h")
        args = self._layer_norm_args(node, 1, x.width)
        self.prog.instrs.append(Instr("layernorm", {"x": x, "y": y, **args}))
        self.views[node.outputs[0].name] = y

    def lower_Relu(self, node) -> None:
        self._lower_activation(node, "relu")

    def lower_Gelu(self, node) -> None:
        approximate = _attr(node, "approximate", "none")
        if approximate not in ("none", "tanh"):
            raise SparsecError(f"node {node.name!r}: Gelu approximate={approximate!r}")
        self._lower_activation(node, "gelu" if approximate == "none" else "gelu_tanh")

    def _lower_activation(self, node, kind: str) -> None:
        """An MLP's activation (a plain MLP: up, activation, down), in place on the up
        projection's output: nothing else reads it."""
        cfg = self.prog.config
        if cfg.mlp != "plain" or cfg.activation != kind:
            raise SparsecError(
                f"{self.where}: node {node.name!r} is a {kind} activation, but sparsec.config "
                f"has a {cfg.mlp} MLP with activation {cfg.activation!r}; {FIX}"
            )
        x_value = node.inputs[0]
        if len(self.consumers[x_value.name]) != 1:
            raise SparsecError(
                f"node {node.name!r}: {node.op_type}'s input is read elsewhere too; it must be "
                "an MLP's up projection"
            )
        x = self.view(x_value)
        self.prog.instrs.append(Instr("activation", {"x": x, "kind": kind}))
        self.views[node.outputs[0].name] = x

    def lower_SkipLayerNormalization(self, node) -> None:
        self._lower_skip_norm(node, "skip_layernorm")

    def lower_SkipRMSNormalization(self, node) -> None:
        self._lower_skip_norm(node, "skip_rmsnorm")

    def _lower_skip_norm(self, node, op: str) -> None:
        a, b = node.inputs[0], node.inputs[1]
        # The residual stream is whichever input has no use after this node: it is
        # updated in place and becomes the ``sum`` output.
        resid, delta = (b, a) if len(self.consumers[b.name]) == 1 else (a, b)
        if (
            len(self.consumers[resid.name]) != 1
            or self.view(resid).width != self.prog.buffers[self.view(resid).buf]
        ):
            raise SparsecError(
                f"node {node.name!r}: neither {node.op_type} input is free to update in place"
            )
        r, d = self.view(resid), self.view(delta)
        if d.width != r.width:
            raise malformed(
                self.where,
                f"node {node.name!r}: {node.op_type} adds {delta.name!r} "
                f"({self._producer(delta)}) of {d.width} features to the residual stream "
                f"{resid.name!r} of {r.width}",
            )
        y = self.new_buffer(r.width, "h")
        if op == "skip_layernorm":
            args = self._layer_norm_args(node, 2, r.width)
        else:
            self._check_norm(node, "rms")
            args = {
                "w": self._norm_weight(node, node.inputs[2], r.width),
                "eps": _attr(node, "epsilon", 1e-5, kind=float),
            }
        self.prog.instrs.append(Instr(op, {"resid": r, "delta": d, "y": y, **args}))
        self.views[node.outputs[0].name] = y
        if len(node.outputs) > 1 and node.outputs[1] is not None:
            self.views[node.outputs[1].name] = r

    def lower_PerTokenFakeQuant(self, node) -> None:
        # W8A8 kernels quantize each linear's input per token with exactly these
        # numerics, so the op is an alias as long as only MatMuls read it.
        users = self.consumers.get(node.outputs[0].name, [])
        if any(u.op_type != "MatMul" for u in users):
            raise SparsecError(f"node {node.name!r}: PerTokenFakeQuant must feed MatMuls only")
        self.prog.activation_quant = True
        self.fake_quant.add(node.outputs[0].name)
        self.views[node.outputs[0].name] = self.view(node.inputs[0])

    def lower_MatMul(self, node) -> None:
        if node.outputs[0].name in self.views:
            return  # computed as part of a fused group
        x_value = node.inputs[0]
        group = [
            u
            for u in self.consumers[x_value.name]
            if u.op_type == "MatMul"
            and u.inputs[0] is x_value
            and (
                u.inputs[1].const_value is not None
                or u.inputs[1].producer() is not None
                and u.inputs[1].producer().op_type == "DequantizeLinear"
            )
        ]
        if node not in group:
            raise SparsecError(f"node {node.name!r}: MatMul needs a constant weight as input B")
        weights = [self.weight(u.inputs[1], f"node {u.name!r}") for u in group]
        is_logits = any(self._gives_logits(u) for u in group)
        if is_logits and len(group) > 1:
            raise SparsecError("the logits MatMul shares its input with another MatMul")
        x = self.view(x_value)
        for u, w in zip(group, weights, strict=True):
            self._check_input_width(u, w, x_value, x.width)
        if is_logits:
            rows, vocab = weights[0].shape[0], self.prog.config.vocab_size
            if rows != vocab:
                what = f"the output width of the LM head {weights[0].name!r}"
                raise disagree(self.where, what, rows, "vocab_size", vocab)
        elif x_value.name in self.fake_quant:
            for u, w in zip(group, weights, strict=True):
                self._check_int8(u, w, "reads a PerTokenFakeQuant activation")
        else:
            self.unquantized.append(group[0].name)
        width = sum(w.shape[0] for w in weights)
        if is_logits:  # written straight to the caller's logits array, not scratch
            self.prog.buffers[contract.LOGITS] = width
            out = View(contract.LOGITS, 0, width)
        else:
            out = self.new_buffer(width, "y")
        name = _linear_name(group[0].name, weights)
        self.prog.instrs.append(
            Instr(
                "linear",
                {
                    "name": name,
                    "x": x,
                    "y": out,
                    "weights": weights,
                    "logits": is_logits,
                },
            )
        )
        offset = 0
        for u, w in zip(group, weights, strict=True):
            self.views[u.outputs[0].name] = View(out.buf, offset, w.shape[0])
            self.weight_of[u.outputs[0].name] = w.name
            offset += w.shape[0]

    def _gives_logits(self, node) -> bool:
        """Whether ``node``'s output is the logits: the graph output itself, or soft-capped
        into it (Gemma 2)."""
        out = node.outputs[0]
        if out.name == contract.LOGITS:
            return True
        users = self.consumers.get(out.name, [])
        return (
            len(users) == 1
            and users[0].op_type == "SoftCap"
            and users[0].outputs[0].name == contract.LOGITS
        )

    def lower_SoftCap(self, node) -> None:
        x, cfg = self.view(node.inputs[0]), self.prog.config
        if x.buf != contract.LOGITS or node.outputs[0].name != contract.LOGITS:
            raise SparsecError(f"node {node.name!r}: SoftCap must give the logits")
        cap = _attr(node, "cap", kind=float)
        if cfg.logit_softcap is None or not math.isclose(cap, cfg.logit_softcap, rel_tol=1e-6):
            what = f"the soft-cap (attribute cap) of node {node.name!r}"
            raise disagree(self.where, what, cap, "logit_softcap", cfg.logit_softcap)
        self.prog.instrs.append(Instr("softcap", {"x": x, "cap": cap}))
        self.views[node.outputs[0].name] = x

    def lower_Mul(self, node) -> None:
        """The token embeddings times a constant (Gemma: sqrt(hidden)), in place."""
        a, b = node.inputs
        x_value, factor = (b, a) if a.const_value is not None else (a, b)
        value = (
            None if factor.const_value is None else _const(factor, f"node {node.name!r}: factor")
        )
        producer = x_value.producer()
        if (
            value is None
            or value.size != 1
            or producer is None
            or producer.op_type != "Gather"
            or producer.inputs[1].name != contract.INPUT_IDS
            or len(self.consumers[x_value.name]) != 1
        ):
            raise SparsecError(
                f"node {node.name!r}: a Mul must scale the token embeddings by a constant"
            )
        scale, cfg = float(value.reshape(())), self.prog.config
        if not math.isclose(scale, cfg.embedding_scale, rel_tol=1e-6):
            what = f"the embedding scale of node {node.name!r}"
            raise disagree(self.where, what, scale, "embedding_scale", cfg.embedding_scale)
        x = self.view(x_value)
        self.prog.instrs.append(Instr("scale", {"x": x, "factor": scale}))
        self.views[node.outputs[0].name] = x

    def _producer(self, value) -> str:
        """``value``'s origin in words, for messages: the weight that computes it."""
        name = self.weight_of.get(value.name)
        return f"from weight {name!r}" if name else "not a linear's output"

    def _check_input_width(self, node, w: Weight, x_value, width: int) -> None:
        if w.shape[1] != width:
            raise malformed(
                self.where,
                f"node {node.name!r}: weight {w.name!r} [in, out] = "
                f"{list(w.shape[::-1])} multiplies {x_value.name!r} of {width} features",
            )

    def _check_int8(self, node, w: Weight, why: str) -> None:
        """A W8A8 linear's weight must be int8 (or float on its own int8 grid): the
        int8 kernels quantize a float weight, which would change the graph's weights."""
        if w.int8 is None and not _on_int8_grid(w.value):
            raise SparsecError(
                f"{self.where}: node {node.name!r} {why} (W8A8), but its weight {w.name!r} is "
                "float32 off the int8 grid, which the int8 kernels would re-quantize; give "
                "int8 weights (`sparsec sparsify --int8`, then `sparsec export`) or a float "
                "graph without activation quantization"
            )

    def lower_CachedAttention(self, node) -> None:
        q, k, v = (self.view(node.inputs[i]) for i in range(3))
        if not (q.buf == k.buf == v.buf):
            raise SparsecError(
                f"node {node.name!r}: q, k and v must come from MatMuls on the same input"
            )
        cache = contract.parse_cache_name(node.inputs[3].name)
        if (
            cache is None
            or (cache.io, cache.kind) != ("past", "key")
            or node.inputs[4].name != contract.past_value(cache.layer)
        ):
            raise SparsecError(f"node {node.name!r}: the cache inputs must be graph inputs")
        if node.inputs[5].name != contract.POSITION_IDS:
            raise SparsecError(f"node {node.name!r}: positions must be the position_ids input")
        layer = cache.layer
        cfg = self.prog.config
        unknown = set(node.attributes) - ATTENTION_ATTRIBUTES
        rope = cfg.positions == "rope"
        if unknown or len(node.inputs) not in ((8, 10) if rope else (6,)):
            raise SparsecError(
                f"node {node.name!r}: CachedAttention with attributes {sorted(unknown)} or "
                f"{len(node.inputs)} inputs is not in the contract for sparsec.config positions "
                f"{cfg.positions!r} (docs/graph-contract.md §3)"
            )
        heads, kv_heads = _attr(node, "num_heads", kind=int), _attr(node, "kv_num_heads", kind=int)
        for attr, got, key, expected in (
            ("num_heads", heads, "num_attention_heads", cfg.num_attention_heads),
            ("kv_num_heads", kv_heads, "num_key_value_heads", cfg.num_key_value_heads),
        ):
            if got != expected:
                what = f"attribute {attr} of node {node.name!r}"
                raise disagree(self.where, what, got, key, expected)
        head_dim = cfg.head_dim
        for which, value, view, n in (
            ("q", node.inputs[0], q, heads),
            ("k", node.inputs[1], k, kv_heads),
            ("v", node.inputs[2], v, kv_heads),
        ):
            if view.width != n * head_dim:
                what = (
                    f"the width of {which} input {value.name!r} ({self._producer(value)}) "
                    f"of node {node.name!r}"
                )
                heads_field = "num_attention_heads" if which == "q" else "num_key_value_heads"
                product = f"{n} * {head_dim} = {n * head_dim}"
                raise disagree(self.where, what, view.width, f"{heads_field} * head_dim", product)
        scale = _attr(node, "scale", 1.0 / np.sqrt(head_dim), kind=float)
        if scale <= 0:  # ONNX Attention's rule too (onnxruntime refuses the graph)
            raise SparsecError(
                f"{self.where}: node {node.name!r} (CachedAttention): attribute 'scale' is "
                f"{scale}, expected a number > 0; re-export the model with `sparsec export`"
            )
        rotary_dim = _attr(node, "rotary_dim", 0, kind=int) or head_dim
        expected_rotary = int(head_dim * cfg.rope.partial_rotary_factor)
        if rope and (rotary_dim != expected_rotary or rotary_dim % 2):
            what = f"the rotary width (attribute rotary_dim) of node {node.name!r}"
            partial = f"{cfg.rope.partial_rotary_factor} (head_dim * it = {expected_rotary})"
            raise disagree(self.where, what, rotary_dim, "rope.partial_rotary_factor", partial)
        window = _attr(node, "window", 0, kind=int)
        if window != (cfg.window_of(layer) or 0):
            raise SparsecError(
                f"node {node.name!r}: window {window} disagrees with sparsec.config "
                f"sliding_window {cfg.sliding_window} (layer {layer}: "
                f"{cfg.layer_types[layer] if cfg.layer_types else 'every layer'})"
            )
        softcap = _attr(node, "softcap", None)
        if (softcap is None) != (cfg.attn_softcap is None) or (
            softcap is not None and not math.isclose(float(softcap), cfg.attn_softcap, rel_tol=1e-6)
        ):
            what = f"the soft-cap (attribute softcap) of node {node.name!r}"
            raise disagree(self.where, what, softcap, "attn_softcap", cfg.attn_softcap)
        if (len(node.inputs) == 10) != cfg.qk_norm:
            raise SparsecError(
                f"node {node.name!r}: q/k norm inputs disagree with sparsec.config qk_norm"
            )
        options = {"rotary_dim": rotary_dim} if rotary_dim != head_dim else {}
        if len(node.inputs) == 10:
            options["qk_norm_eps"] = _attr(node, "qk_norm_epsilon", 1e-6, kind=float)
            for which, value in (("q", node.inputs[8]), ("k", node.inputs[9])):
                w = _const(value, f"node {node.name!r}: {which} norm scale").astype(np.float32)
                if w.shape != (head_dim,):
                    raise SparsecError(f"node {node.name!r}: {which} norm scale is not [head_dim]")
                options[f"{which}_norm"] = f"{which}_norm.{layer}"
                self.prog.tables[options[f"{which}_norm"]] = w
        common = {
            "layer": layer,
            "qkv": q.buf,
            "q_offset": q.offset,
            "k_offset": k.offset,
            "v_offset": v.offset,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "max_positions": cfg.max_position_embeddings,
        }
        if rope:
            common["max_positions"], tables = self._rope_tables(node, rotary_dim, layer)
            if tables != "rope":  # Gemma 3's sliding layers: their own tables
                options["tables"] = tables
        else:
            options["rope"] = False
        self.prog.instrs.append(Instr("rope_kv", {**common, **options}))
        out = self.new_buffer(heads * head_dim, "a")
        attention = {**common, "out": out, "scale": scale}
        if window:
            attention["window"] = window
        alibi = self._alibi_slopes(node)
        if alibi is not None:
            attention["alibi"] = alibi
        if softcap is not None:
            attention["softcap"] = float(softcap)
        self.prog.instrs.append(Instr("attention", attention))
        self.views[node.outputs[0].name] = out
        for i, o in enumerate(node.outputs[1:3]):
            if o is not None and o.name != (contract.present_key, contract.present_value)[i](layer):
                raise SparsecError(f"node {node.name!r}: cache outputs must be the present outputs")

    def _alibi_slopes(self, node) -> tuple[float, ...] | None:
        """The node's ALiBi slopes, which must be the ones sparsec.config's heads and
        alibi_bias_max give (MPT), exactly when it says positions 'alibi'."""
        cfg = self.prog.config
        slopes = _attr(node, "alibi_slopes")
        if (slopes is not None) != (cfg.positions == "alibi"):
            raise SparsecError(
                f"{self.where}: node {node.name!r} has {'' if slopes is not None else 'no '}"
                f"ALiBi slopes, but sparsec.config positions is {cfg.positions!r}; {FIX}"
            )
        if slopes is None:
            return None
        expected = np.array(cfg.alibi_slopes(), np.float64)
        got = np.array(list(slopes), np.float64)
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-5, atol=0):
            raise disagree(
                self.where,
                f"the ALiBi slopes of node {node.name!r}",
                [round(float(v), 6) for v in got],
                "alibi_bias_max (with num_attention_heads)",
                f"{cfg.alibi_bias_max} (slopes {[round(v, 6) for v in expected]})",
            )
        return tuple(float(v) for v in expected)

    def _rope_tables(self, node, rotary_dim: int, layer: int) -> tuple[int, str]:
        """Check and record the RoPE tables (shared by every layer, or with
        ``rope_local`` by every sliding layer and by every other one: Gemma 3); their
        rows and their name (``rope`` or ``rope.local``)."""
        cfg = self.prog.config
        local = cfg.rope_local is not None and cfg.window_of(layer) is not None
        name = "rope.local" if local else "rope"
        cos = _const(node.inputs[6], "cos_cache").astype(np.float32)
        sin = _const(node.inputs[7], "sin_cache").astype(np.float32)
        if cos.ndim != 2 or cos.shape[1] != rotary_dim // 2 or sin.shape != cos.shape:
            raise SparsecError(
                f"node {node.name!r}: cos_cache/sin_cache must be [positions, rotary_dim/2]"
            )
        if cos.shape[0] != cfg.max_position_embeddings:
            what = f"the number of rows (positions) of cos_cache {node.inputs[6].name!r}"
            positions = cfg.max_position_embeddings
            raise disagree(self.where, what, cos.shape[0], "max_position_embeddings", positions)
        for table, value in ((f"{name}.cos", cos), (f"{name}.sin", sin)):
            if not np.array_equal(self.prog.tables.setdefault(table, value), value):
                which = "sliding " if local else ""
                raise malformed(
                    self.where,
                    f"node {node.name!r}: its RoPE tables differ from the first {which}layer's "
                    "(one cos_cache/sin_cache serves every layer of a kind)",
                )
        return cos.shape[0], name

    def lower_SwiGLU(self, node) -> None:
        x = self.view(node.inputs[0])
        gate, up, down = (self.weight(node.inputs[i], f"node {node.name!r}") for i in (1, 2, 3))
        ffn, cfg = gate.shape[0], self.prog.config
        for w in (gate, up):
            self._check_input_width(node, w, node.inputs[0], x.width)
        if up.shape[0] != ffn:
            raise malformed(
                self.where,
                f"node {node.name!r}: the gate weight {gate.name!r} has {ffn} outputs, the up "
                f"weight {up.name!r} {up.shape[0]}",
            )
        if ffn != cfg.intermediate_size:
            what = f"the MLP width of node {node.name!r} (outputs of {gate.name!r})"
            raise disagree(self.where, what, ffn, "intermediate_size", cfg.intermediate_size)
        if down.shape[1] != ffn:
            raise malformed(
                self.where,
                f"node {node.name!r}: the down weight {down.name!r} [in, out] = "
                f"{list(down.shape[::-1])} does not read the MLP's {ffn} features",
            )
        quantize = _attr(node, "quantize_activations", 0, kind=int)
        if quantize not in (0, 1):
            raise malformed(
                self.where, f"node {node.name!r}: quantize_activations is {quantize!r}, not 0 or 1"
            )
        if quantize:
            self.prog.activation_quant = True
            for w in (gate, up, down):
                self._check_int8(node, w, "has quantize_activations=1")
        else:
            self.unquantized.append(node.name)
        activation = _attr(node, "activation", "silu")
        if activation != cfg.activation:
            raise SparsecError(
                f"{self.where}: node {node.name!r} has activation {activation!r}, but "
                f"sparsec.config activation is {cfg.activation!r}; {FIX}"
            )
        gu = self.new_buffer(2 * ffn, "gu")
        self.prog.instrs.append(
            Instr(
                "linear",
                {
                    "name": _linear_name(node.name, [gate, up]),
                    "x": x,
                    "y": gu,
                    "weights": [gate, up],
                    "logits": False,
                },
            )
        )
        h = self.new_buffer(ffn, "m")
        act = {"gu": gu, "h": h, "ffn": ffn}
        if activation != "silu":  # SwiGLU's kernel keeps its name and code
            act["activation"] = activation
        self.prog.instrs.append(Instr("swiglu_act", act))
        y = self.new_buffer(down.shape[0], "y")
        self.prog.instrs.append(
            Instr(
                "linear",
                {
                    "name": _linear_name(node.name, [down]),
                    "x": h,
                    "y": y,
                    "weights": [down],
                    "logits": False,
                },
            )
        )
        self.views[node.outputs[0].name] = y
        self.weight_of[node.outputs[0].name] = down.name

    def lower_Add(self, node) -> None:
        a, b = node.inputs
        if (a.const_value is not None) != (b.const_value is not None):
            self._lower_bias(node, *((b, a) if a.const_value is not None else (a, b)))
            return
        acc_value, other = (a, b) if len(self.consumers[a.name]) == 1 else (b, a)
        acc = self.view(acc_value)
        if len(self.consumers[acc_value.name]) != 1 or acc.width != self.prog.buffers[acc.buf]:
            raise SparsecError(f"node {node.name!r}: Add needs an input free to update in place")
        if self.view(other).width != acc.width:
            raise malformed(
                self.where,
                f"node {node.name!r}: Add of {a.name!r} ({self.view(a).width} features) and "
                f"{b.name!r} ({self.view(b).width} features)",
            )
        self.prog.instrs.append(Instr("add", {"acc": acc, "x": self.view(other)}))
        self.views[node.outputs[0].name] = acc

    def _lower_bias(self, node, value, bias_value) -> None:
        """``Add(MatMul(x, W), b)`` with a constant ``b [out]``: a bias added to the
        linear's output rows in place, right after the linear (a Qwen2 q/k/v bias).
        Linears fused on one input share one bias row (zeros where a part has none)."""
        bias = _const(bias_value, f"node {node.name!r}: bias").astype(np.float32)
        producer = value.producer()
        out = self.views.get(value.name)
        if (
            producer is None
            or producer.op_type != "MatMul"
            or out is None
            or bias.reshape(-1).shape != (out.width,)
            or len(self.consumers[value.name]) != 1
        ):
            raise SparsecError(
                f"node {node.name!r}: a constant Add must be a [out] bias on a MatMul output "
                "read by nothing else"
            )
        if out.buf == contract.LOGITS:
            raise SparsecError(f"node {node.name!r}: a bias on the LM head is not supported")
        table = f"bias.{out.buf}"
        if table not in self.prog.tables:
            self.prog.tables[table] = np.zeros(self.prog.buffers[out.buf], np.float32)
            at = next(
                i
                for i, ins in enumerate(self.prog.instrs)
                if ins.op == "linear" and ins.args["y"].buf == out.buf
            )
            full = View(out.buf, 0, self.prog.buffers[out.buf])
            self.prog.instrs.insert(at + 1, Instr("bias_add", {"y": full, "bias": table}))
        self.prog.tables[table][out.offset : out.offset + out.width] += bias.reshape(-1)
        self.views[node.outputs[0].name] = out
        if value.name in self.weight_of:
            self.weight_of[node.outputs[0].name] = self.weight_of[value.name]


def _linear_name(node_name: str, weights: list[Weight]) -> str:
    names = "+".join(w.name for w in weights)
    return re.sub(r"[^A-Za-z0-9_.+]", "_", names if len(names) < 120 else node_name)


def lower(model, where: str = "the graph") -> Program:
    """Lower an optimized ``onnx_ir.Model`` to a ``Program`` (raises SparsecError).

    The graph is checked against its metadata on the way (``graph_check``): every size
    the generated code is specialised to comes from the graph and agrees with
    ``sparsec.config``. ``where`` names the model in messages (its file).
    """
    from sparsec.passes.functions import OPSET

    meta = model.metadata_props
    if meta.get(contract.META_FORMAT) != "optimized":
        raise SparsecError("the graph is not optimized: run `sparsec optimize` on it first")
    opset = model.opset_imports.get("", 0)
    if opset < OPSET:
        # RMSNormalization, RotaryEmbedding and Attention exist from opset 23 on: below
        # it the graph names ops that do not exist (onnxruntime refuses it).
        raise SparsecError(
            f"{where}: default opset {opset} is below {OPSET}, the opset of optimized graphs; "
            "optimize the exported graph again with `sparsec optimize`"
        )
    try:
        return _Lowering(model, where).run()
    except SparsecError as e:
        if str(e).startswith(where):
            raise
        # The node-level helpers (_const, _attr) do not know the file: name it here.
        raise SparsecError(f"{where}: {e}") from e


def buffer_lifetimes(prog: Program) -> dict[str, tuple[int, int]]:
    """First and last instruction index that touches each scratch buffer."""
    spans: dict[str, list[int]] = {}
    for i, ins in enumerate(prog.instrs):
        for v in ins.args.values():
            bufs = (
                [v.buf]
                if isinstance(v, View)
                else [v]
                if isinstance(v, str) and v in prog.buffers
                else []
            )
            for b in bufs:
                s = spans.setdefault(b, [i, i])
                s[1] = i
    return {b: (s[0], s[1]) for b, s in spans.items()}
