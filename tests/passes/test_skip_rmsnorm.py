"""skip_rmsnorm pass: residual add + RMSNormalization become SkipRMSNormalization."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
from passes_helpers import assert_pass_preserves, ops, run, tiny_graph

from sparsec.passes.cleanup import CleanupPass
from sparsec.passes.rmsnorm import RMSNormPass
from sparsec.passes.skip_rmsnorm import SkipRMSNormPass


def test_fuses_every_residual_norm_of_the_tiny_export(exported):
    CleanupPass()(exported)
    RMSNormPass()(exported)
    report = assert_pass_preserves(exported, SkipRMSNormPass())
    # every norm but layer 0's input norm has a residual add before it
    assert report.fused == {"SkipRMSNormalization": 4}
    counts = ops(exported)
    assert counts["RMSNormalization"] == 1
    assert report.not_fused == []


def test_bias_add_is_not_a_residual():
    nodes = [
        oh.make_node("Add", ["x", "bias"], ["s"]),
        oh.make_node("RMSNormalization", ["s", "w"], ["y"], axis=-1, epsilon=1e-5),
    ]
    model = tiny_graph(
        nodes,
        [oh.make_tensor_value_info("x", 1, [2, 3, 8])],
        [oh.make_tensor_value_info("y", 1, [2, 3, 8])],
        {"bias": np.ones((1, 1, 8), np.float32), "w": np.ones(8, np.float32)},
        opset=23,
    )
    x = np.random.default_rng(0).standard_normal((2, 3, 8), dtype=np.float32)
    before = run(model, {"x": x})
    p = SkipRMSNormPass()
    p(model)
    assert p.report.fused == {}
    assert "broadcasts" in p.report.not_fused[0]
    np.testing.assert_array_equal(run(model, {"x": x})["y"], before["y"])
