"""Does the optimized graph agree with its ``sparsec.config``? Refuse it when not.

The generated code is specialised to sizes: the embedding's and LM head's rows, the
hidden, MLP and attention widths, the KV cache's layers, heads and head size. Each of
them comes from the graph (initializers, attributes, the graph inputs' and outputs'
value infos) and is checked here or in the lowering (``program.py``) against the
metadata, so that a model whose metadata lies is refused by name at compile time
instead of computing logits of the wrong width or writing past the KV cache at run
time. Every refusal is one line: the tensor or field, the graph's value and the
metadata's value.

``check_graph`` runs before the lowering (the graph-wide facts: layers, value infos);
``check_program`` after it (what needs the lowered weights: the sparsity record).
"""

from __future__ import annotations

from sparsec import contract
from sparsec.errors import SparsecError

FIX = "the graph and its metadata disagree; re-export the model with `sparsec export`"


def disagree(where: str, what: str, graph_value, field: str, meta_value) -> SparsecError:
    """``what`` (a tensor or attribute, in words) is ``graph_value`` in the graph, while
    ``sparsec.config`` field ``field`` says ``meta_value``."""
    return SparsecError(
        f"{where}: {what} is {graph_value} in the graph, but metadata "
        f"'{contract.META_CONFIG}' field {field} is {meta_value}; {FIX}"
    )


def malformed(where: str, detail: str) -> SparsecError:
    """The graph contradicts itself (no metadata involved): ``detail`` names the tensors."""
    return SparsecError(
        f"{where}: {detail}; the graph breaks docs/graph-contract.md, re-create it with "
        "`sparsec export` and `sparsec optimize`"
    )


def _dim(value, axis: int):
    """Dimension ``axis`` of ``value``'s declared shape when it is a static int."""
    shape = value.shape
    if shape is None or shape.rank() <= axis:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def check_graph(model, cfg: contract.ModelConfig, where: str) -> None:
    """The decoder layers and the graph's inputs and outputs against ``cfg``."""
    graph = model.graph
    layers = []
    for node in graph:
        if node.domain == contract.DOMAIN and node.op_type == "CachedAttention":
            cache = contract.parse_cache_name(node.inputs[3].name if len(node.inputs) > 3 else "")
            layers.append(None if cache is None else cache.layer)
    n = cfg.num_hidden_layers
    if len(layers) != n:
        what = "the number of decoder layers (CachedAttention nodes)"
        raise disagree(where, what, len(layers), "num_hidden_layers", n)
    known = sorted(layer for layer in layers if layer is not None)
    if len(known) == n and known != list(range(n)):
        raise malformed(
            where,
            f"the CachedAttention nodes read the caches of layers {known}, expected one each "
            f"of 0..{n - 1}",
        )

    for value in [*graph.inputs, *graph.outputs]:
        cache = contract.parse_cache_name(value.name)
        if cache is None:
            continue
        kind = "input" if value.is_graph_input() else "output"
        if cache.layer >= n:
            raise SparsecError(
                f"{where}: graph {kind} {value.name!r} is the KV cache of layer {cache.layer}, "
                f"but metadata '{contract.META_CONFIG}' field num_hidden_layers is {n}; {FIX}"
            )
        for axis, field, expected in (
            (1, "num_key_value_heads", cfg.num_key_value_heads),
            (3, "head_dim", cfg.head_dim),
        ):
            dim = _dim(value, axis)
            if dim is not None and dim != expected:
                raise disagree(
                    where, f"graph {kind} {value.name!r} dimension {axis}", dim, field, expected
                )
    inputs = {v.name for v in graph.inputs}
    for layer in range(n):
        for name in (contract.past_key(layer), contract.past_value(layer)):
            if name not in inputs:
                raise malformed(where, f"layer {layer}'s KV cache {name!r} is not a graph input")

    logits = next((v for v in graph.outputs if v.name == contract.LOGITS), None)
    width = None if logits is None else _dim(logits, 2)
    if width is not None and width != cfg.vocab_size:
        raise disagree(
            where, "graph output 'logits' dimension 2", width, "vocab_size", cfg.vocab_size
        )


def check_program(prog, where: str) -> None:
    """The lowered program's weights against the ``sparsec.sparsity`` record."""
    for ins in prog.linears():
        for w in ins.args["weights"]:
            entry = prog.sparsity.get(w.name)
            if entry is None:
                continue
            shape = [int(w.shape[1]), int(w.shape[0])]  # the graph's [in, out]
            if entry["shape"] != shape:
                raise SparsecError(
                    f"{where}: weight {w.name!r} is {shape} ([in, out]) in the graph, but "
                    f"metadata '{contract.META_SPARSITY}' records {entry['shape']}; the graph "
                    "and its metadata disagree; re-create it with `sparsec export` and "
                    "`sparsec optimize`"
                )
