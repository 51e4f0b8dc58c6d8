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


# A tiny model of each supported family (transformers config class, overrides of
# TINY_CONFIG), each with what sets the family apart from SmolLM2's Llama switched on at
# a size the tests see: Llama 3 RoPE scaling and an untied head (and attention biases),
# q/k/v biases (with
# YaRN RoPE), per-head q/k norm, a sliding window shorter than the tests' prompts,
# fused qkv/gate_up projections with partial rotary.
FAMILIES = {
    "llama3": (
        "LlamaConfig",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": False,
            # Not in Llama 3 itself: Llama-architecture checkpoints with q/k/v/o biases
            "attention_bias": True,
        },
    ),
    "qwen2": (
        "Qwen2Config",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": 8, "head_dim": 16}),
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.5}),
    # Pre-LayerNorm blocks with biases everywhere, learned positions (offset 2), ReLU MLP.
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    # Conv1D ([in, out]) projections, a fused c_attn, learned positions, GELU (tanh) MLP.
    "gpt2": ("GPT2Config", {"n_inner": 128}),
    # The paper's model: ALiBi, LayerNorm without bias, GELU MLP, a fused Wqkv.
    "mpt": ("MptConfig", {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256}),
    # Scaled embeddings, GeGLU, pre- and post-norms, soft-capped scores and logits (caps
    # small enough to clip), a sliding layer then a full one.
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}),
    # q/k norm, and RoPE bases that differ between the sliding and the full layer.
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8,
                                    "query_pre_attn_scalar": 16,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
}  # fmt: skip


def make_tiny_family(family: str, seed: int = 0, **overrides):
    """A random causal LM of ``family`` (a key of ``FAMILIES``; fp32, eval) and the byte
    tokenizer. Biases and norm scales, which Hugging Face initializes to 0 and 1, are
    drawn at random too (scaled like the weights), so a stage that drops them shows."""
    import torch
    import transformers

    config_class, family_overrides = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{**TINY_CONFIG, **family_overrides, **overrides})
    from sparsec.models import as_linear_modules

    # GPT-2's Conv1D projections as nn.Linear, as load_model gives them (same function)
    model = as_linear_modules(transformers.AutoModelForCausalLM.from_config(config).float().eval())
    std = TINY_CONFIG["initializer_range"]
    # Norms by kind, whatever their names (GPT-2: ln_1); drawn in parameter order.
    norms = {
        id(m.weight)
        for m in model.modules()
        if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None
    }
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, std)
            elif id(param) in norms:
                param.normal_(1.0, std)
    return model, make_byte_tokenizer()


def zero_smallest(model, sparsity: float) -> None:
    """Magnitude-prune every decoder Linear weight in place to ``sparsity`` per row
    block (a speed stand-in until real sparsification; keeps exact zeros)."""
    import torch

    from sparsec.sparsify.layer_walk import prunable_linears

    with torch.no_grad():
        for module in prunable_linears(model).values():
            w = module.weight
            k = int(round(w.numel() * sparsity))
            if k == 0:
                continue
            threshold = w.abs().flatten().kthvalue(k).values
            w.mul_(w.abs() > threshold)


def int8_tie_position(w8a8_model, ids: list[int], margin: float = 3e-5) -> int:
    """The first position at which the W8A8 reference (``fake_quant_w8a8``) quantizes an
    activation within ``margin`` steps of a rounding tie, or ``len(ids)`` if none does.

    There, fp32 summation order alone can round the activation the other way in the
    compiled model: one int8 step, which moves that row's logits by up to a few 1e-2 and
    the rows after it (through attention) by less. Rows before it agree to fp32 noise.
    (Measured on the tiny model: an activation 4e-6 steps from a tie flipped.)
    """
    import torch

    tie_rows: list[int] = []

    def record(_module, args):
        x = args[0].detach()[0].double()  # [positions, features], before quantization
        steps = x / (x.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(1e-30)
        distance = ((steps - steps.floor()) - 0.5).abs().amin(dim=-1)
        tie_rows.extend(torch.nonzero(distance < margin).flatten().tolist())

    linears = [m for m in w8a8_model.modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_pre_hook(record, prepend=True) for m in linears]
    try:
        with torch.no_grad():
            w8a8_model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return min(tie_rows, default=len(ids))


def build_contract_graph(model, tokenizer):
    """The optimized graph of docs/graph-contract.md section 3, built directly from an
    HF Llama's weights (no exporter, no passes): a fixture that tests the code
    generator on its own, and a cross-check for what the passes produce."""
    import json

    import numpy as np
    import onnx_ir as ir

    from sparsec import contract
    from sparsec.models import tokenizer_assets

    cfg = contract.ModelConfig.from_hf(model.config)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    L, KVH, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    inits: list = []

    def const(name, arr):
        v = ir.val(name, const_value=ir.tensor(np.ascontiguousarray(arr), name=name))
        inits.append(v)
        return v

    def node(op, inputs, attrs=None, domain="", n_out=1):
        n = ir.node(op, inputs, attrs or {}, domain=domain, num_outputs=n_out)
        nodes.append(n)
        return n.outputs if n_out > 1 else n.outputs[0]

    nodes: list = []
    ids = ir.val(contract.INPUT_IDS, ir.DataType.INT64, [1, "seq"])
    pos = ir.val(contract.POSITION_IDS, ir.DataType.INT64, [1, "seq"])
    pasts = [
        ir.val(name(i), ir.DataType.FLOAT, [1, KVH, "capacity", hd])
        for i in range(L)
        for name in (contract.past_key, contract.past_value)
    ]
    inv_freq = 1.0 / cfg.rope.theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.arange(cfg.max_position_embeddings)[:, None] * inv_freq[None]
    cos = const("cos_cache", np.cos(angles).astype(np.float32))
    sin = const("sin_cache", np.sin(angles).astype(np.float32))
    eps = cfg.norm_eps
    embed = sd["model.embed_tokens.weight"]
    x = node("Gather", [const("embed", embed), ids])
    h = node(
        "RMSNormalization",
        [x, const("norm.0.in", sd["model.layers.0.input_layernorm.weight"])],
        {"epsilon": eps, "axis": -1},
    )
    outputs = []
    for i in range(L):
        p = f"model.layers.{i}."

        def lin(t, key, _p=p):
            return node("MatMul", [t, const(_p + key, sd[_p + key + ".weight"].T)])

        q, k, v = lin(h, "self_attn.q_proj"), lin(h, "self_attn.k_proj"), lin(h, "self_attn.v_proj")
        a, pk, pv = node(
            "CachedAttention",
            [q, k, v, pasts[2 * i], pasts[2 * i + 1], pos, cos, sin],
            {
                "num_heads": cfg.num_attention_heads,
                "kv_num_heads": KVH,
                "scale": float(hd**-0.5),
            },
            domain=contract.DOMAIN,
            n_out=3,
        )
        pk.name, pv.name = contract.present_key(i), contract.present_value(i)
        outputs += [pk, pv]
        o = lin(a, "self_attn.o_proj")
        h2, s = node(
            "SkipRMSNormalization",
            [o, x, const(p + "post", sd[p + "post_attention_layernorm.weight"])],
            {"epsilon": eps},
            domain=contract.DOMAIN,
            n_out=2,
        )
        m = node(
            "SwiGLU",
            [h2]
            + [
                const(p + w, sd[p + f"mlp.{w}.weight"].T)
                for w in ("gate_proj", "up_proj", "down_proj")
            ],
            domain=contract.DOMAIN,
        )
        nxt = (
            sd[f"model.layers.{i + 1}.input_layernorm.weight"]
            if i + 1 < L
            else sd["model.norm.weight"]
        )
        h, x = node(
            "SkipRMSNormalization",
            [m, s, const(f"norm.{i + 1}.in", nxt)],
            {"epsilon": eps},
            domain=contract.DOMAIN,
            n_out=2,
        )
    head = sd.get("lm_head.weight", embed)  # the same tensor when the embeddings are tied
    logits = node("MatMul", [h, const("lm_head", head.T)])
    logits.name = contract.LOGITS
    # Graph outputs are typed, as an exported graph's are (the ONNX checker requires it).
    logits.dtype, logits.shape = ir.DataType.FLOAT, ir.Shape([1, "seq", cfg.vocab_size])
    for present in outputs:
        present.dtype, present.shape = ir.DataType.FLOAT, ir.Shape([1, KVH, "total", hd])
    graph = ir.Graph(
        [ids, pos, *pasts],
        [logits, *outputs],
        nodes=nodes,
        initializers=inits,
        opset_imports={"": 23, contract.DOMAIN: 1},
        name="contract_graph",
    )
    model_ir = ir.Model(graph, ir_version=10)
    assets = tokenizer_assets(tokenizer, model.generation_config)
    model_ir.metadata_props.update(
        {
            contract.META_FORMAT: "optimized",
            contract.META_CONFIG: cfg.to_json(),
            contract.META_TOKENIZER: assets["tokenizer"],
            contract.META_GENERATION: json.dumps(assets["generation"]),
            contract.META_SOURCE: "build_contract_graph",
        }
    )
    if assets["chat_template"]:
        model_ir.metadata_props[contract.META_CHAT_TEMPLATE] = assets["chat_template"]
    return model_ir


def fake_quant_w8a8(model):
    """A copy of ``model`` with W8A8 simulated in PyTorch (the int8 reference): every
    Linear, the output layer included, sees int8 per-token inputs and int8
    per-output-channel weights, both symmetric, round-half-even, computed in fp32.

    A tied embedding stays tied, so its rows are on the LM head's int8 grid too: the
    compiled int8 model reads them from the head's int8 weights."""
    import copy

    import torch

    model = copy.deepcopy(model)

    def fq_tokens(module, args):
        x = args[0]
        s = x.abs().amax(dim=-1, keepdim=True) / 127
        q = torch.where(s == 0, torch.zeros_like(x), torch.clamp(torch.round(x / s), -127, 127))
        return (q * s,)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                s = w.abs().amax(dim=1, keepdim=True) / 127
                safe = torch.where(s == 0, torch.ones_like(s), s)
                w.copy_(torch.clamp(torch.round(w / safe), -127, 127) * s)
                module.register_forward_pre_hook(fq_tokens)
    return model
