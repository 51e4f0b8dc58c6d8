"""Each family at its real layer shapes, through every stage.

The published configs of Llama-3.2-1B, Qwen2.5-0.5B, Qwen3-0.6B, Mistral-7B-v0.1,
Phi-4-mini, OPT-1.3B and OPT-6.7B (sizes, vocab, RoPE scaling, window, tied head), with
random weights (HF's own init), the depth cut to ``--layers`` (default 2; Mistral-7B and
OPT-6.7B 1) and the vocabulary to ``--vocab`` (default 32768, to keep the run short;
larger graphs go to external data): every decoder layer has its real shape. Weights are
70% magnitude-zeroed. Per family: export -> optimize -> compile (int8 and fp32, sparse
kernels) -> teacher-forced logits of a 32-token prompt against transformers (fp32) and
the W8A8 reference (int8): max |Δ| relative to max |logits| (int8: also over the rows
before the reference's first activation rounding tie, after which one int8 step may
differ, and the reference's own spread: float64 against float32 W8A8), the top-1
agreement, and the wall time of each stage.

    .venv/bin/python benchmarks/family_shapes.py [--layers N] [FAMILY ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The checkpoints' config.json values that shape the model (public model cards).
REAL = {
    "llama3.2-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_scaling=dict(
            rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=8192))),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)),
    "qwen3-0.6b": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True)),
    "mistral-7b": ("MistralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False)),
    "phi4-mini": ("Phi3Config", dict(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=10000.0, partial_rotary_factor=0.75, tie_word_embeddings=True,
        pad_token_id=199999, bos_token_id=199999, eos_token_id=199999)),
    "mpt-7b": ("MptConfig", dict(
        vocab_size=50432, d_model=4096, n_heads=32, max_seq_len=2048)),
    "gemma2-2b": ("Gemma2Config", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"])),
    "gemma3-1b": ("Gemma3TextConfig", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, rms_norm_eps=1e-6,
        query_pre_attn_scalar=256, sliding_window=512, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"])),
    "gpt2-xl": ("GPT2Config", dict(
        vocab_size=50257, n_embd=1600, n_head=25, n_positions=1024, bos_token_id=50256,
        eos_token_id=50256)),
    "opt-1.3b": ("OPTConfig", dict(
        vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_attention_heads=32,
        max_position_embeddings=2048, word_embed_proj_dim=2048, activation_function="relu",
        enable_bias=True, tie_word_embeddings=True)),
    "opt-6.7b": ("OPTConfig", dict(
        vocab_size=50272, hidden_size=4096, ffn_dim=16384, num_attention_heads=32,
        max_position_embeddings=2048, word_embed_proj_dim=4096, activation_function="relu",
        enable_bias=True, tie_word_embeddings=True)),
}  # fmt: skip


LAYERS = {"mistral-7b": 1, "opt-6.7b": 1, "mpt-7b": 1}  # one 7B layer is 0.9 GB in fp32


def run(family: str, layers: int, vocab: int, folder: Path) -> dict:
    import numpy as np
    import torch
    import transformers

    from sparsec import runtime
    from sparsec.codegen.compile import compile_model
    from sparsec.export import export_model
    from sparsec.models import as_linear_modules
    from sparsec.passes import optimize_file
    from sparsec.testing import (
        fake_quant_w8a8,
        int8_tie_position,
        make_byte_tokenizer,
        zero_smallest,
    )

    config_class, values = REAL[family]
    torch.manual_seed(0)
    values = {**values, "vocab_size": min(values["vocab_size"], vocab)}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if values.get(key, -1) >= values["vocab_size"]:
            values[key] = values["vocab_size"] - 1
    config = getattr(transformers, config_class)(**values, num_hidden_layers=layers)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    model = as_linear_modules(model)  # GPT-2's Conv1D, as load_model gives it
    with torch.no_grad():  # HF initializes these to 0 and 1: draw them so they count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
            elif "norm" in name and name.endswith(".weight"):
                p.normal_(1.0, 0.02)
    zero_smallest(model, 0.7)
    result: dict = {"family": family, "layers": layers, "vocab": values["vocab_size"]}
    clock = time.perf_counter()
    onnx, opt = folder / f"{family}.onnx", folder / f"{family}.opt.onnx"
    export_model(model, make_byte_tokenizer(), onnx, source=family)
    result["export_s"] = round(time.perf_counter() - clock, 1)
    clock = time.perf_counter()
    report = optimize_file(onnx, opt)
    result["optimize_s"] = round(time.perf_counter() - clock, 1)
    result["outside_contract"] = report.outside_contract
    onnx.unlink()
    ids = list(range(40, 72))
    for precision in ("int8", "fp32"):
        so = folder / f"{family}-{precision}.so"
        clock = time.perf_counter()
        compile_model(opt, so, precision=precision, kernels="bitmask", max_context=256,
                      quiet=True)  # fmt: skip
        result[f"{precision}_compile_s"] = round(time.perf_counter() - clock, 1)
        ref = fake_quant_w8a8(model) if precision == "int8" else model
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].numpy()
        got = runtime.load(so, threads=2).forward(ids)
        error = np.abs(got - want).max(axis=-1) / np.abs(want).max()
        result[f"{precision}_rel_dlogits"] = float(error.max())
        if precision == "int8":  # rows before the reference's first rounding tie
            tie = int8_tie_position(ref, ids)
            result["int8_first_tie_row"] = tie
            result["int8_rel_dlogits_before_tie"] = float(error[:tie].max(initial=0.0))
            # The W8A8 reference's own spread: the same model in float64 rounds some
            # activations to the other int8 step, as fp32 summation order does.
            with torch.no_grad():
                ref64 = fake_quant_w8a8(model.double())(torch.tensor([ids])).logits[0]
            model.float()
            spread = np.abs(ref64.float().numpy() - want).max() / np.abs(want).max()
            result["int8_reference_fp32_vs_fp64"] = float(spread)
        result[f"{precision}_top1_agree"] = float((got.argmax(-1) == want.argmax(-1)).mean())
        so.unlink()
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help=f"of {', '.join(REAL)} (default: all)")
    parser.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default 2; mistral-7b 1)"
    )
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary cap (32768)")
    args = parser.parse_args(argv)
    unknown = [f for f in args.families if f not in REAL]
    if unknown or (args.layers is not None and args.layers < 1) or args.vocab < 300:
        parser.error(
            f"unknown family {unknown[0]!r}" if unknown else "--layers >= 1, --vocab >= 300"
        )
    for family in args.families or REAL:
        with tempfile.TemporaryDirectory(prefix="family-shapes-") as tmp:
            layers = args.layers or LAYERS.get(family, 2)
            print(json.dumps(run(family, layers, args.vocab, Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
