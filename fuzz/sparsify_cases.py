"""Sparsify cases: ``sparsec sparsify`` with bad arguments on a tiny Hugging Face folder.

The base command is cheap and valid (the tiny random Llama, a small text file, two
calibration samples of 16 tokens, 64 eval tokens); a case replaces 1-2 options (or
the model/output paths) with bad values. Expected: a one-line error up front (exit 1,
or exit 2 from argparse), within ``WORK_SECONDS``: a bad argument that is noticed only
after real work has started, or that makes the run take long, is a finding (``hang``).
When the changed options happen to be valid, the run must finish (exit 0) with a
complete output folder. The input folder must never change, and nothing may be
written into it (``overwrote``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fuzz import proc
from fuzz.common import check_unchanged, file_digest
from fuzz.runner import OK, OVERWROTE, WRONG, Finding

NAME = "sparsify"
TIMEOUT = 150.0
SHARE = 0.10
ESTIMATE = 3.0
WORK_SECONDS = 60.0  # a fully valid tiny run takes a few seconds

OPTIONS = {
    "--sparsity": ["1.0", "-0.5", "nan", "inf", "abc", "", "1e-320", "0.995", "-0"],
    "--pattern": ["3:5", "2:4", "0:4", "4:2", "a:b", "block0", "block17", "", "-1:4", "2:0"],
    "--method": ["foo", ""],
    "--layer-sparsity": ["foo"],
    "--owl-lambda": ["-1", "nan", "10", "inf"],
    "--calibration": ["@missing", "@dir", "@empty", "@binary", "builtin:nope", "@badjsonl"],
    "--calibration-samples": ["0", "-1", "1000000000", "1.5"],
    "--calibration-seq-len": ["0", "-1", "1000000000", "1"],
    "--train": ["@missing", "@empty"],
    "--steps": ["-1", "nan"],
    "--lr": ["nan", "-1", "inf", "0"],
    "--batch-size": ["0", "-1"],
    "--seq-len": ["0", "-1", "1"],
    "--example-share": ["-0.1", "1.5", "nan"],
    "--teacher": ["@missing", "@file", "@output"],
    "--output-loss": ["foo"],
    "--qat-steps": ["-1", "5"],
    "--eval": ["@missing", "@empty"],
    "--eval-tokens": ["0", "-1"],
    "--eval-every": ["-1"],
    "--seed": ["-1", "18446744073709551617"],
    "--checkpoint-dir": ["@file", "@model"],
    "--checkpoint-every": ["-1", "nan", "inf"],
    "--resume": [None],
    "--int8": [None],
    "MODEL": ["@missing", "@file", "@emptydir", "@badconfig", "@so"],
    "OUTPUT": ["@model", "@file", "@parent", "", "@existing"],
}


def _files(workdir: Path, ctx) -> dict[str, Path]:
    text = workdir / "text.txt"
    shutil.copyfile(ctx.cache / "text.txt", text)
    empty = workdir / "empty.txt"
    empty.write_text("")
    binary = workdir / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    badjsonl = workdir / "bad.jsonl"
    badjsonl.write_text('{"text": 1}\n{broken\n')
    return {"text": text, "empty": empty, "binary": binary, "badjsonl": badjsonl}


def run(rng, ctx, workdir, rep):
    workdir = Path(workdir)
    files = _files(workdir, ctx)
    model = workdir / "hf"
    shutil.copytree(ctx.cache / "hf", model)
    out = workdir / "out"
    text = str(files["text"])
    args = {
        "MODEL": str(model),
        "OUTPUT": str(out),
        "--sparsity": "0.5",
        "--calibration": text,
        "--calibration-samples": "2",
        "--calibration-seq-len": "16",
        "--train": text,
        "--eval": text,
        "--eval-tokens": "64",
        "--seq-len": "16",
        "--batch-size": "1",
    }
    changed = rng.sample(sorted(OPTIONS), rng.choice([1, 1, 1, 2]))
    special = {
        "missing": str(workdir / "missing"),
        "dir": str(workdir),
        "empty": str(files["empty"]),
        "binary": str(files["binary"]),
        "badjsonl": str(files["badjsonl"]),
        "file": str(files["text"]),
        "output": str(out),
        "model": str(model),
        "emptydir": str(_mkdir(workdir / "emptydir")),
        "badconfig": str(_bad_model(workdir / "badmodel")),
        "so": str(ctx.artifact("fp32")),
        "parent": str(workdir),
        "existing": str(_mkdir(workdir / "existing", with_file=True)),
    }
    flags = []
    for key in changed:
        value = rng.choice(OPTIONS[key])
        if isinstance(value, str) and value.startswith("@"):
            value = special[value[1:]]
        if value is None:
            flags.append(key)
        else:
            args[key] = value
    if "--qat-steps" in changed:
        args.setdefault("--steps", "2")
    argv = [*ctx.sparsec_cmd(), "sparsify", args.pop("MODEL"), "-o", args.pop("OUTPUT")]
    for key, value in args.items():
        argv += [key, value]
    argv += [*flags, "--quiet"]
    rep.describe("+".join(k.lstrip("-") for k in changed), proc._show(argv))
    keep = workdir / "existing" / "keep.txt"  # a file of the user's in an existing folder
    protected = {p: file_digest(p) for p in (model, files["text"], keep)}
    output = Path(argv[argv.index("-o") + 1]) if argv[argv.index("-o") + 1] else None
    ran = proc.run(argv, workdir, WORK_SECONDS)
    for path, digest in protected.items():
        if path == output and ran.returncode == 0:
            raise Finding(OVERWROTE, f"sparsify wrote its output over its input {path.name}")
        check_unchanged(path, digest, "the input")
    outcome, detail = proc.judge(ran)
    if outcome == OK and output is not None and ran.returncode == 0:
        if not (output / "model.safetensors").is_file():
            raise Finding(WRONG, f"exit 0 but no {output}/model.safetensors")
    left = proc.temp_leftovers(workdir, set())
    if left:
        raise Finding(WRONG, f"left temporary files: {left[:5]}")
    return outcome, detail


def _mkdir(path: Path, with_file: bool = False) -> Path:
    path.mkdir(exist_ok=True)
    if with_file:
        (path / "keep.txt").write_text("keep me")
    return path


def _bad_model(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama", "vocab_size": -5}')
    return path


__all__ = ["OK", "run"]
