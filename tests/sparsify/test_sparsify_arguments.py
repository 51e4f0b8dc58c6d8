"""``sparsec sparsify`` refuses bad input with one clear line, before any work.

Every case here fails before a model is loaded (``load_model`` is made to fail the test)
or tests the failing piece directly, so the file runs in a few seconds.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

from sparsec import cli
from sparsec.arguments import FRACTION, POSITIVE_FLOAT, POSITIVE_INT, SEED, Range, check_ranges
from sparsec.errors import SparsecError
from sparsec.sparsify import checkpoint as checkpoint_mod
from sparsec.sparsify import data as data_mod
from sparsec.sparsify import pipeline
from sparsec.sparsify.checkpoint import Checkpoint


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: each check must come before that work."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("sparsec.models.load_model", fail)


def sparsify_cli(model_dir, text_file, out, *extra) -> list[str]:
    data = ["--calibration", str(text_file), "--train", str(text_file), "--eval", str(text_file)]
    return ["sparsify", str(model_dir), "-o", str(out), "--sparsity", "0.5", "--quiet", *data,
            "--calibration-samples", "4", "--calibration-seq-len", "48", "--seq-len", "24",
            "--eval-tokens", "256", *extra]  # fmt: skip


def refused(capsys, argv) -> str:
    """Run the CLI; it must exit 1 with exactly one line on stderr, which is returned."""
    assert cli.main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsec sparsify: error: "), lines
    return lines[0]


# --- the range helpers ------------------------------------------------------------------


def test_ranges_name_the_option_the_value_and_the_allowed_values():
    with pytest.raises(SparsecError, match=r"^--batch-size 0: must be an integer >= 1$"):
        POSITIVE_INT.check("--batch-size", 0)
    for bad in (0, 0.0, -1.5, float("nan"), float("inf"), True, "1e-4"):
        with pytest.raises(SparsecError, match="^--lr .*: must be a finite number > 0$"):
            POSITIVE_FLOAT.check("--lr", bad)
    assert POSITIVE_FLOAT.check("--lr", 1e-4) == 1e-4
    with pytest.raises(SparsecError, match=r"--seed -1: must be an integer from 0 to 4294967295"):
        SEED.check("--seed", -1)
    with pytest.raises(SparsecError, match="must be an integer >= 1"):
        POSITIVE_INT.check("--steps", 2.0)  # a float is not an integer
    with pytest.raises(SparsecError, match=r"--f nan: must be a finite number from 0 to 1 \(x\)"):
        Range(0, 1, note="x").check("--f", float("nan"))
    assert FRACTION.check("--f", 1) == 1

    class Options:
        batch_size, lr = 2, None  # None: unset, not checked

    check_ranges(Options(), {"batch_size": POSITIVE_INT, "lr": POSITIVE_FLOAT})
    Options.batch_size = -3
    with pytest.raises(SparsecError, match="^--batch-size -3: must be an integer >= 1$"):
        check_ranges(Options(), {"batch_size": POSITIVE_INT, "lr": POSITIVE_FLOAT})


# --- every numeric option of the command line ------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--calibration-seq-len", "0"], "--calibration-seq-len 0: must be an integer >= 1"),
        (["--eval-tokens", "0"], "--eval-tokens 0: must be an integer >= 2"),
        (["--steps", "1", "--lr", "-1"], "--lr -1: must be a finite number > 0 and <= 1"),
        (["--steps", "1", "--lr", "nan"], "--lr nan: must be a finite number > 0"),
        (["--steps", "1", "--lr", "0"], "--lr 0: must be a finite number > 0"),
        (["--steps", "1", "--lr", "inf"], "--lr inf: must be a finite number > 0"),
        (["--steps", "1", "--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
        (["--steps", "1", "--seq-len", "0"], "--seq-len 0: must be an integer >= 2"),
        (["--seed", "-1"], "--seed -1: must be an integer from 0 to 4294967295"),
        (["--checkpoint-every", "-1"], "--checkpoint-every -1: must be a finite number >= 0"),
        (["--checkpoint-every", "nan"], "--checkpoint-every nan: must be a finite number"),
        (["--eval-every", "-1"], "--eval-every -1: must be an integer >= 0"),
        (["--steps", "-1"], "--steps -1: must be an integer >= 0"),
        (["--qat-steps", "-2", "--int8"], "--qat-steps -2: must be an integer >= 0"),
        (["--owl-lambda", "nan"], "--owl-lambda nan: must be a finite number >= 0"),
        (["--sparsity", "nan"], "--sparsity nan is outside"),
        (["--calibration-samples", "100000"], "--calibration-samples 100000: must be an int"),
        (["--calibration-samples", "0"], "--calibration-samples 0: must be an integer from 1"),
        (["--steps", "1", "--example-share", "nan"], "--example-share must be between 0 and 1"),
        (["--example-share", "0.5"], "add --steps or drop --example-share"),
        (["--no-smoothing"], "--no-smoothing turns off a step of --int8"),
        # Above the tiny model's context (max_position_embeddings 256), read from its
        # config.json before the weights.
        (["--steps", "1", "--seq-len", "300"], "--seq-len 300 is longer than .* context of 256"),
    ],
)
def test_bad_option_is_one_line_before_any_work(
    tiny_model_dir, text_file, tmp_path, capsys, no_model_load, extra, message
):
    out = tmp_path / "out"
    line = refused(capsys, sparsify_cli(tiny_model_dir, text_file, out, *extra))
    assert re.search(message, line), line
    assert not out.exists() and not (tmp_path / "out.checkpoint").exists()


def test_seq_len_is_checked_only_when_training(tiny_model_dir, text_file, tmp_path):
    opts = pipeline.SparsifyOptions(str(tiny_model_dir), tmp_path / "o", 0.5, seq_len=4096)
    context, hidden = pipeline.model_limits(str(tiny_model_dir))
    assert (context, hidden) == (256, 64)
    # One-shot: --seq-len is unused; calibration longer than the context is cut to it.
    assert pipeline.check_model_limits(opts, context, hidden, "m") == 256
    opts.steps = 1
    with pytest.raises(SparsecError, match="pass --seq-len 256 or less"):
        pipeline.check_model_limits(opts, context, hidden, "m")


def test_calibration_that_cannot_fit_in_memory_is_refused(
    tiny_model_dir, text_file, tmp_path, capsys, monkeypatch, no_model_load
):
    monkeypatch.setattr(pipeline, "_physical_memory", lambda: 2**28)  # a 256 MiB machine
    extra = ["--calibration-samples", "4096", "--calibration-seq-len", "256"]
    line = refused(capsys, sparsify_cli(tiny_model_dir, text_file, tmp_path / "out", *extra))
    assert "the calibration activations alone take 0.5 GiB" in line
    assert "pass fewer samples or shorter sequences" in line


# --- output and checkpoint paths --------------------------------------------------------


def test_output_paths_that_cannot_be_written_are_refused(
    tiny_model_dir, text_file, tmp_path, capsys, monkeypatch, no_model_load
):
    def line(out, *extra):
        return refused(capsys, sparsify_cli(tiny_model_dir, text_file, out, *extra))

    existing = tmp_path / "file.txt"
    existing.write_text("x")
    assert "exists and is not a folder" in line(existing)
    assert "inside the input model folder" in line(tiny_model_dir)
    assert "inside the input model folder" in line(Path(tiny_model_dir) / "sparse")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    assert "is a folder with other files in it (no config.json)" in line(other)
    assert (other / "todo.txt").read_text() == "keep me"

    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    (checkpoints / "mine.txt").write_text("keep me")
    assert "--checkpoint-dir" in line(tmp_path / "out", "--checkpoint-dir", str(checkpoints))
    inside = ["--checkpoint-dir", str(tmp_path / "out" / "ckpt")]
    assert "is inside -o" in line(tmp_path / "out", *inside)

    # A read-only folder (os.access is faked: root may write anywhere).
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != readonly and real_access(p, mode))
    assert f"the folder {readonly} is not writable" in line(readonly / "out")


def test_output_folder_parent_is_made(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    opts = pipeline.SparsifyOptions("m", tmp_path / "new" / "deeper" / "out", 0.5)
    from sparsec.sparsify.layer_walk import prunable_linears
    from sparsec.sparsify.report import layer_sparsity

    ppl = {"dense": {"t": 9.0}, "one-shot": {"t": 9.5}}
    state = {"stage": "done", "perplexity": ppl, "curve": [], "layers": [], "timings": {}}
    state["final_layers"] = layer_sparsity(prunable_linears(model))
    out = pipeline.write_output(opts, model, tokenizer, None, state)
    assert (out / "config.json").is_file() and (out / "report.json").is_file()


# --- data files ---------------------------------------------------------------------------


def test_data_files_that_cannot_be_read_are_clear_errors(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(SparsecError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9"):
        data_mod.read_corpus(str(latin1))
    nested = tmp_path / "nested.jsonl"
    nested.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(SparsecError, match="nested.jsonl:1: the JSON is nested too deeply"):
        data_mod.read_corpus(str(nested))
    digits = tmp_path / "digits.jsonl"
    digits.write_text('{"text": ' + "1" * 5000 + "}\n")
    with pytest.raises(SparsecError, match="digits.jsonl:1: not valid JSON"):
        data_mod.read_corpus(str(digits))
    with pytest.raises(SparsecError, match="is a folder"):
        data_mod.read_corpus(str(tmp_path))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes('\ufeff{"text": "with a byte-order mark"}\n'.encode())
    assert data_mod.read_corpus(str(bom)).documents == ["with a byte-order mark"]


def test_bad_data_file_through_the_cli(tiny_model_dir, text_file, tmp_path, capsys, no_model_load):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe{}\n")
    argv = sparsify_cli(tiny_model_dir, text_file, tmp_path / "out", "--calibration", str(bad))
    assert "bad.jsonl:1: not UTF-8 text" in refused(capsys, argv)


# --- checkpoints ------------------------------------------------------------------------


def _checkpoint(folder: Path, state: bytes, tensors: bytes) -> None:
    (folder / "current").mkdir(parents=True)
    (folder / "current" / "state.json").write_bytes(state)
    (folder / "current" / "tensors.pt").write_bytes(tensors)


def test_resume_from_a_corrupt_checkpoint_says_how_to_start_over(
    tiny_model_dir, text_file, tmp_path, capsys, no_model_load
):
    out = tmp_path / "out"
    argv = sparsify_cli(tiny_model_dir, text_file, out, "--resume")
    folder = tmp_path / "out.checkpoint"
    _checkpoint(folder, b"\x00garbage", b"")
    line = refused(capsys, argv)
    assert f"the checkpoint in {folder} is corrupt (state.json: not a JSON state" in line
    assert f"delete {folder} and run without --resume to start over" in line

    # A whole state with a truncated tensors.pt: refused before the model loads too.
    opts = pipeline.SparsifyOptions(**{**_cli_options(argv), "output": out})
    state = json.dumps({"stage": "pruned", "options": opts.fingerprint()}).encode()
    whole = tmp_path / "whole.pt"
    torch.save({"model": {"w": torch.zeros(64)}}, whole)
    (folder / "current" / "state.json").write_bytes(state)
    (folder / "current" / "tensors.pt").write_bytes(whole.read_bytes()[:-40])
    assert "is corrupt (tensors.pt: not a complete PyTorch file" in refused(capsys, argv)


def _cli_options(argv) -> dict:
    """The SparsifyOptions fields the CLI makes of ``argv``."""
    import dataclasses

    args = cli.build_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(pipeline.SparsifyOptions)}
    return {k: v for k, v in vars(args).items() if k in names}


@pytest.mark.parametrize(
    "payload",
    [b"", b"not a zip at all", b"PK\x05\x06" + bytes(18)],  # the last: an empty zip
)
def test_corrupt_tensors_are_a_clear_error(tmp_path, payload):
    import zipfile

    if payload.startswith(b"PK"):  # a valid zip without torch's records
        with zipfile.ZipFile(tmp_path / "z.zip", "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x05garbage")
        payload = (tmp_path / "z.zip").read_bytes()
    _checkpoint(tmp_path / "ck", b'{"stage": "pruned", "options": {}}', payload)
    with pytest.raises(SparsecError, match="is corrupt .*tensors.pt.*run without --resume"):
        Checkpoint(tmp_path / "ck").load()


class _FullDisk:
    """A file on a full disk: every write fails with ENOSPC."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        pass


def test_full_disk_in_torch_save_is_reported_as_such():
    # torch.save itself reports it as "RuntimeError: unexpected pos"; torch_save does not.
    with pytest.raises(OSError) as raised:
        checkpoint_mod.torch_save({"w": torch.zeros(4096)}, _FullDisk())
    assert raised.value.errno == errno.ENOSPC


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    ck = Checkpoint(tmp_path / "out.checkpoint")
    ck.save({"stage": "start", "options": {}}, {"model": {"w": torch.ones(3)}})

    def half_then_full(obj, file):
        file.write(b"PK half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_mod, "torch_save", half_then_full)
    with pytest.raises(SparsecError) as raised:
        ck.save({"stage": "pruned", "options": {}}, {"model": {"w": torch.zeros(3)}})
    message = str(raised.value)
    assert message.startswith("no space left on ") and f"writing {ck.folder}" in message
    assert "nothing half-written was left" in message and "kept for --resume" in message
    assert sorted(p.name for p in ck.folder.iterdir()) == ["current"]  # no next/
    state, tensors = ck.load()
    assert state["stage"] == "start" and torch.equal(tensors["model"]["w"], torch.ones(3))


def test_full_disk_while_writing_the_output_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    from safetensors import SafetensorError

    model, tokenizer = tiny_model
    opts = pipeline.SparsifyOptions("m", tmp_path / "out", 0.5)

    def full(folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        message = "I/O error: No space left on device (os error 28)"
        raise SafetensorError(f"Error while serializing: {message}")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(SparsecError, match=f"^no space left on .* writing {tmp_path / 'out'} "):
        pipeline.write_output(opts, model, tokenizer, None, {})
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temp folder


def test_checkpoint_remove_deletes_only_the_checkpoint(tmp_path):
    ck = Checkpoint(tmp_path / "ckpt")
    ck.save({"stage": "start", "options": {}}, {"model": {}})
    (ck.folder / "mine.txt").write_text("keep me")
    ck.remove()
    assert [p.name for p in ck.folder.iterdir()] == ["mine.txt"]
    ck.save({"stage": "start", "options": {}}, {"model": {}})
    (ck.folder / "mine.txt").unlink()
    ck.remove()
    assert not ck.folder.exists()


def test_finetune_checks_its_options_first(
    tiny_model_dir, text_file, tmp_path, capsys, no_model_load
):
    base = ["finetune", str(tiny_model_dir), "--train", str(text_file), "--steps", "2", "--quiet"]
    for extra, message in [
        (["-o", str(tmp_path / "t"), "--lr", "nan"], "--lr nan: must be a finite number > 0"),
        (["-o", str(tmp_path / "t"), "--batch-size", "0"], "--batch-size 0: must be an integer"),
        (["-o", str(tmp_path / "t"), "--seq-len", "1"], "--seq-len 1: must be an integer >= 2"),
        (["-o", str(tiny_model_dir)], "inside the input model folder"),
    ]:
        assert cli.main([*base, *extra]) == 1
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and message in line, line
