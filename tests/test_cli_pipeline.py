"""The user's path end to end on the tiny model, through the CLI:
export -> optimize -> compile -> run, checked against PyTorch and onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sparsec import contract, runtime
from sparsec.cli import main
from sparsec.codegen import target

ATOL = 1e-3  # the bound vs onnxruntime; measured ~2e-6


@pytest.fixture(scope="module")
def pipeline(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    opt, so = out / "tiny.opt.onnx", out / "tiny.so"
    assert main(["optimize", str(tiny_onnx), "-o", str(opt)]) == 0
    assert main(["compile", str(opt), "-o", str(so), "--max-context", "128"]) == 0
    return opt, so


def _ort_logits(opt_path, ids, capacity=128, cfg=None):
    """onnxruntime on the optimized graph, prefill into an empty fixed-capacity cache."""
    sess = ort.InferenceSession(str(opt_path), providers=["CPUExecutionProvider"])
    feeds = {
        contract.INPUT_IDS: np.array([ids], np.int64),
        contract.POSITION_IDS: np.arange(len(ids), dtype=np.int64)[None],
    }
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values"):
            feeds[inp.name] = np.zeros(
                (1, cfg.num_key_value_heads, capacity, cfg.head_dim), np.float32
            )
    return sess.run([contract.LOGITS], feeds)[0][0]


def test_compiled_logits_match_onnxruntime_and_pytorch(pipeline, tiny_model):
    opt, so = pipeline
    model, tokenizer = tiny_model
    rt = runtime.load(so)
    ids = tokenizer("The pipeline, end to end.").input_ids
    got = rt.forward(ids)
    expected = _ort_logits(opt, ids, cfg=rt.config)
    np.testing.assert_allclose(got, expected, atol=ATOL)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(torch.tensor([ids])).logits[0].numpy(), atol=ATOL)


def _hf_greedy(model, tokenizer, ids, **kwargs):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=48,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
    return out[0, len(ids) :].tolist()


def test_generate_matches_hf_generate(pipeline, tiny_model):
    _, so = pipeline
    model, tokenizer = tiny_model
    ids = tokenizer("Once upon a time").input_ids
    out = runtime.load(so).generate(ids, max_new_tokens=48)
    assert out.token_ids == _hf_greedy(model, tokenizer, ids)


def test_repetition_penalty_matches_hf_generate(pipeline, tiny_model):
    _, so = pipeline
    model, tokenizer = tiny_model
    ids = tokenizer("Once upon a time").input_ids
    plain = runtime.load(so).generate(ids, max_new_tokens=48)
    out = runtime.load(so).generate(ids, max_new_tokens=48, repetition_penalty=1.3)
    assert out.token_ids == _hf_greedy(model, tokenizer, ids, repetition_penalty=1.3)
    assert out.token_ids != plain.token_ids


def test_compile_runs_the_passes_on_a_raw_export(tiny_onnx, tmp_path, tiny_model):
    so = tmp_path / "direct.so"
    assert main(["compile", str(tiny_onnx), "-o", str(so), "--max-context", "64"]) == 0
    model, tokenizer = tiny_model
    ids = tokenizer("direct").input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(runtime.load(so).forward(ids), ref, atol=ATOL)


def test_run_and_inspect_commands(pipeline, capsys):
    _, so = pipeline
    assert main(["run", str(so), "Hello", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "tok/s" in captured.err
    args = ["run", str(so), "Hello", "--max-new-tokens", "8", "--repetition-penalty", "0"]
    assert main(args) == 1
    assert "repetition_penalty must be a finite number > 0" in capsys.readouterr().err
    assert main(["inspect", str(so)]) == 0
    out = capsys.readouterr().out
    assert "dense_f32" in out
    assert "rows of the tied LM head (float32, stored once)" in out


def test_compile_for_a_named_target_cpu(pipeline, tmp_path, tiny_model, capsys):
    """--target-cpu: scheduled and tuned for that CPU (recorded), same numbers here."""
    opt, default_so = pipeline
    so = tmp_path / "spr.so"
    args = ["compile", str(opt), "-o", str(so), "--max-context", "64"]
    assert main([*args, "--target", "avx512", "--target-cpu", "sapphirerapids"]) == 0
    rt = runtime.load(so)
    assert rt.manifest["target"]["cpu"] == "sapphirerapids"
    assert rt.manifest["target"]["isa"] == "avx512"
    assert runtime.load(default_so).manifest["target"]["cpu"] == target.host_target().cpu
    model, tokenizer = tiny_model
    ids = tokenizer("a named cpu").input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(rt.forward(ids), ref, atol=ATOL)
    capsys.readouterr()
    assert main([*args, "--target-cpu", "Zen 4"]) == 1
    assert "--target-cpu 'Zen 4' is not an LLVM cpu name" in capsys.readouterr().err
    # another CPU's code keeps the table's tuning (nothing to measure here), as
    # --tuning builtin does for this one; inspect says which
    assert rt.manifest["target"]["tuning"]["source"] == "built in"
    assert main([*args, "--tuning", "builtin", "-o", str(tmp_path / "b.so")]) == 0
    assert main(["inspect", str(tmp_path / "b.so")]) == 0
    assert "; tuning built in (sparse expand: bitmask_f32 memory" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--tuning", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
