"""Sparsity patterns: what a pruning mask may look like, and the budget per block.

* ``unstructured``: any weights, ``round(sparsity * numel)`` of them per layer.
* ``N:M`` (e.g. ``2:4``): in every group of M consecutive input weights of a row, N
  are kept and M - N are zero (NVIDIA's convention). Its sparsity is ``1 - N/M``.
* ``blockK`` (e.g. ``block16``): whole runs of K consecutive input weights of a row are
  zero or kept together (``block1xK`` in docs/graph-contract.md).

Weights are PyTorch ``[out, in]``; groups and blocks run along ``in`` (the columns),
which is the axis the compiled kernels walk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sparsec.errors import SparsecError

MAX_SPARSITY = 0.99


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "nm" | "block"
    n: int = 0  # N of N:M: weights kept per group
    m: int = 0  # M of N:M, or K of blockK: the group width

    @property
    def name(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.m}"
        return "unstructured"

    @property
    def contract_name(self) -> str:
        """The pattern as docs/graph-contract.md spells it in ``sparsec.sparsity``."""
        return f"block1x{self.m}" if self.kind == "block" else self.name

    @property
    def group(self) -> int:
        """Columns that must stay together when the weight is cut into column blocks."""
        return self.m if self.kind in ("nm", "block") else 1

    def check_width(self, layer: str, in_features: int) -> None:
        if in_features % self.group:
            what = "M" if self.kind == "nm" else "the block size"
            raise SparsecError(
                f"pattern {self.name}: {what} {self.group} does not divide the input width "
                f"{in_features} of {layer}; choose a pattern whose group divides it"
            )


def parse_pattern(text: str) -> Pattern:
    if text == "unstructured":
        return Pattern("unstructured")
    if match := re.fullmatch(r"(\d+):(\d+)", text):
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise SparsecError(f"pattern {text}: N:M needs 0 < N < M (e.g. 2:4)")
        return Pattern("nm", n, m)
    if match := re.fullmatch(r"block(\d+)", text):
        k = int(match[1])
        if k < 16:
            raise SparsecError(f"pattern {text}: blocks must be at least 16 wide (e.g. block16)")
        return Pattern("block", 0, k)
    raise SparsecError(f"unknown sparsity pattern {text!r}; use unstructured, N:M (2:4) or block16")


def check_sparsity(sparsity: float, pattern: Pattern) -> None:
    if not 0.0 <= sparsity <= MAX_SPARSITY:
        raise SparsecError(f"--sparsity {sparsity} is outside [0, {MAX_SPARSITY}]")
    if pattern.kind == "nm":
        implied = 1 - pattern.n / pattern.m
        if abs(sparsity - implied) > 1e-6:
            raise SparsecError(
                f"pattern {pattern.name} keeps {pattern.n} of every {pattern.m} weights, "
                f"i.e. sparsity {implied:g}; pass --sparsity {implied:g}"
            )


def budget(sparsity: float, units_before: int, units_after: int) -> int:
    """Units to prune in a block that spans units ``[before, after)`` of a layer.

    Rounding the cumulative count instead of each block's makes the layer total exactly
    ``round(sparsity * units)`` however the blocks are cut.
    """

    def rounded(units: int) -> int:
        return int(sparsity * units + 0.5)

    return rounded(units_after) - rounded(units_before)


def magnitude_mask(w: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """Keep-mask (True = kept) of plain magnitude pruning, the baseline SparseGPT beats."""
    rows, cols = w.shape
    score = w.detach().abs().float()
    pruned = torch.zeros_like(score, dtype=torch.bool)
    if pattern.kind == "nm":
        groups = score.reshape(rows, cols // pattern.m, pattern.m)
        idx = torch.topk(groups, pattern.m - pattern.n, dim=2, largest=False).indices
        pruned = pruned.reshape(rows, cols // pattern.m, pattern.m).scatter_(2, idx, True)
        return ~pruned.reshape(rows, cols)
    if pattern.kind == "block":
        groups = score.reshape(rows, cols // pattern.m, pattern.m).sum(-1).flatten()
        k = budget(sparsity, 0, groups.numel())
        pruned_groups = torch.zeros_like(groups, dtype=torch.bool)
        pruned_groups[torch.topk(groups, k, largest=False).indices] = True
        return ~pruned_groups.reshape(rows, -1).repeat_interleave(pattern.m, dim=1)
    k = budget(sparsity, 0, score.numel())
    pruned.view(-1)[torch.topk(score.flatten(), k, largest=False).indices] = True
    return ~pruned


def mask_follows(mask: torch.Tensor, pattern: Pattern) -> bool:
    """Does a keep-mask obey the pattern's structure? (Counts are checked elsewhere.)"""
    rows, cols = mask.shape
    if pattern.kind == "nm":
        kept = mask.reshape(rows, cols // pattern.m, pattern.m).sum(-1)
        return bool((kept == pattern.n).all())
    if pattern.kind == "block":
        kept = mask.reshape(rows, cols // pattern.m, pattern.m).sum(-1)
        return bool(((kept == 0) | (kept == pattern.m)).all())
    return True
