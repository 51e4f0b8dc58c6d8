"""Attention fusion (an onnx-ir pass) into ``sparsec.CachedAttention``, with the KV cache
turned into fixed-capacity buffers written in place.

Rewrites, per decoder layer ``i`` (after the rope pass):

- ``present.i.key = Concat(past_key_values.i.key, RotaryEmbedding(k heads))`` and
  ``present.i.value = Concat(past_key_values.i.value, v heads)`` (the KV append),
- the GQA repeat of both (``Unsqueeze``/``Expand``/``Reshape``), the key transpose,
- ``Softmax(scale * RotaryEmbedding(q heads) @ K^T + mask)`` (with the
  ``Where(IsNaN(p), 0, p)`` guard of fully masked rows), ``@ V``,
- the head split/merge ``Reshape``/``Transpose`` between the projections and the above,

into ``y, present.i.key, present.i.value = sparsec.CachedAttention(q_proj, k_proj,
v_proj, past_key_values.i.key, past_key_values.i.value, position_ids, cos_cache,
sin_cache[, q_norm, k_norm])``. The family's parts become attributes: a per-head
``RMSNormalization`` between a projection and its RoPE (Qwen3) becomes the ``q_norm``/
``k_norm`` inputs and ``qk_norm_epsilon``; ``RotaryEmbedding(rotary_embedding_dim=r)``
becomes ``rotary_dim`` (Phi-3); ``sparsec.config``'s ``sliding_window`` becomes
``window`` (Mistral), trusted only through the numerical check below. A projection's
bias ``Add`` (Qwen2) stays in front of the op. Then the graph's interface changes as
docs/graph-contract.md section 3 says: the cache inputs and outputs become
``[B, KVH, capacity, hd]`` buffers, and ``attention_mask`` is removed (``position_ids``
decides both where tokens are written and what they see).

All layers fuse or none does: a half-converted cache interface would be wrong. The
structure is matched strictly where it carries meaning (the ops, Softmax axis, Concat
axis, constant scales, RoPE tables); the shape plumbing between them (head
split/merge, GQA repeat, key transpose) and the mask are then checked numerically
(``validate=True``): the graph before the pass runs under onnxruntime at a prefill, a
decode and a long-cache shape, with ``attention_mask`` all ones and consecutive
positions, and every layer's attention output and cache must equal the numpy
reference of ``CachedAttention`` on that layer's own projections. A mask that is
neither plainly causal nor the configured window (padding-dependent bias, a window the
config does not state) fails that check and nothing fuses. The report says which layer
failed and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from sparsec import contract, metadata
from sparsec.passes import functions, reference
from sparsec.passes._graph import attr, const, is_op, unique_name, value_names
from sparsec.passes.report import PassReport

# Data-movement ops allowed between the anchors; what they do is checked numerically.
PLUMBING = ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand")
CAPACITY = "capacity"
TOLERANCE = 1e-4  # max |error| / max |reference| of a layer's outputs in validation


class NoMatch(Exception):
    """Why a layer's attention does not match (goes into the report)."""


@dataclass
class Layer:
    index: int
    q_proj: ir.Value
    k_proj: ir.Value
    v_proj: ir.Value
    past_key: ir.Value
    past_value: ir.Value
    present_key: ir.Value  # the old Concat outputs
    present_value: ir.Value
    y: ir.Value  # merged heads, [B, S, H*hd], read by the output projection
    cos_cache: ir.Value | None  # None: no RoPE (learned positions)
    sin_cache: ir.Value | None
    scale: float
    rotary_dim: int = 0  # 0: the whole head rotates
    q_norm: ir.Value | None = None  # per-head RMSNorm scales [hd] of q and k (Qwen3)
    k_norm: ir.Value | None = None
    qk_norm_epsilon: float = 0.0
    alibi: tuple[float, ...] | None = None  # ALiBi's slope per head (MPT)
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) (Gemma 2)
    window: int = 0  # sparsec.config's window of this layer (0: none)


def _only_consumer(value: ir.Value, ignore=("Shape",)) -> ir.Node:
    users = [u for u, _ in value.uses() if u.op_type not in ignore]
    if len(users) != 1:
        names = ", ".join(f"{u.op_type} {u.name!r}" for u in users) or "nothing"
        raise NoMatch(f"{value.name!r} should feed one node, feeds {names}")
    return users[0]


def _up_plumbing(value: ir.Value) -> ir.Value:
    """The first value above ``value`` that is not made by a plumbing op."""
    while (p := value.producer()) is not None and p.domain == "" and p.op_type in PLUMBING:
        value = p.inputs[0]
    return value


def _down_to(value: ir.Value, target: str, scale: list) -> tuple[ir.Node, ir.Value]:
    """Follow single consumers through plumbing and constant scalings to ``target``."""
    while True:
        user = _only_consumer(value)
        if user.domain == "" and user.op_type in PLUMBING and user.inputs[0] is value:
            value = user.outputs[0]
        elif user.domain == "" and user.op_type in ("Mul", "Div") and _scaling(user, value, scale):
            value = user.outputs[0]
        elif user.domain == "" and user.op_type == target:
            return user, value
        else:
            raise NoMatch(
                f"expected {target} after {value.name!r}, found {user.op_type} {user.name!r}"
            )


def _scaling(node: ir.Node, value: ir.Value, scale: list) -> bool:
    """Record a multiplication/division of ``value`` by a constant scalar."""
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    c = const(other)
    if c is None or c.size != 1 or (node.op_type == "Div" and node.inputs[0] is not value):
        return False
    c = float(c.reshape(()))
    scale.append(c if node.op_type == "Mul" else 1.0 / c)
    return True


def _rope_input(value: ir.Value, position_ids: ir.Value, what: str) -> ir.Node:
    rope = value.producer()
    if not is_op(rope, "RotaryEmbedding"):
        found = rope.op_type if rope is not None else "a graph input"
        raise NoMatch(f"{what} is not rotated by RotaryEmbedding (made by {found}); did RoPE fuse?")
    if rope.inputs[3] is not position_ids:
        raise NoMatch(f"RotaryEmbedding {rope.name!r} does not read the position_ids input")
    if attr(rope, "interleaved", 0) or attr(rope, "num_heads", 0):
        raise NoMatch(f"RotaryEmbedding {rope.name!r} is not the plain 4-D rotate-half form")
    return rope


def _up_norm(value: ir.Value, what: str) -> tuple[ir.Value, ir.Node | None]:
    """The projection above ``value`` and the per-head RMSNorm between them, if any:
    ``RMSNormalization(axis=-1)`` with a constant ``[hd]`` scale (Qwen3's q/k norm)."""
    value = _up_plumbing(value)
    norm = value.producer()
    if not is_op(norm, "RMSNormalization"):
        return value, None
    scale = const(norm.inputs[1])
    if attr(norm, "axis", -1) != -1 or scale is None or scale.ndim != 1:
        raise NoMatch(f"{what} is normalized by {norm.name!r}, which is not a per-head RMSNorm")
    if len(norm.inputs[0].uses()) != 1:
        raise NoMatch(f"the input of {what}'s norm {norm.name!r} is read elsewhere too")
    return _up_plumbing(norm.inputs[0]), norm


def _cache_concat(graph: ir.Graph, name: str, past_name: str) -> tuple[ir.Node, ir.Value]:
    out = next((v for v in graph.outputs if v.name == name), None)
    if out is None:
        raise NoMatch(f"no graph output {name!r}")
    concat = out.producer()
    if (
        not is_op(concat, "Concat")
        or len(concat.inputs) != 2
        or attr(concat, "axis") not in (2, -2)
    ):
        raise NoMatch(f"output {name!r} is not a Concat of the past cache and the new entries")
    if concat.inputs[0].name != past_name or not concat.inputs[0].is_graph_input():
        raise NoMatch(f"output {name!r} does not append to graph input {past_name!r}")
    return concat, concat.inputs[1]


def match_layer(
    graph: ir.Graph, index: int, position_ids: ir.Value, rope: bool = True, alibi: bool = False
) -> Layer:
    """The attention of layer ``index``, or NoMatch saying where it differs. ``rope``:
    q and k are rotated (else the model has learned positions: nothing between the
    projections and the attention but head plumbing and the query's scaling)."""
    k_concat, k_new = _cache_concat(graph, contract.present_key(index), contract.past_key(index))
    v_concat, v_heads = _cache_concat(
        graph, contract.present_value(index), contract.past_value(index)
    )
    if rope:
        k_rope = _rope_input(k_new, position_ids, f"{contract.present_key(index)} entries")
        k_proj, k_norm = _up_norm(k_rope.inputs[0], "the key")
    else:
        k_rope = None
        k_proj, k_norm = _up_norm(k_new, "the key")
    v_proj = _up_plumbing(v_heads)

    scale: list[float] = []
    scores_mm, k_side = _down_to(k_concat.outputs[0], "MatMul", scale)
    if scores_mm.inputs[1] is not k_side:
        raise NoMatch(f"the keys are not the right operand of MatMul {scores_mm.name!r}")
    q_side = scores_mm.inputs[0]
    if not rope:  # OPT scales the projection, before the head split
        q_side = _up_plumbing(q_side)
    while (p := q_side.producer()) is not None and p.op_type in ("Mul", "Div") and p.domain == "":
        inner = p.inputs[0] if const(p.inputs[0]) is None else p.inputs[1]
        if not _scaling(p, inner, scale):
            raise NoMatch(f"query scaling {p.name!r} is not by a constant scalar")
        q_side = inner
    if rope:
        q_rope = _rope_input(q_side, position_ids, "the query")
        if q_rope.inputs[1] is not k_rope.inputs[1] or q_rope.inputs[2] is not k_rope.inputs[2]:
            raise NoMatch("query and key RoPE use different cos/sin tables")
        rotary_dim = attr(q_rope, "rotary_embedding_dim", 0)
        if attr(k_rope, "rotary_embedding_dim", 0) != rotary_dim:
            raise NoMatch("query and key RoPE rotate different numbers of features")
        q_proj, q_norm = _up_norm(q_rope.inputs[0], "the query")
        cos_cache, sin_cache = q_rope.inputs[1], q_rope.inputs[2]
    else:
        rotary_dim, cos_cache, sin_cache = 0, None, None
        q_proj, q_norm = _up_norm(q_side, "the query")
    if (q_norm is None) != (k_norm is None):
        raise NoMatch("only one of the query and the key is normalized")
    eps = 0.0
    if q_norm is not None:
        eps = attr(q_norm, "epsilon", 1e-5)
        if attr(k_norm, "epsilon", 1e-5) != eps:
            raise NoMatch("the query and key norms have different epsilons")

    value = scores_mm.outputs[0]
    add = _only_consumer(value)
    while add.op_type in ("Mul", "Div") and add.domain == "" and _scaling(add, value, scale):
        value = add.outputs[0]
        add = _only_consumer(value)
    softcap = None
    if is_op(add, "Tanh"):  # Gemma 2: cap * tanh(scores / cap), the / cap just recorded
        if not scale or scale[-1] <= 0:
            raise NoMatch(f"Tanh {add.name!r} on the scores is not a soft-cap")
        softcap = 1.0 / scale.pop()
        value, cap = add.outputs[0], []
        add = _only_consumer(value)
        if not (is_op(add, "Mul") and _scaling(add, value, cap)) or not math.isclose(
            cap[0], softcap, rel_tol=1e-6
        ):
            raise NoMatch(f"Tanh {add.name!r} on the scores is not followed by * {softcap:g}")
        value = add.outputs[0]
        add = _only_consumer(value)
    slopes = None
    if alibi:  # Add(scores, ALiBi table slice), then the mask
        if not is_op(add, "Add"):
            raise NoMatch(f"the scores feed {add.op_type} {add.name!r}, not the ALiBi Add")
        slopes = _alibi_slopes(add.inputs[1] if add.inputs[0] is value else add.inputs[0])
        value = add.outputs[0]
        add = _only_consumer(value)
    if is_op(add, "Where") and add.inputs[2] is value and const(add.inputs[1]) is not None:
        pass  # masked_fill(mask, min): what the mask is, the numerical check decides
    elif not is_op(add, "Add"):
        raise NoMatch(f"the scores feed {add.op_type} {add.name!r}, not the mask Add")
    softmax = _only_consumer(add.outputs[0])
    if not is_op(softmax, "Softmax") or attr(softmax, "axis", -1) not in (-1, 3):
        raise NoMatch(
            f"the masked scores feed {softmax.op_type} {softmax.name!r}, not Softmax(axis=-1)"
        )
    probs = softmax.outputs[0]
    users = [u for u, _ in probs.uses()]
    if len(users) == 2 and {u.op_type for u in users} == {"IsNaN", "Where"}:
        isnan = next(u for u in users if u.op_type == "IsNaN")
        where = next(u for u in users if u.op_type == "Where")
        zero = const(where.inputs[1])
        if (
            where.inputs[0] is not isnan.outputs[0]
            or where.inputs[2] is not probs
            or zero is None
            or zero.size != 1
            or float(zero.reshape(())) != 0.0
            or len(isnan.outputs[0].uses()) != 1
        ):
            raise NoMatch(f"Softmax {softmax.name!r} is followed by an unknown Where")
        probs = where.outputs[0]
    av_mm = _only_consumer(probs, ignore=())
    if not is_op(av_mm, "MatMul") or av_mm.inputs[0] is not probs:
        raise NoMatch(f"the attention weights feed {av_mm.op_type} {av_mm.name!r}, not MatMul")
    v_mm, v_side = _down_to(v_concat.outputs[0], "MatMul", [])
    if v_mm is not av_mm or av_mm.inputs[1] is not v_side:
        raise NoMatch(f"the values are not the right operand of MatMul {av_mm.name!r}")
    y = av_mm.outputs[0]
    while True:
        user = _only_consumer(y)
        if user.domain == "" and user.op_type in ("Transpose", "Reshape") and user.inputs[0] is y:
            y = user.outputs[0]
        else:
            break
    if y.shape is not None and y.shape.rank() != 3:
        raise NoMatch(f"attention output {y.name!r} is not [B, S, H*hd]")
    past_key = k_concat.inputs[0]
    past_value = v_concat.inputs[0]
    return Layer(
        index=index,
        q_proj=q_proj,
        k_proj=k_proj,
        v_proj=v_proj,
        past_key=past_key,
        past_value=past_value,
        present_key=k_concat.outputs[0],
        present_value=v_concat.outputs[0],
        y=y,
        cos_cache=cos_cache,
        sin_cache=sin_cache,
        scale=math.prod(scale),  # no scaling ops: the graph's attention is unscaled
        rotary_dim=rotary_dim,
        q_norm=None if q_norm is None else q_norm.inputs[1],
        k_norm=None if k_norm is None else k_norm.inputs[1],
        qk_norm_epsilon=float(eps),
        alibi=slopes,
        softcap=softcap,
    )


def _alibi_slopes(bias: ir.Value) -> tuple[float, ...]:
    """The per-head slopes of an ALiBi bias: ``Slice`` s of a constant ``[H, 1, N]``
    table ``slope_h * (j - (N - 1))`` (MPT's; the slices keep the last key positions)."""
    while (p := bias.producer()) is not None and p.op_type in ("Slice", *PLUMBING):
        bias = p.inputs[0]
    table = const(bias)
    while table is not None and table.ndim > 3 and table.shape[0] == 1:
        table = table[0]  # a leading unit axis the graph squeezes away
    if table is None or table.ndim != 3 or table.shape[1] != 1 or table.shape[2] < 2:
        raise NoMatch(f"the ALiBi bias {bias.name!r} is not a constant [heads, 1, positions]")
    n = table.shape[2]
    slopes = table[:, 0, -1] - table[:, 0, -2]
    expected = slopes[:, None] * (np.arange(n) - (n - 1))[None, :]
    if not np.allclose(table[:, 0, :], expected, rtol=1e-5, atol=1e-5 * np.abs(table).max()):
        raise NoMatch(f"the ALiBi bias {bias.name!r} is not linear in the key position")
    return tuple(float(s) for s in slopes)


# --- the interface after the rewrite must not need what it no longer has ------------------


def _violations(graph: ir.Graph, layers: list[Layer], removed_inputs: set[str]) -> list[str]:
    """What a node still alive after the rewrite would read of the old interface."""
    replaced = {layer.y: layer for layer in layers}
    old = {layer.present_key for layer in layers} | {layer.present_value for layer in layers}
    forbidden = old | {v for v in graph.inputs if v.name in removed_inputs}
    for layer in layers:
        forbidden |= {layer.past_key, layer.past_value}
    roots = [v for v in graph.outputs if v not in old]
    for layer in layers:
        roots += [layer.q_proj, layer.k_proj, layer.v_proj]
    seen_values: set[int] = set()
    seen_nodes: set[int] = set()
    problems = []
    stack = list(roots)
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen_values:
            continue
        seen_values.add(id(value))
        if value in replaced:
            layer = replaced[value]
            stack += [layer.q_proj, layer.k_proj, layer.v_proj]
            continue
        node = value.producer()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        for inp in node.inputs:
            if inp in forbidden:
                problems.append(f"node {node.name!r} ({node.op_type}) still reads {inp.name!r}")
        stack += list(node.inputs)
    return problems


# --- numerical validation ----------------------------------------------------------------


def _validation_shapes(max_positions: int) -> list[tuple[int, int, int]]:
    """(batch, new tokens, cached tokens): prefill, decode, and a long cache that would
    show a sliding window."""
    long_past = max(1, min(max_positions - 3, 4100))
    return [(2, 3, 0), (2, 1, 5), (1, 2, long_past)]


def _options(layer: Layer, window: int) -> dict:
    """The non-default CachedAttention attributes of ``layer`` (Llama's graph has none)."""
    options = {}
    if layer.rotary_dim:
        options["rotary_dim"] = layer.rotary_dim
    if window:
        options["window"] = window
    if layer.q_norm is not None:
        options["qk_norm_epsilon"] = layer.qk_norm_epsilon
    if layer.alibi is not None:
        options["alibi_slopes"] = list(layer.alibi)
    if layer.softcap is not None:
        options["softcap"] = layer.softcap
    return options


def validate(
    model: ir.Model,
    layers: list[Layer],
    heads: int,
    kv_heads: int,
    vocab: int,
    window: int = 0,
    max_positions: int | None = None,
) -> list[str]:
    """Run the graph before the rewrite and compare every layer with the reference."""
    graph = model.graph
    extra = []
    for layer in layers:
        extra += [layer.q_proj, layer.k_proj, layer.v_proj, layer.y]
    # Expose each layer's projections and output as graph outputs, for this run only.
    added = [v for v in dict.fromkeys(extra) if v not in graph.outputs]
    graph.outputs.extend(added)
    try:
        session = functions.ort_session(model)
    finally:
        for v in added:
            graph.outputs.remove(v)
    head_dim = layers[0].past_key.shape[3]
    cos = const(layers[0].cos_cache)
    if cos is not None:
        max_positions = cos.shape[0]
    problems = []
    rng = np.random.default_rng(0)
    for batch, seq, past in _validation_shapes(max_positions or 2):
        feeds = {}
        for v in graph.inputs:
            if v.name == contract.INPUT_IDS:
                feeds[v.name] = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
            elif v.name == contract.ATTENTION_MASK:
                feeds[v.name] = np.ones((batch, past + seq), np.int64)
            elif v.name == contract.POSITION_IDS:
                feeds[v.name] = np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))
            elif contract.parse_cache_name(v.name) is not None:
                shape = (batch, v.shape[1], past, v.shape[3])
                feeds[v.name] = rng.standard_normal(shape, dtype=np.float32)
            else:
                return [f"cannot validate: unknown graph input {v.name!r}"]
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(None, feeds), strict=True))
        for layer in layers:
            capacity = past + seq + 3  # spare slots filled with garbage that must stay unread
            pk = np.full((batch, kv_heads, capacity, head_dim), 7.0, np.float32)
            pv = np.full((batch, kv_heads, capacity, head_dim), -7.0, np.float32)
            pk[:, :, :past] = feeds[layer.past_key.name]
            pv[:, :, :past] = feeds[layer.past_value.name]
            norms = [const(v) for v in (layer.q_norm, layer.k_norm)]
            y, rk, rv = reference.cached_attention(
                got[layer.q_proj.name], got[layer.k_proj.name], got[layer.v_proj.name],
                pk, pv, feeds[contract.POSITION_IDS],
                const(layer.cos_cache), const(layer.sin_cache), *norms,
                num_heads=heads, kv_num_heads=kv_heads, scale=layer.scale,
                **_options(layer, layer.window),
            )  # fmt: skip
            pairs = (
                ("output", got[layer.y.name], y),
                ("keys", got[layer.present_key.name], rk[:, :, : past + seq]),
                ("values", got[layer.present_value.name], rv[:, :, : past + seq]),
            )
            for what, have_, want in pairs:
                if have_.shape != want.shape:
                    problems.append(
                        f"layer {layer.index} at batch {batch}, {seq} new, {past} cached: "
                        f"{what} shape {have_.shape} != reference {want.shape}"
                    )
                    continue
                err = float(np.abs(have_ - want).max() / (np.abs(want).max() + 1e-12))
                if not err <= TOLERANCE:
                    problems.append(
                        f"layer {layer.index} at batch {batch}, {seq} new, {past} cached: {what} "
                        f"differ from CachedAttention (relative error {err:.1e})"
                    )
        if problems:
            break
    return problems


# --- the rewrite ------------------------------------------------------------------------------


def _set_capacity(value: ir.Value) -> None:
    dims = list(value.shape) if value.shape is not None else [None] * 4
    dims[2] = ir.SymbolicDim(CAPACITY)
    value.shape = ir.Shape(dims)


def _rewrite(model: ir.Model, layers: list[Layer], heads: int, kv_heads: int, window: int) -> None:
    graph = model.graph
    taken = value_names(graph)
    position_ids = next(v for v in graph.inputs if v.name == contract.POSITION_IDS)
    for layer in layers:
        norms = [layer.q_norm, layer.k_norm] if layer.q_norm is not None else []
        tables = [layer.cos_cache, layer.sin_cache] if layer.cos_cache is not None else []
        node = ir.node(
            "CachedAttention",
            [layer.q_proj, layer.k_proj, layer.v_proj, layer.past_key, layer.past_value,
             position_ids, *tables, *norms],
            attributes={"num_heads": heads, "kv_num_heads": kv_heads, "scale": layer.scale,
                        **_options(layer, layer.window)},
            domain=contract.DOMAIN,
            version=contract.DOMAIN_VERSION,
            num_outputs=3,
            name=unique_name(taken, f"layers.{layer.index}.attention"),
        )  # fmt: skip
        graph.insert_after(layer.y.producer(), node)
        y, present_key, present_value = node.outputs
        y.name = unique_name(taken, f"layers.{layer.index}.attention.y")
        y.shape, y.type = layer.y.shape, layer.y.type
        ir.convenience.replace_all_uses_with(layer.y, y)
        for old, new, name in (
            (layer.present_key, present_key, contract.present_key(layer.index)),
            (layer.present_value, present_value, contract.present_value(layer.index)),
        ):
            position = graph.outputs.index(old)
            old.name = unique_name(taken, f"{name}.appended")
            new.name = name
            new.type = old.type
            new.shape = layer.past_key.shape
            graph.outputs[position] = new
        for v in (layer.past_key, layer.past_value, present_key, present_value):
            _set_capacity(v)
    common.RemoveUnusedNodesPass()(model)
    mask = next((v for v in graph.inputs if v.name == contract.ATTENTION_MASK), None)
    if mask is not None and not mask.uses():
        graph.inputs.remove(mask)


class CachedAttentionPass(ir.passes.InPlacePass):
    """Attention + KV append -> ``sparsec.CachedAttention`` on in-place cache buffers."""

    def __init__(self, *, validate: bool = True):
        super().__init__()
        self.validate = validate
        self.report = PassReport("attention")

    def _fail(self, why: str) -> ir.passes.PassResult:
        self.report.not_fused.append(why)
        return self._result

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._result = ir.passes.PassResult(model, modified=False)
        graph = model.graph
        n_layers = sum(
            1
            for v in graph.outputs
            if (name := contract.parse_cache_name(v.name)) is not None
            and (name.io, name.kind) == ("present", "key")
        )
        if n_layers == 0:
            return self._fail("no present.{i}.key outputs: not a graph with a KV cache")
        position_ids = next((v for v in graph.inputs if v.name == contract.POSITION_IDS), None)
        if position_ids is None:
            return self._fail("no position_ids input")
        config = metadata.config(model.metadata_props)
        rope = config is None or config.positions == "rope"
        alibi = config is not None and config.positions == "alibi"
        layers, failures = [], []
        for i in range(n_layers):
            try:
                layers.append(match_layer(graph, i, position_ids, rope, alibi))
            except NoMatch as e:
                failures.append(f"layer {i}: {e}")
        if failures:
            more = f" (and {len(failures) - 3} more layers)" if len(failures) > 3 else ""
            return self._fail(
                f"no attention fused ({len(layers)} of {n_layers} layers match; all must): "
                + "; ".join(failures[:3])
                + more
            )
        past_key = layers[0].past_key
        kv_heads, head_dim = past_key.shape[1], past_key.shape[3]
        if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
            return self._fail(f"{past_key.name!r} has no static heads/head size: {past_key.shape}")
        q_width = layers[0].q_proj.shape[-1] if layers[0].q_proj.shape is not None else None
        if not isinstance(q_width, int) or q_width % head_dim:
            return self._fail(f"query projection {layers[0].q_proj.name!r} has no static width")
        heads = q_width // head_dim
        if config is not None and (heads, kv_heads, head_dim) != (
            expected := (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        ):
            return self._fail(
                f"heads/kv heads/head size {heads}/{kv_heads}/{head_dim} disagree with "
                f"sparsec.config {expected}"
            )
        for layer in layers:
            if any(
                p.shape is None or p.shape.rank() != 4 for p in (layer.past_key, layer.past_value)
            ):
                return self._fail(f"layer {layer.index}: cache inputs are not 4-D")
        problems = _violations(graph, layers, {contract.ATTENTION_MASK})
        if problems:
            return self._fail(
                "the rest of the graph still needs the old cache interface: "
                + "; ".join(problems[:3])
            )
        window = (config.sliding_window or 0) if config is not None else 0
        for layer in layers:  # Gemma 2: windowed and full layers in turn
            layer.window = (config.window_of(layer.index) or 0) if config is not None else 0
        if self.validate:
            vocab = config.vocab_size if config else _vocab(graph)
            try:
                max_positions = config.max_position_embeddings if config else None
                problems = validate(model, layers, heads, kv_heads, vocab, window, max_positions)
            except Exception as e:  # onnxruntime refusing the graph, out of memory, ...
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                problems = [f"the graph could not be run under onnxruntime: {first}"]
            if problems:
                return self._fail(
                    "numerical check failed, nothing fused: " + "; ".join(problems[:3])
                )
            self.report.notes.append(
                "checked numerically against the reference at prefill, decode and long-cache shapes"
            )
        _rewrite(model, layers, heads, kv_heads, window)
        functions.raise_opset(model)
        self.report.fused["CachedAttention"] = len(layers)
        self.report.notes.append(
            "KV cache is now fixed-capacity buffers [batch, kv_heads, capacity, head_dim] "
            "written in place; attention_mask input removed"
        )
        return ir.passes.PassResult(model, modified=True)


def _vocab(graph: ir.Graph) -> int:
    for node in graph:
        if node.op_type == "Gather" and node.inputs[1].name == contract.INPUT_IDS:
            table = node.inputs[0]
            if table.shape is not None and isinstance(table.shape[0], int):
                return table.shape[0]
    return 2
