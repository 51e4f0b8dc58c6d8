"""SparseGPT on one Linear layer (Frantar & Alistarh 2023, IST-DASLab/sparsegpt).

Given calibration inputs X of a layer, SparseGPT picks a mask and updates the kept
weights to minimise ||W X - W' X||² row by row, with the optimal-brain-surgeon update
``W[:, j+1:] -= (w_j - q_j) / [Hinv]_jj * Hinv[j, j+1:]`` after pruning column j. The
steps, as in the reference implementation:

* ``H = (2/n) Σ x xᵀ`` over the n calibration tokens, dampened by ``0.01 · mean(diag H)``;
  columns that never see a non-zero input are dead and pruned first.
* ``Hinv`` is the upper Cholesky factor of ``H⁻¹`` (cholesky → cholesky_inverse →
  upper cholesky), so that row j of it is the OBS update of column j given that the
  columns before j are already fixed.
* Columns are processed in blocks of 128. Unstructured and block masks are chosen at the
  start of each block from ``w² / [Hinv]_jj²`` across all rows (one threshold per
  block); N:M masks every M columns from the already-updated weights.
* Inside a block the update is applied column by column; the block's accumulated error
  reaches the columns after the block in one matmul (the "lazy batch" update).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.sparsify.patterns import Pattern, budget

BLOCK_SIZE = 128
DAMPENING = 0.01


class HessianAccumulator:
    """Accumulates ``H = (2/n) Σ x xᵀ`` from a Linear's inputs through a forward hook."""

    def __init__(self, linear: nn.Linear):
        self.xtx = torch.zeros(
            linear.in_features, linear.in_features, dtype=torch.float64, device=linear.weight.device
        )
        self.tokens = 0
        self.handle = linear.register_forward_hook(self._hook)

    def _hook(self, _module, args, _output) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.xtx += (x.T @ x).double()
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        self.handle.remove()  # idempotent: one accumulator may serve several Linears
        if self.tokens == 0:
            raise SparsecError("a layer saw no calibration tokens; pass a non-empty --calibration")
        return 2.0 * self.xtx / self.tokens


@dataclass
class PruneResult:
    weight: torch.Tensor  # pruned and updated, same dtype as the input weight
    mask: torch.Tensor  # bool, True = kept
    error: float  # SparseGPT's estimate of the added loss, Σ (w - q)² / [Hinv]_jj² / 2


def upper_cholesky_of_inverse(h: torch.Tensor, dampening: float = DAMPENING) -> torch.Tensor:
    """``Hinv`` as in the reference: dampen, invert through Cholesky, factor again (upper)."""
    h = h.clone()
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += dampening * torch.mean(torch.diag(h))
    try:
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(inverse, upper=True)
    except torch.linalg.LinAlgError as e:
        raise SparsecError(
            "SparseGPT: the calibration Hessian is not positive definite even after "
            "dampening; use more (or more varied) --calibration text"
        ) from e


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    block_size: int = BLOCK_SIZE,
    dampening: float = DAMPENING,
) -> PruneResult:
    """Prune ``weight [out, in]`` to ``sparsity`` with the layer Hessian ``[in, in]``."""
    w = weight.detach().clone().float()
    rows, cols = w.shape
    group = pattern.group
    if cols % group:
        raise SparsecError(f"pattern {pattern.name}: width {cols} is not a multiple of {group}")
    block_size = max(group, block_size // group * group)  # groups never straddle blocks

    h = hessian.detach().to(w.device, torch.float64, copy=True)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # no input ever reaches them: zero costs nothing, so they go first
    hinv = upper_cholesky_of_inverse(h, dampening).float()

    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    losses = torch.zeros(rows, dtype=torch.float64, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        loss1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        mask1 = _block_mask(w1, d, sparsity, pattern, rows, i1, i2)

        for i in range(count):
            if pattern.kind == "nm" and i % pattern.m == 0:
                # N:M picks from the weights as updated so far, like the reference.
                score = w1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m] ** 2
                drop = torch.topk(score, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + drop, True)
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            q1[:, i] = q
            loss1[:, i] = (col - q) ** 2 / d[i] ** 2
            err = (col - q) / d[i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err

        w[:, i1:i2] = q1
        pruned[:, i1:i2] = mask1
        losses += loss1.sum(1).double() / 2
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    w[pruned] = 0.0  # exact zeros, whatever rounding did to them
    return PruneResult(w.to(weight.dtype), ~pruned, float(losses.sum()))


def _block_mask(
    w1: torch.Tensor,
    d: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    rows: int,
    i1: int,
    i2: int,
) -> torch.Tensor:
    """Prune-mask (True = pruned) of one column block, chosen at the block's start."""
    mask1 = torch.zeros_like(w1, dtype=torch.bool)
    if pattern.kind == "nm":
        return mask1  # filled in every M columns inside the loop
    score = w1**2 / d.unsqueeze(0) ** 2
    if pattern.kind == "block":
        k = pattern.m
        groups = score.reshape(rows, -1, k).sum(-1)  # [rows, count / k]
        n = budget(sparsity, rows * i1 // k, rows * i2 // k)
        chosen = torch.zeros(groups.numel(), dtype=torch.bool, device=w1.device)
        chosen[torch.topk(groups.flatten(), n, largest=False).indices] = True
        return chosen.reshape(rows, -1).repeat_interleave(k, dim=1)
    # Counting in weights of the whole layer keeps its total exactly round(s * numel).
    n = budget(sparsity, rows * i1, rows * i2)
    mask1.view(-1)[torch.topk(score.flatten(), n, largest=False).indices] = True
    return mask1
