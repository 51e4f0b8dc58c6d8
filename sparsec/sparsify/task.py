"""The GSM-style demo task: GSM-Symbolic problems, 0-shot greedy exact match.

``reasoning-gym`` ships GSM-Symbolic: templates derived from GSM8K problems that draw
fresh numbers and names, each with a step-by-step answer ending in ``#### n``. Training
and evaluation use disjoint templates (every fifth usable template is held out), so a
model is scored on problem types it never saw in fine-tuning or distillation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from random import Random

import torch
from torch import nn

from sparsec.errors import SparsecError

EVAL_EVERY = 5  # every fifth template is an evaluation template
ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


@dataclass
class Example:
    template: int
    prompt: str  # "Question: ...\nAnswer:"
    solution: str  # worked steps ending in "#### n"
    answer: str  # n


def _generators():
    try:
        from reasoning_gym.arithmetic.gsm_symbolic import gsm_symbolic as gsm
    except ImportError as e:
        raise SparsecError("the GSM task needs reasoning-gym: pip install reasoning-gym") from e
    dataset = gsm.GSMSymbolicDataset(gsm.GSMSymbolicDatasetConfig(size=1, seed=0))
    return gsm.tasks_ok, dataset.generators


def template_split(split: str) -> list[int]:
    usable, _ = _generators()
    held_out = usable[::EVAL_EVERY]
    if split == "eval":
        return list(held_out)
    if split == "train":
        return [t for t in usable if t not in held_out]
    raise ValueError(split)


def gsm_examples(split: str, count: int, seed: int = 0) -> list[Example]:
    """``count`` problems from the ``split`` templates, deterministic in ``seed``."""
    _, generators = _generators()
    templates = template_split(split)
    offset = 0 if split == "train" else 10_000_000
    examples = []
    for i in range(count):
        template = templates[i % len(templates)]
        raw = generators[template](Random(seed * 1_000_003 + offset + i), 1.0)
        cot = raw["metadata"]["answer_cot"].strip()
        examples.append(
            Example(template, f"Question: {raw['question']}\nAnswer:", cot, str(raw["answer"]))
        )
    return examples


def extract_answer(text: str) -> str | None:
    match = ANSWER.search(text)
    return match[1].replace(",", "") if match else None


def _same_number(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def left_padded(tokenizer, prompts: list[str], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``prompts``, padded on the left so that every
    row's next token comes right after its own prompt."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, width - len(e) :] = torch.tensor(e)
        mask[row, width - len(e) :] = 1
    return ids, mask


def score_completion(text: str, example: Example) -> bool:
    """Whether the completion's final ``#### n`` equals the example's answer."""
    text = text.split("Question:")[0]  # the model may go on with a new problem
    return _same_number(extract_answer(text), example.answer)


@torch.no_grad()
def gsm_accuracy(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int = 160,
    batch_size: int = 16,
) -> float:
    """Exact match of the final number after ``####``, greedy, 0-shot, batched."""
    model.eval()
    correct = 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(examples), batch_size):
        group = examples[start : start + batch_size]
        ids, mask = left_padded(tokenizer, [ex.prompt for ex in group], pad)
        width = ids.shape[1]
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            stop_strings=["Question:"],  # a batch ends once every row starts a new problem
            tokenizer=tokenizer,
        )
        for row, ex in enumerate(group):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            correct += score_completion(text, ex)
    return correct / len(examples)
