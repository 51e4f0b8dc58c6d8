"""Outlier-weighted layerwise sparsity (OWL; Yin et al. 2024, "Outlier Weighed Layerwise
Sparsity: A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Uniform sparsity prunes every decoder layer alike, yet layers differ in how many of their
weights matter: OWL measures, per layer, the share of "outlier" weights, those whose
activation-weighted magnitude ``|W_ij| * ||X_j||`` (the Wanda score, on the dense model's
calibration activations) exceeds ``m`` times the layer's mean score. Layers with more
outliers keep more weights. The layers' densities are the outlier ratios rescaled to a
spread of ``2 * lam`` and shifted so their mean is the target density, so the model as a
whole keeps the requested sparsity (all decoder layers have the same size).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.sparsify.layer_walk import decoder_layers
from sparsec.sparsify.prune import HessianSum, LayerInputs, capture_first_layer_inputs, run_layer

OUTLIER_M = 5.0  # the paper's threshold for Llama models
OWL_LAMBDA = 0.08  # the paper's spread: densities within target ± 0.08


def _layer_outlier_ratio(linears: list[nn.Linear], col_sq: list[torch.Tensor], m: float) -> float:
    scores = torch.cat(
        [
            (lin.weight.detach().double().abs() * sq.sqrt()[None, :]).flatten()
            for lin, sq in zip(linears, col_sq, strict=True)
        ]
    )
    return float((scores > m * scores.mean()).double().mean())


def _mean_input_squares(
    layer: nn.Module, linears: list[nn.Linear], inputs: LayerInputs, total: HessianSum | None
):
    """Run ``layer``; return each Linear's per-input-column mean of x², and the outputs.
    ``total`` sums the column sums and token counts over the ranks of a distributed run."""
    sums = [
        torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device)
        for lin in linears
    ]
    tokens = [0] * len(linears)

    def accumulate(i: int, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        sums[i] += (x * x).sum(0)
        tokens[i] += x.shape[0]

    handles = [
        lin.register_forward_hook(lambda _m, args, _o, i=i: accumulate(i, args[0]))
        for i, lin in enumerate(linears)
    ]
    try:
        outputs = run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    if total is not None:
        for i in range(len(linears)):
            sums[i], tokens[i] = total(sums[i], tokens[i])
    return [s / max(n, 1) for s, n in zip(sums, tokens, strict=True)], outputs


@torch.no_grad()
def outlier_ratios(
    model: nn.Module,
    calibration: torch.Tensor,
    m: float = OUTLIER_M,
    chunk: int = 4,
    total: HessianSum | None = None,
) -> list[float]:
    """Each decoder layer's share of weights scoring above ``m`` x its mean Wanda score.
    Under torchrun ``calibration`` is this rank's share and ``total`` sums over the ranks
    (``Ranks.sum_hessian``: it adds any float64 tensor and a count)."""
    captured = capture_first_layer_inputs(model, calibration, chunk)
    hidden = captured.hidden
    ratios = []
    for i, layer in enumerate(decoder_layers(model)):
        linears = [mod for mod in layer.modules() if isinstance(mod, nn.Linear)]
        squares, hidden = _mean_input_squares(layer, linears, captured.at_layer(i, hidden), total)
        ratios.append(_layer_outlier_ratio(linears, squares, m))
    return ratios


def check_owl_lambda(sparsity: float, lam: float) -> None:
    # The densest layer can sit up to 2 * lam above the mean, the sparsest 2 * lam below.
    limit = min(sparsity, 0.99 - sparsity) / 2
    if not 0 <= lam <= limit:
        raise SparsecError(
            f"--owl-lambda {lam} must be between 0 and {limit:.3f} at --sparsity {sparsity}, "
            "so that every layer's sparsity stays within [0, 0.99]"
        )


def owl_sparsities(ratios: list[float], sparsity: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Per-layer sparsities from outlier ratios: mean ``sparsity``, spread ``2 * lam``."""
    check_owl_lambda(sparsity, lam)
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0.0:
        return [sparsity] * len(ratios)
    density = (r - r.min()) / spread * (2 * lam)
    density = density - density.mean() + (1.0 - sparsity)
    return [float(1.0 - d) for d in density]
