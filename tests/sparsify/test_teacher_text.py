"""``sparsec generate-data`` on a tiny model: samples, determinism, resume, bad input."""

from __future__ import annotations

import json
import re

import pytest

from sparsec.cli import main
from sparsec.errors import SparsecError
from sparsec.sparsify.teacher_text import SampleOptions, generate_corpus, opener_lines, openers

PROSE = "\n".join(
    f"Line {i} of the story: the travellers walked on through the quiet town at dusk."
    for i in range(50)
)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(PROSE)
    return str(path)


def run(model_dir, prompts, out, tokens, **kw):
    opts = SampleOptions(
        str(model_dir), out, tokens, prompts=(prompts,), length=12, batch_size=3, quiet=True, **kw
    )
    return generate_corpus(opts)


def texts(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_samples_continue_openers_until_the_token_budget(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "samples.jsonl"
    result = run(tiny_model_dir, prompts, out, tokens=100)
    samples = texts(out)
    assert result["samples"] == len(samples) and len(samples) % 3 == 0
    assert result["tokens"] >= 100
    assert all(re.match(r"Line \d+ of", text) for text in samples)  # 3+ words of a line
    assert len(set(samples)) == len(samples)  # sampled, not one greedy continuation


def test_resume_equals_an_uninterrupted_run(tiny_model_dir, prompts, tmp_path):
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    run(tiny_model_dir, prompts, whole, tokens=150, seed=3)
    run(tiny_model_dir, prompts, part, tokens=40, seed=3)
    assert len(texts(part)) < len(texts(whole))
    run(tiny_model_dir, prompts, part, tokens=150, seed=3, resume=True)
    assert texts(part) == texts(whole)


def test_openers_are_deterministic_and_short(prompts):
    lines = opener_lines([prompts])
    a, b = openers(lines, 20, seed=1), openers(lines, 20, seed=1)
    assert a == b and a != openers(lines, 20, seed=2)
    assert all(3 <= len(o.split()) <= 8 for o in a)


def test_bad_input_is_named(tiny_model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    out.write_text("")
    with pytest.raises(SparsecError, match="exists; pass --resume"):
        run(tiny_model_dir, prompts, out, tokens=10)
    with pytest.raises(SparsecError, match="does not exist"):
        run(tiny_model_dir, prompts, tmp_path / "none.jsonl", tokens=10, resume=True)
    with pytest.raises(SparsecError, match="a .jsonl file"):
        run(tiny_model_dir, prompts, tmp_path / "s.txt", tokens=10)
    short = tmp_path / "short.txt"
    short.write_text("too short\n" * 10)
    with pytest.raises(SparsecError, match="pass --prompts with some prose"):
        run(tiny_model_dir, str(short), tmp_path / "t.jsonl", tokens=10)
    code = main(["generate-data", str(tiny_model_dir), "-o", str(out), "--tokens", "0"])
    assert code == 1 and "--tokens must be at least 1" in capsys.readouterr().err


def test_bf16_sampling_writes_samples(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "bf16.jsonl"
    result = run(tiny_model_dir, prompts, out, tokens=30, bf16=True)
    assert result["samples"] == len(texts(out)) == 3
