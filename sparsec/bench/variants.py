"""The weights a benchmark runs: one model source, pruned to each requested sparsity.

A variant is either the source pruned by magnitude to a fraction of zeros
(``zero_smallest``: a speed stand-in for real sparsification that keeps exact zeros),
or a ``sparsec sparsify`` output folder (real sparsification, with a report.json of
its perplexities for the accuracy-against-speed plot). Every comparator reads the same
variant's weights, converted into its own format; the conversions are cached in
``cache_dir/<weights hash>/`` so a second run only measures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sparsec.contract import ModelConfig
from sparsec.errors import SparsecError


@dataclass
class Variant:
    label: str  # "0%", "70%", or the sparsify folder's name
    kind: str  # "dense" | "magnitude" | "sparsify"
    requested: float | None  # the --sparsity value (None for a folder)
    model: object  # LlamaForCausalLM (fp32, eval)
    tokenizer: object
    weights_hash: str  # blake2b of config + tokenizer + weights, 16 hex digits
    measured_sparsity: float  # zeros / weights over the decoder Linears
    folder: Path  # artifact cache of this variant
    report: dict | None = None  # sparsify report.json, when there is one
    paths: dict = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.model.config)

    def describe(self) -> dict:
        return {
            "label": self.label,
            "kind": self.kind,
            "requested_sparsity": self.requested,
            "measured_sparsity": round(self.measured_sparsity, 4),
            "weights_hash": self.weights_hash,
            **({"perplexity": self.report.get("perplexity")} if self.report else {}),
        }


def parse_sparsity(text: str) -> list[float | Path]:
    """``--sparsity 0,0.7,runs/s50``: fractions in [0, 1) or sparsify output folders."""
    items: list[float | Path] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise SparsecError(f"--sparsity {text!r} has an empty item; e.g. --sparsity 0,0.7")
        try:
            value = float(part)
        except ValueError:
            folder = Path(part)
            if not (folder / "config.json").is_file():
                raise SparsecError(
                    f"--sparsity item {part!r} is neither a fraction in [0, 1) nor a sparsify "
                    "output folder (no config.json)"
                ) from None
            items.append(folder)
            continue
        if not 0.0 <= value < 1.0:
            raise SparsecError(f"--sparsity {value} is outside [0, 1); e.g. --sparsity 0,0.7")
        items.append(value)
    return items


def weights_hash(model, tokenizer) -> str:
    """blake2b over the config, the tokenizer and every tensor of the state dict (names,
    shapes and bytes): the key of every artifact made from the variant (a model.so or a
    GGUF carries the tokenizer too)."""
    from sparsec.models import tokenizer_assets

    h = hashlib.blake2b(digest_size=8)
    h.update(ModelConfig.from_hf(model.config).to_json().encode())
    h.update(
        json.dumps(tokenizer_assets(tokenizer, model.generation_config), sort_keys=True).encode()
    )
    for name, t in sorted(model.state_dict().items()):
        arr = t.detach().contiguous().float().numpy()
        h.update(f"{name}{tuple(arr.shape)}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def decoder_sparsity(model) -> float:
    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "layers." in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)


def load_variants(source: str, sparsities: list, cache_dir: Path, quiet: bool = True):
    """The variants of ``source`` (loaded once) for each --sparsity item."""
    import copy

    from sparsec.models import load_model
    from sparsec.testing import zero_smallest

    base = None
    variants = []
    for item in sparsities:
        if isinstance(item, Path):
            model, tokenizer = load_model(item, quiet=quiet)
            report_path = item / "report.json"
            report = json.loads(report_path.read_text()) if report_path.is_file() else None
            label, kind, requested = item.name, "sparsify", None
        else:
            if base is None:
                base = load_model(source, quiet=quiet)
            model, tokenizer = base
            if item > 0:
                model = copy.deepcopy(model)
                zero_smallest(model, item)
            report = None
            label, kind, requested = f"{item:.0%}", ("magnitude" if item else "dense"), item
        digest = weights_hash(model, tokenizer)
        folder = cache_dir / digest
        folder.mkdir(parents=True, exist_ok=True)
        variants.append(
            Variant(
                label,
                kind,
                requested,
                model,
                tokenizer,
                digest,
                decoder_sparsity(model),
                folder,
                report,
            )
        )
    return variants


@contextlib.contextmanager
def _quiet_logs(*names: str):
    """Silence the third-party loggers that chatter during a conversion (the exporter's
    'torchvision is not installed', quantize_dynamic's advice on the root logger)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _atomic(out: Path, write) -> Path:
    """Run ``write(tmp_path)`` and rename the result over ``out``."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def contract_graph(v: Variant) -> Path:
    """The optimized graph of the variant (the input of ``sparsec compile``)."""
    out = v.folder / "graph.onnx"
    if not out.is_file():
        import onnx_ir as ir

        from sparsec.testing import build_contract_graph

        _atomic(out, lambda p: ir.save(build_contract_graph(v.model, v.tokenizer), p))
    return out


def compiler_digest() -> str:
    """Hash of the code generator's sources: a cached model.so built by another version of
    the compiler must not be benchmarked as this one's."""
    import sparsec.codegen

    root = Path(sparsec.codegen.__file__).parent
    h = hashlib.blake2b(digest_size=6)
    for src in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c", ".h")):
        h.update(src.relative_to(root).as_posix().encode() + b"\0" + src.read_bytes())
    return h.hexdigest()


def sparsec_library(
    v: Variant,
    precision: str,
    kernels: str,
    max_context: int,
    target: str = "auto",
    kv_cache: str = "float32",
) -> Path:
    from sparsec.codegen.target import host_target

    tgt = host_target(target)
    kv = "" if kv_cache == "float32" else f"_kv{kv_cache}"  # not matched by the globs below
    # "." ends the ISA name: the stale-build glob of avx2 must not match avx2-vnni's
    stem = f"sparsec-{precision}-{kernels}-c{max_context}{kv}.{tgt.isa.name}."
    out = v.folder / f"{stem}{compiler_digest()}.so"
    if not out.is_file():
        from sparsec.codegen.compile import compile_model

        compile_model(
            contract_graph(v),
            out,
            precision=precision,
            kernels=kernels,
            max_context=max_context,
            quiet=True,
            target=tgt,
            kv_cache=kv_cache,
        )
        old = f"sparsec-{precision}-{kernels}-c{max_context}-*.so"  # names before targets
        for stale in [*v.folder.glob(f"{stem}*.so"), *v.folder.glob(old)]:
            if stale != out:  # other compiler versions' builds
                stale.unlink(missing_ok=True)
    return out


def exported_onnx(v: Variant) -> Path:
    """The dynamo export (graph contract section 1): what onnxruntime runs."""
    out = v.folder / "export.onnx"
    if not out.is_file():
        from sparsec.export import export_model

        with _quiet_logs("torch.onnx", "torch.export"):
            export_model(v.model, v.tokenizer, out, source=f"bench {v.label}")
    return out


def onnx_dynamic_int8(v: Variant) -> Path:
    """onnxruntime's own dynamic int8 quantization of the exported graph (its W8A8)."""
    out = v.folder / "export-int8.onnx"
    if not out.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        src = exported_onnx(v)
        with _quiet_logs(""):  # "" is the root logger
            _atomic(out, lambda p: quantize_dynamic(src, p, weight_type=QuantType.QInt8))
    return out


GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
# Formats whose blocks store exact zeros for zero weights (measured: Q4_1's min/scale
# offset turns zeros into small nonzeros), i.e. that still run "the same weights".
GGUF_KEEPS_ZEROS = {"f32": True, "f16": True, "q8_0": True, "q4_0": True, "q4_1": False}


def gguf_file(v: Variant, gtype: str) -> Path:
    """A GGUF of the variant: F32/F16 written with the ``gguf`` package (Q/K rotary
    permutation re-applied), quantized types made from the F32 file by llama.cpp."""
    out = v.folder / f"model-{gtype}.gguf"
    if out.is_file():
        return out
    from sparsec.gguf_writer import write_gguf

    if gtype in ("f32", "f16"):
        return _atomic(out, lambda p: write_gguf(v.model, v.tokenizer, p, dtype=gtype))
    from sparsec.bench.systems.llamacpp import quantize_gguf

    src = gguf_file(v, "f32")
    return _atomic(out, lambda p: quantize_gguf(src, p, gtype))
