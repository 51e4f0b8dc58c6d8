"""What generate() returns: the Generation record, its timing stats, and the text stream."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from sparsec.errors import SparsecError


@dataclass(frozen=True)
class GenerationStats:
    """Timings of one generation (seconds from time.perf_counter).

    ``prompt_seconds`` covers the prefill forwards; ``decode_seconds`` runs from the first
    new token to the last one and covers ``decode_steps`` single-token forwards with their
    sampling and detokenization (and, when streaming, the time the consumer spends between
    pieces).
    """

    prompt_tokens: int
    prompt_seconds: float
    new_tokens: int
    decode_steps: int
    decode_seconds: float
    time_to_first_token: float
    total_seconds: float

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        decode = (
            f"{self.decode_tokens_per_second:.1f} tok/s ({self.decode_steps} steps in "
            f"{self.decode_seconds:.2f} s)"
            if self.decode_steps
            else "n/a (no decode step)"
        )
        return (
            f"prompt: {self.prompt_tokens_per_second:.1f} tok/s ({self.prompt_tokens} tokens in "
            f"{self.prompt_seconds:.2f} s), decode: {decode}"
        )


@dataclass(frozen=True)
class Generation:
    """One finished generation.

    ``token_ids`` are the new tokens only, including a final eos token when
    ``finish_reason == "eos"`` and the tokens of a stop string when it is ``"stop"``;
    ``text`` is their text without eos and cut before the stop string.
    """

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "eos"
    stats: GenerationStats


class TextStream(Iterator[str]):
    """Iterator of text pieces from generate(stream=True); ``.result`` once exhausted.

    ``hold()`` is a context manager entered around each step (the Model's: it holds the
    model while a piece is computed, and refuses a step while another call runs).
    """

    def __init__(
        self,
        pieces: Generator[str, None, Generation],
        hold: Callable[[], AbstractContextManager] = nullcontext,
    ):
        self._pieces = pieces
        self._hold = hold
        self._result: Generation | None = None
        self._finished = False

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        if self._finished:  # no hold: a finished stream needs no model
            raise StopIteration
        # Taken outside the generator: a second thread stepping the same stream gets
        # the model's busy error, not "generator already executing".
        with self._hold():
            try:
                return next(self._pieces)
            except StopIteration as stop:
                self._finished = True
                if stop.value is not None:
                    self._result = stop.value
                raise
            except BaseException:
                self._finished = True  # the generator is closed by its exception
                raise

    @property
    def result(self) -> Generation:
        if self._result is None:
            raise SparsecError("the stream is not finished; iterate it to the end first")
        return self._result


def run_to_end(pieces: Generator[str, None, Generation]) -> Generation:
    while True:
        try:
            next(pieces)
        except StopIteration as stop:
            return stop.value
