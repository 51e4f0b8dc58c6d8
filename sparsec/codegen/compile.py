"""``sparsec compile``: an ONNX graph in, one native ``model.so`` out.

Steps: load the graph (running the passes first on a raw export), lower it to a
kernel program, pick and emit a kernel per layer (``emit_model``); compile the module
for AVX-512, link it with the thread pool and driver, read the CPU features the linked
code needs (``isa_scan``) and append weights + manifest (``sparsec.codegen.artifact``)
(``build_model``). The output is written atomically.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sparsec import __version__, contract, metadata
from sparsec.codegen.tuning import TUNING_MODES
from sparsec.errors import SparsecError
from sparsec.runtime.arguments import MAX_THREADS
from sparsec.runtime.artifact import ABI_VERSION
from sparsec.runtime.native import build_info_define

if TYPE_CHECKING:
    from sparsec.codegen.emit import Emitted
    from sparsec.codegen.target import Target

NATIVE = Path(__file__).parent / "native"
DEFAULT_MAX_TOKENS = 64  # prefill chunk: rows of every scratch buffer


def load_graph(path: str | os.PathLike, *, quiet: bool = False):
    """Load an exported or optimized sparsec graph as an optimized ``onnx_ir.Model``.

    Its JSON metadata is checked against its schema first (``sparsec.metadata``), so a
    malformed value is refused by name before any pass or lowering reads it."""
    import onnx_ir as ir

    path = Path(path)
    if not path.is_file():
        raise SparsecError(f"{path}: no such file")
    try:
        model = ir.load(path)
    except Exception as e:
        raise SparsecError(f"{path} is not a readable ONNX model: {str(e).splitlines()[0]}") from e
    fmt = model.metadata_props.get(contract.META_FORMAT)
    if fmt in ("exported", "optimized"):
        metadata.read(model.metadata_props, str(path), require_config=True)
    if fmt == "exported":
        from sparsec.passes import optimize
        from sparsec.progress import stage

        with stage("optimizing the exported graph (sparsec optimize)", quiet=quiet):
            model, _ = optimize(model)
    elif fmt != "optimized":
        raise SparsecError(
            f"{path} was not made by sparsec (no sparsec.format metadata); "
            "export the model with `sparsec export` first"
        )
    return model


def default_chooser(cache: bool = True, target=None):
    """Each layer's format, timed on this host for ``target`` (default: this host's)."""
    from sparsec.codegen import linear

    def choose(weight, precision: str, kernels: str) -> str:
        return linear.choose_linear_format(weight, precision, kernels, use_cache=cache, tgt=target)

    return choose


@dataclass
class EmittedModel:
    """A model's LLVM module, packed weights and manifest draft, before machine code:
    ``build_model`` compiles it for the host; the kernel regression check also reads
    the module's code for a fixed CPU (``benchmarks/kernel_regression.py``)."""

    emitted: Emitted
    target: Target
    manifest: dict
    defines: dict[str, int]
    source: str
    start: float  # perf_counter() when the compile began


def emit_model(
    src: str | os.PathLike,
    *,
    precision: str = "fp32",
    threads: int | None = None,
    max_context: int | None = None,
    kernels: str = "auto",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    quiet: bool = False,
    choose=None,
    target: Target | None = None,
    kv_cache: str = "float32",
    profile: bool = False,
    tuning: str = "host",
) -> EmittedModel:
    """Lower ``src`` (.onnx, or an optimized ``onnx_ir.Model`` in memory, which this
    consumes: ``sparsec build``) and emit its kernels for ``target`` (default: this
    host's, ``host_target()``). ``choose(weight, precision, kernels)`` picks each linear
    layer's format (default: ``default_chooser``, timed on this host). ``kv_cache``: the
    KV cache's element type, ``contract.KV_CACHE_DTYPES``. ``profile``: count each op's
    cycles for ``sparsec profile`` (``emit._ProfileClock``; off in models to deploy).
    ``tuning``: "host" measures the per-CPU knobs on this CPU when ``target`` is it and
    a layer may be sparse (``host_tuning.py``, cached per CPU model); "builtin" keeps
    the table's values (``tuning.py``), the same code on every machine."""
    from sparsec.codegen.emit import PROFILE_COUNTERS, emit_program
    from sparsec.codegen.host_tuning import host_tuned
    from sparsec.codegen.program import lower
    from sparsec.codegen.target import host_target, is_host
    from sparsec.passes.check import check as check_graph
    from sparsec.progress import stage

    start = time.perf_counter()
    check_options(precision, kernels, threads, max_context, max_tokens, kv_cache)
    if not isinstance(profile, bool):
        raise SparsecError(f"profile must be True or False, got {profile!r}")
    if tuning not in TUNING_MODES:
        raise SparsecError(f"unknown tuning {tuning!r}; choose {' or '.join(TUNING_MODES)}")
    tgt = target or host_target()
    if tuning == "host" and kernels != "dense" and tgt.measured is None and is_host(tgt):
        tgt = host_tuned(tgt, quiet=quiet)
    if isinstance(src, str | os.PathLike):
        model, where = load_graph(src, quiet=quiet), str(src)
    else:
        model, src = src, None  # the caller's graph; `src` no longer holds it
        where = model.metadata_props.get(contract.META_SOURCE) or "the graph"
        if model.metadata_props.get(contract.META_FORMAT) != "optimized":
            raise SparsecError(f"{where}: emit_model takes an optimized graph in memory")
        metadata.read(model.metadata_props, where, require_config=True)
    meta = model.metadata_props
    tokenizer = metadata.tokenizer(meta, where)
    generation = metadata.generation(meta, where, required=True)
    prog = lower(model, where=where)
    # Then the whole graph as onnxruntime would run it (its sparsec ops through their
    # function bodies): what lowering does not read must still be a valid graph, so
    # compile never accepts a graph the reference rejects. After lowering, whose checks
    # name the tensor and both sizes where they apply.
    check_graph(model, where, functions=True)
    # Lowering copied the weights it needs: free the graph's before packing (its
    # objects form reference cycles, so only a collection frees them: 655 MB for
    # SmolLM2, measured).
    del model
    gc.collect()
    cfg = prog.config
    capacity = int(max_context or cfg.max_position_embeddings)
    if not 1 <= capacity <= cfg.max_position_embeddings:
        raise SparsecError(
            f"--max-context {capacity} is outside 1..{cfg.max_position_embeddings} "
            "(the model's max_position_embeddings)"
        )
    if prog.activation_quant and precision == "fp32":
        precision = "int8"  # the graph already carries W8A8 quantization
    with stage(f"emitting kernels ({precision}, --kernels {kernels})", quiet=quiet):
        emitted = emit_program(
            prog,
            precision=precision,
            kernels=kernels,
            max_tokens=max_tokens,
            capacity=capacity,
            choose=choose or default_chooser(target=tgt),
            target=tgt,
            kv_cache=kv_cache,
            profile=profile,
        )
    defines = {
        "SPC_ABI": ABI_VERSION,
        "SPC_SCRATCH_BYTES": emitted.scratch_bytes,
        "SPC_MAX_TOKENS": max_tokens,
        "SPC_CAPACITY": capacity,
        "SPC_VOCAB": cfg.vocab_size,
    }
    manifest = {
        "magic": "sparsec-model",
        "abi_version": ABI_VERSION,
        "sparsec_version": __version__,
        "cpu_features": [],  # read from the linked code by build_model
        "target": tgt.describe(),
        "config": cfg.to_dict(),
        "tokenizer": tokenizer,
        "chat_template": meta.get(contract.META_CHAT_TEMPLATE),
        "generation": generation,
        "precision": precision,
        "max_context": capacity,
        "max_tokens_per_call": max_tokens,
        "default_threads": int(threads or min(os.cpu_count() or 1, 8)),
        "kv_cache": {
            "shape": cfg.kv_cache_shape(capacity, kv_cache),
            "dtype": kv_cache,
        },
        "layers": [asdict(layer) for layer in emitted.layers],
        "embedding": emitted.embedding,
    }
    if profile:
        manifest["profile"] = {"counters": PROFILE_COUNTERS, "ops": emitted.profile_ops}
    source = meta.get(contract.META_SOURCE) or where
    return EmittedModel(emitted, tgt, manifest, defines, source, start)


MAX_TOKENS_PER_CALL = 4096  # rows of every scratch buffer; prefill runs in such chunks


def check_options(precision, kernels, threads, max_context, max_tokens, kv_cache) -> None:
    """The compile options of the API (the CLI parses them into these types first)."""

    def integer(value, name: str, low: int, high: int | None, none_ok: bool) -> None:
        if value is None and none_ok:
            return
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok or value < low or (high is not None and value > high):
            allowed = f"an integer from {low} to {high}" if high else f"an integer >= {low}"
            raise SparsecError(f"{name} is {value!r}; it must be {allowed}")

    if precision not in ("fp32", "int8"):
        raise SparsecError(f"unknown precision {precision!r}; choose fp32 or int8")
    if kv_cache not in contract.KV_CACHE_DTYPES:
        choices = " or ".join(contract.KV_CACHE_DTYPES)
        raise SparsecError(f"unknown kv_cache {kv_cache!r}; choose {choices}")
    if kernels not in ("auto", "dense", "bitmask"):
        raise SparsecError(f"unknown --kernels {kernels!r}; choose auto, dense or bitmask")
    integer(threads, "threads", 1, MAX_THREADS, none_ok=True)
    integer(max_context, "max_context", 1, None, none_ok=True)
    integer(max_tokens, "max_tokens", 1, MAX_TOKENS_PER_CALL, none_ok=False)


def build_model(em: EmittedModel, out: str | os.PathLike, *, quiet: bool = False) -> dict:
    """Compile ``em`` for its target, link it with the thread pool and driver, read the
    CPU features its code needs, and write ``out`` (.so) atomically; returns the manifest."""
    from sparsec.codegen import artifact, isa_scan, target
    from sparsec.progress import stage

    out = Path(out)
    tgt = em.target
    with stage(f"compiling for {tgt.isa.name}, cpu {tgt.cpu} (LLVM -O3)", quiet=quiet):
        obj = target.compile_ir(em.emitted.module, target=tgt)
    manifest = dict(em.manifest)
    # The code carries the constants it was built for; the runtime checks the manifest
    # against them (sparsec.runtime.native.BUILD_FIELDS).
    build_info = build_info_define(
        {**manifest, "abi_version": ABI_VERSION, "weights": {"size": em.emitted.weights.nbytes}}
    )
    defines = {**em.defines, "SPC_BUILD_INFO": build_info}
    with stage("linking model.so", quiet=quiet), tempfile.TemporaryDirectory() as tmp:
        elf = target.link_shared(
            [obj],
            [NATIVE / "threadpool.c", NATIVE / "driver.c"],
            Path(tmp) / "model.elf",
            extra_flags=[f"-D{k}={v}" for k, v in defines.items()] + [f"-I{NATIVE}"],
            target=tgt,
        )
        manifest["cpu_features"] = isa_scan.required_cpu_features(elf)
        manifest["compile"] = {
            "seconds": round(time.perf_counter() - em.start, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": em.source,
        }
        artifact.write_artifact(elf, em.emitted.weights, manifest, out)
    return manifest


def compile_model(src: str | os.PathLike, out: str | os.PathLike, **options) -> dict:
    """Compile ``src`` (.onnx) into ``out`` (.so); returns the manifest. ``options``: those
    of ``emit_model`` (precision, threads, max_context, kernels, max_tokens, quiet, choose,
    target, kv_cache, profile, tuning)."""
    from sparsec.onnx_io import check_onnx_output

    check_onnx_output(out, src)  # the CLI's output checks, for API callers too
    check_compile_resources(src, out, options.get("precision", "fp32"))
    return build_model(emit_model(src, **options), out, quiet=options.get("quiet", False))


def check_compile_resources(src: str | os.PathLike, out: str | os.PathLike, precision) -> None:
    """Refuse up front a compile this machine's memory or disk cannot hold (estimated
    from the graph's files: the .onnx and the data files sparsec writes beside it)."""
    from sparsec.onnx_io import data_files
    from sparsec.resources import check_compile

    src = Path(src)
    if not src.is_file():
        return  # load_graph names it
    data = sum(f.stat().st_size for f in data_files(src))
    check_compile(src.stat().st_size + data, precision, Path(out), external=data > 0)
