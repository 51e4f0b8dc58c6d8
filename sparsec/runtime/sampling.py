"""Next-token choice from one row of logits, in numpy.

A repetition penalty comes first, as Hugging Face's ``repetition_penalty`` (CTRL, Keskar
et al. 2019): the logit of every token already in the prompt or the output is divided by
the penalty if positive and multiplied by it if negative (> 1 discourages repeats).
Then temperature == 0 is greedy (argmax; ties go to the lowest id). Otherwise
softmax(logits / temperature), restricted to the top_k largest logits (all tokens tied
with the k-th are kept, as Hugging Face does), then to the smallest set of most likely
tokens whose probability reaches top_p (ties in probability ordered by id), then one
draw from ``numpy.random.Generator(seed)``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from sparsec.errors import SparsecError

# Nucleus search looks at this many best tokens first; a full sort of the vocabulary
# (about 3 ms for 49k tokens) only runs when they do not reach top_p.
_NUCLEUS_PREFILTER = 256
_DRAW_BLOCK = 512


def check_sampling(temperature, top_k, top_p, seed, repetition_penalty=None) -> None:
    """Raise SparsecError for parameters outside their domain."""
    if (
        not isinstance(temperature, numbers.Real)
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise SparsecError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}"
        )
    if top_k is not None and (
        not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1
    ):
        raise SparsecError(f"top_k must be an integer >= 1 (or None for all), got {top_k!r}")
    if top_p is not None and (
        not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not (0 < top_p <= 1)
    ):
        raise SparsecError(f"top_p must be in (0, 1] (or None for 1), got {top_p!r}")
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise SparsecError(f"seed must be an integer or None, got {seed!r}")
    if repetition_penalty is not None and (
        not isinstance(repetition_penalty, numbers.Real)
        or isinstance(repetition_penalty, bool)
        or not math.isfinite(repetition_penalty)
        or repetition_penalty <= 0
    ):
        raise SparsecError(
            "repetition_penalty must be a finite number > 0 (1 or None = off; 1.1-1.3 "
            f"discourages repeats), got {repetition_penalty!r}"
        )


class Sampler:
    """Callable ``logits [V] -> token id``; one per generation (it owns the RNG and, with a
    repetition penalty, the set of tokens seen: ``see`` the prompt and each chosen token)."""

    def __init__(self, temperature=0.0, top_k=None, top_p=None, seed=None, repetition_penalty=None):
        check_sampling(temperature, top_k, top_p, seed, repetition_penalty)
        # A Python float, so float32 logits are scaled in float32 (a numpy float64 would
        # promote them), as torch scales them in Hugging Face's processor.
        self.penalty = (
            None
            if repetition_penalty is None or repetition_penalty == 1
            else float(repetition_penalty)
        )
        self.seen: set[int] = set()
        self.greedy = temperature == 0
        self.temperature = float(temperature)
        self.top_k = None if top_k is None else int(top_k)
        self.top_p = None if top_p is None or top_p >= 1 else float(top_p)
        self.rng = np.random.default_rng(seed)

    def see(self, token_ids) -> None:
        """Record tokens (the prompt, then each one chosen) for the repetition penalty."""
        if self.penalty is not None:
            self.seen.update(int(t) for t in np.atleast_1d(token_ids))

    def penalize(self, logits: np.ndarray) -> np.ndarray:
        """The logits with the repetition penalty applied (a copy; the input is untouched).

        In the logits' own dtype, as Hugging Face computes it, so greedy choices agree.
        """
        if self.penalty is None or not self.seen:
            return logits
        ids = np.fromiter(self.seen, np.int64, len(self.seen))
        out = logits.copy()
        picked = out[ids]
        out[ids] = np.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return out

    def __call__(self, logits: np.ndarray) -> int:
        logits = self.penalize(logits)
        if self.greedy:
            return int(np.argmax(logits))  # first maximum = lowest id
        ids, weights = self._weights(logits)
        i = self._draw(weights)
        return i if ids is None else int(ids[i])

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate ids (ascending) and their renormalized probabilities."""
        ids, weights = self._weights(logits)
        return (np.arange(len(weights)) if ids is None else ids), weights / weights.sum()

    def _weights(self, logits: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Candidate ids (None = the whole vocabulary) and unnormalized probabilities."""
        x = logits.astype(np.float64)
        x /= self.temperature
        ids = None
        vocab = len(x)
        if self.top_k is not None and self.top_k < vocab:
            kth = np.partition(x, vocab - self.top_k)[vocab - self.top_k]
            ids = np.flatnonzero(x >= kth)
            x = x[ids]
        x -= x.max()
        weights = np.exp(x, out=x)
        if self.top_p is not None:
            kept = self._nucleus(weights / weights.sum())
            ids, weights = (kept if ids is None else ids[kept]), weights[kept]
        return ids, weights

    def _nucleus(self, probs: np.ndarray) -> np.ndarray:
        """Indices (ascending) of the smallest most-likely set reaching top_p."""
        pool = None
        if len(probs) > _NUCLEUS_PREFILTER:
            # Everything tied with the m-th best is kept, so every token left out is less
            # likely than all in the pool: if the pool reaches top_p it holds the nucleus.
            m = _NUCLEUS_PREFILTER
            mth = np.partition(probs, len(probs) - m)[len(probs) - m]
            candidates = np.flatnonzero(probs >= mth)
            if probs[candidates].sum() >= self.top_p:
                pool = candidates
        if pool is None:
            pool = np.arange(len(probs))
        # numpy's default argsort is a fast SIMD sort but not stable. The sorted values
        # are the same either way, so the count ``keep`` is too; only which of the tokens
        # tied with the last kept one get in can differ, and that is settled by id below.
        pool_probs = probs[pool]
        sorted_probs = pool_probs[np.argsort(-pool_probs)]
        cum = np.cumsum(sorted_probs)
        keep = min(int(np.searchsorted(cum, self.top_p)) + 1, len(pool))
        last = sorted_probs[keep - 1]
        above = pool[pool_probs > last]
        tied = pool[pool_probs == last]  # pool is ascending, so lowest ids first
        return np.sort(np.concatenate([above, tied[: keep - len(above)]]))

    def _draw(self, weights: np.ndarray) -> int:
        """Inverse CDF of one uniform draw: the index i with cdf[i-1] <= u*total < cdf[i].

        A sequential cumsum over 49k floats costs more than the rest of sampling, so
        large vocabularies go through block sums first, then one block's cumsum.
        """
        n = len(weights)
        if n <= _DRAW_BLOCK:
            cdf = np.cumsum(weights)
            i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
            return min(i, n - 1)
        block_cdf = np.cumsum(np.add.reduceat(weights, np.arange(0, n, _DRAW_BLOCK)))
        target = self.rng.random() * block_cdf[-1]
        j = min(int(np.searchsorted(block_cdf, target, side="right")), len(block_cdf) - 1)
        start = j * _DRAW_BLOCK
        inner = np.cumsum(weights[start : start + _DRAW_BLOCK])
        rest = target - (block_cdf[j - 1] if j else 0.0)
        i = min(int(np.searchsorted(inner, rest, side="right")), len(inner) - 1)
        return start + i
