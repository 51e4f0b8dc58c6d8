"""sparsity pass: per-weight sparsity and pattern, as docs/graph-contract.md defines them
(and as codegen classifies them)."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from sparsec import contract
from sparsec.passes import optimize
from sparsec.passes.sparsity import classify


def _pruned(kind: str, rng) -> np.ndarray:
    """A [in=64, out=32] weight whose zeros follow ``kind`` along the input axis."""
    w = rng.standard_normal((32, 64)).astype(np.float32)  # PyTorch [out, in]
    if kind == "2:4":
        groups = w.reshape(-1, 4)
        drop = np.argsort(np.abs(groups), axis=1)[:, :2]
        np.put_along_axis(groups, drop, 0, axis=1)
    elif kind == "1:4":
        groups = w.reshape(-1, 4)
        drop = np.argsort(np.abs(groups), axis=1)[:, :3]
        np.put_along_axis(groups, drop, 0, axis=1)
    elif kind == "4:8":
        groups = w.reshape(-1, 8)
        drop = np.argsort(np.abs(groups), axis=1)[:, :4]
        np.put_along_axis(groups, drop, 0, axis=1)
    elif kind == "block1x16":
        blocks = w.reshape(32, 4, 16)
        blocks[rng.random((32, 4)) < 0.5] = 0
    elif kind == "unstructured":
        w[rng.random(w.shape) < 0.5] = 0
    elif kind == "dense":
        w[0, 0] = 0
    return np.ascontiguousarray(w.T)  # stored [in, out]


@pytest.mark.parametrize("kind", ["dense", "2:4", "1:4", "4:8", "block1x16", "unstructured"])
def test_classify(kind):
    w = _pruned(kind, np.random.default_rng(0))
    sparsity, pattern = classify(w)
    assert pattern == kind
    assert sparsity == pytest.approx(float((w == 0).mean()))


def test_pattern_runs_along_the_input_axis():
    """2:4 along the outputs is not 2:4 along the inputs."""
    w = _pruned("2:4", np.random.default_rng(1))
    assert classify(np.ascontiguousarray(w.T))[1] != "2:4"


def test_record_of_a_pruned_model(exported):
    """k/v projections pruned 2:4, every other decoder weight 50% unstructured."""
    from sparsec.passes.cleanup import CleanupPass

    CleanupPass()(exported)
    rng = np.random.default_rng(3)
    for node in exported.graph:
        weight = node.inputs[1] if node.op_type == "MatMul" else None
        if weight is None or weight.const_value is None or weight.shape[1] == 272:
            continue  # lm_head stays dense
        w = weight.const_value.numpy().copy()
        if tuple(w.shape) == (64, 32):
            groups = w.T.reshape(-1, 4)  # along the inputs
            np.put_along_axis(
                groups,
                rng.permuted(np.tile([0, 1, 2, 3], (len(groups), 1)), axis=1)[:, :2],
                0,
                axis=1,
            )
            w = groups.reshape(w.shape[1], w.shape[0]).T
        else:
            w[rng.random(w.shape) < 0.5] = 0
        weight.const_value = ir.tensor(np.ascontiguousarray(w))
    optimized, report = optimize(exported)
    record = json.loads(optimized.metadata_props[contract.META_SPARSITY])
    for i in range(2):
        for role in ("k_proj", "v_proj"):
            entry = record[f"layers.{i}.self_attn.{role}.weight"]
            assert entry == {"shape": [64, 32], "sparsity": 0.5, "pattern": "2:4"}
        q = record[f"layers.{i}.self_attn.q_proj.weight"]
        assert q["pattern"] == "unstructured" and q["sparsity"] == pytest.approx(0.5, abs=0.05)
    assert record["lm_head.weight"]["pattern"] == "dense"
    rows = {(r.layer, r.role): r for r in report.sparsity}
    assert rows[(1, "down_proj")].sparsity == pytest.approx(0.5, abs=0.05)
    assert rows[(0, "k_proj")].pattern == "2:4"
    assert "unstructured" in report.to_text()
