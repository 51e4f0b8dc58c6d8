"""The fused-projection split: a MatMul whose output is only cut into column blocks
becomes one MatMul per block (float32 and int8 weights), numbers unchanged; what does
not tile the columns is left alone. (On a real export: tests/families, Phi-3.)"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from passes_helpers import run

from sparsec.passes import reference
from sparsec.passes.split_linear import SplitFusedLinearPass


def _graph(weight_inputs, w_value, cuts, nodes_before=()):
    """x [1, 3, 8] @ w -> cut by ``cuts`` ("split" or [(start, end), ...]) -> + 0."""
    x = ir.val("x", ir.DataType.FLOAT, [1, 3, 8])
    mm = ir.node("MatMul", [x, w_value])
    mm.outputs[0].shape = ir.Shape([1, 3, 12])
    nodes, consts = [*nodes_before, mm], list(weight_inputs)
    if cuts == "split":
        split = ir.node("Split", [mm.outputs[0]], {"axis": -1, "num_outputs": 3}, num_outputs=3)
        nodes.append(split)
        blocks = list(split.outputs)
    else:
        blocks = []
        for k, (a, b) in enumerate(cuts):
            bounds = [ir.val(f"{n}{k}", const_value=ir.tensor(np.array([v], np.int64)))
                      for n, v in (("s", a), ("e", b), ("ax", -1), ("st", 1))]  # fmt: skip
            consts += bounds
            node = ir.node("Slice", [mm.outputs[0], *bounds])
            nodes.append(node)
            blocks.append(node.outputs[0])
    zero = ir.val("zero", const_value=ir.tensor(np.zeros(1, np.float32)))
    adds = [ir.node("Add", [out, zero]) for out in blocks]  # the blocks' readers
    for i, add in enumerate(adds):
        add.outputs[0].name = f"y{i}"
    graph = ir.Graph([x], [a.outputs[0] for a in adds], nodes=[*nodes, *adds],
                     initializers=[*consts, zero], opset_imports={"": 23})  # fmt: skip
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("cuts", ["split", [(0, 4), (4, 6), (6, 12)]])
def test_float_blocks_split_and_compute_the_same(cuts):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 12)).astype(np.float32)
    wv = ir.val("w", const_value=ir.tensor(w))
    model = _graph([wv], wv, cuts)
    feeds = {"x": rng.standard_normal((1, 3, 8), dtype=np.float32)}
    before = run(model, feeds)
    the_pass = SplitFusedLinearPass()
    the_pass(model)
    assert the_pass.report.fused == {"MatMul split": 1}
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMul") == 3 and "Split" not in ops and "Slice" not in ops
    after = run(model, feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6, atol=1e-6)


def test_blocks_that_do_not_tile_the_columns_stay():
    """Ablation of the tiling check: overlapping or partial cuts are not split."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 12)).astype(np.float32)
    for cuts in ([(0, 6), (4, 12)], [(0, 4), (4, 8)]):
        wv = ir.val("w", const_value=ir.tensor(w))
        model = _graph([wv], wv, cuts)
        the_pass = SplitFusedLinearPass()
        the_pass(model)
        assert the_pass.report.fused == {}
        assert [n.op_type for n in model.graph].count("MatMul") == 1


def test_split_keeps_int8_weights_and_scales():
    """A fused int8 projection splits into int8 blocks with their own scales, exactly."""
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (8, 12), dtype=np.int8)
    scale = rng.uniform(0.01, 0.1, 12).astype(np.float32)
    x = ir.val("x", ir.DataType.FLOAT, [1, 3, 8])
    wq = ir.val("wq", const_value=ir.tensor(q))
    s = ir.val("s", const_value=ir.tensor(scale))
    dq = ir.node("DequantizeLinear", [wq, s], {"axis": 1})
    mm = ir.node("MatMul", [x, dq.outputs[0]])
    mm.outputs[0].shape = ir.Shape([1, 3, 12])
    split = ir.node("Split", [mm.outputs[0]], {"axis": -1, "num_outputs": 3}, num_outputs=3)
    zero = ir.val("zero", const_value=ir.tensor(np.zeros(4, np.float32)))
    adds = [ir.node("Add", [out, zero]) for out in split.outputs]  # the blocks' readers
    for i, add in enumerate(adds):
        add.outputs[0].name = f"y{i}"
    graph = ir.Graph([x], [a.outputs[0] for a in adds], nodes=[dq, mm, split, *adds],
                     initializers=[wq, s, zero], opset_imports={"": 23})  # fmt: skip
    model = ir.Model(graph, ir_version=10)
    feeds = {"x": rng.standard_normal((1, 3, 8), dtype=np.float32)}
    before = reference.dequantize_linear(q, scale)
    the_pass = SplitFusedLinearPass()
    the_pass(model)
    assert the_pass.report.fused == {"MatMul split": 1}
    assert [n.op_type for n in model.graph].count("MatMul") == 3
    assert all(
        n.inputs[0].const_value.dtype == ir.DataType.INT8
        for n in model.graph
        if n.op_type == "DequantizeLinear"
    )
    got = reference.evaluate(model, feeds)
    for i in range(3):
        want = feeds["x"] @ before[:, 4 * i : 4 * i + 4]
        np.testing.assert_allclose(got[f"y{i}"], want, rtol=1e-6, atol=1e-6)
