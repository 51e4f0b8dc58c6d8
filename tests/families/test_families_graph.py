"""Every family through export and optimize: all ops fuse into the contract, the fused
attention carries the family's parts as attributes, and the optimized graph computes
what the exported one did (onnxruntime and the numpy references), including past a
sliding window. Ablations take each part away and see the check fail."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from sparsec import contract
from sparsec.passes import functions
from sparsec.passes.verify import CASES, Case, compare
from sparsec.testing import FAMILIES

# A cache longer than Mistral's tiny window (8) on top of the usual shapes.
LONG = (*CASES, Case("decode past the window", 1, 2, 20, then_decode=True))


def _attention(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "CachedAttention"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_everything_fuses(built, family):
    b = built(family)
    assert b.report.outside_contract == {}
    assert not [why for p in b.report.passes for why in p.not_fused]
    model = ir.load(b.optimized)
    config = contract.graph_config(model.metadata_props)
    assert config.family == ("llama" if family == "llama3" else family)
    nodes = _attention(model)
    assert len(nodes) == config.num_hidden_layers
    attrs = {k: v.value for k, v in nodes[0].attributes.items()}
    extra = {k: v for k, v in attrs.items() if k not in ("num_heads", "kv_num_heads", "scale")}
    expected = {
        "mistral": {"window": 8},
        "phi3": {"rotary_dim": 8},
        "qwen3": {"qk_norm_epsilon": pytest.approx(config.norm_eps)},
        "mpt": {"alibi_slopes": pytest.approx(config.alibi_slopes())},
        # layer 0 is a sliding one (layer 1 a full one: no window)
        "gemma2": {"window": 8, "softcap": pytest.approx(config.attn_softcap)},
        "gemma3_text": {"window": 8, "qk_norm_epsilon": pytest.approx(config.norm_eps)},
    }.get(family, {})
    assert extra == expected
    if config.layer_types is not None:  # the window follows each layer's kind
        windows = [n.attributes.get("window") for n in nodes]
        assert [w.value if w else None for w in windows] == [
            config.window_of(i) for i in range(config.num_hidden_layers)
        ]
    # q/k norm scales (Qwen3); no cos/sin tables with learned positions (OPT)
    assert len(nodes[0].inputs) == {
        "qwen3": 10,
        "gemma3_text": 10,
        "opt": 6,
        "gpt2": 6,
        "mpt": 6,
    }.get(family, 8)
    biases = [
        n
        for n in model.graph
        if n.op_type == "Add" and any(i.const_value is not None for i in n.inputs)
    ]
    # q, k, v biases per layer (Qwen2), q, k, v, o (Llama with attention_bias), and the
    # MLP's up and down too (OPT, GPT-2)
    per_layer = {"qwen2": 3, "llama3": 4, "opt": 6, "gpt2": 6}.get(family, 0)
    assert len(biases) == per_layer * config.num_hidden_layers


@pytest.mark.parametrize("engine", ["onnxruntime", "numpy"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_optimized_graph_matches_the_export(built, family, engine):
    b = built(family)
    for r in compare(ir.load(b.exported), ir.load(b.optimized), engine=engine, cases=LONG):
        assert r.ok(1e-5), r


def _worst(exported, optimized) -> float:
    return max(r.logits_rel for r in compare(exported, optimized, cases=LONG))


def test_without_the_window_the_graph_differs(built):
    b = built("mistral")
    optimized = ir.load(b.optimized)
    for node in _attention(optimized):
        del node.attributes["window"]
    assert _worst(ir.load(b.exported), optimized) > 1e-3


def test_without_the_qk_norm_the_graph_differs(built):
    b = built("qwen3")
    optimized = ir.load(b.optimized)
    for node in _attention(optimized):
        node.resize_inputs(8)
        del node.attributes["qk_norm_epsilon"]
    functions.attach(optimized)  # the body without the norm
    assert _worst(ir.load(b.exported), optimized) > 1e-3


def test_without_partial_rope_or_split_nothing_fuses(built, monkeypatch):
    """Phi-3 needs both: the partial-rotary rule (else no RotaryEmbedding covers the
    head and attention does not fuse) and the split of fused projections (else no
    SwiGLU, and q/k/v stay Slices of one MatMul, outside the contract)."""
    from sparsec.passes import optimize, rope, split_linear

    exported = built("phi3").exported
    with monkeypatch.context() as m:
        m.setattr(rope._PartialRoPE, "check", lambda self, *a, **k: False)
        _, report = optimize(ir.load(exported))
    assert report.fused("CachedAttention") == 0
    with monkeypatch.context() as m:
        m.setattr(split_linear, "_blocks", lambda *a: None)
        _, report = optimize(ir.load(exported))
    assert report.fused("SwiGLU") == 0 and "Slice" in report.outside_contract


def test_linear_rope_scaling_fuses_with_the_scaled_tables(tmp_path):
    """``linear`` scaling divides the positions by the factor: the RoPE tables the pass
    builds hold those angles, and the optimized graph matches the export."""
    import numpy as np

    from sparsec.export import export_model
    from sparsec.passes import optimize
    from sparsec.testing import make_tiny_llama

    model, tokenizer = make_tiny_llama(rope_scaling={"rope_type": "linear", "factor": 4.0})
    exported = export_model(model, tokenizer, tmp_path / "m.onnx")
    optimized, report = optimize(ir.load(exported))
    assert report.fused("CachedAttention") == 2
    cos = next(v for v in optimized.graph.initializers.values() if "cos_cache" in v.name)
    hd = contract.graph_config(optimized.metadata_props).head_dim
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd) / 4.0
    angles = np.arange(cos.shape[0])[:, None] * inv_freq.astype(np.float32)[None]
    np.testing.assert_allclose(cos.const_value.numpy(), np.cos(angles), atol=2e-6)
    for r in compare(ir.load(exported), optimized, cases=LONG):
        assert r.ok(1e-5), r
