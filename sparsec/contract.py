"""Names shared by every stage: the graph contract in code (see docs/graph-contract.md).

Stages meet only at files; these constants are what those files promise each other.
"""

from __future__ import annotations

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
META_CONFIG = "sparsec.config"  # JSON: the model config (see ModelConfig)
META_TOKENIZER = "sparsec.tokenizer"  # tokenizer.json text
META_CHAT_TEMPLATE = "sparsec.chat_template"  # Jinja chat template, may be absent
META_GENERATION = "sparsec.generation"  # JSON: bos/eos token ids
META_SOURCE = "sparsec.source"  # what the model was made from
META_QUANTIZATION = "sparsec.quantization"  # "w8a8" when exported from an --int8 folder
META_SPARSITY = "sparsec.sparsity"  # JSON per weight: shape, sparsity, pattern (optimized)

# --- custom op domain of the optimized graph -----------------------------------------
DOMAIN = "sparsec"
DOMAIN_VERSION = 1
