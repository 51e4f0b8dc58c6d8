"""Calibration, training and evaluation data, all offline.

A data source is a path or a built-in name:

* ``*.jsonl``: one JSON object a line, either ``{"text": ...}`` or
  ``{"question": ..., "answer": ...}`` (formatted as ``Question: q\\nAnswer: a``). Each
  record is one example: training pads examples instead of cutting windows across them.
  A question/answer example ends with the end-of-text token; a ``{"text"}`` one is
  trained on exactly as written (``generate-data --chat`` writes the end-of-turn token
  into the text where the teacher ended its answer, and none where it was cut off).
* any other file: plain UTF-8 text, cut into token windows.
* ``builtin:verne``: Jules Verne's "In the year 2889" (shipped by ``reasoning-gym``).
* ``builtin:python-tutorial``: the Python tutorial (Debian ``python3.11-doc``).
* ``builtin:python-docs``: the rest of the Python docs, the tutorial excluded.
* ``builtin:fortunes``: Debian ``fortunes``.
* ``builtin:austen``: Jane Austen's six novels (Debian ``r-cran-janeaustenr``).
* ``builtin:moby-dick``: Melville's *Moby Dick* (Debian ``r-cran-tokenizers``).
* ``builtin:gsm-train`` / ``builtin:gsm-eval``: GSM-Symbolic problems with worked
  answers from disjoint template sets (see ``task.py``).

The defaults calibrate and train on Python docs, fortunes and the two novel sources,
and evaluate on Verne and the tutorial, so that evaluation text is never seen in
calibration or training.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsec.errors import SparsecError

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
FORTUNES = Path("/usr/share/games/fortunes")
# Enough text for an hour of distillation (~0.5 M tokens) without tokenizing 12 MB.
MAX_CHARS_PER_SOURCE = 4_000_000
# One command for every Debian-shipped built-in source, so that a missing one is
# installed together with the others.
DEBIAN_DATA = (
    "apt-get install -y --no-install-recommends python3.11-doc fortunes "
    "r-cran-janeaustenr r-cran-tokenizers"
)

# Technical prose, quotes and novels: each kind recovers its own kind of held-out text
# best (docs/sparsify.md, "narrative prose").
DEFAULT_CALIBRATION = (
    "builtin:python-docs",
    "builtin:fortunes",
    "builtin:austen",
    "builtin:moby-dick",
)
DEFAULT_TRAIN = DEFAULT_CALIBRATION
DEFAULT_EVAL = ("builtin:verne", "builtin:python-tutorial")


@dataclass
class Corpus:
    name: str
    documents: list[str]
    examples: bool  # True: one training example per document; False: running text
    # Indices of the documents trained as written, without an end-of-text token after them.
    as_written: frozenset[int] = frozenset()


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SparsecError(f"built-in data needs {install_hint}")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def _read_files(files: list[Path], what: str, hint: str) -> list[str]:
    if not files:
        raise SparsecError(f"{what} not found; install it with: {hint}")
    texts, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= MAX_CHARS_PER_SOURCE:
            break
    return texts


def _novels(name: str) -> Corpus:
    from sparsec.sparsify.r_data import read_r_data

    if name == "austen":
        books = read_r_data("janeaustenr", DEBIAN_DATA)
        # One string a printed line, "" between paragraphs.
        docs = ["\n".join(map(str, lines)) for _, lines in sorted(books.items())]
    else:
        objects = read_r_data("tokenizers", DEBIAN_DATA)
        if "mobydick" not in objects:
            raise SparsecError(
                f"R package tokenizers has no mobydick data set (it has {', '.join(objects)})"
            )
        docs = [_gutenberg_body(str(objects["mobydick"][0]).replace("\r\n", "\n"))]
    return Corpus(f"builtin:{name}", docs, examples=False)


def _gutenberg_body(text: str) -> str:
    """The book without Project Gutenberg's header and licence."""
    start, end = text.find("*** START OF"), text.find("*** END OF")
    if start < 0 or end < start:
        return text
    return text[text.index("\n", start) + 1 : end].strip()


def _builtin(name: str) -> Corpus:
    if name == "verne":
        path = _package_file(
            "reasoning_gym", "data/in_the_year_2889.txt", "pip install reasoning-gym"
        )
        return Corpus("builtin:verne", [path.read_text(encoding="utf-8")], examples=False)
    if name in ("python-tutorial", "python-docs"):
        files = sorted(PYTHON_DOCS.rglob("*.rst.txt"))
        tutorial = [f for f in files if f.parent.name == "tutorial"]
        chosen = tutorial if name == "python-tutorial" else [f for f in files if f not in tutorial]
        # Shuffle deterministically so a capped read mixes all parts of the docs.
        if name == "python-docs":
            random.Random(0).shuffle(chosen)
        return Corpus(f"builtin:{name}", _read_files(chosen, "the Python docs", DEBIAN_DATA), False)
    if name == "fortunes":
        files = sorted(
            p for p in FORTUNES.glob("*") if p.is_file() and not p.is_symlink() and not p.suffix
        )
        return Corpus("builtin:fortunes", _read_files(files, "fortunes", DEBIAN_DATA), False)
    if name in ("austen", "moby-dick"):
        return _novels(name)
    if name in ("gsm-train", "gsm-eval"):
        from sparsec.sparsify.task import gsm_examples

        split = name.removeprefix("gsm-")
        docs = [ex.prompt + " " + ex.solution for ex in gsm_examples(split, 2000, seed=0)]
        return Corpus(f"builtin:{name}", docs, examples=True)
    raise SparsecError(
        f"unknown built-in data builtin:{name}; use verne, python-tutorial, python-docs, "
        "fortunes, austen, moby-dick, gsm-train or gsm-eval"
    )


def read_corpus(source: str) -> Corpus:
    """Read one data source; missing or empty sources raise SparsecError."""
    if source.startswith("builtin:"):
        return _builtin(source.removeprefix("builtin:"))
    path = Path(source)
    if path.is_dir():
        raise SparsecError(f"data file {source} is a folder; pass the files in it")
    if not path.is_file():
        raise SparsecError(f"data file {source} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SparsecError(f"cannot read data file {source}: {e.strerror or e}") from e
    if path.suffix == ".jsonl":
        docs, as_written = [], set()
        for number, line in enumerate(_utf8_text(raw, source).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SparsecError(f"{source}:{number}: not valid JSON ({e.msg})") from e
            except RecursionError as e:
                raise SparsecError(
                    f"{source}:{number}: the JSON is nested too deeply to read; each line "
                    'must be an object such as {"text": ...}'
                ) from e
            except ValueError as e:  # such as an integer of more than 4300 digits
                raise SparsecError(f"{source}:{number}: not valid JSON ({e})") from e
            text, written = _record_text(record, f"{source}:{number}")
            if written:
                as_written.add(len(docs))
            docs.append(text)
        corpus = Corpus(source, docs, examples=True, as_written=frozenset(as_written))
    else:
        corpus = Corpus(source, [raw.decode("utf-8", errors="replace")], False)
    if not any(doc.strip() for doc in corpus.documents):
        raise SparsecError(f"data file {source} is empty; pass a file with some text")
    return corpus


def _utf8_text(raw: bytes, source: str) -> str:
    """``raw`` decoded as UTF-8 (a leading byte-order mark dropped), or SparsecError
    naming the line and the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SparsecError(
            f"{source}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from e


def _record_text(record: object, where: str) -> tuple[str, bool]:
    """The record's text, and whether it is trained as written (a ``{"text"}`` record)."""
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"], True
    if isinstance(record, dict) and "question" in record and "answer" in record:
        return f"Question: {record['question']}\nAnswer: {record['answer']}", False
    raise SparsecError(f"{where}: expected an object with 'text' or 'question' and 'answer'")


def check_share(share: float) -> float:
    """``share`` if it is a fraction (NaN is not)."""
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise SparsecError(f"--example-share must be between 0 and 1, got {share}")
    return share


def check_example_share(share: float, corpora: list[Corpus]) -> float:
    """``share`` if it is a fraction and ``corpora`` mix examples with running text."""
    check_share(share)
    kinds = {c.examples for c in corpora}
    if kinds != {True, False}:
        only = "examples (.jsonl)" if True in kinds else "running text"
        raise SparsecError(
            "--example-share sets how often a training row is a .jsonl example rather than "
            f"running text; the training data {', '.join(c.name for c in corpora)} is only "
            f"{only}: drop --example-share or add the other kind"
        )
    return share


class TokenData:
    """The tokenized sources: one running token stream plus the separate examples."""

    def __init__(
        self,
        tokenizer,
        sources: list[str] | tuple[str, ...],
        example_share: float | None = None,
    ):
        """``example_share``: the fraction of training rows that are examples, when the
        sources mix examples and running text (default: the examples' share of tokens)."""
        if not sources:
            raise SparsecError("no data sources given")
        self.eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        stream: list[int] = []
        text: list[int] = []  # the running-text sources only
        self.examples: list[list[int]] = []
        corpora = [read_corpus(source) for source in sources]
        for corpus in corpora:
            for number, doc in enumerate(corpus.documents):
                ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
                if number not in corpus.as_written:
                    ids.append(self.eos)
                if corpus.examples:
                    self.examples.append(ids)
                else:
                    text.extend(ids)
                stream.extend(ids)
        self.stream = torch.tensor(stream, dtype=torch.long)
        self.text = torch.tensor(text, dtype=torch.long)
        if self.stream.numel() < 2:
            raise SparsecError(f"data {', '.join(sources)} holds no text")
        # With both kinds of source, a batch row is an example with this probability (by
        # default the examples' share of all tokens) and a running-text window otherwise.
        if example_share is not None:
            self.example_share = check_example_share(example_share, corpora)
        elif self.text.numel() < 2:
            self.example_share = 1.0
        else:
            self.example_share = sum(map(len, self.examples)) / len(stream)

    def truncation_note(self, seq_len: int) -> str | None:
        """A line for the log when training cuts examples to ``seq_len`` tokens."""
        long = sum(len(e) > seq_len for e in self.examples)
        if not long:
            return None
        return (
            f"note: {long} of {len(self.examples)} training examples are longer than "
            f"--seq-len {seq_len}; training sees only their first {seq_len} tokens (pass "
            "long samples as a plain text file to train on windows from all of them)"
        )

    def windows(self, count: int, seq_len: int, seed: int) -> torch.Tensor:
        """``count`` random windows of ``seq_len`` tokens from the stream (calibration)."""
        seq_len = min(seq_len, self.stream.numel())
        rng = random.Random(seed)
        starts = [rng.randrange(0, self.stream.numel() - seq_len + 1) for _ in range(count)]
        return torch.stack([self.stream[s : s + seq_len] for s in starts])

    def batch(self, step: int, size: int, seq_len: int, seed: int):
        """Training batch number ``step``: the same for the same arguments (resumable).

        Returns ``(input_ids, token_mask)``; examples are right-padded, text windows full.
        """
        rng = random.Random(seed * 1_000_003 + step)
        if not self.examples:
            ids = self.windows(size, seq_len, rng.randrange(2**31))
            return ids, torch.ones_like(ids)
        picked = []
        for _ in range(size):
            if self.example_share == 1.0 or rng.random() < self.example_share:
                picked.append(self.examples[rng.randrange(len(self.examples))][:seq_len])
            else:
                length = min(seq_len, self.text.numel())
                start = rng.randrange(0, self.text.numel() - length + 1)
                picked.append(self.text[start : start + length].tolist())
        width = max(len(p) for p in picked)
        ids = torch.full((size, width), self.eos, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        for row, example in enumerate(picked):
            ids[row, : len(example)] = torch.tensor(example)
            mask[row, : len(example)] = 1
        return ids, mask
