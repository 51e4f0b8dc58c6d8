"""A graph from the TorchScript exporter (``dynamo=False``): what matches fuses, the
rest stays, the report says why, and the graph computes what it did."""

from __future__ import annotations

import warnings

import onnx_ir as ir
import pytest
from passes_helpers import assert_same_outputs, outputs_at

from sparsec import contract
from sparsec.passes import optimize


@pytest.fixture(scope="module")
def torchscript_onnx(tiny_model, tiny_onnx, tmp_path_factory):
    import torch

    from sparsec.export import _cache_wrapper, _example_inputs, _io_names

    model, _ = tiny_model
    wrapper = _cache_wrapper(model).eval()
    ids, mask, pos, kv = _example_inputs(model.config, 2, 3, 4)
    inputs, outputs = _io_names(model.config.num_hidden_layers)
    dynamic = {n: {0: "batch", 1: "seq"} for n in inputs[:3]}
    dynamic[contract.ATTENTION_MASK] = {0: "batch", 1: "total"}
    dynamic.update({n: {0: "batch", 2: "past"} for n in inputs[3:]})
    path = tmp_path_factory.mktemp("ts") / "tiny_ts.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (ids, mask, pos, *kv), str(path), dynamo=False, input_names=inputs,
            output_names=outputs, dynamic_axes=dynamic, opset_version=18,
        )  # fmt: skip
    onnx_model = ir.load(path)
    onnx_model.metadata_props.update(ir.load(tiny_onnx).metadata_props)  # config, tokenizer
    ir.save(onnx_model, path)
    return path


def test_fuses_what_matches_and_stays_correct(torchscript_onnx):
    model = ir.load(torchscript_onnx)
    before = outputs_at(model)
    model, report = optimize(model)
    after = outputs_at(model)
    for b, a in zip(before, after, strict=True):
        assert_same_outputs(b, a, rtol=1e-5)
    assert report.fused("RMSNormalization") == 5
    assert report.fused("SkipRMSNormalization") == 4
    assert report.fused("SwiGLU") == 2
    # RoPE's slices are computed from shapes here, so RoPE and attention stay, reported
    rope = next(p for p in report.passes if p.name == "rope")
    attention = next(p for p in report.passes if p.name == "attention")
    assert report.fused("CachedAttention") == 0
    assert rope.not_fused and "Neg" in rope.not_fused[0]
    assert "RotaryEmbedding" in attention.not_fused[0]
    # the interface is untouched: still the exported one
    assert contract.ATTENTION_MASK in [v.name for v in model.graph.inputs]
    assert "Softmax" in report.outside_contract
    assert "OUTSIDE THE CONTRACT" in report.to_text()
