"""Bad input: clear SparsecErrors naming the file or the node, never a traceback."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from sparsec.errors import SparsecError
from sparsec.passes import optimize, optimize_file


def _save(tmp_path, nodes, name="bad.onnx"):
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", 1, [2])],
        [oh.make_tensor_value_info("y", 1, [2])],
    )
    path = tmp_path / name
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 20)]), path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(SparsecError, match="no such file"):
        optimize_file(tmp_path / "nope.onnx", tmp_path / "out.onnx")


def test_not_onnx(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    with pytest.raises(SparsecError, match="not a readable ONNX model"):
        optimize_file(path, tmp_path / "out.onnx")


def test_dangling_input_names_the_node(tmp_path):
    path = _save(tmp_path, [oh.make_node("Add", ["x", "ghost"], ["y"], name="add_ghost")])
    with pytest.raises(SparsecError, match=r"node 'add_ghost' \(Add\) reads 'ghost'"):
        optimize_file(path, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_checker_failure_names_the_node(tmp_path):
    path = _save(tmp_path, [oh.make_node("Softmax", ["x"], ["y"], name="bad_softmax", bogus=3)])
    with pytest.raises(SparsecError, match=r"ONNX checker: node 'bad_softmax' \(Softmax\)"):
        optimize_file(path, tmp_path / "out.onnx")


def test_already_optimized(optimized_tiny):
    model, _ = optimized_tiny
    with pytest.raises(SparsecError, match="already optimized"):
        optimize(model)


def test_unwritable_destination(tiny_onnx, tmp_path):
    with pytest.raises(SparsecError, match="does not exist"):
        optimize_file(tiny_onnx, tmp_path / "missing" / "out.onnx")


def test_unmatched_graph_stays_valid_and_correct(tmp_path):
    """A graph with nothing to fuse comes out computing the same, with a report."""
    from passes_helpers import run, tiny_graph

    model = tiny_graph(
        [oh.make_node("Softmax", ["x"], ["y"], axis=-1)],
        [oh.make_tensor_value_info("x", 1, [2, 3])],
        [oh.make_tensor_value_info("y", 1, [2, 3])],
    )
    x = np.random.default_rng(0).standard_normal((2, 3), dtype=np.float32)
    before = run(model, {"x": x})["y"]
    model, report = optimize(model)
    np.testing.assert_array_equal(run(model, {"x": x})["y"], before)
    assert report.outside_contract == {"Softmax": 1}
    attention = next(p for p in report.passes if p.name == "attention")
    assert "no present.{i}.key outputs" in attention.not_fused[0]
