"""``sparsec build``: export, optimize and compile in one process from a checkpoint,
with no intermediate files; the model equals the staged commands' output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from sparsec import runtime
from sparsec.build import build
from sparsec.codegen.compile import compile_model
from sparsec.errors import SparsecError
from sparsec.export import export_model
from sparsec.models import open_skeleton
from sparsec.passes import optimize_file
from sparsec.testing import make_tiny_llama

IDS = list(range(40, 72))


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-bf16"
    model, tokenizer = make_tiny_llama(seed=3)
    with torch.no_grad():  # 70% of each decoder Linear zeroed: sparse kernels get picked
        for name, p in model.named_parameters():
            if ".layers." in name and name.endswith("_proj.weight"):
                p[p.abs() < p.abs().flatten().quantile(0.7)] = 0
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="80KB")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_build_equals_the_staged_pipeline(bf16_checkpoint, tmp_path, precision):
    options = dict(precision=precision, max_context=64, kernels="bitmask", quiet=True)
    built = tmp_path / "built.so"
    manifest = build(bf16_checkpoint, built, **options)
    assert any("bitmask" in layer["kernel"] for layer in manifest["layers"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["built.so"]  # nothing else written

    skeleton, tokenizer, checkpoint, generation = open_skeleton(bf16_checkpoint)
    onnx = export_model(
        skeleton,
        tokenizer,
        tmp_path / "m.onnx",
        checkpoint=checkpoint,
        generation_config=generation,
    )
    optimize_file(onnx, tmp_path / "m.opt.onnx")
    compile_model(tmp_path / "m.opt.onnx", tmp_path / "staged.so", **options)
    got = runtime.load(built).forward(IDS, all_logits=True)
    want = runtime.load(tmp_path / "staged.so").forward(IDS, all_logits=True)
    assert np.array_equal(np.asarray(got), np.asarray(want))


def test_build_command_writes_a_model_that_generates(bf16_checkpoint, tmp_path):
    out = tmp_path / "m.so"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsec", "build", str(bf16_checkpoint), "-o", str(out)]
        + ["--precision", "int8", "--max-context", "64"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "exporting" in proc.stderr
    generation = runtime.load(out).generate("Hi", max_new_tokens=4)
    assert len(generation.token_ids) == 4 or generation.finish_reason == "eos"


def test_build_refuses_bad_options_and_outputs_before_work(bf16_checkpoint, tmp_path):
    with pytest.raises(SparsecError, match="max_context"):
        build(bf16_checkpoint, tmp_path / "m.so", max_context=0)
    with pytest.raises(SparsecError):
        build(bf16_checkpoint, bf16_checkpoint / "m.so")  # inside the input model folder
    assert not (bf16_checkpoint / "m.so").exists()


def test_build_refuses_what_memory_cannot_hold(bf16_checkpoint, tmp_path, monkeypatch):
    from sparsec import resources

    monkeypatch.setattr(resources, "available_memory", lambda: 1 << 20)
    with pytest.raises(SparsecError, match="building this model .* needs about"):
        build(bf16_checkpoint, tmp_path / "m.so")
    assert not (tmp_path / "m.so").exists()
