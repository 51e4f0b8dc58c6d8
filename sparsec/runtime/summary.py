"""What `sparsec inspect` shows: a manifest summary and the per-layer table.

Works from the manifest alone (no dlopen, no CPU requirement), so a model can be
inspected on any machine, including one that could not run it.
"""

from __future__ import annotations

import math

from sparsec.contract import KV_CACHE_DTYPES, ModelConfig
from sparsec.errors import SparsecError
from sparsec.runtime.artifact import Artifact
from sparsec.runtime.cpu import missing_cpu_features

SPARSE_KERNEL_MARKERS = ("bitmask", "blocked")
EMBEDDING_LABELS = {
    "rows": "float32 table",
    "dense_f32": "rows of the tied LM head (float32, stored once)",
    "dense_i8": "rows of the tied int8 LM head (int8 x per-row scale, stored once)",
}


def is_sparse_kernel(kernel: str) -> bool:
    return any(marker in kernel for marker in SPARSE_KERNEL_MARKERS)


def _sparse_share(values: list[int], sparse: list[bool]) -> float:
    """The fraction of sum(values) that belongs to layers run by sparse kernels."""
    total = sum(values)
    part = sum(v for v, s in zip(values, sparse, strict=True) if s)
    return part / total if total else 0.0


def summarize(artifact: Artifact) -> dict:
    """A JSON-able summary: the manifest without the tokenizer text, plus derived figures."""
    m = artifact.manifest
    layers = m["layers"]
    params = [math.prod(layer["shape"]) for layer in layers]
    sparse = [is_sparse_kernel(layer["kernel"]) for layer in layers]
    try:
        host_missing = missing_cpu_features(m["cpu_features"])
    except SparsecError:
        host_missing = None  # not Linux: unknown
    kv_shape = m["kv_cache"]["shape"]
    try:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_str(m["tokenizer"]).get_vocab_size(with_added_tokens=True)
    except Exception:  # inspect still shows the rest of a model whose tokenizer is bad
        vocab = None
    return {
        "file": str(artifact.path),
        "file_size": artifact.file_size,
        "sparsec_version": m["sparsec_version"],
        "abi_version": m["abi_version"],
        "config": artifact.config.to_dict(),  # older layouts read as today's
        "precision": m["precision"],
        "target": m["target"],
        "cpu_features": m["cpu_features"],
        "host_missing_cpu_features": host_missing,
        "max_context": m["max_context"],
        "max_tokens_per_call": m["max_tokens_per_call"],
        "default_threads": m["default_threads"],
        "kv_cache": {
            **m["kv_cache"],
            "bytes": math.prod(kv_shape) * KV_CACHE_DTYPES[m["kv_cache"]["dtype"]],
        },
        "weights": m["weights"],
        "non_weight_bytes": artifact.file_size - m["weights"]["size"],
        "generation": m["generation"],
        "tokenizer": {"bytes": len(m["tokenizer"].encode()), "vocab_size": vocab},
        "chat_template": m["chat_template"],
        "compile": m["compile"],
        "layers": layers,
        "embedding": m.get("embedding", "rows"),  # older .so files do not record it
        "sparse": {
            "layers": sum(sparse),
            "weights_fraction": _sparse_share(params, sparse),
            "bytes_fraction": _sparse_share([layer["bytes"] for layer in layers], sparse),
            "flops_fraction": _sparse_share([layer["flops"] for layer in layers], sparse),
        },
    }


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def format_summary(s: dict) -> str:
    c = ModelConfig.from_dict(s["config"])
    model = (
        f"layers {c.num_hidden_layers}, hidden {c.hidden_size}, heads {c.num_attention_heads}, "
        f"kv heads {c.num_key_value_heads}, head_dim {c.head_dim}, mlp {c.intermediate_size}, "
        f"vocab {c.vocab_size}"
    )
    missing = s["host_missing_cpu_features"]
    host = (
        "this host: unknown (not Linux)"
        if missing is None
        else "this host: ok"
        if not missing
        else f"this host lacks {', '.join(missing)}"
    )
    w, comp, sp = s["weights"], s["compile"], s["sparse"]
    rows = [
        ("model", f"{c.family}: {model}"),
        ("architecture", ", ".join(c.features()) or "plain (no bias, window or scaling)"),
        ("precision", s["precision"]),
        (
            "target",
            f"{s['target']['triple']}, {s['target']['isa']}, cpu {s['target']['cpu']}"
            + _tuning(s["target"]),
        ),
        ("cpu features", f"{' '.join(s['cpu_features']) or '(none)'} ({host})"),
        (
            "context",
            f"{s['max_context']} tokens (KV cache {human_bytes(s['kv_cache']['bytes'])} "
            f"{s['kv_cache']['dtype']} per sequence), "
            f"{s['max_tokens_per_call']} tokens per call, {s['default_threads']} threads",
        ),
        (
            "weights",
            f"{human_bytes(w['size'])} at offset {w['offset']}, {len(w['blake2b'])} blake2b "
            f"chunk hash(es) of {human_bytes(w['chunk_bytes'])}",
        ),
        (
            "file",
            f"{human_bytes(s['file_size'])} = weights + {human_bytes(s['non_weight_bytes'])} "
            "(code, manifest, tokenizer)",
        ),
        ("compiled", f"{comp['created']} in {comp['seconds']:.1f} s from {comp['source']}"),
        ("embedding", EMBEDDING_LABELS.get(s["embedding"], s["embedding"])),
        ("chat template", "yes" if s["chat_template"] else "no"),
        (
            "sparse kernels",
            f"{sp['weights_fraction']:.1%} of weights ({sp['bytes_fraction']:.1%} of weight "
            f"bytes), {sp['flops_fraction']:.1%} of FLOPs, {sp['layers']} of "
            f"{len(s['layers'])} layers",
        ),
    ]
    head = f"{s['file']}  (sparsec {s['sparsec_version']}, ABI {s['abi_version']})"
    width = max(len(k) for k, _ in rows)
    lines = [head, *(f"  {k.ljust(width)}  {v}" for k, v in rows), ""]
    lines += _layer_table(s["layers"])
    return "\n".join(lines)


def _layer_table(layers: list[dict]) -> list[str]:
    header = ("name", "shape", "sparsity", "pattern", "kernel", "bytes")
    body = [
        (
            layer["name"],
            "x".join(str(d) for d in layer["shape"]),
            f"{layer['sparsity']:.1%}",
            layer["pattern"],
            layer["kernel"],
            str(layer["bytes"]),
        )
        for layer in layers
    ]
    if not body:
        return ["(no layers listed)"]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    right = {2, 5}  # numbers align right

    def fmt(row):
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [fmt(header), *(fmt(row) for row in body)]


def _tuning(target: dict) -> str:
    """The target line's tuning part (models compiled before it was recorded: none)."""
    tuning = target.get("tuning")
    if not isinstance(tuning, dict):
        return ""
    parts = []
    for field, table in tuning.items():  # the recorded fields, whichever they are
        if isinstance(table, dict) and table:
            shown = ", ".join(f"{fmt} {value}" for fmt, value in sorted(table.items()))
            parts.append(f"{field.replace('_', ' ')}: {shown}")
    return f"; tuning {tuning.get('source', '?')} ({'; '.join(parts) or '-'})"
