"""Names shared by every stage: the graph contract in code (see docs/graph-contract.md).

Stages meet only at files; these constants are what those files promise each other.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, fields

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
# reads per step (keys and values rounded to half precision when written); int8 about
# quarters them: each row (one token's key or value of one kv head) holds head_dim
# symmetric int8 values, then one float32 scale (max|x| / 127) per KV_INT8_BLOCK of them
# (as llama.cpp's q8_0: a scale per row lost the small channels next to the keys'
# outlier ones), so a head_dim-64 row is 72 bytes.
KV_CACHE_DTYPES = {"float32": 4, "float16": 2, "int8": 1}
KV_INT8_BLOCK = 32


def kv_int8_blocks(head_dim: int) -> int:
    return -(-head_dim // KV_INT8_BLOCK)


def kv_row_elements(head_dim: int, dtype: str) -> int:
    """Elements of one KV cache row (one token, one kv head) of ``dtype``."""
    return head_dim + (4 * kv_int8_blocks(head_dim) if dtype == "int8" else 0)


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

    def kv_cache_shape(self, capacity: int, dtype: str = "float32") -> list[int]:
        """The runtime's KV cache: [layers, 2 (key, value), kv heads, capacity, row], the row
        head_dim elements (+ the scale's bytes with int8: ``kv_row_elements``)."""
        row = kv_row_elements(self.head_dim, dtype)
        return [self.num_hidden_layers, 2, self.num_key_value_heads, capacity, row]

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
            every = ""
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
        from sparsec.hf_config import read_fields  # one reader per family

        result = cls(family=family, **read_fields(config, family))
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
