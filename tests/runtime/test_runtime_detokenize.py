"""Incremental detokenization and stop-string matching."""

from __future__ import annotations

import pytest
import runtime_fake as fake

from sparsec.runtime.detokenize import IncrementalDetokenizer, StopStrings, normalize_stop

TEXT = "héllo wörld 😀 ж. ok"


@pytest.fixture(scope="module")
def tok():
    return fake.tokenizer()


def test_pieces_are_whole_characters(tok):
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    assert len(ids) == len(TEXT.encode())  # one token per byte: characters do get split
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[ids.index(tok.encode("😀", add_special_tokens=False).ids[-1])] == "😀"


def test_special_tokens_are_skipped(tok):
    detok = IncrementalDetokenizer(tok)
    ids = [fake.BOS, *tok.encode("hi", add_special_tokens=False).ids, fake.EOS]
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "hi"


def test_flush_gives_incomplete_character_as_replacement(tok):
    detok = IncrementalDetokenizer(tok)
    first_byte_of_e_acute = tok.encode("é", add_special_tokens=False).ids[0]
    assert detok.add(tok.encode("a", add_special_tokens=False).ids[0]) == "a"
    assert detok.add(first_byte_of_e_acute) == ""
    assert detok.flush() == "\ufffd"


def test_stop_find_and_holdback():
    stops = StopStrings(normalize_stop(["END", "stop here"]))
    assert stops.find("abc EN", 4) is None
    assert stops.find("abc END", 6) == 4
    assert stops.find("abc ENDstop here", 8) == 4
    assert stops.holdback("abc EN") == 2
    assert stops.holdback("abc stop h") == 6
    assert stops.holdback("abc") == 0
    assert StopStrings(()).holdback("x") == 0 and StopStrings(()).find("x", 0) is None
    assert normalize_stop("x") == ("x",) and normalize_stop(None) == ()
