"""Classify a weight's sparsity pattern: what decides which kernel families apply."""

from __future__ import annotations

import numpy as np

DENSE_BELOW = 0.05  # fewer zeros than this is not worth a sparse format


def classify_pattern(w: np.ndarray) -> str:
    """``dense``, ``N:M`` (2:4, 1:4, 4:8 on the input axis), ``block1xK`` (all-zero runs
    of K >= 16 aligned input columns explain every zero) or ``unstructured``."""
    w = np.asarray(w)
    zeros = w == 0
    sparsity = zeros.mean() if w.size else 0.0
    if sparsity < DENSE_BELOW:
        return "dense"
    cols = w.shape[-1]
    for n, m in ((2, 4), (1, 4), (4, 8)):
        if cols % m == 0 and np.all((~zeros).reshape(-1, m).sum(axis=1) <= n):
            return f"{n}:{m}"
    for k in (64, 32, 16):
        if cols % k == 0:
            blocks = zeros.reshape(*zeros.shape[:-1], cols // k, k)
            if np.array_equal(blocks.all(axis=-1).repeat(k, axis=-1).reshape(zeros.shape), zeros):
                return f"block1x{k}"
    return "unstructured"
