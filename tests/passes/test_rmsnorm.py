"""rmsnorm pass: the exported RMSNorm subgraphs become RMSNormalization, same outputs."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
from passes_helpers import assert_pass_preserves, ops, run, tiny_graph

from sparsec.passes.cleanup import CleanupPass
from sparsec.passes.rmsnorm import RMSNormPass


def test_fuses_every_norm_of_the_tiny_export(exported):
    CleanupPass()(exported)
    report = assert_pass_preserves(exported, RMSNormPass())
    # 2 layers x (input, post-attention) + the final norm
    assert report.fused == {"RMSNormalization": 5}
    counts = ops(exported)
    assert "Pow" not in counts and "ReduceMean" not in counts
    assert report.not_fused == []


def _norm_graph(axes, form="reciprocal"):
    nodes = [
        oh.make_node("Pow", ["x", "two"], ["sq"]),
        oh.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        oh.make_node("Add", ["ms", "eps"], ["mse"]),
        oh.make_node("Sqrt", ["mse"], ["r"]),
        oh.make_node("Reciprocal", ["r"], ["inv"]),
        oh.make_node("Mul", ["x", "inv"], ["n"]),
        oh.make_node("Mul", ["w", "n"], ["y"]),
    ]
    if form == "one_over":
        nodes[4] = oh.make_node("Div", ["one", "r"], ["inv"])
    inits = {
        "two": np.float32(2),
        "axes": np.array(axes, np.int64),
        "eps": np.float32(1e-6),
        "one": np.float32(1),
        "w": np.linspace(0.5, 1.5, 8).astype(np.float32),
    }
    return tiny_graph(
        nodes,
        [oh.make_tensor_value_info("x", 1, [2, 3, 8])],
        [oh.make_tensor_value_info("y", 1, [2, 3, 8])],
        inits,
    )


def test_torchscript_form_with_div_fuses():
    model = _norm_graph([-1], "one_over")
    x = np.random.default_rng(0).standard_normal((2, 3, 8), dtype=np.float32)
    before = run(model, {"x": x})
    p = RMSNormPass()
    p(model)
    assert p.report.fused == {"RMSNormalization": 1}
    np.testing.assert_allclose(run(model, {"x": x})["y"], before["y"], rtol=1e-5, atol=1e-6)


def test_norm_over_another_axis_is_left_and_reported():
    model = _norm_graph([1])
    p = RMSNormPass()
    p(model)
    assert p.report.fused == {}
    assert "ReduceMean" in ops(model)
    assert len(p.report.not_fused) == 1
    assert "does not reduce the last axis" in p.report.not_fused[0]
