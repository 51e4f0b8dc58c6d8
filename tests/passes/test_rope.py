"""rope pass: rotate-half RoPE becomes RotaryEmbedding with shared cos/sin tables."""

from __future__ import annotations

import numpy as np
from passes_helpers import assert_pass_preserves, ops

from sparsec import contract
from sparsec.passes.cleanup import CleanupPass
from sparsec.passes.rmsnorm import RMSNormPass
from sparsec.passes.rope import RoPEPass, rope_tables


def _prepared(model):
    CleanupPass()(model)
    RMSNormPass()(model)
    return model


def test_fuses_q_and_k_of_every_layer(exported):
    model = _prepared(exported)
    # positions near the end of the tables too
    report = assert_pass_preserves(model, RoPEPass(), shapes=[(1, 5, 0), (2, 1, 4), (1, 2, 250)])
    assert report.fused == {"RotaryEmbedding": 4}
    assert "Neg" not in ops(model)
    ropes = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    # one pair of tables for all layers, from position_ids
    assert len({id(n.inputs[1]) for n in ropes}) == 1
    assert all(n.inputs[3].name == contract.POSITION_IDS for n in ropes)
    cos = ropes[0].inputs[1].const_value.numpy()
    cfg = contract.graph_config(model.metadata_props)
    assert cos.shape == (cfg.max_position_embeddings, cfg.head_dim // 2)


def test_tables_are_the_float32_angles():
    inv_freq = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).astype(np.float32)
    cos, sin = rope_tables(inv_freq, 300)
    p, j = 299, 1
    angle = np.float32(p) * inv_freq[j]
    assert cos[p, j] == np.float32(np.cos(np.float64(angle)))
    assert sin[p, j] == np.float32(np.sin(np.float64(angle)))


def test_without_max_positions_nothing_fuses_and_the_report_says_why(exported):
    model = _prepared(exported)
    del model.metadata_props[contract.META_CONFIG]
    report = assert_pass_preserves(model, RoPEPass())
    assert report.fused == {}
    assert "max_position_embeddings" in report.not_fused[0]
