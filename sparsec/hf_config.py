"""A Hugging Face config read into sparsec's model description (``ModelConfig.from_hf``).

The only code that reads a ``PretrainedConfig``: one reader per family (Llama and the
families built like it, OPT, GPT-2, MPT, Gemma 2/3), each mapping the family's fields
onto ``contract.ModelConfig``'s and refusing, naming the field, a value that no stage
handles or that the family's transformers class ignores.
"""

from __future__ import annotations

import copy

import numpy as np

from sparsec.contract import RoPE
from sparsec.errors import SparsecError

# Hugging Face activation names -> the description's (one name per function).
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",  # GPT-2: the tanh approximation
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": None,  # a different approximation: refused by name
}

# What each family's config implies without saying so in a field.
FAMILY_TRAITS: dict[str, dict] = {
    "qwen2": {"attention_bias": True},  # Qwen2/2.5: q/k/v always carry a bias
    "qwen3": {"qk_norm": True},  # per-head RMSNorm on q and k before RoPE
}


def _activation(name) -> str:
    """The description's name of a Hugging Face activation, or a refusal naming it."""
    act = HF_ACTIVATIONS.get(name)
    if act is None:
        known = ", ".join(sorted(k for k, v in HF_ACTIVATIONS.items() if v))
        raise SparsecError(f"unsupported model: activation = {name!r} (supported: {known})")
    return act


def _refuse_unless(config, checks: dict) -> None:
    """Refuse a config whose field differs from the value every stage assumes."""
    for name, expected in checks.items():
        value = getattr(config, name, expected)
        if value != expected:
            raise SparsecError(f"unsupported model: {name} = {value!r} (supported: {expected!r})")


def _rope_fields(config, rope_type: str, params: dict, theta, partial) -> RoPE:
    return RoPE(
        theta=float(theta),
        type=str(rope_type),
        partial_rotary_factor=float(partial),
        scaling=tuple(sorted((str(k), v) for k, v in params.items())),
    )


def _llama_fields(config, family: str, one_window: bool = True) -> dict:
    """Llama and the families built like it (Qwen2/3, Mistral, Phi-3): RMSNorm, a gated
    MLP, RoPE."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    partial = params.pop("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    heads = config.num_attention_heads
    traits = FAMILY_TRAITS.get(family, {})
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        max_position_embeddings=_static_positions(config, str(rope_type), params),
        tie_word_embeddings=bool(config.tie_word_embeddings),
        norm="rms",
        norm_eps=float(config.rms_norm_eps),
        activation=_activation(getattr(config, "hidden_act", None) or config.hidden_activation),
        attention_bias=traits.get("attention_bias", bool(getattr(config, "attention_bias", False))),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=traits.get("qk_norm", False),
        rope=_rope_fields(config, rope_type, params, theta, partial),
        sliding_window=_sliding_window(config, family) if one_window else None,
    )


# What OPT, GPT-2 and MPT blocks share: multi-head attention in pre-LayerNorm blocks with
# a plain (non-gated) MLP; no rotary positions (RoPE unused), no window, no q/k norm.
_LAYERNORM_BLOCK = dict(
    norm="layer",
    mlp="plain",
    qk_norm=False,
    rope=RoPE(theta=10000.0),
    sliding_window=None,
)


def _opt_fields(config, family: str) -> dict:
    """OPT: pre-LayerNorm blocks with biases, learned positions (offset 2, folded by
    the passes), a ReLU MLP (``fc1``, ``fc2``)."""
    _refuse_unless(
        config,
        {
            "do_layer_norm_before": True,  # OPT-350m normalizes after: not a pre-norm block
            "_remove_final_layer_norm": False,
            "layer_norm_elementwise_affine": True,
            "word_embed_proj_dim": config.hidden_size,  # no project_in/out
        },
    )
    heads = config.num_attention_heads
    bias = bool(getattr(config, "enable_bias", True))
    return dict(
        **_LAYERNORM_BLOCK,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=config.hidden_size // heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        norm_eps=1e-5,  # torch.nn.LayerNorm's default; OPT's config has no field for it
        norm_bias=True,
        activation=_activation(config.activation_function),
        attention_bias=bias,
        mlp_bias=bias,
        positions="learned",
    )


def _gpt2_fields(config, family: str) -> dict:
    """GPT-2: pre-LayerNorm blocks, Conv1D (``[in, out]``) projections with biases, a
    fused ``c_attn``, learned positions, a GELU (tanh) MLP."""
    _refuse_unless(
        config,
        {
            "scale_attn_by_inverse_layer_idx": False,
            "add_cross_attention": False,
            "scale_attn_weights": True,
        },
    )
    heads = config.n_head
    return dict(
        **_LAYERNORM_BLOCK,
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.n_inner or 4 * config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=config.n_embd // heads,
        max_position_embeddings=config.n_positions,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        norm_eps=float(config.layer_norm_epsilon),
        norm_bias=True,
        activation=_activation(config.activation_function),
        attention_bias=True,
        mlp_bias=True,
        positions="learned",
    )


def _mpt_fields(config, family: str) -> dict:
    """MPT (the sparse fine-tuning paper's model): pre-LayerNorm blocks (no biases with
    ``no_bias``), a fused ``Wqkv``, ALiBi instead of positions, a GELU MLP, tied
    embeddings."""
    attn = config.attn_config
    _refuse_unless(
        attn,
        {"alibi": True, "qk_ln": False, "clip_qkv": None, "attn_type": "multihead_attention"},
    )
    # transformers' MPT has no biases and a 4x MLP whatever these say: a checkpoint that
    # needs otherwise does not load into it.
    _refuse_unless(config, {"no_bias": True, "expansion_ratio": 4})
    if getattr(attn, "prefix_lm", False):
        raise SparsecError("unsupported model: attn_config.prefix_lm = True (supported: False)")
    heads = config.n_heads
    bias = False
    return dict(
        **_LAYERNORM_BLOCK,
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=4 * config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=config.d_model // heads,
        max_position_embeddings=config.max_seq_len,  # ALiBi's bias table ends there
        tie_word_embeddings=True,  # MPT's LM head is its embedding
        norm_eps=float(config.layer_norm_epsilon),
        norm_bias=bias,
        activation="gelu",  # MptMLP: nn.GELU(approximate="none")
        attention_bias=bias,
        mlp_bias=bias,
        positions="alibi",
        alibi_bias_max=float(attn.alibi_bias_max),
    )


def _gemma2_fields(config, family: str) -> dict:
    """Gemma 2: Llama-like, with embeddings scaled by sqrt(hidden), GeGLU, norms after
    the attention and the MLP as well as before (in the graph, nothing to describe),
    soft-capped attention scores and logits, and sliding-window and full layers in
    turn (``layer_types``)."""
    params = getattr(config, "rope_parameters", None) or {}
    local = None
    if "full_attention" in params:  # Gemma 3: a RoPE per kind of layer
        config = copy.copy(config)
        local = dict(params.get("sliding_attention") or {})
        config.rope_parameters = dict(params["full_attention"])
        local_theta = local.pop("rope_theta", 10000.0)
        local_type = local.pop("rope_type", "default")
        local = _rope_fields(config, local_type, local, local_theta, 1.0)
    fields = _llama_fields(config, "llama", one_window=False)
    types = tuple(getattr(config, "layer_types", None) or ())
    kinds = set(types)
    if not kinds <= {"sliding_attention", "full_attention"}:
        raise SparsecError(f"unsupported model: layer_types {sorted(kinds)}")
    window = getattr(config, "sliding_window", None) if "sliding_attention" in kinds else None
    scale = float(np.float32(config.hidden_size**0.5))  # Gemma's normalizer, float32
    fields.update(
        activation=_activation(config.hidden_activation),
        sliding_window=window,
        layer_types=types if len(kinds) > 1 else None,
        embedding_scale=scale,
        attn_softcap=_optional_float(getattr(config, "attn_logit_softcapping", None)),
        logit_softcap=_optional_float(getattr(config, "final_logit_softcapping", None)),
        qk_norm=family == "gemma3_text",  # per-head RMSNorm on q and k, as Qwen3
        rope_local=local,
    )
    return fields


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


_HF_READERS = {
    "opt": _opt_fields,
    "gpt2": _gpt2_fields,
    "mpt": _mpt_fields,
    "gemma2": _gemma2_fields,
    "gemma3_text": _gemma2_fields,
}


def _static_positions(config, rope_type: str, params: dict) -> int:
    """The positions one static graph serves: LongRoPE switches to its long factors past
    ``original_max_position_embeddings``, so a graph holds the short set up to there."""
    if rope_type == "longrope":
        original = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        if isinstance(original, int) and 0 < original < config.max_position_embeddings:
            return original
    return config.max_position_embeddings


def _sliding_window(config, family: str) -> int | None:
    """The window every layer uses, None when no layer has one. Qwen2/3 window only the
    layers ``layer_types`` marks; a mix of windowed and full layers is refused."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kinds = set(layer_types)
        if kinds == {"full_attention"}:
            return None
        if kinds != {"sliding_attention"}:
            raise SparsecError(
                f"unsupported model: layer_types mixes {sorted(kinds)} (a sliding window on "
                "some layers only); supported: one attention kind for every layer"
            )
    elif family in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return None
    if window is not None and (type(window) is not int or window <= 0):
        raise SparsecError(f"unsupported model: sliding_window = {window!r} (expected int > 0)")
    return window


def read_fields(config, family: str) -> dict:
    """``ModelConfig``'s fields (all but ``family``) for ``config`` of ``family``."""
    return _HF_READERS.get(family, _llama_fields)(config, family)
