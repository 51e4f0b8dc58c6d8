"""``sparsec generate-data``: text sampled from a model, for data-free distillation.

Distillation only teaches the student what the training text exercises. When the text
at hand is narrow (here: Python docs and fortunes), the student recovers on that domain
and not on others (held-out narrative prose). Text sampled from the dense teacher covers
what the teacher knows, whatever files are available: the data-free recipe of LLM-QAT
(Liu et al. 2023). Measured here it did not help SquareHead distillation (see
docs/sparsify.md). Each sample starts from an opener, the first few words of a random
line of the ``prompts`` sources, and continues for ``length`` tokens sampled at
``temperature`` from the nucleus ``top_p`` of the 64 likeliest tokens. With ``chat``
the samples are instead whole chat turns, the user's message and the answer both
sampled from the teacher (chat_data.py).

Records (``{"text": ...}``, one a line, what ``--train FILE.jsonl`` reads) are appended
as each batch finishes, so an interrupted run keeps what it made and ``resume``
continues it; batch ``i`` is sampled from seed ``(seed, i)``, so a resumed file equals
an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsec.errors import SparsecError
from sparsec.sparsify.checkpoint import GracefulInterrupt
from sparsec.sparsify.data import read_corpus
from sparsec.sparsify.task import left_padded
from sparsec.sparsify.train import require_bf16_cpu

OPENER_WORDS = (3, 8)  # an opener is this many words, inclusive
TOP_K = 64  # candidates per token before the top-p cut


@dataclass
class SampleOptions:
    model: str
    output: Path
    tokens: int  # stop once the file holds at least this many tokens
    prompts: tuple[str, ...] = ("builtin:fortunes", "builtin:python-docs")
    length: int = 256  # tokens sampled after each opener
    batch_size: int = 16
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0
    bf16: bool = False  # sample under bfloat16 autocast (see train.py)
    chat: bool = False  # chat turns instead of continued openers (chat_data.py)
    resume: bool = False
    quiet: bool = False


def opener_lines(sources: tuple[str, ...] | list[str]) -> list[list[str]]:
    """The words of every line of ``sources`` long enough to cut an opener from."""
    lines = []
    for source in sources:
        for doc in read_corpus(source).documents:
            lines.extend(line.split() for line in doc.splitlines())
    lines = [words for words in lines if len(words) >= OPENER_WORDS[1]]
    if not lines:
        raise SparsecError(
            f"no line of {', '.join(sources)} has {OPENER_WORDS[1]} words to start a sample "
            "from; pass --prompts with some prose"
        )
    return lines


def openers(lines: list[list[str]], count: int, seed: int) -> list[str]:
    """``count`` openers: the first 3 to 8 words of random lines."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(lines)[: rng.randint(*OPENER_WORDS)]) for _ in range(count)]


def _check(opts: SampleOptions) -> None:
    if opts.output.suffix != ".jsonl":
        raise SparsecError(f"-o {opts.output}: the output is a .jsonl file (one sample a line)")
    for name in ("tokens", "length", "batch_size"):
        if getattr(opts, name) < 1:
            raise SparsecError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.temperature <= 0 or not 0 < opts.top_p <= 1:
        raise SparsecError("--temperature must be > 0 and --top-p in (0, 1]")
    if opts.output.exists() and not opts.resume:
        raise SparsecError(
            f"{opts.output} exists; pass --resume to add to it up to --tokens, or delete it"
        )
    if opts.resume and not opts.output.exists():
        raise SparsecError(f"--resume: {opts.output} does not exist")


def _existing(path: Path, tokenizer) -> tuple[int, int]:
    """(records, tokens) already in ``path``."""
    if not path.exists():
        return 0, 0
    records = [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    return len(records), _count_tokens(tokenizer, records)


def _count_tokens(tokenizer, texts: list[str]) -> int:
    # Counted on the written text, so a resumed run stops where an uninterrupted one does.
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def sample_next(logits: torch.Tensor, opts: SampleOptions, generator) -> torch.Tensor:
    """``[batch]`` tokens drawn from ``[batch, vocab]`` logits: temperature, then the
    ``TOP_K`` most likely tokens, then the smallest prefix of them holding ``top_p``.

    Cutting to the top k first keeps the sort and the random draw to k entries a row;
    over a 49k vocabulary the full-width versions took most of a decode step.
    """
    values, index = (logits.float() / opts.temperature).topk(min(TOP_K, logits.shape[-1]))
    probs = values.softmax(-1)
    keep = probs.cumsum(-1) - probs < opts.top_p  # the first token is always kept
    choice = torch.multinomial(probs * keep, 1, generator=generator)
    return index.gather(1, choice).squeeze(1)


@torch.no_grad()
def sample_rows(model, ids, mask, length: int, opts: SampleOptions, generator, stop: set[int]):
    """Up to ``length`` tokens sampled after each left-padded row of ``ids``; each row is
    cut before its first ``stop`` token. Returns ``(rows, ends)``: the token lists and
    the stop token that ended each row (None for a row cut at ``length``)."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    new, cache, step_ids = [], None, ids
    stops, done = torch.tensor(sorted(stop)), torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts.bf16):
        for _ in range(length):
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            step_ids = sample_next(out.logits[:, -1], opts, generator)[:, None]
            new.append(step_ids)
            mask = torch.cat([mask, torch.ones_like(step_ids)], 1)
            positions = positions[:, -1:] + 1
            done |= torch.isin(step_ids[:, 0], stops)
            if done.all():
                break
    rows, ends = [], []
    for row in torch.cat(new, 1).tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), None)
        rows.append(row if cut is None else row[:cut])
        ends.append(None if cut is None else row[cut])
    return rows, ends


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _sample_batch(model, tokenizer, prompts: list[str], opts: SampleOptions, seed: int):
    ids, mask = left_padded(tokenizer, prompts, pad_id(tokenizer))
    generator = torch.Generator().manual_seed(seed)
    # A row that ended goes on sampling: it is cut at its end token.
    rows, _ = sample_rows(model, ids, mask, opts.length, opts, generator, {tokenizer.eos_token_id})
    pairs = zip(prompts, rows, strict=True)
    return [p + tokenizer.decode(r, skip_special_tokens=True) for p, r in pairs]


def generate_corpus(opts: SampleOptions) -> dict:
    """Append samples to ``opts.output`` until it holds ``opts.tokens`` tokens."""
    from tqdm import tqdm

    from sparsec.models import load_model

    opts.output = Path(opts.output)
    _check(opts)
    if opts.bf16:
        require_bf16_cpu()
    model, tokenizer = load_model(opts.model, quiet=opts.quiet)
    model.eval()
    records, made = _existing(opts.output, tokenizer)
    if records % opts.batch_size:
        raise SparsecError(
            f"{opts.output} holds {records} samples, not whole batches of --batch-size "
            f"{opts.batch_size}; resume with the --batch-size that made it"
        )
    batch = records // opts.batch_size
    if opts.chat:
        from sparsec.sparsify.chat_data import chat_batch, user_turn_prefix

        user_turn_prefix(tokenizer)  # a model without a chat template fails before sampling

        def make_batch(seed: int) -> list[str]:
            return chat_batch(model, tokenizer, opts, seed)
    else:
        lines = opener_lines(opts.prompts)

        def make_batch(seed: int) -> list[str]:
            prompts = openers(lines, opts.batch_size, seed)
            return _sample_batch(model, tokenizer, prompts, opts, seed)

    opts.output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=opts.tokens,
        initial=min(made, opts.tokens),
        desc="sampling",
        unit="tok",
        disable=opts.quiet,
        file=sys.stderr,
    )
    with bar, GracefulInterrupt() as interrupt, opts.output.open("a", encoding="utf-8") as f:
        while made < opts.tokens:
            batch_seed = opts.seed * 1_000_003 + batch
            texts = make_batch(batch_seed)
            tokens = _count_tokens(tokenizer, texts)
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
            f.flush()
            batch, records, made = batch + 1, records + len(texts), made + tokens
            bar.update(min(tokens, opts.tokens - bar.n))
            if interrupt.requested and made < opts.tokens:
                print(
                    f"\ninterrupted: {records} samples ({made} tokens) kept in {opts.output}; "
                    "run the same command with --resume to continue",
                    file=sys.stderr,
                )
                raise KeyboardInterrupt
    return {"output": str(opts.output), "samples": records, "tokens": made}
