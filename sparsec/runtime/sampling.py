"""Next-token choice from one row of logits, in numpy.

A repetition penalty comes first, as Hugging Face's ``repetition_penalty`` (CTRL, Keskar
et al. 2019): the logit of every token already in the prompt or the output is divided by
the penalty if positive and multiplied by it if negative (> 1 discourages repeats).
Then temperature == 0 is greedy (argmax; ties go to the lowest id). Otherwise
softmax(logits / temperature), restricted to the top_k largest logits (all tokens tied
with the k-th are kept, as Hugging Face does), then to the smallest set of most likely
tokens whose probability reaches top_p (ties in probability ordered by id), then one
draw from ``numpy.random.Generator(seed)``. Any positive finite temperature is safe: the
logits are shifted to max 0 before they are scaled, so a tiny temperature gives weight 1
to the largest logit(s) and 0 to the rest (the greedy limit) instead of overflowing.
"""

from __future__ import annotations

import numpy as np

from sparsec.runtime.arguments import check_sampling

__all__ = ["Sampler", "check_sampling"]

# Nucleus search looks at this many best tokens first; a full sort of the vocabulary
# (about 3 ms for 49k tokens) only runs when they do not reach top_p.
_NUCLEUS_PREFILTER = 256
_DRAW_BLOCK = 512


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
        ids = None
        vocab = len(x)
        if self.top_k is not None and self.top_k < vocab:
            # On the unscaled logits: a positive temperature keeps their order, and a tiny
            # one would otherwise tie every token below the max at -inf with the k-th.
            kth = np.partition(x, vocab - self.top_k)[vocab - self.top_k]
            ids = np.flatnonzero(x >= kth)
            x = x[ids]
        # Shift, then scale: x <= 0 with the max at exactly 0, so however small the
        # temperature the quotients stay in [-inf, 0] (never inf - inf = nan) and the
        # largest logit keeps weight 1.
        x -= x.max()
        with np.errstate(over="ignore"):  # -1 / 5e-324 = -inf is the intended limit
            x /= self.temperature
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
            return _pick(cdf, self.rng.random() * cdf[-1])
        block_cdf = np.cumsum(np.add.reduceat(weights, np.arange(0, n, _DRAW_BLOCK)))
        target = self.rng.random() * block_cdf[-1]
        j = _pick(block_cdf, target)
        start = j * _DRAW_BLOCK
        inner = np.cumsum(weights[start : start + _DRAW_BLOCK])
        rest = target - (block_cdf[j - 1] if j else 0.0)
        return start + _pick(inner, rest)


def _pick(cdf: np.ndarray, target: float) -> int:
    """The index i with cdf[i-1] <= target < cdf[i].

    A target that rounding put at or past the total goes to the last index with a
    weight, never to a trailing zero weight (a token a tiny temperature ruled out).
    """
    i = int(np.searchsorted(cdf, target, side="right"))
    if i >= len(cdf):
        i = int(np.searchsorted(cdf, cdf[-1], side="left"))
    return i
