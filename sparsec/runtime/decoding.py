"""One generation's state after its prompt: the next token, its text, and when to stop.

``Decoding.step(logits)`` picks the next token (``Sampler``), decodes it incrementally,
finds stop strings and eos, and returns the text that is safe to show. Both
``Model.generate`` (one sequence) and ``Engine`` (many sequences per native step) drive
one ``Decoding`` per generation, so a batched generation gives the same tokens and
text as a single one.
"""

from __future__ import annotations

import numpy as np

from sparsec.runtime.detokenize import IncrementalDetokenizer, StopStrings
from sparsec.runtime.sampling import Sampler


class Decoding:
    """Tokens and text of one generation; ``finish`` is set when it is over.

    ``finish``: None while running, else ``"eos"`` (the token was an eos id), ``"stop"``
    (a stop string appeared; the text is cut before it) or ``"length"`` (max_new
    tokens were generated).
    """

    def __init__(
        self,
        tokenizer,
        eos_token_ids: frozenset[int],
        sampler: Sampler,
        stops: StopStrings,
        max_new: int,
        prompt_ids: np.ndarray,
    ):
        self.sampler = sampler
        self.stops = stops
        self.max_new = max_new
        self.eos = eos_token_ids
        self.detok = IncrementalDetokenizer(tokenizer)
        self.new_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # text[:emitted] has been handed out
        self.finish: str | None = None
        sampler.see(prompt_ids)

    def step(self, logits: np.ndarray) -> tuple[int, str]:
        """Choose the next token from one row of logits; returns it and the text now safe
        to show ("" while a character or a possible stop string is incomplete)."""
        token = self.sampler(logits)
        self.sampler.see(token)
        self.new_ids.append(token)
        if token in self.eos:
            self.finish = "eos"
            return token, ""
        piece = self.detok.add(token)
        out = ""
        if piece:
            start = len(self.text)
            self.text += piece
            cut = self.stops.find(self.text, start)
            if cut is not None:
                self.text, self.finish = self.text[:cut], "stop"
                return token, ""
            safe = len(self.text) - self.stops.holdback(self.text)
            if safe > self.emitted:
                out = self.text[self.emitted : safe]
                self.emitted = safe
        if len(self.new_ids) >= self.max_new:
            self.finish = "length"
        return token, out

    def rest(self) -> str:
        """Once finished: the text not handed out yet (pending bytes of the last tokens,
        a held-back tail that turned out not to be a stop string)."""
        if self.finish != "stop":
            start = len(self.text)
            self.text += self.detok.flush()
            cut = self.stops.find(self.text, start)
            if cut is not None:
                self.text, self.finish = self.text[:cut], "stop"
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
