"""Incremental detokenization and stop strings for streamed generation.

Byte-level tokenizers split multi-byte UTF-8 characters across tokens, so decoding
one token at a time would emit U+FFFD halves. ``IncrementalDetokenizer`` decodes a
small window of recent tokens twice (with and without the new ones) and emits the
difference only once it no longer ends in U+FFFD; the window keeps the previous
tokens as context so decoders that depend on neighbours (leading-space handling)
give the same text as decoding everything at once.
"""

from __future__ import annotations

from sparsec.runtime.arguments import check_stop

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._decode = tokenizer.decode
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: context tokens already emitted
        self._read = 0  # tokens before this index have been emitted

    def _window_texts(self) -> tuple[str, str]:
        ids = self._ids
        before = self._decode(ids[self._prefix : self._read], skip_special_tokens=self._skip)
        after = self._decode(ids[self._prefix :], skip_special_tokens=self._skip)
        return before, after

    def add(self, token_id: int) -> str:
        """Text completed by ``token_id`` ("" while a character is still incomplete)."""
        self._ids.append(token_id)
        before, after = self._window_texts()
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is pending at the end (an incomplete character decodes as U+FFFD)."""
        before, after = self._window_texts()
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]


def normalize_stop(stop) -> tuple[str, ...]:
    """``stop`` (None, a str or a list of str) as a tuple; SparsecError if malformed."""
    return check_stop(stop)


class StopStrings:
    """Finds the earliest stop string in growing text; says how much to hold back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self._longest = max((len(s) for s in stops), default=0)

    def find(self, text: str, new_from: int) -> int | None:
        """Index of the earliest stop string that ends after ``new_from``, or None."""
        if not self.stops:
            return None
        start = max(0, new_from - self._longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """Length of the longest tail of ``text`` that may begin a stop string."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
