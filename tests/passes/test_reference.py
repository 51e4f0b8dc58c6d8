"""reference.py: the numpy semantics and the interpreter of optimized graphs."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from passes_helpers import run, tiny_graph

from sparsec.errors import SparsecError
from sparsec.passes import reference


@pytest.mark.parametrize("axis_scale", [True, False], ids=["per-channel", "per-tensor"])
def test_dequantize_linear_matches_onnxruntime(axis_scale):
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (6, 5), dtype=np.int8)
    scale = rng.random(5).astype(np.float32) if axis_scale else np.float32(0.02)
    zp = np.full(5, 3, np.int8) if axis_scale else np.int8(3)
    model = tiny_graph(
        [oh.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1)],
        [oh.make_tensor_value_info("q", 3, [6, 5])],
        [oh.make_tensor_value_info("y", 1, [6, 5])],
        {"s": scale, "z": zp},
    )
    want = run(model, {"q": q})["y"]
    np.testing.assert_array_equal(reference.dequantize_linear(q, scale, zp, axis=1), want)


def test_evaluate_refuses_ops_outside_the_contract_by_name():
    model = tiny_graph(
        [oh.make_node("Softmax", ["x"], ["y"], name="stray_softmax")],
        [oh.make_tensor_value_info("x", 1, [2])],
        [oh.make_tensor_value_info("y", 1, [2])],
    )
    with pytest.raises(SparsecError, match="'stray_softmax': op Softmax is outside"):
        reference.evaluate(model, {"x": np.zeros(2, np.float32)})


def test_cached_attention_rejects_positions_beyond_the_cache():
    cache = np.zeros((1, 1, 4, 8), np.float32)
    x = np.zeros((1, 1, 8), np.float32)
    table = np.ones((16, 4), np.float32)
    with pytest.raises(ValueError, match="capacity 4"):
        reference.cached_attention(
            x, x, x, cache, cache, np.array([[4]]), table, table, num_heads=1, kv_num_heads=1
        )
