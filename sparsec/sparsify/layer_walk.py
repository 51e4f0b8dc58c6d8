"""The decoder-layer walk every sparsify step shares, found from the model itself.

No family's module names appear here: the decoder layers are the ``nn.ModuleList`` with
one module per layer of the model description; a layer's Linears are grouped by the
tensor they read, in the order the layer's forward runs them (Llama: q/k/v, o,
gate/up, down; a fused ``qkv_proj`` is a group of one); and ``walk_layer`` runs the layer
on every calibration chunk, pausing all of them at each group so that the group can be
pruned on every chunk's input before the rest of the layer runs with it pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sparsec.errors import SparsecError


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, layers)``: the ModuleList holding one decoder layer per model layer."""
    if not hasattr(model, "config"):
        raise SparsecError(
            f"{type(model).__name__} is not a Hugging Face causal LM (no .config); "
            "sparsec sparsify needs one"
        )
    # Read off the config itself, not ``ModelConfig.from_hf``: whether sparsec supports
    # the family is ``load_model``'s question; the walk only needs the layer count.
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise SparsecError(
            f"{type(model).__name__}'s config has no num_hidden_layers; sparsec sparsify "
            "needs a decoder-only causal LM"
        )
    for path, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == n_layers
            and len({type(layer) for layer in module}) == 1
        ):
            return path, module
    raise SparsecError(
        f"{type(model).__name__} has no list of {n_layers} decoder layers "
        "(num_hidden_layers); sparsec sparsify needs a decoder-only causal LM"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return find_decoder_layers(model)[1]


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder layers, by full parameter-path name.

    The embedding and the (often tied) LM head stay dense, as in the paper.
    """
    path, layers = find_decoder_layers(model)
    found = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                found[f"{path}.{i}.{name}"] = module
    if not found:
        raise SparsecError(f"{type(model).__name__} has no Linear layers in its decoder to prune")
    return found


def _group_by_input(calls) -> list[tuple[dict[str, nn.Linear], torch.Tensor]]:
    """``(name, Linear, input)`` calls in run order -> ``({name: Linear}, input)`` per
    input tensor, in the order the tensors were first read."""
    groups: dict[int, tuple[dict[str, nn.Linear], torch.Tensor]] = {}
    for name, module, x in calls:
        group, _ = groups.setdefault(id(x), ({}, x))
        if any(name in g for g, _ in groups.values()):
            raise SparsecError(f"Linear {name!r} runs more than once in a decoder layer")
        group[name] = module
    return list(groups.values())


@torch.no_grad()
def linear_groups(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> list[dict]:
    """The layer's Linears, ``{name: Linear}`` per group of those reading the same
    tensor, groups in the order the forward first runs them (one traced forward)."""
    linears = {id(m): (n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    calls: list[tuple] = []  # the inputs are kept so no id is reused

    def record(module, args):
        calls.append((*linears[id(module)], args[0]))

    handles = [m.register_forward_pre_hook(record, prepend=True) for _, m in linears.values()]
    try:
        layer(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups = [group for group, _ in _group_by_input(calls)]
    missing = {n for n, _ in linears.values()} - {n for g in groups for n in g}
    if missing:
        raise SparsecError(f"decoder layer Linears never run by its forward: {sorted(missing)}")
    return groups


def walk_layer(
    layer: nn.Module,
    hidden: list[torch.Tensor],
    kwargs: list[dict],
    groups: list[dict],
    on_group: Callable[[dict, list[torch.Tensor]], None],
) -> list[torch.Tensor]:
    """Run ``layer`` on every chunk; at each group, once every chunk has reached it, call
    ``on_group(group, inputs)`` (the group's input of every chunk, in chunk order), then
    let the chunks go on, through the group's Linears as ``on_group`` left them. Returns
    the layer's output per chunk.

    Each chunk's forward runs once, as a greenlet (a coroutine with its own stack, in
    this thread) that pauses at every group: the same work, memory and numbers as one
    forward per chunk, without knowing how the layer computes (no copy of its code).
    OS threads would do it too, but non-main threads get their own malloc arenas, which
    map and fault in every large activation afresh (measured: 2x slower forwards).
    """
    from greenlet import GreenletExit, greenlet

    firsts = {id(next(iter(group.values()))): k for k, group in enumerate(groups)}
    scheduler = greenlet.getcurrent()

    def at_group(module, args):
        scheduler.switch(firsts[id(module)], args[0])  # pause; resumed when all arrived

    def forward(i: int):
        out = layer(hidden[i], **kwargs[i])
        return out[0] if isinstance(out, tuple) else out

    chunks = [greenlet(forward) for _ in hidden]
    handles = [next(iter(g.values())).register_forward_pre_hook(at_group) for g in groups]
    # Grad mode is per thread, and the greenlets share this one: it is set here, once,
    # around all of them (a ``no_grad`` entered in each would leak out of the last).
    with torch.no_grad():
        try:
            results = [chunk.switch(i) for i, chunk in enumerate(chunks)]
            while not all(chunk.dead for chunk in chunks):
                paused_at = {r[0] for r in results}
                if len(paused_at) != 1 or any(chunk.dead for chunk in chunks):
                    raise SparsecError("calibration chunks took different paths through the layer")
                on_group(groups[paused_at.pop()], [r[1] for r in results])
                results = [chunk.switch() for chunk in chunks]
        finally:
            for h in handles:
                h.remove()
            for chunk in chunks:  # an error or Ctrl-C: end the paused forwards
                if not chunk.dead:
                    chunk.throw(GreenletExit)
    return results


# --- where a group's input comes from (for folding scales into it) ----------------------
_MULTIPLY = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_LAYER_NORM = {nn.functional.layer_norm, torch.layer_norm}
_RELU = {nn.functional.relu, torch.relu, torch.Tensor.relu}


@dataclass(frozen=True)
class InputSource:
    """What a Linear group's input is the product of, when a per-channel scale of that
    input can be folded exactly into a weight: a 1-D parameter (a norm's weight, with
    its ``bias`` for a LayerNorm), or the rows of a Linear (the ``up`` of a gated MLP, its
    output times the activation; a ReLU MLP's ``fc1``, since relu(z) / s = relu(z / s)
    for s > 0).

    ``rows``: the Linear's output rows the input is, where it is a slice of a wider output
    (Phi-3's ``gate_up_proj``: the up half of the rows); None: all of them.
    """

    parameter: nn.Parameter | None = None
    bias: nn.Parameter | None = None  # added after ``parameter`` scales (LayerNorm)
    linear: nn.Linear | None = None
    rows: slice | None = None


class _Producers(TorchFunctionMode):
    """Records, for every tensor an op returns (alone or in a tuple, as ``chunk`` and
    ``split`` do), the op and its arguments."""

    def __init__(self):
        super().__init__()
        self.made_by: dict[int, tuple] = {}
        self.keep: list = []  # outputs stay alive so their ids are not reused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        recorded = args
        if func in _LAYER_NORM and kwargs:  # F.layer_norm passes weight and bias by name
            names = ("input", "normalized_shape", "weight", "bias")
            bound = dict(zip(names, args, strict=False)) | kwargs
            recorded = tuple(bound.get(n) for n in names)
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.made_by[id(tensor)] = (func, recorded)
                self.keep.append(tensor)
        return out


@torch.no_grad()
def trace_groups(model: nn.Module, input_ids: torch.Tensor) -> list[list[tuple]]:
    """Per decoder layer, ``[(group, source)]``: the Linear groups (as ``linear_groups``)
    and each one's ``InputSource`` or None, from one forward of ``input_ids``."""
    layers = decoder_layers(model)
    where = {}  # id(Linear) -> (layer index, name)
    by_weight = {}  # id(weight) -> Linear
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                where[id(module)] = (i, name)
                by_weight[id(module.weight)] = module
    seen: list[list] = [[] for _ in layers]

    def record(module, args):
        i, name = where[id(module)]
        seen[i].append((name, module, args[0]))

    handles = [
        m.register_forward_pre_hook(record, prepend=True)
        for layer in layers
        for m in layer.modules()
        if isinstance(m, nn.Linear)
    ]
    producers = _Producers()
    try:
        with producers:
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [
        [(group, _source(x, producers.made_by, by_weight)) for group, x in _group_by_input(calls)]
        for calls in seen
    ]


def _source(x: torch.Tensor, made_by: dict, by_weight: dict) -> InputSource | None:
    func, args = made_by.get(id(x), (None, ()))
    width = x.shape[-1]
    if func in _LAYER_NORM and len(args) >= 3:
        weight = args[2]
        bias = args[3] if len(args) > 3 else None
        if isinstance(weight, nn.Parameter) and weight.shape == (width,):
            if bias is None or isinstance(bias, nn.Parameter) and bias.shape == (width,):
                return InputSource(parameter=weight, bias=bias)
        return None
    if func in _RELU and len(args) >= 1 and isinstance(args[0], torch.Tensor):
        return _linear_rows(args[0], made_by, by_weight)
    if func not in _MULTIPLY or len(args) != 2:
        return None
    for operand in args:
        if isinstance(operand, nn.Parameter) and operand.shape == (width,):
            return InputSource(parameter=operand)
    for operand in args:
        if not isinstance(operand, torch.Tensor) or operand.shape[-1] != width:
            continue
        found = _linear_rows(operand, made_by, by_weight)
        if found is not None:
            return found
    return None


def _is_linear(func) -> bool:
    return func is nn.functional.linear or func is torch._C._nn.linear


def _linear_rows(t: torch.Tensor, made_by: dict, by_weight: dict) -> InputSource | None:
    """``t`` as (a slice of) a decoder Linear's output: all its rows, or, where ``t`` is a
    view of that output holding a contiguous run of its last axis (``chunk``, ``split``,
    ``[..., a:b]``, ``narrow``: Phi-3's up half of ``gate_up_proj``), those rows. A view
    that is not such a run (interleaved halves) is not foldable into rows: None."""
    op, op_args = made_by.get(id(t), (None, ()))
    whole, rows = t, None
    if not _is_linear(op):  # a view of a Linear's output?
        whole = op_args[0] if op_args and isinstance(op_args[0], torch.Tensor) else None
        if whole is None:
            return None
        op, op_args = made_by.get(id(whole), (None, ()))
        if not _is_linear(op):
            return None
        start = t.storage_offset() - whole.storage_offset()
        if not (
            t.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            and t.shape[:-1] == whole.shape[:-1]
            and t.stride() == whole.stride()
            and whole.stride(-1) == 1
            and 0 <= start
            and start + t.shape[-1] <= whole.shape[-1]
        ):
            return None
        rows = slice(start, start + t.shape[-1])
    linear = by_weight.get(id(op_args[1])) if len(op_args) > 1 else None
    if linear is None or linear.out_features != whole.shape[-1]:
        return None
    return InputSource(linear=linear, rows=rows)
