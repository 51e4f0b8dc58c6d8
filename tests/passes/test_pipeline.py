"""The whole pipeline on the tiny export: what fuses, the interface and metadata of
docs/graph-contract.md section 3, and the numbers against the exported graph."""

from __future__ import annotations

import json

import onnx
import onnx_ir as ir
import pytest

from sparsec import contract
from sparsec.passes import optimize_file
from sparsec.passes.verify import compare

CONTRACT_OPS = {
    "Gather", "MatMul", "Add", "RMSNormalization", "DequantizeLinear",
    "sparsec.SkipRMSNormalization", "sparsec.CachedAttention", "sparsec.SwiGLU",
    "sparsec.PerTokenFakeQuant",
}  # fmt: skip


def test_everything_fuses(optimized_tiny):
    model, report = optimized_tiny
    assert report.fused("RMSNormalization") == 5
    assert report.fused("SkipRMSNormalization") == 4
    assert report.fused("CachedAttention") == 2
    assert report.fused("SwiGLU") == 2
    assert report.ops_after == {
        "MatMul": 9,  # q, k, v, o per layer + lm_head
        "sparsec.SkipRMSNormalization": 4,
        "sparsec.CachedAttention": 2,
        "sparsec.SwiGLU": 2,
        "Gather": 1,
        "RMSNormalization": 1,
    }
    assert set(report.ops_after) <= CONTRACT_OPS and report.outside_contract == {}
    for p in report.passes:
        assert p.not_fused == [], (p.name, p.not_fused)
    text = report.to_text()
    assert "CachedAttention x2" in text and "all ops are in the optimized-graph contract" in text


def test_interface_and_metadata(tiny_onnx, optimized_tiny):
    model, _ = optimized_tiny
    exported = ir.load(tiny_onnx)
    names = [v.name for v in model.graph.inputs]
    expect = [contract.INPUT_IDS, contract.POSITION_IDS]
    for i in range(2):
        expect += [contract.past_key(i), contract.past_value(i)]
    assert names == expect
    assert [v.name for v in model.graph.outputs] == [v.name for v in exported.graph.outputs]
    for v in list(model.graph.inputs)[2:] + list(model.graph.outputs)[1:]:
        assert v.dtype == ir.DataType.FLOAT and str(v.shape[2]) == "capacity"
    meta = model.metadata_props
    for key, value in exported.metadata_props.items():
        if key != contract.META_FORMAT:
            assert meta[key] == value
    assert meta[contract.META_FORMAT] == "optimized"
    record = json.loads(meta[contract.META_SPARSITY])
    assert record["layers.0.mlp.down_proj.weight"] == {
        "shape": [128, 64],
        "sparsity": 0.0,
        "pattern": "dense",
    }
    assert model.opset_imports[""] >= 23 and model.opset_imports["sparsec"] == 1
    assert {f[1] for f in model.functions} == {
        "SkipRMSNormalization",
        "CachedAttention",
        "SwiGLU",
        "PerTokenFakeQuant",
    }


@pytest.mark.parametrize("engine", ["onnxruntime", "numpy"])
def test_matches_the_exported_graph(tiny_onnx, optimized_tiny, engine):
    model, _ = optimized_tiny
    for r in compare(ir.load(tiny_onnx), model, engine=engine):
        assert r.ok(1e-5), r


def test_optimize_file_writes_a_valid_model_atomically(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "tiny.opt.onnx"
    report = optimize_file(tiny_onnx, out, report=True)
    assert "nodes:" in capsys.readouterr().out
    assert report.fused("CachedAttention") == 2
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left
    onnx.checker.check_model(str(out), full_check=True)
    assert ir.load(out).metadata_props[contract.META_FORMAT] == "optimized"
