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

import json
import re
from dataclasses import dataclass, field

import numpy as np

from sparsec import contract
from sparsec.errors import SparsecError

ALLOWED_OPS = {
    ("", "Gather"),
    ("", "MatMul"),
    ("", "Add"),
    ("", "RMSNormalization"),
    ("", "DequantizeLinear"),
    (contract.DOMAIN, "SkipRMSNormalization"),
    (contract.DOMAIN, "CachedAttention"),
    (contract.DOMAIN, "SwiGLU"),
    (contract.DOMAIN, "PerTokenFakeQuant"),
}


# CachedAttention attributes the kernels implement (docs/graph-contract.md section 3).
ATTENTION_ATTRIBUTES = {
    "num_heads",
    "kv_num_heads",
    "scale",
    "rotary_dim",
    "window",
    "qk_norm_epsilon",
}


@dataclass(frozen=True)
class View:
    """Columns ``offset .. offset+width`` of every row of scratch buffer ``buf``."""

    buf: str
    offset: int
    width: int


@dataclass
class Weight:
    """A linear weight, ``float32 [out, in]`` (PyTorch layout), maybe pre-quantized."""

    name: str
    value: np.ndarray
    int8: np.ndarray | None = None  # [out, in] when the graph carried DequantizeLinear
    scale: np.ndarray | None = None  # [out]


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
    return value.const_value.numpy()


def _attr(node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


class _Lowering:
    def __init__(self, model):
        self.graph = model.graph
        meta = model.metadata_props
        if contract.META_CONFIG not in meta:
            raise SparsecError(
                "the graph has no sparsec.config metadata: export it with `sparsec export`"
            )
        config = contract.graph_config(meta)
        config.check_supported()
        self.prog = Program(config=config)
        self.prog.sparsity = json.loads(meta.get(contract.META_SPARSITY, "{}"))
        self.views: dict[str, View] = {}
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
            if zp is not None and np.any(_const(zp, f"{what}: zero point")):
                raise SparsecError(f"{what}: asymmetric weight quantization is not supported")
            if q.dtype != np.int8 or scale.ndim != 1 or _attr(producer, "axis", 1) not in (1, -1):
                raise SparsecError(
                    f"{what}: expected int8 weights with per-output-channel scales (axis=1)"
                )
            wq = np.ascontiguousarray(q.T)
            # Named after the int8 initializer, as the sparsity record keys it.
            name = producer.inputs[0].name
            return Weight(name, wq.astype(np.float32) * scale[:, None], wq, scale.copy())
        w = _const(value, what)
        if w.ndim != 2 or w.dtype != np.float32:
            raise SparsecError(
                f"{what}: expected a float32 [in, out] weight, got {w.dtype} {w.shape}"
            )
        return Weight(value.name, np.ascontiguousarray(w.T))

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
        return self.prog

    def lower_DequantizeLinear(self, node) -> None:
        for out in node.outputs:
            users = self.consumers.get(out.name, [])
            if any(u.op_type not in ("MatMul", "SwiGLU") for u in users):
                raise SparsecError(f"node {node.name!r}: DequantizeLinear must feed weights only")

    def lower_Gather(self, node) -> None:
        table = _const(node.inputs[0], f"node {node.name!r}: embedding table")
        if node.inputs[1].name != contract.INPUT_IDS or table.ndim != 2:
            raise SparsecError(
                f"node {node.name!r}: only the input_ids embedding Gather is supported"
            )
        self.prog.tables["embedding"] = np.ascontiguousarray(table, dtype=np.float32)
        out = self.new_buffer(table.shape[1], "x")
        self.prog.instrs.append(Instr("embed", {"out": out, "vocab": table.shape[0]}))
        self.views[node.outputs[0].name] = out

    def _norm_weight(self, node, value) -> str:
        name = f"norm.{value.name}"
        self.prog.tables[name] = _const(value, f"node {node.name!r}: norm scale").astype(np.float32)
        return name

    def lower_RMSNormalization(self, node) -> None:
        x = self.view(node.inputs[0])
        if _attr(node, "axis", -1) not in (-1, 2):
            raise SparsecError(f"node {node.name!r}: RMSNormalization must normalize the last axis")
        y = self.new_buffer(x.width, "h")
        self.prog.instrs.append(
            Instr(
                "rmsnorm",
                {
                    "x": x,
                    "w": self._norm_weight(node, node.inputs[1]),
                    "y": y,
                    "eps": float(_attr(node, "epsilon", 1e-5)),
                },
            )
        )
        self.views[node.outputs[0].name] = y

    def lower_SkipRMSNormalization(self, node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        # The residual stream is whichever input has no use after this node: it is
        # updated in place and becomes the ``sum`` output.
        resid, delta = (b, a) if len(self.consumers[b.name]) == 1 else (a, b)
        if (
            len(self.consumers[resid.name]) != 1
            or self.view(resid).width != self.prog.buffers[self.view(resid).buf]
        ):
            raise SparsecError(
                f"node {node.name!r}: neither SkipRMSNormalization input is free to update in place"
            )
        r = self.view(resid)
        y = self.new_buffer(r.width, "h")
        self.prog.instrs.append(
            Instr(
                "skip_rmsnorm",
                {
                    "resid": r,
                    "delta": self.view(delta),
                    "w": self._norm_weight(node, node.inputs[2]),
                    "y": y,
                    "eps": float(_attr(node, "epsilon", 1e-5)),
                },
            )
        )
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
        is_logits = any(u.outputs[0].name == contract.LOGITS for u in group)
        if is_logits and len(group) > 1:
            raise SparsecError("the logits MatMul shares its input with another MatMul")
        width = sum(w.value.shape[0] for w in weights)
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
                    "x": self.view(x_value),
                    "y": out,
                    "weights": weights,
                    "logits": is_logits,
                },
            )
        )
        offset = 0
        for u, w in zip(group, weights, strict=True):
            self.views[u.outputs[0].name] = View(out.buf, offset, w.value.shape[0])
            offset += w.value.shape[0]

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
        if unknown or len(node.inputs) not in (8, 10):
            raise SparsecError(
                f"node {node.name!r}: CachedAttention with attributes {sorted(unknown)} or "
                f"{len(node.inputs)} inputs is not in the contract (docs/graph-contract.md §3)"
            )
        heads, kv_heads = int(_attr(node, "num_heads")), int(_attr(node, "kv_num_heads"))
        head_dim = q.width // heads
        scale = float(_attr(node, "scale", 1.0 / np.sqrt(head_dim)))
        rotary_dim = int(_attr(node, "rotary_dim", 0)) or head_dim
        window = int(_attr(node, "window", 0))
        if window != (cfg.sliding_window or 0):
            raise SparsecError(
                f"node {node.name!r}: window {window} disagrees with sparsec.config "
                f"sliding_window {cfg.sliding_window}"
            )
        if (len(node.inputs) == 10) != cfg.qk_norm:
            raise SparsecError(
                f"node {node.name!r}: q/k norm inputs disagree with sparsec.config qk_norm"
            )
        options = {"rotary_dim": rotary_dim} if rotary_dim != head_dim else {}
        if len(node.inputs) == 10:
            options["qk_norm_eps"] = float(_attr(node, "qk_norm_epsilon", 1e-6))
            for which, value in (("q", node.inputs[8]), ("k", node.inputs[9])):
                w = _const(value, f"node {node.name!r}: {which} norm scale").astype(np.float32)
                if w.shape != (head_dim,):
                    raise SparsecError(f"node {node.name!r}: {which} norm scale is not [head_dim]")
                options[f"{which}_norm"] = f"{which}_norm.{layer}"
                self.prog.tables[options[f"{which}_norm"]] = w
        if (heads, kv_heads, head_dim) != (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        ):
            raise SparsecError(f"node {node.name!r}: attention shape disagrees with sparsec.config")
        cos = _const(node.inputs[6], "cos_cache").astype(np.float32)
        sin = _const(node.inputs[7], "sin_cache").astype(np.float32)
        self.prog.tables.setdefault("rope.cos", cos)
        self.prog.tables.setdefault("rope.sin", sin)
        if cos.ndim != 2 or cos.shape[1] != rotary_dim // 2 or sin.shape != cos.shape:
            raise SparsecError(
                f"node {node.name!r}: cos_cache/sin_cache must be [positions, rotary_dim/2]"
            )
        common = {
            "layer": layer,
            "qkv": q.buf,
            "q_offset": q.offset,
            "k_offset": k.offset,
            "v_offset": v.offset,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "max_positions": cos.shape[0],
        }
        self.prog.instrs.append(Instr("rope_kv", {**common, **options}))
        out = self.new_buffer(heads * head_dim, "a")
        attention = {**common, "out": out, "scale": scale}
        if window:
            attention["window"] = window
        self.prog.instrs.append(Instr("attention", attention))
        self.views[node.outputs[0].name] = out
        for i, o in enumerate(node.outputs[1:3]):
            if o is not None and o.name != (contract.present_key, contract.present_value)[i](layer):
                raise SparsecError(f"node {node.name!r}: cache outputs must be the present outputs")

    def lower_SwiGLU(self, node) -> None:
        x = self.view(node.inputs[0])
        gate, up, down = (self.weight(node.inputs[i], f"node {node.name!r}") for i in (1, 2, 3))
        if _attr(node, "quantize_activations", 0):
            self.prog.activation_quant = True
        ffn = gate.value.shape[0]
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
        self.prog.instrs.append(Instr("swiglu_act", {"gu": gu, "h": h, "ffn": ffn}))
        y = self.new_buffer(down.value.shape[0], "y")
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

    def lower_Add(self, node) -> None:
        a, b = node.inputs
        if (a.const_value is not None) != (b.const_value is not None):
            self._lower_bias(node, *((b, a) if a.const_value is not None else (a, b)))
            return
        acc_value, other = (a, b) if len(self.consumers[a.name]) == 1 else (b, a)
        acc = self.view(acc_value)
        if len(self.consumers[acc_value.name]) != 1 or acc.width != self.prog.buffers[acc.buf]:
            raise SparsecError(f"node {node.name!r}: Add needs an input free to update in place")
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


def _linear_name(node_name: str, weights: list[Weight]) -> str:
    names = "+".join(w.name for w in weights)
    return re.sub(r"[^A-Za-z0-9_.+]", "_", names if len(names) < 120 else node_name)


def lower(model) -> Program:
    """Lower an optimized ``onnx_ir.Model`` to a ``Program`` (raises SparsecError)."""
    meta = model.metadata_props
    if meta.get(contract.META_FORMAT) != "optimized":
        raise SparsecError("the graph is not optimized: run `sparsec optimize` on it first")
    return _Lowering(model).run()


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
