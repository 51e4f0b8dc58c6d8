"""swiglu pass: gate/up/SiLU/multiply/down becomes SwiGLU, plain and W8A8."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
from passes_helpers import assert_pass_preserves, ops, run, tiny_graph

from sparsec.passes import reference
from sparsec.passes.cleanup import CleanupPass
from sparsec.passes.swiglu import SwiGLUPass


def test_fuses_every_mlp_of_the_tiny_export(exported):
    CleanupPass()(exported)
    report = assert_pass_preserves(exported, SwiGLUPass())
    assert report.fused == {"SwiGLU": 2}
    assert "Sigmoid" not in ops(exported)
    node = next(n for n in exported.graph if n.op_type == "SwiGLU")
    assert node.domain == "sparsec"
    assert node.attributes["quantize_activations"].value == 0
    shapes = [tuple(v.shape) for v in node.inputs[1:]]
    assert shapes == [(64, 128), (64, 128), (128, 64)]


def _mlp(quantize_x: bool, quantize_h: bool):
    rng = np.random.default_rng(0)
    nodes = []
    x_in = "x"
    if quantize_x:
        nodes.append(oh.make_node("PerTokenFakeQuant", ["x"], ["xq"], domain="sparsec"))
        x_in = "xq"
    nodes += [
        oh.make_node("MatMul", [x_in, "wg"], ["g"]),
        oh.make_node("Sigmoid", ["g"], ["sg"]),
        oh.make_node("Mul", ["sg", "g"], ["silu"]),  # operand order differs from the export
        oh.make_node("MatMul", [x_in, "wu"], ["u"]),
        oh.make_node("Mul", ["u", "silu"], ["h"]),
    ]
    h_in = "h"
    if quantize_h:
        nodes.append(oh.make_node("PerTokenFakeQuant", ["h"], ["hq"], domain="sparsec"))
        h_in = "hq"
    nodes.append(oh.make_node("MatMul", [h_in, "wd"], ["y"]))
    weights = {
        "wg": rng.standard_normal((8, 20)).astype(np.float32),
        "wu": rng.standard_normal((8, 20)).astype(np.float32),
        "wd": rng.standard_normal((20, 8)).astype(np.float32),
    }
    model = tiny_graph(
        nodes,
        [oh.make_tensor_value_info("x", 1, [2, 3, 8])],
        [oh.make_tensor_value_info("y", 1, [2, 3, 8])],
        weights,
        opset=23,
    )
    model.opset_imports["sparsec"] = 1
    return model, weights


def test_w8a8_mlp_folds_its_activation_quantization():
    model, w = _mlp(True, True)
    x = np.random.default_rng(1).standard_normal((2, 3, 8), dtype=np.float32)
    before = run(model, {"x": x})["y"]
    p = SwiGLUPass()
    p(model)
    assert p.report.fused == {"SwiGLU": 1}
    assert list(ops(model)) == ["sparsec.SwiGLU"]
    node = next(iter(model.graph))
    assert node.attributes["quantize_activations"].value == 1
    after = run(model, {"x": x})["y"]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    ref = reference.swiglu(x, w["wg"], w["wu"], w["wd"], quantize_activations=1)
    np.testing.assert_allclose(after, ref, rtol=1e-4, atol=1e-4)


def test_half_quantized_mlp_is_left_as_it_is():
    model, _ = _mlp(True, False)
    p = SwiGLUPass()
    p(model)
    assert p.report.fused == {}
    assert "Sigmoid" in ops(model)
    assert p.report.not_fused and "SwiGLU" in p.report.not_fused[0]
