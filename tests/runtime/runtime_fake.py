"""The fake model for runtime tests: build fake_model.c, wrap it as a model.so, and a
numpy twin of its toy computation (see the comment at the top of fake_model.c).

Uses only numpy, tokenizers and the standard library (the import-isolation test runs
it with the compiler stack blocked), plus sparsec.codegen.artifact for writing.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import numpy as np

from sparsec.contract import ModelConfig, RoPE

HERE = Path(__file__).parent
SOURCE = HERE / "fake_model.c"

# 256 byte tokens + these specials: V = 260 = D, so an identity embedding is possible.
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
V, L, KVH, HD, C, T = 260, 2, 2, 130, 64, 8
D = KVH * HD
WEIGHTS_BYTES = 4 * (V * D * 2 + L + 1)  # emb, out, wv, pos_bias (see fake_model.c)
BOS, EOS = 256, 257
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_fake(out_dir: Path, **defines) -> Path:
    """Compile fake_model.c into a shared library (``defines`` add or override -D flags)."""
    dims = {"V": V, "L": L, "KVH": KVH, "HD": HD, "C": C, "T": T, **defines}
    flags = [f"-D{k}" if v is True else f"-D{k}={v}" for k, v in dims.items()]
    name = "fake" + "".join(f"_{k}{'' if v is True else v}" for k, v in defines.items())
    out = out_dir / f"{name}.so"
    subprocess.run(
        ["cc", "-O1", "-shared", "-fPIC", *flags, "-o", str(out), str(SOURCE)],
        check=True,
        capture_output=True,
    )
    return out


def make_tokenizer_json() -> str:
    """Byte-level BPE without merges: ids 0-255 are the bytes (GPT-2 alphabet order
    sorted), then the specials; encoding adds <|bos|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", BOS)]
    )
    return tok.to_str()


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "emb": rng.normal(0, 1, (V, D)).astype(np.float32),
        "out": rng.normal(0, 0.2, (D, V)).astype(np.float32),
        "wv": rng.normal(0, 1, L).astype(np.float32),
        "pos_bias": np.array([0.05], np.float32),
    }


def chain_weights(successor: dict[int, int]) -> dict[str, np.ndarray]:
    """Weights whose greedy continuation of token a is successor[a] (else token 0):
    identity embedding, no attention contribution, out = the successor table."""
    out = np.zeros((D, V), np.float32)
    for a, b in successor.items():
        out[a, b] = 1.0
    return {
        "emb": np.eye(V, D, dtype=np.float32),
        "out": out,
        "wv": np.zeros(L, np.float32),
        "pos_bias": np.zeros(1, np.float32),
    }


def pack(weights: dict[str, np.ndarray]) -> bytes:
    return b"".join(
        weights[k].astype(np.float32).tobytes() for k in ("emb", "out", "wv", "pos_bias")
    )


def manifest(**overrides) -> dict:
    m = {
        "sparsec_version": "0.1.0",
        "cpu_features": ["avx512f", "avx512bw", "avx512_vnni"],
        "target": {
            "triple": f"{platform.machine()}-unknown-linux-gnu",
            "cpu": "znver4",
            "isa": "avx512",
        },
        "config": ModelConfig(
            family="fake",
            vocab_size=V,
            hidden_size=D,
            intermediate_size=D,
            num_hidden_layers=L,
            num_attention_heads=KVH,
            num_key_value_heads=KVH,
            head_dim=HD,
            max_position_embeddings=C,
            tie_word_embeddings=False,
            norm="rms",
            norm_eps=1e-5,
            activation="silu",
            attention_bias=False,
            mlp_bias=False,
            qk_norm=False,
            rope=RoPE(theta=10000.0),
            sliding_window=None,
        ).to_dict(),
        "tokenizer": make_tokenizer_json(),
        "chat_template": CHAT_TEMPLATE,
        "generation": {"bos_token_id": BOS, "eos_token_id": EOS},
        "precision": "fp32",
        "max_context": C,
        "max_tokens_per_call": T,
        "default_threads": 2,
        "kv_cache": {"shape": [L, 2, KVH, C, HD], "dtype": "float32"},
        "layers": [
            {
                "name": "emb",
                "shape": [V, D],
                "sparsity": 0.0,
                "pattern": "dense",
                "kernel": "gather_f32",
                "bytes": V * D * 4,
                "flops": 0,
            },
            {
                "name": "out",
                "shape": [D, V],
                "sparsity": 0.5,
                "pattern": "unstructured",
                "kernel": "matmul_bitmask_f32",
                "bytes": D * V * 2 + D * V // 8,
                "flops": 2 * D * V,
            },
        ],
        "compile": {"seconds": 0.5, "created": "2025-01-01T00:00:00Z", "source": "fake"},
    }
    m.update(overrides)
    return m


def write_fake(out: Path, lib: Path, weights: dict[str, np.ndarray] | None = None, **overrides):
    from sparsec.codegen.artifact import write_artifact

    weights = random_weights() if weights is None else weights
    return write_artifact(lib, pack(weights), manifest(**overrides), out)


class Reference:
    """numpy twin of fake_model.c (float64 math, float32 cache like the C code)."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.w = {k: v.astype(np.float64) for k, v in weights.items()}
        self.cache = np.zeros((L, 2, KVH, C, HD), np.float32)
        self.position = 0

    def forward(self, ids) -> np.ndarray:
        rows = [self._token(int(t)) for t in ids]
        return np.stack(rows)

    def _token(self, t: int) -> np.ndarray:
        p, w = self.position, self.w
        x = w["emb"][t].copy()
        for layer in range(L):
            for g in range(KVH):
                xg = x[g * HD : (g + 1) * HD]
                self.cache[layer, 0, g, p] = xg * (layer + 1) + 0.01 * p
                self.cache[layer, 1, g, p] = xg * w["wv"][layer]
                k0 = self.cache[layer, 0, g, : p + 1, 0].astype(np.float64)
                s = 1.0 / (1.0 + k0 * k0)
                vals = self.cache[layer, 1, g, : p + 1].astype(np.float64)
                x[g * HD : (g + 1) * HD] = xg + (s @ vals) / s.sum()
        self.position += 1
        return x @ w["out"] + w["pos_bias"][0] * p

    def greedy(self, prompt_ids, n: int, eos=()) -> list[int]:
        logits = self.forward(prompt_ids)[-1]
        out = []
        while True:
            t = int(np.argmax(logits))
            out.append(t)
            if t in eos or len(out) == n:
                return out
            logits = self.forward([t])[-1]


def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_str(make_tokenizer_json())


def rewrite_manifest(path: Path, edit, seal: bool = True) -> None:
    """Apply ``edit(manifest)`` in place, keeping the file layout valid (for negative
    tests); ``seal``: put the edited manifest's hash in the trailer, as a consistent but
    wrong file would have it."""
    import hashlib
    import struct

    data = path.read_bytes()
    offset, size, sealed, magic = struct.unpack("<QQ32s8s", data[-56:])
    m = json.loads(data[offset : offset + size])
    edit(m)
    raw = json.dumps(m).encode()
    if seal:
        sealed = hashlib.blake2b(raw, digest_size=32).digest()
    path.write_bytes(data[:offset] + raw + struct.pack("<QQ32s8s", offset, len(raw), sealed, magic))


def read_manifest(data: bytes) -> dict:
    import struct

    offset, size, _, _ = struct.unpack("<QQ32s8s", bytes(data[-56:]))
    return json.loads(bytes(data[offset : offset + size]))


def read_weights_offset(data: bytes) -> int:
    return read_manifest(data)["weights"]["offset"]
