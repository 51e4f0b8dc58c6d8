"""Data sources, training batches and the GSM-style task scoring."""

from __future__ import annotations

import json

import pytest
import torch

from sparsec.errors import SparsecError
from sparsec.sparsify.data import TokenData, read_corpus
from sparsec.sparsify.perplexity import perplexity
from sparsec.sparsify.task import (
    Example,
    extract_answer,
    gsm_accuracy,
    gsm_examples,
    score_completion,
    template_split,
)


def test_jsonl_records_are_examples(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"text": "plain record"}, {"question": "1+1?", "answer": "2\n#### 2"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    corpus = read_corpus(str(path))
    assert corpus.examples
    assert corpus.documents == ["plain record", "Question: 1+1?\nAnswer: 2\n#### 2"]
    path.write_text("{not json\n")
    with pytest.raises(SparsecError, match="d.jsonl:1: not valid JSON"):
        read_corpus(str(path))


def test_missing_and_unknown_sources():
    with pytest.raises(SparsecError, match="does not exist"):
        read_corpus("/no/such/file.txt")
    with pytest.raises(SparsecError, match="unknown built-in"):
        read_corpus("builtin:wikipedia")


def test_batches_are_deterministic_and_padded(tiny_model, tmp_path):
    _, tokenizer = tiny_model
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": "x" * n}) for n in (3, 9, 20)))
    data = TokenData(tokenizer, [str(path)])
    ids, mask = data.batch(step=5, size=4, seq_len=16, seed=1)
    ids2, mask2 = data.batch(step=5, size=4, seq_len=16, seed=1)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    assert ids.shape[1] <= 16
    lengths = mask.sum(1)
    for row in range(4):  # right padding: real tokens first, then nothing but padding
        assert mask[row, : lengths[row]].all() and not mask[row, lengths[row] :].any()
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 20)
    windows = TokenData(tokenizer, [str(text)]).windows(3, 32, seed=0)
    assert windows.shape == (3, 32)


def test_examples_cut_by_seq_len_are_reported(tiny_model, tmp_path):
    _, tokenizer = tiny_model
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": "x" * n}) for n in (3, 30, 40)))
    data = TokenData(tokenizer, [str(path)])
    assert data.truncation_note(64) is None
    assert "2 of 3 training examples are longer than --seq-len 16" in data.truncation_note(16)


def test_mixed_sources_train_on_examples_and_text_by_token_share(tiny_model, tmp_path):
    _, tokenizer = tiny_model
    examples = tmp_path / "e.jsonl"
    examples.write_text("\n".join(json.dumps({"text": "q" * 10}) for _ in range(20)))  # 200
    text = tmp_path / "t.txt"
    text.write_text("z" * 599)  # 600 tokens with eos: examples are 1/4 of the tokens
    data = TokenData(tokenizer, [str(examples), str(text)])
    assert data.example_share == pytest.approx(0.25)
    q, z = tokenizer.convert_tokens_to_ids(["q", "z"])
    rows = torch.cat([data.batch(step, 8, 16, seed=0)[0] for step in range(50)])
    from_text = (rows[:, 0] == z).float().mean().item()
    assert (rows[:, 0] == q).any() and 0.6 < from_text < 0.9
    assert ((rows == q).any(1) & (rows == z).any(1)).sum() == 0  # a row is one or the other


def test_example_share_sets_the_mix_and_needs_both_kinds(tiny_model, tmp_path):
    _, tokenizer = tiny_model
    examples = tmp_path / "e.jsonl"
    examples.write_text("\n".join(json.dumps({"text": "q" * 10}) for _ in range(20)))
    text = tmp_path / "t.txt"
    text.write_text("z" * 599)
    data = TokenData(tokenizer, [str(examples), str(text)], example_share=0.75)
    q = tokenizer.convert_tokens_to_ids("q")
    first = torch.cat([data.batch(step, 8, 16, seed=0)[0][:, 0] for step in range(50)])
    assert 0.65 < (first == q).float().mean().item() < 0.85  # 0.25 by token share
    with pytest.raises(SparsecError, match="between 0 and 1, got 1.5"):
        TokenData(tokenizer, [str(examples), str(text)], example_share=1.5)
    with pytest.raises(SparsecError, match=r"t.txt is only running text: drop --example-share"):
        TokenData(tokenizer, [str(text)], example_share=0.5)
    with pytest.raises(SparsecError, match=r"is only examples \(.jsonl\)"):
        TokenData(tokenizer, [str(examples)], example_share=0.5)


def test_text_records_are_trained_as_written(tiny_model, tmp_path):
    """A {"text"} record gets no end-of-text token (generate-data --chat writes its own
    where an answer ended); a question/answer record and running text do."""
    _, tokenizer = tiny_model
    path = tmp_path / "d.jsonl"
    records = [
        {"text": "cut off mid"},
        {"text": "done<|im_end|>"},
        {"question": "q", "answer": "a"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    text = tmp_path / "t.txt"
    text.write_text("running")
    data = TokenData(tokenizer, [str(path), str(text)])
    eos, im_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    cut, done, qa = data.examples
    assert cut == tokenizer("cut off mid", add_special_tokens=False)["input_ids"]
    assert done[-1] == im_end and eos not in done  # the special token is one token
    assert qa[-1] == eos
    assert data.text.tolist()[-1] == eos


def test_perplexity_matches_direct_computation(tiny_model):
    model, _ = tiny_model
    tokens = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(0))
    nll, count = 0.0, 0
    for start in range(0, 70, 32):  # windows 32, 32, 6
        w = tokens[start : start + 32].unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=w).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
        count += w.shape[1] - 1
    expected = torch.exp(torch.tensor(nll / count)).item()
    assert perplexity(model, tokens, seq_len=32) == pytest.approx(expected, rel=1e-5)


def test_gsm_templates_are_disjoint_and_examples_deterministic():
    train, held_out = set(template_split("train")), set(template_split("eval"))
    assert train and held_out and not train & held_out
    a, b = gsm_examples("eval", 5, seed=3), gsm_examples("eval", 5, seed=3)
    assert a == b
    assert all(ex.template in held_out for ex in a)
    assert all(extract_answer(ex.solution) == ex.answer.replace(",", "") for ex in a)
    assert {ex.template for ex in gsm_examples("train", 40)} <= train


def test_extract_answer():
    assert extract_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert extract_answer("#### 1,250 apples") == "1250"
    assert extract_answer("#### -3.5") == "-3.5"
    assert extract_answer("the answer is 7") is None


def test_score_completion_ignores_a_next_problem():
    ex = Example(0, "Question: q\nAnswer:", "#### 7", "7")
    assert score_completion(" 3 + 4 = 7\n#### 7.0", ex)
    assert not score_completion(" 3 + 4 = 8\n#### 8\nQuestion: r\nAnswer: #### 7", ex)
    assert not score_completion(" no number", ex)


class ScriptedModel(torch.nn.Module):
    """Answers every prompt with a fixed continuation, to test the scoring loop."""

    def __init__(self, tokenizer, replies):
        super().__init__()
        self.tokenizer, self.replies = tokenizer, replies

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for row in range(input_ids.shape[0]):
            reply = self.tokenizer(self.replies.pop(0), add_special_tokens=False)["input_ids"]
            rows.append(torch.cat([input_ids[row], torch.tensor(reply)]))
        width = max(r.numel() for r in rows)
        pad = self.tokenizer.eos_token_id
        return torch.stack(
            [torch.nn.functional.pad(r, (0, width - r.numel()), value=pad) for r in rows]
        )


def test_gsm_accuracy_scores_the_final_number(tiny_model):
    _, tokenizer = tiny_model
    examples = [Example(0, f"Question: q{i}\nAnswer:", "", str(i)) for i in range(5)]
    replies = [
        " 0 + 0 = 0\n#### 0",  # right
        " #### 1\nQuestion: next\n#### 9",  # right; the made-up next problem is ignored
        " #### 3",  # wrong
        " no final line",  # wrong
        " #### 4.0",  # right: numbers compare as numbers
    ]
    model = ScriptedModel(tokenizer, replies)
    assert gsm_accuracy(model, tokenizer, examples, batch_size=2) == pytest.approx(3 / 5)
