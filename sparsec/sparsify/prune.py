"""One-shot pruning of a whole decoder: SparseGPT layer by layer.

Decoder layer i is pruned on the calibration activations that the already-pruned layers
0..i-1 produce, so each layer compensates the error of the ones before it (as in the
reference ``llama_sequential``). Inside a layer the Linears are pruned in execution
order groups (q/k/v, o, gate/up, down), each group's Hessian taken after the groups
before it were pruned ("true sequential"): for the same calibration budget that gives
a lower reconstruction error than one Hessian per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.sparsify.patterns import Pattern, magnitude_mask
from sparsec.sparsify.sparsegpt import HessianAccumulator, sparsegpt_prune

# Execution-order groups of a Llama decoder layer (Linear names relative to the layer).
LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise SparsecError(
            f"{type(model).__name__} has no decoder layers (model.model.layers); "
            "sparsec sparsify supports Llama-family causal LMs"
        )
    return layers


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder layers, by full parameter-path name.

    The embedding and the (often tied) LM head stay dense, as in the paper.
    """
    layers = decoder_layers(model)
    found = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                found[f"model.layers.{i}.{name}"] = module
    if not found:
        raise SparsecError(
            f"{type(model).__name__} has no Linear layers in its decoder to prune; "
            "pass a Llama-family model"
        )
    return found


def layer_groups(layer: nn.Module) -> list[dict[str, nn.Linear]]:
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    if set(linears) == {n for group in LLAMA_GROUPS for n in group}:
        return [{n: linears[n] for n in group} for group in LLAMA_GROUPS]
    return [linears]  # unknown layout: one Hessian pass for all of them


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Calibration activations entering one decoder layer, in chunks of a few sequences."""

    hidden: list[torch.Tensor]  # [chunk, seq, hidden] each
    kwargs: list[dict] = field(default_factory=list)  # attention mask, RoPE, ... per chunk


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, calibration: torch.Tensor, chunk: int):
    """Run the embedding only and catch what decoder layer 0 receives."""
    first = decoder_layers(model)[0]
    captured = LayerInputs([], [])

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        captured.hidden.append(hidden.detach())
        captured.kwargs.append(kwargs)
        raise _StopForward

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, calibration.shape[0], chunk):
            try:
                model.model(input_ids=calibration[start : start + chunk], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, stop_after: list[nn.Linear] | None = None):
    """Run a layer on every chunk; with ``stop_after``, stop each chunk once those ran."""
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
        if stop_after is None:
            out = layer(hidden, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
            continue
        seen = set()

        def count(module, _args, _out, seen=seen):
            seen.add(id(module))
            if len(seen) == len(stop_after):
                raise _StopForward

        handles = [m.register_forward_hook(count) for m in stop_after]
        try:
            layer(hidden, **kwargs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
    return outputs


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    error: float  # SparseGPT's loss estimate


def prune_layer(
    layer: nn.Module,
    inputs: LayerInputs,
    sparsity: float,
    pattern: Pattern,
    prefix: str,
    method: str = "sparsegpt",
    staged: bool = True,
) -> tuple[list[LayerReport], dict[str, torch.Tensor], LayerInputs]:
    """Prune one decoder layer in place; return its reports, keep-masks and its outputs.

    ``staged`` (Llama layout only) computes each group's inputs from cached intermediate
    activations instead of re-running the layer from its start for every group: the same
    result for about half the work.
    """
    reports, masks = [], {}
    groups = layer_groups(layer)
    llama = len(groups) == len(LLAMA_GROUPS)
    for group in groups:
        for name, linear in group.items():
            pattern.check_width(f"{prefix}.{name}", linear.in_features)

    def prune_group(group: dict[str, nn.Linear], hessians: dict[str, torch.Tensor]) -> None:
        for name, linear in group.items():
            result = sparsegpt_prune(linear.weight, hessians[name], sparsity, pattern)
            linear.weight.data.copy_(result.weight)
            masks[f"{prefix}.{name}"] = result.mask
            reports.append(_report(f"{prefix}.{name}", linear, result.mask, result.error))

    if method == "magnitude":
        for group in groups:
            for name, linear in group.items():
                keep = magnitude_mask(linear.weight, sparsity, pattern)
                linear.weight.data.mul_(keep)
                masks[f"{prefix}.{name}"] = keep
                reports.append(_report(f"{prefix}.{name}", linear, keep, 0.0))
        return reports, masks, LayerInputs(run_layer(layer, inputs), inputs.kwargs)
    if llama and staged:
        outputs = _prune_llama_staged(layer, inputs, groups, prune_group)
        return reports, masks, LayerInputs(outputs, inputs.kwargs)
    for group in groups:
        if llama:  # q/k/v (and gate/up) read the same tensor: one Hessian serves all
            first = HessianAccumulator(next(iter(group.values())))
            accumulators = dict.fromkeys(group, first)
        else:
            accumulators = {name: HessianAccumulator(linear) for name, linear in group.items()}
        run_layer(layer, inputs, stop_after=list(group.values()))
        prune_group(group, {name: acc.hessian() for name, acc in accumulators.items()})
    return reports, masks, LayerInputs(run_layer(layer, inputs), inputs.kwargs)


def _hessian(xs: list[torch.Tensor]) -> torch.Tensor:
    """``(2/n) Σ x xᵀ`` over every token of the chunks ``xs``."""
    dim = xs[0].shape[-1]
    xtx = torch.zeros(dim, dim, dtype=torch.float64)
    tokens = 0
    for x in xs:
        flat = x.reshape(-1, dim).float()
        xtx += (flat.T @ flat).double()
        tokens += flat.shape[0]
    return 2.0 * xtx / tokens


@torch.no_grad()
def _prune_llama_staged(layer, inputs: LayerInputs, groups, prune_group) -> list[torch.Tensor]:
    """A Llama decoder layer, written out so each group's inputs come from cached values.

    Mirrors ``LlamaDecoderLayer.forward``: h → attn(norm(h)) → h2 = h + o(attn) →
    out = h2 + down(act(gate(norm2(h2))) * up(norm2(h2))).
    """
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = groups

    x1 = [layer.input_layernorm(h) for h in inputs.hidden]
    h = _hessian(x1)
    prune_group(qkv, dict.fromkeys(qkv, h))

    attended: list[torch.Tensor] = []  # o_proj's inputs: attention with pruned q/k/v
    hook = attn.o_proj.register_forward_pre_hook(lambda _m, args: attended.append(args[0]))
    try:
        for x, kwargs in zip(x1, inputs.kwargs, strict=True):
            attn(hidden_states=x, **kwargs)
    finally:
        hook.remove()
    del x1
    prune_group(o, {"self_attn.o_proj": _hessian(attended)})

    h2 = [h + attn.o_proj(a) for h, a in zip(inputs.hidden, attended, strict=True)]
    attended.clear()
    x2 = [layer.post_attention_layernorm(h) for h in h2]
    h = _hessian(x2)
    prune_group(gate_up, dict.fromkeys(gate_up, h))

    z = [mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) for x in x2]
    del x2
    prune_group(down, {"mlp.down_proj": _hessian(z)})
    return [h + mlp.down_proj(x) for h, x in zip(h2, z, strict=True)]


def _report(name: str, linear: nn.Linear, keep: torch.Tensor, error: float) -> LayerReport:
    sparsity = float((linear.weight == 0).sum()) / linear.weight.numel()
    return LayerReport(name, tuple(linear.weight.shape), sparsity, error)


def prune_model(
    model: nn.Module,
    calibration: torch.Tensor,
    sparsity: float | list[float],
    pattern: Pattern,
    *,
    chunk: int = 4,
    method: str = "sparsegpt",
    start_layer: int = 0,
    start_inputs: list[torch.Tensor] | None = None,
    on_layer: Callable[[int, list[LayerReport], dict, LayerInputs], None] | None = None,
) -> None:
    """Prune every decoder layer from ``start_layer`` on, in place.

    ``sparsity`` is one fraction for every layer or a list with one per decoder layer.
    ``on_layer(i, reports, masks, outputs)`` runs after layer i (progress, checkpoints);
    resuming passes the saved inputs of ``start_layer`` as ``start_inputs``.
    """
    prunable_linears(model)  # fail early on models without Linears
    layers = decoder_layers(model)
    per_layer = [sparsity] * len(layers) if isinstance(sparsity, float | int) else sparsity
    if len(per_layer) != len(layers):
        raise SparsecError(f"{len(per_layer)} layer sparsities for {len(layers)} decoder layers")
    inputs = capture_first_layer_inputs(model, calibration, chunk)
    if start_inputs is not None:
        inputs.hidden = list(start_inputs)
    for i in range(start_layer, len(layers)):
        reports, masks, inputs = prune_layer(
            layers[i], inputs, per_layer[i], pattern, f"model.layers.{i}", method
        )
        if on_layer is not None:
            on_layer(i, reports, masks, inputs)
