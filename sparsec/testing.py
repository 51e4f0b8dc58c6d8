"""Tiny random Llama models and a byte-level tokenizer, for tests and examples.

Built from a ``LlamaConfig`` with a fixed seed: no model hub, no files.
"""

from __future__ import annotations

TINY_CONFIG = dict(
    vocab_size=272,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    # Larger than HF's 0.02 so logits are decisive: greedy tests then compare real
    # choices instead of near-ties decided by rounding.
    initializer_range=0.1,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=257,
)

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_byte_tokenizer():
    """A byte-level BPE tokenizer without merges: ids 0-255 are bytes, then specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(seed: int = 0, **overrides):
    """A random ``LlamaForCausalLM`` (fp32, eval) and its byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_CONFIG, **overrides})
    model = LlamaForCausalLM(config).float().eval()
    return model, make_byte_tokenizer()


def zero_smallest(model, sparsity: float) -> None:
    """Magnitude-prune every decoder Linear weight in place to ``sparsity`` per row
    block (a speed stand-in until real sparsification; keeps exact zeros)."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "layers." in name:
                w = module.weight
                k = int(round(w.numel() * sparsity))
                if k == 0:
                    continue
                threshold = w.abs().flatten().kthvalue(k).values
                w.mul_(w.abs() > threshold)
