"""Names shared by every stage: the graph contract in code (see docs/graph-contract.md).

Stages meet only at files; these constants are what those files promise each other.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, fields

import numpy as np

from sparsec.errors import SparsecError

# --- exported graph (sparsec export) -------------------------------------------------
INPUT_IDS = "input_ids"  # int64 [batch, seq]
ATTENTION_MASK = "attention_mask"  # int64 [batch, past + seq]
POSITION_IDS = "position_ids"  # int64 [batch, seq]
LOGITS = "logits"  # float32 [batch, seq, vocab]


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"  # float32 [batch, kv_heads, past, head_dim]


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"  # float32 [batch, kv_heads, past + seq, head_dim]


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


# --- model metadata (metadata_props of every sparsec .onnx) --------------------------
META_FORMAT = "sparsec.format"  # "exported" | "optimized"
META_CONFIG = "sparsec.config"  # JSON: ModelConfig.to_json() (below)
META_TOKENIZER = "sparsec.tokenizer"  # tokenizer.json text
META_CHAT_TEMPLATE = "sparsec.chat_template"  # Jinja chat template, may be absent
META_GENERATION = "sparsec.generation"  # JSON: bos/eos token ids
META_SOURCE = "sparsec.source"  # what the model was made from
META_QUANTIZATION = "sparsec.quantization"  # "w8a8" when exported from an --int8 folder
META_SPARSITY = "sparsec.sparsity"  # JSON per weight: shape, sparsity, pattern (optimized)

# --- custom op domain of the optimized graph -----------------------------------------
# Element types of a compiled model's KV cache (`sparsec compile --kv-cache`), with their
# bytes: float32 by default; float16 halves the cache's memory and the bytes attention
# reads per step (keys and values rounded to half precision when written).
KV_CACHE_DTYPES = {"float32": 4, "float16": 2}

DOMAIN = "sparsec"
DOMAIN_VERSION = 1


# --- KV-cache names ------------------------------------------------------------------
_CACHE_NAME = re.compile(r"(past_key_values|present)\.(\d+)\.(key|value)")


@dataclass(frozen=True)
class CacheName:
    """A parsed KV-cache graph name: ``past_key_values.3.key`` -> ("past", 3, "key")."""

    io: str  # "past" (graph input) | "present" (graph output)
    layer: int
    kind: str  # "key" | "value"


def parse_cache_name(name: str | None) -> CacheName | None:
    """The cache name's parts, or None when ``name`` is not a KV-cache name."""
    match = _CACHE_NAME.fullmatch(name or "")
    if match is None:
        return None
    io = "past" if match[1] == "past_key_values" else "present"
    return CacheName(io, int(match[2]), match[3])


# --- the model description (sparsec.config) --------------------------------------------
# The one place that knows how model families differ. Every stage reads a ModelConfig:
# export builds it from the Hugging Face config (refusing what no stage supports), writes
# it as the sparsec.config JSON, and optimize, compile and the runtime read it back.

# What the stages support today, per field. A family is only listed once every stage
# (sparsify, export, passes, codegen, runtime) handles it end to end.
SUPPORTED: dict[str, tuple] = {
    "family": (
        "llama",
        "qwen2",
        "qwen3",
        "mistral",
        "phi3",
        "opt",
        "gpt2",
        "mpt",
        "gemma2",
        "gemma3_text",
    ),
    "norm": ("rms", "layer"),
    "norm_bias": (False, True),
    "mlp": ("gated", "plain"),
    "activation": ("silu", "relu", "gelu", "gelu_tanh"),
    "positions": ("rope", "learned", "alibi"),
    "attention_bias": (False, True),
    "mlp_bias": (False, True),
    "qk_norm": (False, True),
    # Scalings whose inverse frequencies are constants the exporter traces (dynamic
    # recomputes them from the sequence length: not one static graph).
    # longrope: the short factors, up to original_max_position_embeddings (see
    # _static_positions).
    "rope.type": ("default", "llama3", "linear", "yarn", "longrope"),
}
# Any positive int is supported: (any window, None = all positions).

# The MLP activations a gated or plain MLP may have, per kind (the kernels' names):
# a gated MLP of another activation (GeGLU) is refused until a kernel exists.
MLP_ACTIVATIONS = {"gated": ("silu", "gelu_tanh"), "plain": ("relu", "gelu", "gelu_tanh")}

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


class ConfigError(SparsecError):
    """A sparsec.config that is malformed (a field missing or of the wrong type)."""


@dataclass(frozen=True)
class RoPE:
    """Rotary position embedding parameters."""

    theta: float
    type: str = "default"  # Hugging Face rope_type: default, llama3, linear, ...
    partial_rotary_factor: float = 1.0  # the share of head_dim that is rotated
    scaling: tuple[tuple[str, object], ...] = ()  # rope_type's own parameters, sorted


INT32_MAX = 2**31 - 1
# Contexts up to 2M positions (Qwen2.5-1M has 1,010,000): the optimizer materialises RoPE
# tables of a row per position, 512 MiB each at head_dim 128 there.
MAX_POSITIONS = 1 << 21


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer, as every sparsec stage needs to know it."""

    family: str  # Hugging Face model_type: "llama", ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    norm: str  # "rms": RMSNorm with a weight; "layer": LayerNorm with a weight
    norm_eps: float
    activation: str  # the MLP's activation: "silu" (SwiGLU), "relu", "gelu", "gelu_tanh"
    attention_bias: bool  # q/k/v projections carry a bias
    mlp_bias: bool  # the MLP's Linears carry a bias
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE
    rope: RoPE
    sliding_window: int | None  # attend to the last N positions only; None: all
    # Fields added after the first files were written: their defaults are what a file
    # without them meant (a Llama block).
    norm_bias: bool = False  # LayerNorm with a bias (OPT, GPT-2)
    mlp: str = "gated"  # "gated": act(x @ gate) * (x @ up); "plain": act(x @ up) (OPT, GPT-2)
    positions: str = "rope"  # "rope" | "learned": a table of absolute positions (OPT, GPT-2)
    # | "alibi": a per-head linear bias on the scores (MPT); alibi_bias_max sets the slopes
    alibi_bias_max: float = 8.0
    embedding_scale: float = 1.0  # the token embeddings times this (Gemma: sqrt(hidden))
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    logit_softcap: float | None = None  # the same on the logits (Gemma 2)
    # Per layer "sliding_attention" (``sliding_window``) or "full_attention", when the
    # layers differ (Gemma 2 alternates); None: every layer as ``sliding_window`` says.
    layer_types: tuple[str, ...] | None = None
    rope_local: RoPE | None = None  # the sliding layers' own RoPE (Gemma 3); None: ``rope``

    # -- derived sizes ------------------------------------------------------------------
    def window_of(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer`` (None: it sees every position)."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def alibi_slopes(self) -> list[float]:
        """ALiBi's slope per head (MPT's rule): ``2^-(k * max / n)`` for k = 1..n, n the
        heads rounded up to a power of 2; with fewer heads, the odd k then the even ones."""
        heads = self.num_attention_heads
        n = 2 ** math.ceil(math.log2(heads))
        slopes = [1.0 / 2.0 ** (k * self.alibi_bias_max / n) for k in range(1, n + 1)]
        if n != heads:
            slopes = (slopes[1::2] + slopes[::2])[:heads]
        return slopes

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_cache_shape(self, capacity: int) -> list[int]:
        """The runtime's KV cache: [layers, 2 (key, value), kv heads, capacity, head_dim]."""
        return [self.num_hidden_layers, 2, self.num_key_value_heads, capacity, self.head_dim]

    def features(self) -> list[str]:
        """What sets this model apart from a plain Llama block, in words (for
        ``sparsec inspect``): empty for SmolLM2."""
        out = []
        if self.norm != "rms":
            out.append("LayerNorm" + (" with bias" if self.norm_bias else ""))
        if self.mlp != "gated":
            out.append(f"{self.activation} MLP")
        if self.positions == "alibi":
            out.append(f"ALiBi (bias max {self.alibi_bias_max:g})")
        elif self.positions != "rope":
            out.append(f"{self.positions} positions")
        elif self.rope.type != "default":
            out.append(f"RoPE {self.rope.type} scaling")
        if self.rope.partial_rotary_factor != 1.0:
            out.append(f"partial rotary {self.rope.partial_rotary_factor:g}")
        if self.attention_bias:
            out.append("attention bias")
        if self.mlp_bias:
            out.append("MLP bias")
        if self.qk_norm:
            out.append("q/k norm")
        if self.sliding_window is not None:
            every = "" if self.layer_types is None else " on alternate layers"
            if self.layer_types is not None:
                n = sum(t == "sliding_attention" for t in self.layer_types)
                every = f" on {n} of {len(self.layer_types)} layers"
            out.append(f"sliding window {self.sliding_window}{every}")
        if self.rope_local is not None:
            out.append(f"RoPE theta {self.rope_local.theta:g} on the sliding layers")
        if self.embedding_scale != 1.0:
            out.append(f"embeddings x {self.embedding_scale:g}")
        if self.attn_softcap is not None:
            out.append(f"attention soft-cap {self.attn_softcap:g}")
        if self.logit_softcap is not None:
            out.append(f"logit soft-cap {self.logit_softcap:g}")
        if not self.tie_word_embeddings:
            out.append("untied LM head")
        return out

    # -- reading ------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, config) -> ModelConfig:
        """The description of a Hugging Face ``PretrainedConfig``; refuses what sparsec
        does not support, naming the field."""
        family = getattr(config, "model_type", None)
        if family not in SUPPORTED["family"]:  # before reading fields it may not have
            raise SparsecError(
                f"unsupported model: family = {family!r} "
                f"(supported: {', '.join(map(repr, SUPPORTED['family']))})"
            )
        fields_of = _HF_READERS.get(family, _llama_fields)
        result = cls(family=family, **fields_of(config, family))
        result.check_supported()
        return result

    @classmethod
    def from_dict(cls, d) -> ModelConfig:
        """Parse the sparsec.config JSON object; ConfigError names a bad field."""
        if not isinstance(d, dict):
            raise ConfigError(f"sparsec.config is {type(d).__name__}, expected a JSON object")
        if "family" not in d and "architecture" in d:
            d = _from_legacy(d)
        values = {}
        for f in fields(cls):
            if f.name in d:
                values[f.name] = d[f.name]
            elif f.default is MISSING:  # a field with a default came later (a Llama value)
                raise ConfigError(f"sparsec.config has no field {f.name!r}")
        values["rope"] = _rope_from_dict(values["rope"], "rope")
        if values.get("rope_local") is not None:
            values["rope_local"] = _rope_from_dict(values["rope_local"], "rope_local")
        if isinstance(values.get("layer_types"), list):  # JSON has no tuples
            values["layer_types"] = tuple(values["layer_types"])
        result = cls(**values)
        result._check_types()
        return result

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"sparsec.config is not valid JSON: {e}") from e
        return cls.from_dict(d)

    # -- writing ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["rope"]["scaling"] = dict(self.rope.scaling)
        if self.rope_local is not None:
            d["rope_local"]["scaling"] = dict(self.rope_local.scaling)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    # -- checks -------------------------------------------------------------------------
    def _check_types(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ConfigError(f"sparsec.config field {name!r} is {value!r}, expected int > 0")
            if value > INT32_MAX:  # the native code indexes with 32-bit integers
                raise ConfigError(
                    f"sparsec.config field {name!r} is {value}, expected at most {INT32_MAX}"
                )
        if self.max_position_embeddings > MAX_POSITIONS:
            raise ConfigError(
                f"sparsec.config field 'max_position_embeddings' is "
                f"{self.max_position_embeddings}, expected at most {MAX_POSITIONS} (the RoPE "
                "tables hold a row per position)"
            )
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "qk_norm", "norm_bias"):
            if type(getattr(self, name)) is not bool:
                raise ConfigError(f"sparsec.config field {name!r} must be true or false")
        for name, value in (
            ("norm_eps", self.norm_eps),
            ("rope.theta", self.rope.theta),
            *((("rope_local.theta", self.rope_local.theta),) if self.rope_local else ()),
            ("alibi_bias_max", self.alibi_bias_max),
            ("embedding_scale", self.embedding_scale),
            *(
                (name, value)
                for name, value in (
                    ("attn_softcap", self.attn_softcap),
                    ("logit_softcap", self.logit_softcap),
                )
                if value is not None
            ),
        ):
            if type(value) not in (int, float) or value <= 0:
                raise ConfigError(f"sparsec.config field {name!r} is {value!r}, expected > 0")
            if not math.isfinite(value):
                raise ConfigError(
                    f"sparsec.config field {name!r} is {value!r}, expected a finite number > 0"
                )
        for name, value in (
            ("family", self.family),
            ("norm", self.norm),
            ("activation", self.activation),
            ("mlp", self.mlp),
            ("positions", self.positions),
            ("rope.type", self.rope.type),
        ):
            if not isinstance(value, str):
                raise ConfigError(f"sparsec.config field {name!r} must be a string")
        partial = self.rope.partial_rotary_factor
        if type(partial) not in (int, float) or not 0 < partial <= 1:
            raise ConfigError(
                f"sparsec.config field 'rope.partial_rotary_factor' is {partial!r}, "
                "expected a number in (0, 1]"
            )
        window = self.sliding_window
        if window is not None and (type(window) is not int or window <= 0):
            raise ConfigError(f"sparsec.config field 'sliding_window' is {window!r}")
        types = self.layer_types
        if types is not None and (
            not isinstance(types, tuple)
            or len(types) != self.num_hidden_layers
            or not set(types) <= {"sliding_attention", "full_attention"}
            or window is None
        ):
            raise ConfigError(
                "sparsec.config field 'layer_types' must list 'sliding_attention' or "
                f"'full_attention' for each of the {self.num_hidden_layers} layers, with a "
                "sliding_window"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"sparsec.config: {self.num_attention_heads} attention heads are not a "
                f"multiple of {self.num_key_value_heads} key/value heads"
            )

    def check_supported(self) -> None:
        """Refuse, up front, a value that some stage does not handle."""
        self._check_types()
        if self.rope_local is not None and self.rope_local.type != "default":
            raise SparsecError(
                f"unsupported model: rope_local.type = {self.rope_local.type!r} "
                "(supported: 'default')"
            )
        if self.mlp == "gated" and self.mlp_bias:  # SwiGLU has no bias inputs
            raise SparsecError(
                "unsupported model: mlp_bias = True (supported: False) with a gated MLP"
            )
        if self.mlp in MLP_ACTIVATIONS and self.activation not in MLP_ACTIVATIONS[self.mlp]:
            raise SparsecError(
                f"unsupported model: a {self.mlp} MLP with activation = {self.activation!r} "
                f"(supported: {', '.join(map(repr, MLP_ACTIVATIONS[self.mlp]))})"
            )
        for field_name, supported in SUPPORTED.items():
            owner, _, attr = field_name.rpartition(".")
            value = getattr(getattr(self, owner) if owner else self, attr)
            if value not in supported:
                raise SparsecError(
                    f"unsupported model: {field_name} = {value!r} "
                    f"(supported: {', '.join(map(repr, supported))})"
                )


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
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=config.hidden_size // heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        norm="layer",
        norm_eps=1e-5,  # torch.nn.LayerNorm's default; OPT's config has no field for it
        norm_bias=True,
        activation=_activation(config.activation_function),
        mlp="plain",
        attention_bias=bias,
        mlp_bias=bias,
        qk_norm=False,
        positions="learned",
        rope=RoPE(theta=10000.0),  # unused: no rotary positions
        sliding_window=None,
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
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.n_inner or 4 * config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=config.n_embd // heads,
        max_position_embeddings=config.n_positions,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        norm="layer",
        norm_eps=float(config.layer_norm_epsilon),
        norm_bias=True,
        activation=_activation(config.activation_function),
        mlp="plain",
        attention_bias=True,
        mlp_bias=True,
        qk_norm=False,
        positions="learned",
        rope=RoPE(theta=10000.0),
        sliding_window=None,
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
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=4 * config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=config.d_model // heads,
        max_position_embeddings=config.max_seq_len,  # ALiBi's bias table ends there
        tie_word_embeddings=True,  # MPT's LM head is its embedding
        norm="layer",
        norm_eps=float(config.layer_norm_epsilon),
        norm_bias=bias,
        activation="gelu",  # MptMLP: nn.GELU(approximate="none")
        mlp="plain",
        attention_bias=bias,
        mlp_bias=bias,
        qk_norm=False,
        positions="alibi",
        alibi_bias_max=float(attn.alibi_bias_max),
        rope=RoPE(theta=10000.0),
        sliding_window=None,
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


def _rope_from_dict(rope, name: str) -> RoPE:
    if not isinstance(rope, dict) or "theta" not in rope:
        raise ConfigError(f"sparsec.config field {name!r} must be an object with 'theta'")
    if not isinstance(rope.get("scaling") or {}, dict):
        raise ConfigError(f"sparsec.config field '{name}.scaling' must be an object")
    return RoPE(
        theta=rope["theta"],
        type=rope.get("type", "default"),
        partial_rotary_factor=rope.get("partial_rotary_factor", 1.0),
        scaling=tuple(sorted((rope.get("scaling") or {}).items())),
    )


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


def _from_legacy(d: dict) -> dict:
    """The flat Llama-only layout that sparsec wrote before ModelConfig (same sizes)."""
    d = dict(d)
    family = d.pop("architecture")
    eps = d.pop("rms_norm_eps", None)
    theta = d.pop("rope_theta", None)
    return {
        **d,
        "family": family,
        "norm": "rms",
        "norm_eps": eps,
        "activation": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "qk_norm": False,
        "rope": {"theta": theta},
        "sliding_window": None,
    }


def graph_config(metadata) -> ModelConfig | None:
    """The ModelConfig in a graph's ``metadata_props``, None when it has none;
    ConfigError when it is malformed."""
    text = metadata.get(META_CONFIG)
    return None if text is None else ModelConfig.from_json(text)
