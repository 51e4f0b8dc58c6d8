"""Helpers of the graph-pass tests: run graphs under onnxruntime, make inputs, compare."""

from __future__ import annotations

import numpy as np

from sparsec import contract


def session(model):
    from sparsec.passes.functions import ort_session

    return ort_session(model)


def exported_feeds(model, batch: int, seq: int, past: int, seed: int = 0) -> dict:
    """Inputs of an exported-form graph: random ids and caches, full mask, positions."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in model.graph.inputs:
        if v.name == contract.INPUT_IDS:
            feeds[v.name] = rng.integers(0, 256, (batch, seq), dtype=np.int64)
        elif v.name == contract.ATTENTION_MASK:
            feeds[v.name] = np.ones((batch, past + seq), np.int64)
        elif v.name == contract.POSITION_IDS:
            feeds[v.name] = np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))
        else:
            shape = (batch, v.shape[1], past, v.shape[3])
            feeds[v.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def run(model, feeds) -> dict:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(
        zip(
            names,
            sess.run(None, {k: feeds[k] for k in (i.name for i in sess.get_inputs())}),
            strict=True,
        )
    )


def assert_same_outputs(before: dict, after: dict, rtol: float = 1e-5) -> None:
    assert before.keys() == after.keys()
    for name in before:
        want, got = before[name], after[name]
        err = np.abs(got - want).max() / (np.abs(want).max() + 1e-30)
        assert err <= rtol, f"{name}: relative error {err:.2e}"


SHAPES = [(1, 5, 0), (2, 1, 4)]  # (batch, new tokens, cached tokens): prefill, decode


def outputs_at(model, shapes=SHAPES) -> list[dict]:
    """The model's outputs at each (batch, new, cached) shape, with fixed random inputs."""
    return [run(model, exported_feeds(model, *shape, seed=i)) for i, shape in enumerate(shapes)]


def assert_pass_preserves(model, the_pass, shapes=SHAPES, rtol: float = 1e-5):
    """Run ``the_pass`` on ``model`` and check every output at ``shapes`` is unchanged."""
    before = outputs_at(model, shapes)
    the_pass(model)
    after = outputs_at(model, shapes)
    for b, a in zip(before, after, strict=True):
        assert_same_outputs(b, a, rtol)
    return the_pass.report


def ops(model) -> dict[str, int]:
    from sparsec.passes.report import op_counts

    return op_counts(model)


def tiny_graph(nodes, inputs, outputs, initializers=(), opset: int = 20):
    """An ``onnx_ir.Model`` from onnx.helper pieces (``initializers``: name -> array)."""
    import onnx
    import onnx.helper as oh
    import onnx_ir as ir

    graph = oh.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        initializer=[
            onnx.numpy_helper.from_array(np.asarray(a), n) for n, a in dict(initializers).items()
        ],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10)
    return ir.serde.deserialize_model(proto)
