"""ModelConfig: the one model description every stage reads (sparsec.config)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import (
    BloomConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from sparsec import contract, models
from sparsec.contract import ConfigError, ModelConfig, RoPE, parse_cache_name
from sparsec.errors import SparsecError
from sparsec.testing import TINY_CONFIG


def tiny_llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY_CONFIG, **overrides})


def test_from_hf_reads_every_field():
    cfg = ModelConfig.from_hf(tiny_llama_config(rope_theta=50000.0, rms_norm_eps=1e-6))
    assert (cfg.family, cfg.num_hidden_layers, cfg.num_attention_heads) == ("llama", 2, 4)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.q_width, cfg.kv_width) == (2, 16, 64, 32)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (272, 64, 128)
    assert cfg.rope == RoPE(theta=50000.0)
    assert (cfg.norm, cfg.norm_eps, cfg.activation) == ("rms", 1e-6, "silu")
    assert not (cfg.attention_bias or cfg.mlp_bias or cfg.qk_norm)
    assert cfg.sliding_window is None and cfg.tie_word_embeddings is True
    assert cfg.kv_cache_shape(100) == [2, 2, 2, 100, 16]


def test_json_round_trip():
    cfg = ModelConfig.from_hf(tiny_llama_config())
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["rope"] == {
        "theta": 10000.0,
        "type": "default",
        "partial_rotary_factor": 1.0,
        "scaling": {},
    }


@given(
    layers=st.integers(1, 64),
    kv_heads=st.integers(1, 8),
    group=st.integers(1, 8),
    head_dim=st.sampled_from([8, 64, 128, 256]),
    theta=st.floats(1.0, 1e7),
    window=st.one_of(st.none(), st.integers(1, 1 << 16)),
    scaling=st.dictionaries(st.sampled_from(["factor", "low_freq_factor"]), st.floats(0.5, 64)),
)
def test_any_config_round_trips(layers, kv_heads, group, head_dim, theta, window, scaling):
    cfg = dataclasses.replace(
        ModelConfig.from_hf(tiny_llama_config()),
        hidden_size=kv_heads * group * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=kv_heads * group,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope=RoPE(theta=theta, scaling=tuple(sorted(scaling.items()))),
        sliding_window=window,
    )
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_the_layout_written_before_model_config_still_reads():
    """Graphs and artifacts made by earlier sparsec versions carry the flat Llama layout."""
    cfg = ModelConfig.from_hf(tiny_llama_config())
    legacy = {
        "architecture": "llama",
        "vocab_size": 272,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }
    assert ModelConfig.from_dict(legacy) == cfg


@pytest.mark.parametrize(
    "hf, message",
    [
        (
            tiny_llama_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
            "rope.type = 'dynamic' (supported: 'default', 'llama3', 'linear', 'yarn', 'longrope')",
        ),
        (tiny_llama_config(mlp_bias=True), "mlp_bias = True (supported: False)"),
        (tiny_llama_config(hidden_act="gelu"), "activation = 'gelu' (supported: 'silu', 'gelu"),
        (
            Qwen2Config(num_hidden_layers=2, use_sliding_window=True, max_window_layers=1),
            "layer_types mixes ['full_attention', 'sliding_attention']",
        ),
        (GemmaConfig(num_hidden_layers=1), "family = 'gemma' (supported: 'llama', 'qwen2'"),
        (BloomConfig(n_layer=1), "family = 'bloom'"),  # no rms_norm_eps: refused first
    ],
)
def test_unsupported_values_are_refused_naming_the_field(hf, message):
    with pytest.raises(SparsecError, match="unsupported model: ") as e:
        ModelConfig.from_hf(hf)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("head_dim"), "has no field 'head_dim'"),
        (lambda d: d.__setitem__("num_hidden_layers", "2"), "'num_hidden_layers' is '2'"),
        (lambda d: d.__setitem__("num_key_value_heads", 3), "not a multiple of 3"),
        (lambda d: d.__setitem__("rope", 10000.0), "'rope' must be an object"),
        (lambda d: d.__setitem__("sliding_window", 0), "'sliding_window' is 0"),
        (lambda d: d.__setitem__("qk_norm", 1), "'qk_norm' must be true or false"),
        (lambda d: d["rope"].__setitem__("scaling", [1, 2]), "'rope.scaling' must be an object"),
        (lambda d: d["rope"].__setitem__("type", 3), "'rope.type' must be a string"),
        (
            lambda d: d["rope"].__setitem__("partial_rotary_factor", 0),
            "'rope.partial_rotary_factor' is 0",
        ),
        (lambda d: d.__setitem__("vocab_size", 2**31), "'vocab_size' is 2147483648, expected at"),
        (
            lambda d: d.__setitem__("max_position_embeddings", (1 << 21) + 1),
            "'max_position_embeddings' is 2097153, expected at most 2097152",
        ),
    ],
)
def test_malformed_config_names_the_field(edit, message):
    d = ModelConfig.from_hf(tiny_llama_config()).to_dict()
    edit(d)
    with pytest.raises(ConfigError, match="sparsec.config") as e:
        ModelConfig.from_dict(d)
    assert message in str(e.value)


def test_unsupported_config_folder_is_refused_before_its_weights_load(tmp_path):
    """Only config.json: the refusal must come from the description, not a missing file."""
    folder = tmp_path / "llama3"
    folder.mkdir()
    tiny_llama_config(mlp_bias=True).save_pretrained(folder)
    with pytest.raises(SparsecError, match=r"config\.json: unsupported model: mlp_bias"):
        models.load_model(folder)


def test_compile_refuses_a_graph_whose_config_no_stage_supports(tiny_model):
    """The code generator trusts the description only for what it supports."""
    from sparsec.codegen.program import lower
    from sparsec.testing import build_contract_graph

    graph = build_contract_graph(*tiny_model)
    lower(graph)  # the description as exported: accepted
    d = json.loads(graph.metadata_props[contract.META_CONFIG])
    d["mlp_bias"] = True
    graph.metadata_props[contract.META_CONFIG] = json.dumps(d)
    with pytest.raises(SparsecError, match="mlp_bias = True .supported: False."):
        lower(graph)
    d["mlp_bias"] = False
    d["sliding_window"] = 16  # supported, but the graph's attention has no window
    graph.metadata_props[contract.META_CONFIG] = json.dumps(d)
    with pytest.raises(SparsecError, match="window 0 disagrees with sparsec.config"):
        lower(graph)


@pytest.mark.parametrize(
    "hf, expected",
    [
        (Qwen2Config(**TINY_CONFIG), {"family": "qwen2", "attention_bias": True}),
        (Qwen3Config(**TINY_CONFIG), {"family": "qwen3", "qk_norm": True}),
        (MistralConfig(**TINY_CONFIG, sliding_window=8), {"sliding_window": 8}),
        (Qwen2Config(**TINY_CONFIG, sliding_window=8), {"sliding_window": None}),  # not used
        (
            Qwen2Config(
                **TINY_CONFIG, use_sliding_window=True, sliding_window=8, max_window_layers=0
            ),
            {"sliding_window": 8},
        ),  # fmt: skip
        (Phi3Config(**TINY_CONFIG, partial_rotary_factor=0.75), {"family": "phi3"}),
    ],
)
def test_family_traits_are_read(hf, expected):
    """What a family implies without a config field (Qwen2's q/k/v bias, Qwen3's q/k
    norm, Qwen's unused window) is in the description."""
    cfg = ModelConfig.from_hf(hf)
    assert {k: getattr(cfg, k) for k in expected} == expected
    if hf.model_type == "phi3":
        assert cfg.rope.partial_rotary_factor == 0.75


@pytest.mark.parametrize(
    "name, parsed",
    [
        ("past_key_values.0.key", ("past", 0, "key")),
        ("past_key_values.29.value", ("past", 29, "value")),
        ("present.3.key", ("present", 3, "key")),
        ("present.3.keys", None),
        ("past_key_values.x.key", None),
        ("logits", None),
        (None, None),
    ],
)
def test_cache_names(name, parsed):
    got = parse_cache_name(name)
    assert (got and (got.io, got.layer, got.kind)) == parsed
    if parsed is not None:
        make = {
            ("past", "key"): contract.past_key,
            ("past", "value"): contract.past_value,
            ("present", "key"): contract.present_key,
            ("present", "value"): contract.present_value,
        }[(got.io, got.kind)]
        assert make(got.layer) == name
