"""cleanup pass: common onnx-ir passes + constant folding, outputs unchanged."""

from __future__ import annotations

from passes_helpers import assert_pass_preserves, ops

from sparsec.passes.cleanup import CleanupPass


def test_folds_a_weight_transpose_into_an_initializer(exported):
    """``sparsec export`` already turns each ``Transpose(W)`` into a (lazily transposed)
    initializer; other exporters leave ``MatMul(x, Transpose(W))`` (a tied head, say),
    which this pass folds whatever W's size."""
    import numpy as np
    import onnx.helper as oh
    from passes_helpers import run, tiny_graph

    assert not any(
        n.op_type == "Transpose" and n.inputs[0].is_initializer() for n in exported.graph
    )
    w = np.arange(12, dtype=np.float32).reshape(4, 3)  # [out, in], as PyTorch keeps it
    nodes = [
        oh.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        oh.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    model = tiny_graph(
        nodes,
        [oh.make_tensor_value_info("x", 1, [2, 3])],
        [oh.make_tensor_value_info("y", 1, [2, 4])],
        initializers={"w": w},
    )
    x = np.ones((2, 3), np.float32)
    CleanupPass()(model)
    assert ops(model) == {"MatMul": 1}
    weight = next(iter(model.graph)).inputs[1]
    assert weight.is_initializer() and weight.const_value.shape == (3, 4)
    np.testing.assert_array_equal(run(model, {"x": x})["y"], x @ w.T)
    assert_pass_preserves(exported, CleanupPass(), rtol=0)


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
