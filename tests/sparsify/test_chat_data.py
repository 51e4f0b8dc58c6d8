"""``sparsec generate-data --chat`` on a tiny model: whole conversations in the model's
chat template, end-of-turn tokens only where an answer ended, resume, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sparsec.cli import main
from sparsec.errors import SparsecError
from sparsec.sparsify import chat_data
from sparsec.sparsify.chat_data import (
    answer_perplexity,
    chat_batch,
    end_of_turn_ids,
    generation_prompt,
    user_turn_prefix,
)
from sparsec.sparsify.teacher_text import SampleOptions, generate_corpus, sample_rows


def run(model_dir, out, tokens, **kw):
    opts = SampleOptions(
        str(model_dir), out, tokens, length=8, batch_size=2, chat=True, quiet=True, **kw
    )
    return generate_corpus(opts)


def texts(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_samples_are_conversations_in_the_chat_template(tiny_model, tiny_model_dir, tmp_path):
    _, tokenizer = tiny_model
    out = tmp_path / "chat.jsonl"
    result = run(tiny_model_dir, out, tokens=200)
    samples = texts(out)
    assert result["samples"] == len(samples) >= 2 and result["tokens"] >= 200
    head = "<|im_start|>user\n"
    assert user_turn_prefix(tokenizer) == head
    for text in samples:
        question = text[len(head) : text.index("<|im_end|>\n<|im_start|>assistant\n")]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        assert text.startswith(prompt)  # the sampled user message, rendered by the template
    assert len(set(samples)) == len(samples)


def test_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    run(tiny_model_dir, whole, tokens=400, seed=2)
    run(tiny_model_dir, part, tokens=100, seed=2)
    assert len(texts(part)) < len(texts(whole))
    run(tiny_model_dir, part, tokens=400, seed=2, resume=True)
    assert texts(part) == texts(whole)


def test_turns_end_at_the_end_of_text_or_the_templates_end_of_turn(tiny_model):
    _, tokenizer = tiny_model
    ids = tokenizer.convert_tokens_to_ids(["<|eos|>", "<|im_end|>"])
    assert end_of_turn_ids(tokenizer) == set(ids)


def test_only_an_answer_that_ended_keeps_the_end_of_turn_token(tiny_model, monkeypatch):
    """The second answer hit --length: the student must not learn to stop there."""
    _, tokenizer = tiny_model
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    replies = iter(
        [
            ([encode("Hi?"), encode(" Why? ")], [im_end, im_end]),  # the user messages
            ([encode("Hello."), encode("Because")], [im_end, None]),  # the answers
        ]
    )
    monkeypatch.setattr(chat_data, "sample_rows", lambda *a, **k: next(replies))
    opts = SampleOptions("m", "o.jsonl", 1, batch_size=2, chat=True)
    done, cut = chat_batch(None, tokenizer, opts, seed=0)
    assert done == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>"
    assert cut == "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\nBecause"


def test_sample_rows_cut_each_row_at_its_first_stop_token(tiny_model):
    model, tokenizer = tiny_model
    ids = torch.tensor([tokenizer("abc", add_special_tokens=False)["input_ids"]] * 2)
    greedy = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    greedy = greedy[0, ids.shape[1] :].tolist()
    stop = greedy[3]
    opts = SampleOptions("m", "o.jsonl", 1, top_p=1e-6)  # a one-token nucleus: greedy
    rows, ends = sample_rows(model, ids, torch.ones_like(ids), 6, opts, None, {stop})
    first = greedy.index(stop)
    assert rows == [greedy[:first]] * 2 and ends == [stop, stop]
    rows, ends = sample_rows(model, ids, torch.ones_like(ids), 6, opts, None, {10_000})
    assert rows == [greedy] * 2 and ends == [None, None]


def test_a_model_without_a_chat_template_is_refused(tiny_model, tmp_path, capsys):
    _, tokenizer = tiny_model
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(SparsecError, match="needs a model whose tokenizer has a chat template"):
        user_turn_prefix(plain)
    from sparsec.models import save_model

    model, _ = tiny_model
    folder = save_model(model, plain, tmp_path / "plain")
    out = tmp_path / "chat.jsonl"
    code = main(["generate-data", str(folder), "--chat", "--tokens", "10", "-o", str(out)])
    assert code == 1 and "chat template" in capsys.readouterr().err
    assert not out.exists() or out.read_text() == ""


def test_answer_perplexity_scores_only_the_answers(tiny_model):
    model, tokenizer = tiny_model
    assert generation_prompt(tokenizer) == "<|im_start|>assistant\n"
    prompt = "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    conversations = [prompt + "Hello there.<|im_end|>", prompt + "Bye"]
    nll, count = 0.0, 0
    for text in conversations:  # the same by hand, one token at a time
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(text[len(prompt) :], add_special_tokens=False)["input_ids"]
        for i, target in enumerate(a):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + a[:i]])).logits[0, -1]
            nll -= torch.log_softmax(logits.float(), -1)[target].item()
            count += 1
    expected = torch.tensor(nll / count).exp().item()
    assert answer_perplexity(model, tokenizer, conversations) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(SparsecError, match="no assistant turn"):
        answer_perplexity(model, tokenizer, ["plain text"])


def test_prompts_with_chat_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "chat.jsonl"
    argv = ["generate-data", str(tiny_model_dir), "--chat", "--prompts", "x.txt"]
    code = main([*argv, "--tokens", "10", "-o", str(out)])
    assert code == 1 and "--prompts is not used with --chat" in capsys.readouterr().err
    assert not out.exists()
