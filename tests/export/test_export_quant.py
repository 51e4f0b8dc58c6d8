"""W8A8 export of a sparsify --int8 folder: int8 weights + DequantizeLinear, per-token
activation fake quantization, folded by the passes and compiled like --precision int8."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
import torch

from sparsec import runtime
from sparsec.cli import main
from sparsec.codegen.compile import compile_model
from sparsec.errors import SparsecError
from sparsec.export import export_model, verify_export
from sparsec.export_quant import read_quantization
from sparsec.models import load_model, save_model
from sparsec.passes.pipeline import optimize_file
from sparsec.sparsify.quant import quantize_weights_, write_quantization_json
from sparsec.testing import make_tiny_llama, zero_smallest

N_LINEARS = 14  # 2 layers x q, k, v, o, gate, up, down


def _linears(model):
    return {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    }


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory):
    """What `sparsify --sparsity 0.5 --int8` writes, for the tiny model."""
    model, tokenizer = make_tiny_llama(seed=3)
    zero_smallest(model, 0.5)
    scales = quantize_weights_(_linears(model))
    folder = save_model(model, tokenizer, tmp_path_factory.mktemp("int8") / "s50")
    write_quantization_json(folder, scales)
    return folder


@pytest.fixture(scope="module")
def qdq_onnx(int8_folder, tmp_path_factory):
    model, tokenizer = load_model(int8_folder, quiet=True)
    out = tmp_path_factory.mktemp("qdq") / "q.onnx"
    export_model(model, tokenizer, out, quantization=read_quantization(int8_folder))
    return out


def test_weights_become_int8_dequantize_linear(qdq_onnx, int8_folder):
    graph = ir.load(qdq_onnx).graph
    dqs = [n for n in graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == N_LINEARS
    model, _ = load_model(int8_folder, quiet=True)
    floats = {
        np.ascontiguousarray(m.weight.detach().numpy().T).tobytes()
        for m in _linears(model).values()
    }
    for dq in dqs:
        q, scale = dq.inputs[0].const_value.numpy(), dq.inputs[1].const_value.numpy()
        assert q.dtype == np.int8 and np.abs(q).max() <= 127 and len(dq.inputs) == 2
        assert scale.dtype == np.float32 and scale.shape == (q.shape[1],)
        assert dq.attributes["axis"].as_int() == 1  # [in, out]: one scale per output
    for init in graph.initializers.values():  # no float copy of a quantized weight is left
        if init.const_value.dtype == ir.DataType.FLOAT:
            assert init.const_value.numpy().tobytes() not in floats
    assert ir.load(qdq_onnx).metadata_props["sparsec.quantization"] == "w8a8"


def test_onnxruntime_matches_pytorch_fake_quant(qdq_onnx, int8_folder):
    model, _ = load_model(int8_folder, quiet=True)
    check = verify_export(
        qdq_onnx,
        model,
        greedy_prompt=[5, 9, 2, 7],
        greedy_tokens=16,
        quantization=read_quantization(int8_folder),
    )
    assert check.prefill_max_abs < 1e-4 and check.decode_max_abs < 1e-4
    assert check.greedy_match


def test_passes_fold_and_compile_equals_rederived_int8(qdq_onnx, int8_folder, tmp_path):
    optimized = tmp_path / "q.opt.onnx"
    optimize_file(qdq_onnx, optimized)
    graph = ir.load(optimized).graph
    ops = Counter((n.domain, n.op_type) for n in graph)
    assert ops[("", "DequantizeLinear")] == N_LINEARS
    assert ops[("sparsec", "PerTokenFakeQuant")] == 2 * 2  # inputs of q|k|v and o
    swiglus = [n for n in graph if n.op_type == "SwiGLU"]  # gate|up and down quantize inside
    assert [n.attributes["quantize_activations"].as_int() for n in swiglus] == [1, 1]

    # the same folder exported as floats and compiled with --precision int8 must give
    # the same model: both paths land on the same int8 grid
    model, tokenizer = load_model(int8_folder, quiet=True)
    plain = tmp_path / "plain.onnx"
    export_model(model, tokenizer, plain)
    compile_model(optimized, tmp_path / "qdq.so", max_context=64, quiet=True)
    compile_model(plain, tmp_path / "int8.so", precision="int8", max_context=64, quiet=True)
    with runtime.load(tmp_path / "qdq.so") as a, runtime.load(tmp_path / "int8.so") as b:
        assert a.manifest["precision"] == "int8"
        ids = [3, 1, 4, 1, 5, 9, 2, 6]
        np.testing.assert_allclose(a.forward(ids), b.forward(ids), atol=1e-5)
        a.reset()
        b.reset()
        gen = dict(max_new_tokens=24)
        assert a.generate(ids, **gen).token_ids == b.generate(ids, **gen).token_ids


def _edited_folder(int8_folder, tmp_path, edit):
    folder = tmp_path / "edited"
    subprocess.run(["cp", "-r", str(int8_folder), str(folder)], check=True)
    doc = json.loads((folder / "quantization.json").read_text())
    edit(folder, doc)
    return folder


def test_off_grid_weights_are_an_error(int8_folder, tmp_path):
    def halve_scale(_folder, doc):
        name = "model.layers.1.mlp.down_proj.weight"
        doc["weights"]["scales"][name] = [s * 0.5001 for s in doc["weights"]["scales"][name]]
        (_folder / "quantization.json").write_text(json.dumps(doc))

    folder = _edited_folder(int8_folder, tmp_path, halve_scale)
    model, tokenizer = load_model(folder, quiet=True)
    with pytest.raises(SparsecError, match=r"weights of model\.layers\.1\.mlp\.down_proj are not"):
        export_model(model, tokenizer, tmp_path / "x.onnx", quantization=read_quantization(folder))
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not a valid quantization file (JSONDecodeError"),
        ('{"scheme": "w4a16"}', "scheme 'w4a16' is not supported"),
        ('{"scheme": "w8a8", "weights": {}}', "is not a valid quantization file (KeyError"),
        ('{"scheme": "w8a8", "weights": {"scales": {}}}', "lists no weight scales"),
    ],
)
def test_malformed_quantization_json(tmp_path, text, message):
    (tmp_path / "quantization.json").write_text(text)
    with pytest.raises(SparsecError, match=message.replace("(", r"\(")):
        read_quantization(tmp_path)


def test_scales_for_an_unknown_or_misshaped_linear(int8_folder, tmp_path):
    model, tokenizer = load_model(int8_folder, quiet=True)
    scheme = read_quantization(int8_folder)
    scheme.scales["model.layers.0.mlp.nope"] = np.ones(3, np.float32)
    with pytest.raises(SparsecError, match="quantizes 'model.layers.0.mlp.nope', which is not"):
        export_model(model, tokenizer, tmp_path / "x.onnx", quantization=scheme)
    scheme = read_quantization(int8_folder)
    scheme.scales["model.layers.0.mlp.up_proj"] = np.ones(3, np.float32)
    with pytest.raises(SparsecError, match="up_proj has 3 scales for 128 output channels"):
        export_model(model, tokenizer, tmp_path / "x.onnx", quantization=scheme)


def test_cli_exports_w8a8_and_can_ignore_it(int8_folder, tmp_path, capsys):
    def run(*extra):
        out = tmp_path / f"cli{len(extra)}.onnx"
        args = ["export", str(int8_folder), "-o", str(out), "--verify-tokens", "8", *extra]
        assert main(args) == 0
        return capsys.readouterr().out, Counter(n.op_type for n in ir.load(out).graph)

    stdout, ops = run()
    assert "W8A8 from quantization.json: 14 Linear weights" in stdout
    assert "greedy 8 tokens, onnxruntime vs PyTorch: match" in stdout
    assert ops["DequantizeLinear"] == N_LINEARS
    stdout, ops = run("--ignore-quantization")
    assert "W8A8" not in stdout and ops["DequantizeLinear"] == 0
