"""What every benchmarked engine provides, and what one measurement returns.

All engines run the same protocol on the same token ids: prefill the prompt, take the
argmax of the last logits, then ``new_tokens - 1`` single-token decode steps, each
feeding back the previous argmax. End-of-sequence tokens are never chosen (as Hugging
Face's ``min_new_tokens`` does), so every engine does the same work and their tokens can
be compared one for one. Prefill time covers the prompt forward and
the first token; decode tok/s is decode steps / decode seconds, as
``GenerationStats.decode_tokens_per_second`` counts them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    tokens: list[int]

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Unavailable(Exception):
    """The engine cannot run here (missing package, failed build...); says why."""


class System:
    """One engine on one variant's weights in one format.

    Subclasses set the descriptive attributes and implement ``_load(threads)``,
    ``_forward_last(ids) -> logits of the last id`` (appending to the engine's cache) and
    ``_reset()``; or override ``run`` entirely (PyTorch uses HF generate).
    """

    engine = "?"
    version = "?"
    precision = "fp32"  # what the arithmetic is: fp32 | fp16 | int8 | int4 ...
    weights_format = "?"  # how weights are stored, e.g. "bitmask_i8", "Q8_0"
    kv_bytes_per_value = 4  # KV cache element size (llama.cpp: f16)

    def __init__(self, variant, name: str):
        self.variant = variant
        self.name = name
        self.threads: int | None = None
        self.artifact: str | None = None
        eos = variant.model.generation_config.eos_token_id
        self.suppress = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # -- lifecycle -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Build or fetch the artifact (cached). Raises Unavailable."""

    def set_threads(self, threads: int) -> None:
        if threads != self.threads:
            self._load(threads)
            self.threads = threads

    def close(self) -> None:
        """Release memory (sessions, mapped files)."""

    # -- measurement -----------------------------------------------------------------------
    def run(self, prompt: list[int], new_tokens: int) -> Sample:
        self._reset()
        t0 = time.perf_counter()
        tok = self.pick(self._forward_last(prompt))
        t1 = time.perf_counter()
        tokens = [tok]
        for _ in range(new_tokens - 1):
            tok = self.pick(self._forward_last([tok]))
            tokens.append(tok)
        t2 = time.perf_counter()
        return Sample(t1 - t0, t2 - t1, new_tokens - 1, tokens)

    def pick(self, logits: np.ndarray) -> int:
        """Greedy choice, never an end-of-sequence token (no copy in the usual case)."""
        best = int(np.argmax(logits))
        if best in self.suppress:
            logits = np.array(logits, dtype=np.float32)
            logits[self.suppress] = -np.inf
            best = int(np.argmax(logits))
        return best

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads (embedding: one row)."""
        raise NotImplementedError

    # -- hooks -----------------------------------------------------------------------------
    def _load(self, threads: int) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    def _forward_last(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError
