"""names pass: weights and fused nodes named after their role; only names change."""

from __future__ import annotations

import json

from sparsec import contract


def test_roles_of_the_tiny_model(optimized_tiny):
    model, _ = optimized_tiny
    names = set(model.graph.initializers)
    for i in range(2):
        for role in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # fmt: skip
            assert f"layers.{i}.{role}.weight" in names
    assert {"lm_head.weight", "embed_tokens.weight", "rope.cos_cache", "rope.sin_cache"} <= names
    q = model.graph.initializers["layers.1.self_attn.q_proj.weight"].const_value
    k = model.graph.initializers["layers.1.self_attn.k_proj.weight"].const_value
    assert q.shape == (64, 64) and k.shape == (64, 32)  # [in, out]
    nodes = {n.name: n for n in model.graph}
    assert nodes["layers.0.self_attn"].op_type == "CachedAttention"
    assert nodes["layers.1.mlp"].op_type == "SwiGLU"
    assert nodes["lm_head"].outputs[0].name == contract.LOGITS
    # the random tiny model's norm scales are all ones: one shared initializer keeps its name
    shared = {n.inputs[-1].name for n in model.graph if "RMSNormalization" in n.op_type}
    assert len(shared) == 1


def test_sparsity_record_uses_the_final_names(optimized_tiny):
    model, report = optimized_tiny
    record = json.loads(model.metadata_props[contract.META_SPARSITY])
    assert set(record) == {r.name for r in report.sparsity}
    assert all(name in model.graph.initializers for name in record)
    assert len(record) == 15
