"""Weight naming (an onnx-ir pass): every weight initializer gets the name of its role.

The dynamo exporter names most weights ``val_83``; after fusion each weight's role is
plain from the op that reads it, so it is renamed after it, in Hugging Face terms:
``layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``layers.{i}.mlp.{gate,up,down}_proj.weight``,
``layers.{i}.input_layernorm.weight``, ``layers.{i}.post_attention_layernorm.weight``,
``norm.weight``, ``embed_tokens.weight``, ``lm_head.weight`` (int8 weights keep the name,
their scales get ``.scale``). Linear weights stay ``[in, out]`` as the contract says.
The fused nodes are named after their layer too. An initializer shared by several
roles keeps its name. Only names change.
"""

from __future__ import annotations

import onnx_ir as ir

from sparsec import contract
from sparsec.passes._graph import is_op, unique_name, value_names
from sparsec.passes.report import PassReport


def weight_initializers(value: ir.Value) -> tuple[ir.Value, ir.Value | None] | None:
    """``(weight, scale)``: the initializer behind a MatMul/SwiGLU weight input (the int8
    one of a DequantizeLinear, with its scale), or None for a computed value."""
    if value is None:
        return None
    if value.is_initializer():
        return value, None
    dq = value.producer()
    if is_op(dq, "DequantizeLinear") and dq.inputs[0].is_initializer():
        scale = dq.inputs[1] if dq.inputs[1] is not None and dq.inputs[1].is_initializer() else None
        return dq.inputs[0], scale
    return None


def _matmul_of(value: ir.Value) -> ir.Node | None:
    """The MatMul computing ``value`` (a projection output, maybe through its bias Add)."""
    node = value.producer()
    if is_op(node, "Add"):
        computed = [v for v in node.inputs if v.const_value is None]
        node = computed[0].producer() if len(computed) == 1 else None
    return node if is_op(node, "MatMul") else None


def _reads_through_quant(value: ir.Value) -> list[ir.Node]:
    """Consumers of ``value``, looking through PerTokenFakeQuant."""
    users = []
    for user, _ in value.uses():
        if is_op(user, "PerTokenFakeQuant", contract.DOMAIN):
            users += [u for u, _ in user.outputs[0].uses()]
        else:
            users.append(user)
    return users


def assign_roles(graph: ir.Graph) -> tuple[dict, dict]:
    """``({id(initializer): (layer, role)}, {id(node): name})`` read off the fused graph."""
    weights: dict[int, list] = {}
    nodes: dict[int, str] = {}

    def claim(value, layer, role, node=None):
        found = weight_initializers(value)
        if found is not None:
            weights.setdefault(id(found[0]), []).append((layer, role, found))
        if node is not None:
            nodes[id(node)] = (f"layers.{layer}." if layer is not None else "") + role

    proj_to_layer: dict[int, int] = {}
    mlp_to_layer: dict[int, int] = {}
    layer = None
    for node in graph:
        if is_op(node, "CachedAttention", contract.DOMAIN):
            cache = contract.parse_cache_name(node.outputs[1].name)
            if cache is None or (cache.io, cache.kind) != ("present", "key"):
                continue
            layer = cache.layer
            nodes[id(node)] = f"layers.{layer}.self_attn"
            for value, role in zip(node.inputs[:3], ("q_proj", "k_proj", "v_proj"), strict=False):
                mm = _matmul_of(value)
                if mm is not None:
                    claim(mm.inputs[1], layer, f"self_attn.{role}", mm)
                    proj_to_layer[id(mm)] = layer
            for user in _reads_through_quant(node.outputs[0]):
                if is_op(user, "MatMul"):
                    claim(user.inputs[1], layer, "self_attn.o_proj", user)
        elif is_op(node, "SwiGLU", contract.DOMAIN) and layer is not None:
            nodes[id(node)] = f"layers.{layer}.mlp"
            for value, role in zip(
                node.inputs[1:4], ("gate_proj", "up_proj", "down_proj"), strict=False
            ):
                claim(value, layer, f"mlp.{role}")
        elif node.op_type in ("Relu", "Gelu") and node.domain == "" and layer is not None:
            up = _matmul_of(node.inputs[0])  # a plain MLP: up, activation, down
            if up is not None:
                claim(up.inputs[1], layer, "mlp.up_proj", up)
                mlp_to_layer[id(up)] = layer
            for user in _reads_through_quant(node.outputs[0]):
                if is_op(user, "MatMul"):
                    claim(user.inputs[1], layer, "mlp.down_proj", user)
        elif is_op(node, "Gather") and node.inputs[1].name == contract.INPUT_IDS:
            claim(node.inputs[0], None, "embed_tokens", node)
        elif is_op(node, "MatMul") and node.outputs[0].name == contract.LOGITS:
            claim(node.inputs[1], None, "lm_head", node)
    # Norms: named after what reads them.
    for node in graph:
        if not (
            is_op(node, "RMSNormalization")
            or is_op(node, "LayerNormalization")
            or is_op(node, "SkipRMSNormalization", contract.DOMAIN)
            or is_op(node, "SkipLayerNormalization", contract.DOMAIN)
        ):
            continue
        scale = node.inputs[1] if node.domain == "" else node.inputs[2]
        readers = _reads_through_quant(node.outputs[0])
        role, where = None, None
        for r in readers:
            if id(r) in proj_to_layer:
                role, where = "input_layernorm", proj_to_layer[id(r)]
            elif is_op(r, "SwiGLU", contract.DOMAIN) and id(r) in nodes:
                role, where = "post_attention_layernorm", int(nodes[id(r)].split(".")[1])
            elif id(r) in mlp_to_layer:
                role, where = "post_attention_layernorm", mlp_to_layer[id(r)]
            elif is_op(r, "MatMul") and r.outputs[0].name == contract.LOGITS:
                role, where = "norm", None
        if role is not None:
            claim(scale, where, role, node)
    return weights, nodes


class NameWeightsPass(ir.passes.InPlacePass):
    """Initializers and fused nodes renamed after their role in the model."""

    def __init__(self):
        super().__init__()
        self.report = PassReport("names")
        self.roles: dict[str, tuple[int | None, str]] = {}  # final name -> (layer, role)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        weights, node_names = assign_roles(graph)
        taken = value_names(graph)
        renamed = 0
        for claims in weights.values():
            layer, role, (weight, scale) = claims[0]
            if len({(c[0], c[1]) for c in claims}) > 1:
                self.roles[weight.name] = (None, "shared")
                continue  # shared by several roles: keep its name
            base = (f"layers.{layer}." if layer is not None else "") + f"{role}.weight"
            if weight.name != base:
                taken.discard(weight.name)
                weight.name = unique_name(taken, base)
                renamed += 1
            if scale is not None and scale.name != f"{base}.scale" and len(scale.uses()) == 1:
                taken.discard(scale.name)
                scale.name = unique_name(taken, f"{base}.scale")
            self.roles[weight.name] = (layer, role)
        names_taken = {n.name for n in graph if n.name}
        for node in graph:
            if id(node) in node_names:
                names_taken.discard(node.name)
                node.name = unique_name(names_taken, node_names[id(node)])
        if renamed:
            self.report.notes.append(f"renamed {renamed} weight initializers after their role")
        return ir.passes.PassResult(model, modified=renamed > 0)
