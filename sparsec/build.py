"""``sparsec build MODEL -o model.so``: export, optimize and compile in one process,
with no intermediate files.

The staged commands write a float32 graph twice (export, then optimize): 2 x 4 bytes
a parameter of disk, 56 GB for a 7B model, on top of the checkpoint. ``build`` keeps
the graph in memory instead, and its weights in the checkpoint: each one is read
(and converted from bf16/fp16, and transposed) when the compiler packs it, then
dropped, so memory is bounded by a few copies of the largest tensor, whatever the
model's size, and disk by the packed weights (a temporary file, then the .so).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

from sparsec.errors import SparsecError


def build(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    quiet: bool = False,
    ignore_quantization: bool = False,
    **options,
) -> dict:
    """Build MODEL (Hugging Face folder, .gguf file or built-in name) into ``out`` (.so,
    written atomically); returns its manifest. ``options``: ``emit_model``'s (precision,
    threads, max_context, kernels, max_tokens, choose, target, kv_cache, profile, tuning)."""
    from sparsec.codegen.compile import DEFAULT_MAX_TOKENS, build_model, check_options, emit_model
    from sparsec.errors import require_compiler_stack
    from sparsec.export import open_source
    from sparsec.models import input_paths, resolve
    from sparsec.onnx_io import check_writable
    from sparsec.passes import optimize
    from sparsec.paths import check_output_path
    from sparsec.progress import stage
    from sparsec.resources import check_build

    out = check_output_path(out, **input_paths(resolve(model)))
    check_writable(out)
    check_options(
        options.get("precision", "fp32"),
        options.get("kernels", "auto"),
        options.get("threads"),
        options.get("max_context"),
        options.get("max_tokens", DEFAULT_MAX_TOKENS),
        options.get("kv_cache", "float32"),
    )
    require_compiler_stack()
    src = open_source(model, ignore_quantization=ignore_quantization, quiet=quiet)
    sizes = src.tensor_sizes()
    check_build(sum(sizes), max(sizes), options.get("precision", "fp32"), out)
    with stage("exporting (torch dynamo; weights are read when packed)", quiet=quiet):
        graph = src.graph(str(model))
    del src
    gc.collect()
    with stage("optimizing (sparsec optimize's passes)", quiet=quiet):
        graph, report = optimize(graph)
    if not quiet:
        for skipped in report.skipped:
            print(f"note: not run: {skipped}")
    if report.outside_contract:
        left = ", ".join(f"{op} x{n}" for op, n in report.outside_contract.items())
        raise SparsecError(
            f"{model}: ops outside the graph contract remain after the passes ({left}); "
            "run `sparsec export` and `sparsec optimize --report` to see what did not fuse"
        )
    emitted = emit_model(graph, quiet=quiet, **options)
    del graph
    return build_model(emitted, out, quiet=quiet)


def register(sub) -> None:
    from sparsec.codegen.command import add_compile_options

    p = sub.add_parser(
        "build",
        help="export + optimize + compile MODEL into model.so in one step, no intermediate files",
        description="Build MODEL (Hugging Face folder, .gguf file or built-in name) into "
        "one native model.so: what `sparsec export`, `sparsec optimize` and `sparsec "
        "compile` do, in one process and without writing the float32 graphs (8 bytes a "
        "parameter of disk). The weights of a Hugging Face folder's safetensors "
        "checkpoint (float32, bfloat16 or float16, sharded or not) are read one tensor "
        "at a time while they are packed: memory stays near a few copies of the largest "
        "tensor, disk near twice the packed weights (a temporary file in TMPDIR, then "
        "the output). A build that cannot fit is refused up front with the estimate "
        "(SPARSEC_NO_RESOURCE_CHECK=1 runs it anyway). No check against PyTorch runs "
        "here: `sparsec export` has it.",
    )
    p.add_argument("model", help="Hugging Face folder, .gguf file, or built-in name")
    p.add_argument("-o", "--output", required=True, help="the .so to write")
    add_compile_options(p)
    p.add_argument(
        "--ignore-quantization",
        action="store_true",
        help="build a `sparsify --int8` folder from its float weights (by default its "
        "quantization.json makes the int8 weights and activation quantization)",
    )
    p.set_defaults(func=_build_command)


def _build_command(args) -> int:
    from sparsec.codegen.command import compile_options, summary
    from sparsec.errors import require_compiler_stack

    require_compiler_stack()
    manifest = build(
        args.model,
        args.output,
        ignore_quantization=args.ignore_quantization,
        **compile_options(args),
    )
    print(summary(Path(args.output), manifest))
    return 0
