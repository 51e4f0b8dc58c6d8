"""``sparsec compile``: the CLI of the code generator (heavy imports happen inside)."""

from __future__ import annotations

from pathlib import Path

from sparsec.arguments import int_range
from sparsec.codegen.target import ISAS  # stdlib-only module: llvmlite loads on first use
from sparsec.codegen.tuning import TUNING_MODES
from sparsec.contract import KV_CACHE_DTYPES
from sparsec.runtime.arguments import MAX_THREADS


def register(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="compile an ONNX graph into one native model.so (AVX-512 or AVX2; --target)",
        description="Compile a sparsec ONNX graph (raw `sparsec export` output, or "
        "`sparsec optimize` output) into one shared library: AVX-512 or AVX2 kernels specialized "
        "to every layer's shape, precision and sparsity, the whole forward step, the "
        "packed weights and a manifest. Load it with "
        "`from sparsec import runtime; runtime.load('model.so')` or `sparsec run`. "
        "Memory: about 2.4x the graph's bytes at the peak (0.5x with external data), and "
        "the packed weights' size "
        "free in TMPDIR and beside the output; a compile that cannot fit is refused up "
        "front with the estimate (SPARSEC_NO_RESOURCE_CHECK=1 runs it anyway).",
    )
    p.add_argument("model", help="the .onnx graph")
    p.add_argument("-o", "--output", required=True, help="the .so to write")
    add_compile_options(p)
    p.set_defaults(func=_compile)


def add_compile_options(p) -> None:
    """The options of the code generator (``sparsec compile`` and ``sparsec build``)."""
    p.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="fp32 weights and activations, or int8 W8A8 (symmetric per-output-channel "
        "weights, per-token dynamic activations, VNNI). A graph that already carries "
        "quantization is compiled as int8. Default fp32.",
    )
    p.add_argument(
        "--kernels",
        choices=("auto", "dense", "bitmask"),
        default="auto",
        help="kernel family per layer: auto measures the candidates on this CPU and keeps "
        "the fastest (cached); dense/bitmask force one. Default auto.",
    )
    p.add_argument(
        "--threads",
        type=int_range(1, MAX_THREADS),
        default=None,
        help=f"default thread count of the model, 1..{MAX_THREADS} (default: the CPUs, at "
        "most 8; `sparsec run --threads` overrides it)",
    )
    p.add_argument(
        "--max-context",
        type=int_range(1),
        default=None,
        help="KV-cache capacity in tokens, at most the model's max_position_embeddings "
        "(the default)",
    )
    p.add_argument(
        "--kv-cache",
        choices=tuple(KV_CACHE_DTYPES),
        default="float32",
        help="element type of the KV cache: float16 halves its memory (per sequence: "
        "`sparsec inspect` shows it) and the bytes attention reads per step, which is what "
        "batched decode (`sparsec serve`) and long contexts spend; keys and values are "
        "rounded to half precision, so logits move by about 1e-3. int8 stores each key and "
        "value row as int8 with a float32 scale (about a quarter of float32; logits move "
        "by about 1%% of their range). Default float32.",
    )
    p.add_argument(
        "--target",
        choices=("auto", *ISAS),
        default="auto",
        help="instruction set of the kernels: avx512-amx (avx512 plus AMX tiles for "
        "prefill and batched int8 decode: Intel Sapphire Rapids and newer Xeons), avx512 "
        "(AVX-512 with VNNI/VBMI2: AMD Zen 4, Intel Ice Lake and newer Xeons), avx2-vnni "
        "(AVX2 + AVX-VNNI: Intel Core 12th gen and newer, AMD Zen 5), avx2 (AVX2 + FMA: "
        "Intel Haswell and newer, AMD Zen 1-3). auto picks the first of these this CPU "
        "runs. The model "
        "runs only on CPUs with its ISA, and the CPU compiling must have it too (--kernels "
        "auto times candidates here). Default auto.",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also count the cycles of every op of the forward step (one counter read per "
        "op, ~0.1%% of a step), for `sparsec profile model.so`: where a step's time goes, "
        "per op and layer. Default off.",
    )
    p.add_argument(
        "--tuning",
        choices=TUNING_MODES,
        default="host",
        help="per-CPU kernel constants: host measures on this CPU the ones whose best "
        "value differs between CPUs (how sparse kernels expand their nonzeros, from memory "
        "or loaded then expanded in a register, and how many weight streams their decode "
        "keeps in flight), about 10 s once per CPU model, cached in ~/.cache/sparsec "
        "(SPARSEC_CACHE_DIR), when the code is for this "
        "CPU (not with another --target-cpu) and --kernels is not dense; builtin keeps "
        "the values measured on the CPUs in sparsec's table (the same code on every "
        "machine). `sparsec inspect` shows which. Default host.",
    )
    p.add_argument(
        "--target-cpu",
        default=None,
        metavar="NAME",
        help="LLVM cpu name the code is scheduled and tuned for (e.g. znver4, "
        "sapphirerapids); the ISA stays --target's. Default: this CPU.",
    )


def compile_options(args) -> dict:
    """``emit_model``'s keyword arguments from the parsed ``add_compile_options``."""
    from sparsec.codegen.target import host_target

    return {
        "precision": args.precision,
        "threads": args.threads,
        "max_context": args.max_context,
        "kernels": args.kernels,
        "target": host_target(args.target, args.target_cpu),
        "kv_cache": args.kv_cache,
        "profile": args.profile,
        "tuning": args.tuning,
    }


def summary(out: Path, manifest: dict) -> str:
    """The line a command prints after writing a model."""
    n_sparse = sum(1 for layer in manifest["layers"] if "bitmask" in layer["kernel"])
    return (
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(manifest['layers'])} linear "
        f"kernels, {n_sparse} sparse, compiled in {manifest['compile']['seconds']} s)"
    )


def _compile(args) -> int:
    from sparsec.errors import require_compiler_stack
    from sparsec.onnx_io import check_onnx_output

    check_onnx_output(args.output, args.model)
    require_compiler_stack()
    from sparsec.codegen.compile import compile_model

    manifest = compile_model(args.model, args.output, **compile_options(args))
    print(summary(Path(args.output), manifest))
    return 0
