"""``sparsec generate-data`` on a tiny model: samples, determinism, resume, bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

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


def test_sample_next_keeps_the_nucleus_of_the_top_k():
    from sparsec.sparsify.teacher_text import TOP_K, sample_next

    logits = torch.stack([-0.01 * torch.arange(500.0), -0.01 * torch.arange(500.0)])
    logits[0, 7] = 20.0  # one token holds nearly all the mass
    g = torch.Generator().manual_seed(0)
    opts = SampleOptions("m", "o.jsonl", 1, top_p=0.5)
    draws = torch.stack([sample_next(logits, opts, g) for _ in range(300)])
    assert (draws[:, 0] == 7).all()  # the nucleus is that one token
    assert 20 < draws[:, 1].max() < 40  # half of 64 nearly equal tokens' mass: about 32
    opts.top_p = 1.0
    draws = torch.stack([sample_next(logits, opts, g) for _ in range(3000)])[:, 1]
    assert draws.max() < TOP_K and draws.max() > 55  # all of the 64 likeliest, none past


def test_the_sampling_loop_decodes_like_hf_generate(tiny_model):
    """With a nucleus of one token the loop is greedy: it must equal HF's greedy decode
    of each left-padded prompt (the cache, positions and mask are right)."""
    from sparsec.sparsify.teacher_text import _sample_batch

    model, tokenizer = tiny_model
    prompts = ["Line 4 of", "the travellers walked on through"]
    opts = SampleOptions("m", "o.jsonl", 1, length=10, top_p=1e-6)
    texts = _sample_batch(model, tokenizer, prompts, opts, seed=0)
    for prompt, text in zip(prompts, texts, strict=True):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        tokens = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        assert text == prompt + tokenizer.decode(tokens, skip_special_tokens=True)
