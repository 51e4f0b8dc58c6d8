"""Chat turns sampled from an instruction-tuned teacher (``generate-data --chat``).

Distilling a chat model on plain text keeps its perplexity but loses its chat behaviour:
the sparse SmolLM2 students answered "What is the capital of France?" with loops of
"the capital of France". Chat turns in the training data put the student where the
teacher's answers are made. Nothing but the teacher is needed (Magpie, Xu et al. 2024):

1. the teacher writes the user's message: it is given its chat template up to where a
   user message begins, and samples until its end-of-turn token;
2. it answers that message, wrapped in its template with the generation prompt.

Each record is the whole conversation as the template renders it, the answer followed
by the end-of-turn token when the teacher ended it (an answer cut at ``--length`` has
none, so the student is not taught to stop mid-sentence).
"""

from __future__ import annotations

import math

import torch

from sparsec.errors import SparsecError
from sparsec.sparsify.task import left_padded
from sparsec.sparsify.teacher_text import SampleOptions, pad_id, sample_rows

QUERY_LENGTH = 96  # tokens at most in a sampled user message
_MARK = "\x00sparsec-user-message\x00"


def _rendered(tokenizer, generation_prompt: bool = False) -> str:
    """The chat template rendered for one user message, ``_MARK``."""
    if not getattr(tokenizer, "chat_template", None):
        raise SparsecError(
            "--chat needs a model whose tokenizer has a chat template (an instruction-tuned "
            "model); this one has none"
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARK}],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )
    if _MARK not in rendered:
        raise SparsecError("the model's chat template does not render the user's message")
    return rendered


def user_turn_prefix(tokenizer) -> str:
    """The rendered template up to where the user's message text begins (with the
    template's default system prompt, if it has one)."""
    rendered = _rendered(tokenizer)
    return rendered[: rendered.index(_MARK)]


def end_of_turn_ids(tokenizer) -> set[int]:
    """Tokens that end a turn: the end-of-text token and, when the template has one, the
    token right after a message's text (``<|im_end|>`` in ChatML)."""
    stop = {tokenizer.eos_token_id}
    rendered = _rendered(tokenizer)
    after = rendered[rendered.index(_MARK) + len(_MARK) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    added = tokenizer.added_tokens_decoder  # id -> AddedToken, the special tokens among them
    if ids and ids[0] in added and added[ids[0]].special:
        stop.add(ids[0])
    return stop


def chat_batch(model, tokenizer, opts: SampleOptions, seed: int) -> list[str]:
    """``opts.batch_size`` conversations: sampled user messages and the teacher's answers."""
    stop = end_of_turn_ids(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    prefix = tokenizer(user_turn_prefix(tokenizer), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prefix] * opts.batch_size)
    rows, _ = sample_rows(model, ids, torch.ones_like(ids), QUERY_LENGTH, opts, generator, stop)
    questions = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    ids, mask = left_padded(tokenizer, prompts, pad_id(tokenizer))
    rows, ends = sample_rows(model, ids, mask, opts.length, opts, generator, stop)
    return [
        prompt
        + tokenizer.decode(row, skip_special_tokens=True)
        + ("" if end is None else tokenizer.convert_ids_to_tokens(end))
        for prompt, row, end in zip(prompts, rows, ends, strict=True)
    ]


def generation_prompt(tokenizer) -> str:
    """What the template adds to open the assistant's turn (``<|im_start|>assistant\\n``)."""
    return _rendered(tokenizer, generation_prompt=True)[len(_rendered(tokenizer)) :]


@torch.no_grad()
def answer_perplexity(model, tokenizer, conversations: list[str]) -> float:
    """Perplexity of the assistant's answers in ``conversations`` (records of
    ``generate-data --chat``), each scored after its prompt: how well a model predicts
    the teacher's answers, the chat behaviour that plain-text perplexity does not see."""
    opening = generation_prompt(tokenizer)
    total, count = 0.0, 0
    for text in conversations:
        if opening not in text:
            raise SparsecError(f"no assistant turn ({opening!r}) in the conversation {text[:60]!r}")
        cut = text.rindex(opening) + len(opening)
        prompt = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
        answer = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
        if not answer:
            continue
        logits = model(input_ids=torch.tensor([prompt + answer]), use_cache=False).logits[0]
        total += torch.nn.functional.cross_entropy(
            logits[len(prompt) - 1 : -1].float(), torch.tensor(answer), reduction="sum"
        ).item()
        count += len(answer)
    if not count:
        raise SparsecError("the conversations hold no answer tokens to score")
    return math.exp(total / count)
