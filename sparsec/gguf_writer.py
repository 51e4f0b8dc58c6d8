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
    import gguf

    from sparsec.contract import ModelConfig

    cfg = ModelConfig.from_hf(model.config)
    out = Path(out)
    np_dtype = {"f32": np.float32, "f16": np.float16}[dtype]
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
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
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

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    def add(name: str, arr: np.ndarray, keep_f32: bool = False) -> None:
        w.add_tensor(name, np.ascontiguousarray(arr.astype(np.float32 if keep_f32 else np_dtype)))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], keep_f32=True)
        add(f"blk.{i}.attn_q.weight", _permute_rotary(sd[p + "self_attn.q_proj.weight"], n_head))
        add(f"blk.{i}.attn_k.weight", _permute_rotary(sd[p + "self_attn.k_proj.weight"], n_kv))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], keep_f32=True)
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"], keep_f32=True)
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
