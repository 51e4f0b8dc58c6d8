"""A W8A8 model (sparsify's int8 weight grid, per-token activation fake quantization)
exported by torch dynamo: the activation quantizers become PerTokenFakeQuant ops and
SwiGLU attributes, everything else fuses as usual, and nothing changes numerically."""

from __future__ import annotations

import copy

import onnx_ir as ir
import pytest

from sparsec.passes import optimize
from sparsec.passes.verify import compare


@pytest.fixture(scope="module")
def w8a8_onnx(tiny_model, tmp_path_factory):
    import torch

    from sparsec.export import export_model
    from sparsec.sparsify.quant import ActivationFakeQuant, quantize_weights_

    model, tokenizer = tiny_model
    model = copy.deepcopy(model)
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "layers." in name
    }
    quantize_weights_(linears)
    with ActivationFakeQuant(linears):
        path = tmp_path_factory.mktemp("w8a8") / "tiny_w8a8.onnx"
        return export_model(model, tokenizer, path, source="tiny-w8a8")


def test_w8a8_export_fuses_with_activation_quantization(w8a8_onnx):
    model, report = optimize(ir.load(w8a8_onnx))
    # per layer: q/k/v input (shared), o_proj input, MLP input and hidden
    assert report.fused("PerTokenFakeQuant") == 8
    assert report.fused("CachedAttention") == 2 and report.fused("SwiGLU") == 2
    assert report.outside_contract == {}
    assert report.ops_after["sparsec.PerTokenFakeQuant"] == 4  # the MLP's went into SwiGLU
    swiglus = [n for n in model.graph if n.op_type == "SwiGLU"]
    assert all(n.attributes["quantize_activations"].value == 1 for n in swiglus)
    for n in model.graph:
        if n.op_type == "PerTokenFakeQuant":
            assert {u.op_type for u, _ in n.outputs[0].uses()} == {"MatMul"}
    roles = {(r.layer, r.role) for r in report.sparsity}
    assert (0, "o_proj") in roles and (1, "o_proj") in roles
    for engine in ("onnxruntime", "numpy"):
        for r in compare(ir.load(w8a8_onnx), model, engine=engine):
            assert r.ok(1e-5), (engine, r)
