"""One-shot pruning of a whole decoder: SparseGPT layer by layer.

Decoder layer i is pruned on the calibration activations that the already-pruned layers
0..i-1 produce, so each layer compensates the error of the ones before it (as in the
reference ``llama_sequential``). Inside a layer the Linears are pruned in execution
order groups (Linears reading one tensor; Llama: q/k/v, o, gate/up, down; found by
``layer_walk.linear_groups``), each group's Hessian taken after the groups
before it were pruned ("true sequential"): for the same calibration budget that gives
a lower reconstruction error than one Hessian per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.sparsify.layer_walk import (
    decoder_layers,
    find_decoder_layers,
    linear_groups,
    prunable_linears,
    walk_layer,
)
from sparsec.sparsify.patterns import Pattern, magnitude_mask
from sparsec.sparsify.sparsegpt import HessianAccumulator, sparsegpt_prune

# Sums a rank's ``(Σ x xᵀ, token count)`` over every rank of a distributed run
# (``distributed.Ranks.sum_hessian``); None in a single process.
HessianSum = Callable[[torch.Tensor, int], tuple[torch.Tensor, int]]


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Calibration activations entering one decoder layer, in chunks of a few sequences."""

    hidden: list[torch.Tensor]  # [chunk, seq, hidden] each
    kwargs: list[dict] = field(default_factory=list)  # attention mask, RoPE, ... per chunk
    # From ``capture_first_layer_inputs``: every decoder layer's own kwargs per chunk. They
    # may differ by layer (a sliding-window layer's attention mask is not a full one's).
    by_layer: list[list[dict]] = field(default_factory=list)

    def at_layer(self, i: int, hidden: list[torch.Tensor]) -> LayerInputs:
        """``hidden`` entering decoder layer ``i``, with that layer's own kwargs."""
        return LayerInputs(hidden, self.by_layer[i] if self.by_layer else self.kwargs)


def _skip(*args, **kwargs):
    """A decoder layer's forward, replaced while the inputs are captured: the identity."""
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, calibration: torch.Tensor, chunk: int):
    """Run the embedding only and catch what decoder layer 0 receives, and the keyword
    arguments the model passes each decoder layer (``by_layer``).

    The layers do not run (each returns its input): the kwargs (masks, RoPE tables) do
    not depend on the hidden states, and a model may give its layers different ones
    (Qwen2 with sliding-window layers after full-attention ones, Gemma-style
    interleaving), so layer 0's are not reused for the others.
    """
    layers = decoder_layers(model)
    captured = LayerInputs([], [], [[] for _ in layers])

    def catcher(i: int):
        def catch(_module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kept = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
            if i == 0:
                captured.hidden.append(hidden.detach())
            captured.by_layer[i].append(kept)
            if i == len(layers) - 1:
                raise _StopForward

        return catch

    handles = [
        layer.register_forward_pre_hook(catcher(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    own_forward = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate's
    for layer in layers:
        layer.forward = _skip
    try:
        device = next(model.parameters()).device
        for start in range(0, calibration.shape[0], chunk):
            try:
                model(input_ids=calibration[start : start + chunk].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        for layer, forward in zip(layers, own_forward, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    if not all(len(chunks) == len(captured.hidden) for chunks in captured.by_layer):
        raise SparsecError("the model did not run every decoder layer on the calibration text")
    captured.kwargs = captured.by_layer[0]
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
    hessian_sum: HessianSum | None = None,
) -> tuple[list[LayerReport], dict[str, torch.Tensor], LayerInputs]:
    """Prune one decoder layer in place; return its reports, keep-masks and its outputs.

    ``staged`` prunes each group (Linears reading one tensor, see ``linear_groups``) when
    every chunk's forward has reached it, and lets the forwards go on (``walk_layer``):
    one forward per chunk. Without it the layer is re-run from its start for every group,
    the plain reference of the same result at about twice the work.
    ``hessian_sum`` adds the other ranks' calibration tokens to every group's Hessian.
    """
    reports, masks = [], {}
    groups = linear_groups(layer, inputs.hidden[0], inputs.kwargs[0])
    for group in groups:
        for name, linear in group.items():
            pattern.check_width(f"{prefix}.{name}", linear.in_features)

    def prune_group(group: dict[str, nn.Linear], hessian: torch.Tensor) -> None:
        for name, linear in group.items():  # one Hessian: the group reads one tensor
            result = sparsegpt_prune(linear.weight, hessian, sparsity, pattern)
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
    if staged:
        outputs = walk_layer(
            layer,
            inputs.hidden,
            inputs.kwargs,
            groups,
            lambda group, xs: prune_group(group, _hessian(xs, hessian_sum)),
        )
        return reports, masks, LayerInputs(outputs, inputs.kwargs)
    for group in groups:
        accumulator = HessianAccumulator(next(iter(group.values())))
        run_layer(layer, inputs, stop_after=list(group.values()))
        accumulator.handle.remove()
        prune_group(group, _finish(accumulator.xtx, accumulator.tokens, hessian_sum))
    return reports, masks, LayerInputs(run_layer(layer, inputs), inputs.kwargs)


def _hessian(xs: list[torch.Tensor], hessian_sum: HessianSum | None = None) -> torch.Tensor:
    """``(2/n) Σ x xᵀ`` over every token of the chunks ``xs`` (and of the other ranks')."""
    dim = xs[0].shape[-1]
    xtx = torch.zeros(dim, dim, dtype=torch.float64, device=xs[0].device)
    tokens = 0
    for x in xs:
        flat = x.reshape(-1, dim).float()
        xtx += (flat.T @ flat).double()
        tokens += flat.shape[0]
    return _finish(xtx, tokens, hessian_sum)


def _finish(xtx: torch.Tensor, tokens: int, hessian_sum: HessianSum | None) -> torch.Tensor:
    # Summed in float64 before the division: the ranks' sums then agree with one
    # process's to float64 rounding, far below what could move a float32 mask decision.
    if hessian_sum is not None:
        xtx, tokens = hessian_sum(xtx, tokens)
    if tokens == 0:
        raise SparsecError("a layer saw no calibration tokens; pass a non-empty --calibration")
    return 2.0 * xtx / tokens


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
    hessian_sum: HessianSum | None = None,
) -> None:
    """Prune every decoder layer from ``start_layer`` on, in place.

    ``sparsity`` is one fraction for every layer or a list with one per decoder layer.
    ``on_layer(i, reports, masks, outputs)`` runs after layer i (progress, checkpoints);
    resuming passes the saved inputs of ``start_layer`` as ``start_inputs``.
    ``calibration`` goes to the model's device chunk by chunk; under torchrun it is this
    rank's share, and ``hessian_sum`` sums the Hessians over the ranks.
    """
    prunable_linears(model)  # fail early on models without Linears
    path, layers = find_decoder_layers(model)
    per_layer = [sparsity] * len(layers) if isinstance(sparsity, float | int) else sparsity
    if len(per_layer) != len(layers):
        raise SparsecError(f"{len(per_layer)} layer sparsities for {len(layers)} decoder layers")
    captured = capture_first_layer_inputs(model, calibration, chunk)
    device = next(model.parameters()).device
    hidden = captured.hidden if start_inputs is None else [h.to(device) for h in start_inputs]
    for i in range(start_layer, len(layers)):
        reports, masks, inputs = prune_layer(
            layers[i],
            captured.at_layer(i, hidden),
            per_layer[i],
            pattern,
            f"{path}.{i}",
            method,
            hessian_sum=hessian_sum,
        )
        hidden = inputs.hidden
        if on_layer is not None:
            on_layer(i, reports, masks, inputs)
