"""attention pass: RoPE'd q/k + KV append + GQA + causal softmax + values become
CachedAttention on in-place cache buffers, checked against the exported graph."""

from __future__ import annotations

import numpy as np
import pytest
from passes_helpers import assert_pass_preserves, ops

from sparsec import contract
from sparsec.passes.attention import CachedAttentionPass
from sparsec.passes.cleanup import CleanupPass
from sparsec.passes.rmsnorm import RMSNormPass
from sparsec.passes.rope import RoPEPass
from sparsec.passes.verify import compare


def _prepared(model, rope=True):
    CleanupPass()(model)
    RMSNormPass()(model)
    if rope:
        RoPEPass()(model)
    return model


@pytest.mark.parametrize("validate", [True, False])
def test_fuses_every_layer_and_rewrites_the_cache_interface(tiny_onnx, exported, validate):
    import onnx_ir as ir

    model = _prepared(exported)
    p = CachedAttentionPass(validate=validate)
    p(model)
    assert p.report.fused == {"CachedAttention": 2}, p.report.not_fused
    counts = ops(model)
    for gone in ("Softmax", "Concat", "Expand", "Transpose", "Reshape", "RotaryEmbedding"):
        assert gone not in counts
    inputs = {v.name: v for v in model.graph.inputs}
    assert contract.ATTENTION_MASK not in inputs
    for i in range(2):
        for v in (
            inputs[contract.past_key(i)],
            next(o for o in model.graph.outputs if o.name == contract.present_value(i)),
        ):
            assert str(v.shape[2]) == "capacity" and v.shape[1] == 2 and v.shape[3] == 16
    node = next(n for n in model.graph if n.op_type == "CachedAttention")
    assert node.domain == "sparsec"
    assert [v.name for v in node.inputs[3:6]] == [
        contract.past_key(0),
        contract.past_value(0),
        contract.POSITION_IDS,
    ]
    assert node.attributes["num_heads"].value == 4 and node.attributes["kv_num_heads"].value == 2
    assert node.attributes["scale"].value == pytest.approx(0.25)
    # the graph, still with unfused MLPs, computes what the export did
    for r in compare(ir.load(tiny_onnx), model):
        assert r.ok(1e-5), r


def test_needs_rope_fused_first_and_says_so(exported):
    model = _prepared(exported, rope=False)
    report = assert_pass_preserves(model, CachedAttentionPass())
    assert report.fused == {}
    assert "RotaryEmbedding" in report.not_fused[0]
    assert contract.ATTENTION_MASK in [v.name for v in model.graph.inputs]


def test_a_mask_that_is_not_causal_fails_the_numerical_check(exported):
    """Queries that may not see themselves (LessOrEqual -> Less): nothing fuses."""
    model = _prepared(exported)
    compare_node = next(n for n in model.graph if n.op_type == "LessOrEqual")
    compare_node.op_type = "Less"
    before = len(model.graph)
    report = assert_pass_preserves(model, CachedAttentionPass())
    assert report.fused == {}
    assert "numerical check failed" in report.not_fused[0]
    assert len(model.graph) == before


def test_a_changed_scale_is_carried_not_lost(exported):
    """The fused op takes the exported graph's scaling, whatever it is."""
    model = _prepared(exported)
    for node in model.graph:
        if node.op_type == "Mul" and node.inputs[1].const_value is not None:
            if (
                node.inputs[1].const_value.numpy().size == 1
                and float(node.inputs[1].const_value.numpy()) == 0.5
            ):
                import onnx_ir as ir

                node.replace_input_with(
                    1, ir.Value(name="s", const_value=ir.tensor(np.float32(0.3)))
                )
                model.graph.register_initializer(node.inputs[1])
                break
    p = CachedAttentionPass()
    p(model)
    scales = sorted(
        n.attributes["scale"].value for n in model.graph if n.op_type == "CachedAttention"
    )
    assert scales == pytest.approx([0.3 * 0.5, 0.25])
