"""cleanup pass: common onnx-ir passes + constant folding, outputs unchanged."""

from __future__ import annotations

from passes_helpers import assert_pass_preserves, ops

from sparsec import contract
from sparsec.passes.cleanup import CleanupPass


def test_folds_the_tied_lm_head_transpose_into_an_initializer(exported):
    assert "Transpose" in {
        n.op_type for n in exported.graph if n.inputs and n.inputs[0].is_initializer()
    }
    assert_pass_preserves(exported, CleanupPass(), rtol=0)
    lm_head = next(n for n in exported.graph if n.outputs[0].name == contract.LOGITS)
    weight = lm_head.inputs[1]
    assert weight.is_initializer() and weight.const_value.shape == (64, 272)
    assert not any(
        n.op_type == "Transpose" and n.inputs[0].is_initializer() for n in exported.graph
    )


def test_torchscript_style_constants_and_casts_go(tmp_path):
    import numpy as np
    import onnx.helper as oh
    from passes_helpers import run, tiny_graph

    nodes = [
        oh.make_node("Constant", [], ["two"], value=oh.make_tensor("t", 1, [], [2.0])),
        oh.make_node("Cast", ["x"], ["xf"], to=1),  # float -> float: a no-op
        oh.make_node("Identity", ["xf"], ["xi"]),
        oh.make_node("Mul", ["xi", "two"], ["y"]),
    ]
    model = tiny_graph(
        nodes, [oh.make_tensor_value_info("x", 1, [3])], [oh.make_tensor_value_info("y", 1, [3])]
    )
    x = np.arange(3, dtype=np.float32)
    CleanupPass()(model)
    assert ops(model) == {"Mul": 1}
    np.testing.assert_array_equal(run(model, {"x": x})["y"], 2 * x)
