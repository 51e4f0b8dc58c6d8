"""``sparsec sparsify`` end to end on a tiny model: outputs, bad inputs, resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsec.errors import SparsecError
from sparsec.sparsify import prune as prune_mod
from sparsec.sparsify.pipeline import SparsifyOptions, sparsify
from sparsec.sparsify.quant import quantize_weight
from sparsec.sparsify.train import MaskedTrainer


def options(model_dir, text_file, out, **overrides) -> SparsifyOptions:
    base = dict(
        model=str(model_dir),
        output=Path(out),
        sparsity=0.5,
        calibration=[str(text_file)],
        calibration_samples=4,
        calibration_seq_len=48,
        train=[str(text_file)],
        batch_size=2,
        seq_len=24,
        eval=[str(text_file)],
        eval_tokens=256,
        curve_tokens=64,
        quiet=True,
    )
    return SparsifyOptions(**{**base, **overrides})


def test_end_to_end_writes_hf_folder_recipe_and_report(tiny_model_dir, text_file, tmp_path):
    out = sparsify(options(tiny_model_dir, text_file, tmp_path / "out", steps=3, int8=True))
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "recipe.yaml"} <= names
    assert {"report.json", "report.md", "quantization.json"} <= names
    assert not (tmp_path / "out.checkpoint").exists()  # removed after success

    report = json.loads((out / "report.json").read_text())
    assert list(report["perplexity"]) == ["dense", "one-shot", "distilled", "int8"]
    assert [p["step"] for p in report["recovery_curve"]["points"]] == [0, 1, 2, 3]
    # Pruning hit the target exactly in every layer (INT8 rounding may add zeros later).
    for layer in report["pruning"]:
        rows, cols = layer["shape"]
        assert layer["sparsity"] == int(0.5 * rows * cols + 0.5) / (rows * cols)

    weights = load_file(out / "model.safetensors")
    quant = json.loads((out / "quantization.json").read_text())["weights"]["scales"]
    for name, scales in quant.items():
        w = weights[name]
        assert float((w == 0).float().mean()) >= 0.5  # exact zeros survived saving
        q, scale = quantize_weight(w)  # what the compiler re-derives
        torch.testing.assert_close(scale, torch.tensor(scales), rtol=1e-6, atol=0)
        torch.testing.assert_close(q.float() * scale[:, None], w, rtol=0, atol=0)
    import yaml

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert [next(iter(s)) for s in recipe["stages"]] == [
        "prune",
        "squarehead_distillation",
        "quantize",
    ]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(sparsity=1.0), "outside"),
        (dict(sparsity=-0.5), "outside"),
        (dict(pattern="3:5", sparsity=0.4), "does not divide the input width"),
        (dict(pattern="2:4", sparsity=0.7), "pass --sparsity 0.5"),
        (dict(calibration=["/nonexistent/data.txt"]), "does not exist"),
        (dict(steps=4, qat_steps=2), "--qat-steps trains for the int8 model: add --int8"),
        (dict(steps=4, qat_steps=5, int8=True), "must be between 1 and --steps \\(4\\)"),
        (dict(steps=4, qat_steps=2, int8=True, bf16=True), "--bf16 or --qat-steps, not both"),
        (dict(steps=4, output_loss="mse"), "unknown --output-loss 'mse'; use one of ce, kl"),
        (dict(steps=4, example_share=0.5), "is only running text: drop --example-share"),
        (dict(steps=4, example_share=1.5), "--example-share must be between 0 and 1"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_model_dir, text_file, tmp_path, overrides, message):
    with pytest.raises(SparsecError, match=message):
        sparsify(options(tiny_model_dir, text_file, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_empty_data_file(tiny_model_dir, text_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SparsecError, match="empty"):
        sparsify(options(tiny_model_dir, text_file, tmp_path / "out", train=[str(empty)], steps=2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text field"}\n')
    with pytest.raises(SparsecError, match="'text'"):
        sparsify(options(tiny_model_dir, text_file, tmp_path / "out", calibration=[str(bad)]))


def test_model_without_linears_is_a_clear_error():
    from transformers import LlamaConfig

    from sparsec.sparsify.layer_walk import prunable_linears

    class NoLinears(torch.nn.Module):
        def __init__(self, layers: int):
            super().__init__()
            self.config = LlamaConfig(num_hidden_layers=2)
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.LayerNorm(4)] * layers)

    with pytest.raises(SparsecError, match="no Linear layers"):
        prunable_linears(NoLinears(2))
    with pytest.raises(SparsecError, match=r"no list of 2 decoder layers \(num_hidden_layers\)"):
        prunable_linears(NoLinears(3))
    with pytest.raises(SparsecError, match="not a Hugging Face causal LM"):
        prunable_linears(torch.nn.Linear(3, 3))


def _interrupt_at(monkeypatch, target, after_calls: int):
    """Deliver a real SIGINT once ``target`` (a method) has been called ``after_calls`` times."""
    owner, name = target
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == after_calls:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(owner, name, wrapped)


def _record_steps(monkeypatch) -> list[int]:
    """The trainer step at each train_step call from now on."""
    steps_run = []
    original = MaskedTrainer.train_step
    monkeypatch.setattr(
        MaskedTrainer,
        "train_step",
        lambda self, fn: steps_run.append(self.step) or original(self, fn),
    )
    return steps_run


def test_ctrl_c_in_distillation_then_resume_matches_uninterrupted(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    reference = sparsify(options(tiny_model_dir, text_file, tmp_path / "ref", steps=6))

    out = tmp_path / "out"
    opts = options(tiny_model_dir, text_file, out, steps=6, checkpoint_every=1e9)
    with monkeypatch.context() as m:
        _interrupt_at(m, (MaskedTrainer, "train_step"), after_calls=3)
        with pytest.raises(KeyboardInterrupt):
            sparsify(opts)
    assert not out.exists()  # never a half-written output
    state = json.loads((tmp_path / "out.checkpoint" / "current" / "state.json").read_text())
    assert state["stage"] == "pruned" and len(state["curve"]) == 4  # steps 0..3 done

    with pytest.raises(SparsecError, match="--resume"):
        sparsify(opts)  # a checkpoint exists: refuse to silently start over
    steps_run = _record_steps(monkeypatch)
    opts.resume = True
    sparsify(opts)
    assert steps_run == [3, 4, 5]  # continued where it stopped
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    ra = json.loads((out / "report.json").read_text())["recovery_curve"]["points"]
    rb = json.loads((reference / "report.json").read_text())["recovery_curve"]["points"]
    assert [p["step"] for p in ra] == [p["step"] for p in rb]


def test_ctrl_c_in_pruning_then_resume(tiny_model_dir, text_file, tmp_path, monkeypatch):
    reference = sparsify(options(tiny_model_dir, text_file, tmp_path / "ref"))
    out = tmp_path / "out"
    opts = options(tiny_model_dir, text_file, out, checkpoint_every=1e9)
    with monkeypatch.context() as m:
        _interrupt_at(m, (prune_mod, "prune_layer"), after_calls=1)  # after decoder layer 0
        with pytest.raises(KeyboardInterrupt):
            sparsify(opts)
    state = json.loads((tmp_path / "out.checkpoint" / "current" / "state.json").read_text())
    assert state["next_layer"] == 1
    opts.resume = True
    sparsify(opts)
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def _interrupted_run(monkeypatch, where: tuple, opts) -> None:
    """Run ``opts`` with a Ctrl-C after the first call of ``where``: a checkpoint is left."""
    with monkeypatch.context() as m:
        _interrupt_at(m, where, after_calls=1)
        with pytest.raises(KeyboardInterrupt):
            sparsify(opts)


def test_resume_refuses_other_options(tiny_model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupted_run(
        monkeypatch, (MaskedTrainer, "train_step"), options(tiny_model_dir, text_file, out, steps=3)
    )
    with pytest.raises(SparsecError, match="other options"):
        sparsify(options(tiny_model_dir, text_file, out, steps=3, sparsity=0.6, resume=True))


def test_checkpoint_older_than_an_option_resumes_at_its_default(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    _interrupted_run(
        monkeypatch, (MaskedTrainer, "train_step"), options(tiny_model_dir, text_file, out, steps=3)
    )
    state_file = tmp_path / "out.checkpoint" / "current" / "state.json"
    state = json.loads(state_file.read_text())
    # Options absent from checkpoints made before they existed.
    for newer in ("output_loss", "layer_sparsity", "owl_lambda", "example_share"):
        del state["options"][newer]
    state_file.write_text(json.dumps(state))
    with pytest.raises(SparsecError, match="'output_loss': 'ce'"):
        sparsify(options(tiny_model_dir, text_file, out, steps=3, output_loss="kl", resume=True))
    assert sparsify(options(tiny_model_dir, text_file, out, steps=3, resume=True)).is_dir()


def test_finetune_writes_a_trained_dense_model(tiny_model_dir, tmp_path):
    from sparsec.sparsify.finetune import finetune

    data = tmp_path / "task.jsonl"
    data.write_text(
        "\n".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) for i in range(8))
    )
    out = finetune(str(tiny_model_dir), [str(data)], tmp_path / "teacher", steps=2, quiet=True)
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed  # it trained
    assert all(float((after[n] == 0).float().mean()) < 0.01 for n in after)  # still dense


def test_finetune_ctrl_c_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path, monkeypatch):
    from sparsec.sparsify.finetune import finetune

    data = tmp_path / "task.jsonl"
    data.write_text(
        "\n".join(json.dumps({"question": f"{i}+2?", "answer": f"#### {i + 2}"}) for i in range(8))
    )
    args = (str(tiny_model_dir), [str(data)])
    kw = dict(steps=5, batch_size=2, seq_len=16, quiet=True, checkpoint_every=1e9)
    reference = finetune(*args, tmp_path / "ref", **kw)
    out = tmp_path / "teacher"
    with monkeypatch.context() as m:
        _interrupt_at(m, (MaskedTrainer, "train_step"), after_calls=2)
        with pytest.raises(KeyboardInterrupt):
            finetune(*args, out, **kw)
    assert not out.exists()  # never a half-written output
    state = json.loads((tmp_path / "teacher.checkpoint" / "current" / "state.json").read_text())
    assert state["step"] == 2
    with pytest.raises(SparsecError, match="pass --resume"):
        finetune(*args, out, **kw)
    with pytest.raises(SparsecError, match="made with other options"):
        finetune(*args, out, **{**kw, "lr": 5e-4}, resume=True)
    steps_run = _record_steps(monkeypatch)
    finetune(*args, out, **kw, resume=True)
    assert steps_run == [2, 3, 4]
    assert not (tmp_path / "teacher.checkpoint").exists()
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    with pytest.raises(SparsecError, match="--resume: no checkpoint"):
        finetune(*args, tmp_path / "other", **kw, resume=True)


def test_command_module_is_light_and_parses():
    import argparse
    import subprocess
    import sys

    code = "import sys, sparsec.sparsify.command; print('torch' in sys.modules)"
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert light.stdout.strip() == "False"

    from sparsec.sparsify import command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["sparsify", "m", "-o", "out", "--sparsity", "0.5", "--pattern", "2:4", "--int8"]
    )
    assert (args.sparsity, args.pattern, args.int8, args.steps) == (0.5, "2:4", True, 0)
    args = parser.parse_args(["sparsify", "m", "-o", "out", "--sparsity", "1.5"])
    with pytest.raises(SparsecError, match="outside"):
        args.func(args)


def test_resume_before_distillation_may_change_training_options(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    _interrupted_run(
        monkeypatch, (prune_mod, "prune_layer"), options(tiny_model_dir, text_file, out, steps=0)
    )
    sparsify(options(tiny_model_dir, text_file, out, steps=2, resume=True))
    report = json.loads((out / "report.json").read_text())
    assert list(report["perplexity"]) == ["dense", "one-shot", "distilled"]


def test_cli_defaults_match_the_data_module():
    from sparsec.sparsify import command, data

    assert command.DEFAULT_CALIBRATION == list(data.DEFAULT_CALIBRATION)
    assert command.DEFAULT_TRAIN == list(data.DEFAULT_TRAIN)
    assert command.DEFAULT_EVAL == list(data.DEFAULT_EVAL)


def test_quantization_aware_steps_train_through_w8a8(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    """The last --qat-steps steps (only those) run with QuantAwareLinears active, and the
    recipe records them; the output is snapped to the int8 grid as without QAT."""
    import sparsec.sparsify.pipeline as pipeline

    active = []

    class Spy(pipeline.QuantAwareLinears):
        def __enter__(self):
            active.append(True)
            return super().__enter__()

    monkeypatch.setattr(pipeline, "QuantAwareLinears", Spy)
    opts = options(tiny_model_dir, text_file, tmp_path / "out", steps=5, qat_steps=2, int8=True)
    out = sparsify(opts)
    assert len(active) == 2
    import yaml

    stages = yaml.safe_load((out / "recipe.yaml").read_text())["stages"]
    assert stages[-1]["quantize"]["quantization_aware_steps"] == 2
    assert stages[-1]["quantize"]["smoothing"].startswith("SmoothQuant")
    weights = load_file(out / "model.safetensors")
    for name in json.loads((out / "quantization.json").read_text())["weights"]["scales"]:
        q, scale = quantize_weight(weights[name])
        torch.testing.assert_close(q.float() * scale[:, None], weights[name], rtol=0, atol=0)


def test_bf16_distillation_is_recorded_and_keeps_exact_zeros(tiny_model_dir, text_file, tmp_path):
    import yaml

    out = sparsify(options(tiny_model_dir, text_file, tmp_path / "out", steps=3, bf16=True))
    stages = yaml.safe_load((out / "recipe.yaml").read_text())["stages"]
    assert stages[1]["squarehead_distillation"]["bf16"] is True
    weights = load_file(out / "model.safetensors")
    for name, w in weights.items():
        if name.endswith("proj.weight"):
            assert w.dtype == torch.float32
            assert (w == 0).float().mean() == pytest.approx(0.5, abs=0.01), name


def test_kl_distillation_is_recorded_and_logs_its_curve(
    tiny_model_dir, text_file, tmp_path, capsys
):
    import yaml

    out = sparsify(
        options(
            tiny_model_dir,
            text_file,
            tmp_path / "out",
            steps=4,
            eval_every=2,
            output_loss="kl",
            quiet=False,
        )
    )
    log = capsys.readouterr().err
    curve = json.loads((out / "report.json").read_text())["recovery_curve"]["points"]
    for point in curve[1:]:  # each curve point is logged as it is measured
        assert f"step {point['step']}: " in log
        assert f"perplexity {point['perplexity']:.2f}" in log
    stages = yaml.safe_load((out / "recipe.yaml").read_text())["stages"]
    assert stages[1]["squarehead_distillation"]["output_loss"] == "kl"
    assert "KL" in stages[1]["squarehead_distillation"]["loss"]["output"]


def test_a_sparse_model_is_pruned_further_with_the_dense_teacher(
    tiny_model_dir, text_file, tmp_path
):
    first = sparsify(options(tiny_model_dir, text_file, tmp_path / "s50", steps=2))
    first_ppl = json.loads((first / "report.json").read_text())["perplexity"]

    out = sparsify(
        options(
            first, text_file, tmp_path / "s70", sparsity=0.7, steps=2, teacher=str(tiny_model_dir)
        )
    )
    report = json.loads((out / "report.json").read_text())
    ppl = report["perplexity"]
    assert list(ppl) == ["dense", "input", "one-shot", "distilled"]
    source = str(text_file)
    # "dense" is the teacher's, the same model the first stage started from; "input" is
    # the first stage's result, reloaded.
    assert ppl["dense"][source] == pytest.approx(first_ppl["dense"][source], rel=1e-5)
    assert ppl["input"][source] == pytest.approx(first_ppl["distilled"][source], rel=1e-4)
    assert report["input_sparsity"] == pytest.approx(0.5, abs=0.01)
    for layer in report["pruning"]:
        rows, cols = layer["shape"]
        assert layer["sparsity"] == int(0.7 * rows * cols + 0.5) / (rows * cols)
    assert "| input (50.0% sparse) |" in (out / "report.md").read_text()
    assert "from_sparsity: 0.5" in (out / "recipe.yaml").read_text()


def test_a_sparse_model_needs_its_dense_teacher_and_a_higher_sparsity(
    tiny_model_dir, text_file, tmp_path
):
    first = sparsify(options(tiny_model_dir, text_file, tmp_path / "s50"))
    with pytest.raises(SparsecError, match=r"already 50\.0% sparse: pass --teacher"):
        sparsify(options(first, text_file, tmp_path / "a", sparsity=0.7, steps=1))
    with pytest.raises(SparsecError, match="more than --sparsity 0.3"):
        sparsify(options(first, text_file, tmp_path / "b", sparsity=0.3, teacher=str(first)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
