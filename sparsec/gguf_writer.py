"""Write a Llama model as a GGUF file with the ``gguf`` package.

Used to feed llama.cpp the very weights sparsec compiles (benchmarks) and to test the
GGUF model source. llama.cpp stores Q and K rows permuted for its rotary layout;
transformers undoes that on load, so it is applied here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sparsec.errors import SparsecError


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tokenizer_vocab(tokenizer) -> tuple[list[str], list[int], list[str]]:
    import json

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise SparsecError(f"GGUF export supports BPE tokenizers, not {model.get('type')}")
    vocab = dict(model["vocab"])
    special = set()
    for tok in data.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
        special.add(tok["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, idx in vocab.items():
        tokens[idx] = text
    # gguf token types: 1 normal, 3 control, 5 unused
    types = [3 if i in special else 1 for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def write_gguf(model, tokenizer, out: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write ``model`` (HF Llama) and its BPE tokenizer to ``out`` as GGUF F32/F16."""
    state = model.state_dict()
    return write_gguf_tensors(
        model.config, tokenizer, lambda name: state[name].detach().float().numpy(), out, dtype
    )


# GGUF file types: F32/F16 as numpy arrays; Q8_0/Q4_0 quantized by the gguf package
# (every 2-D weight, embedding and output included: llama-quantize --pure's choice).
FILE_TYPES = ("f32", "f16", "q8_0", "q4_0")


def write_gguf_tensors(config, tokenizer, get, out: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write a Llama model as GGUF (``FILE_TYPES``), one tensor at a time: ``get(name)``
    returns the float32 array of the Hugging Face tensor ``name`` (from memory, or read
    from a checkpoint: a 7B model never has to be in memory whole)."""
    import gguf

    from sparsec.contract import ModelConfig

    cfg = ModelConfig.from_hf(config)
    if cfg.family != "llama":  # the tensor names and metadata below are llama.cpp's Llama
        raise SparsecError(
            f"GGUF export writes Llama models only, not {cfg.family!r}; llama.cpp's own "
            "convert_hf_to_gguf.py converts the others"
        )
    out = Path(out)
    from gguf import quants

    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    np_dtype = np.float16 if dtype == "f16" else np.float32
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[dtype]
    )
    tokens, types, merges = _tokenizer_vocab(tokenizer)
    if len(tokens) < cfg.vocab_size:
        tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
        types += [5] * (cfg.vocab_size - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        w.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        w.add_eos_token_id(tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)

    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    # (GGUF name, HF name, rows permuted for llama.cpp's rotary layout (heads), kept f32)
    plan: list[tuple[str, str, int, bool]] = [
        ("token_embd.weight", "model.embed_tokens.weight", 0, False)
    ]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        plan += [
            (f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", 0, True),
            (f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", n_head, False),
            (f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", n_kv, False),
            (f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", 0, False),
            (f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", 0, False),
            (f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", 0, True),
            (f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", 0, False),
            (f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", 0, False),
            (f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", 0, False),
        ]
    plan.append(("output_norm.weight", "model.norm.weight", 0, True))
    if not cfg.tie_word_embeddings:
        plan.append(("output.weight", "lm_head.weight", 0, False))

    def load(hf_name: str, heads: int, keep_f32: bool) -> np.ndarray:
        arr = get(hf_name)
        if heads:
            arr = _permute_rotary(arr, heads)
        if dtype in qtype and not keep_f32:
            return quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype[dtype])
        return np.ascontiguousarray(arr.astype(np.float32 if keep_f32 else np_dtype))

    hidden, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {
        "embed_tokens": (cfg.vocab_size, hidden),
        "lm_head": (cfg.vocab_size, hidden),
        "q_proj": (n_head * hd, hidden),
        "k_proj": (n_kv * hd, hidden),
        "v_proj": (n_kv * hd, hidden),
        "o_proj": (hidden, n_head * hd),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    # Tensor infos first (shapes from the config), then the header, then each tensor's
    # data as it is read: the writer never holds more than one tensor.
    for name, hf_name, _heads, keep_f32 in plan:
        shape = shapes.get(hf_name.split(".")[-2], (hidden,))
        if dtype in qtype and not keep_f32:
            stored = quants.quant_shape_to_byte_shape(shape, qtype[dtype])
            nbytes = int(np.prod(stored))
            w.add_tensor_info(name, stored, np.dtype(np.uint8), nbytes, raw_dtype=qtype[dtype])
            continue
        dt = np.dtype(np.float32 if keep_f32 else np_dtype)
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _name, hf_name, heads, keep_f32 in plan:
        w.write_tensor_data(load(hf_name, heads, keep_f32))
    w.close()
    return out
