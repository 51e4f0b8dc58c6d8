"""``sparsec bench``: decode and prefill speed of sparsec against the engines people
already use, on the same weights, in one interleaved run, with the memory roofline.

Light module (CLI registration): everything heavy is imported inside ``bench_command``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from sparsec.errors import SparsecError

COMPARATORS = ("torch", "onnxruntime", "llama.cpp")
PRECISIONS = ("fp32", "int8")
MIN_REPS = 3
MAX_REPS = 1000
MAX_PROBE_MB = 65536  # 64 GiB: far past any cache; the probe allocates it

EPILOG = """\
examples:
  sparsec bench smollm2-135m --sparsity 0,0.7 --precision fp32,int8 --threads 2 \\
      --json out/bench/smollm2.json --plot out/bench/smollm2.png
  sparsec bench ./my-hf-folder --sparsity 0,runs/s70 --compare llama.cpp --threads 1,2

Every system runs the same prompt token ids greedily for --new-tokens tokens; systems are
interleaved round by round and each result is the median of --reps rounds (min/max
shown). Magnitude-zeroed sparsities are a speed stand-in for real sparsification; a
sparsify output folder is benchmarked as is, and its report's perplexity is plotted
against speed. Compiled models, ONNX exports and GGUFs are cached in --cache-dir.
llama.cpp needs the optional llama-cpp-python package; without it that comparator is
reported as unavailable, with the reason.
"""


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure decode/prefill speed against PyTorch, onnxruntime and llama.cpp",
        description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1].strip(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="Hugging Face folder, .gguf file, or built-in name")
    p.add_argument(
        "--sparsity",
        default="0",
        help="comma list of fractions of zeros (magnitude pruning of the decoder "
        "Linears) and/or sparsify output folders (default: 0)",
    )
    p.add_argument(
        "--precision",
        default="fp32,int8",
        help="sparsec precisions to compile: fp32, int8 (default: fp32,int8)",
    )
    p.add_argument(
        "--compare",
        default=",".join(COMPARATORS),
        help=f"comparators: {', '.join(COMPARATORS)}, or 'none' (default: all three)",
    )
    p.add_argument(
        "--llama-types",
        default="f32,f16,q8_0,q4_0",
        help="llama.cpp GGUF types: f32, f16, q8_0, q4_0, q4_1 (q4_1 does not keep "
        "exact zeros) (default: f32,f16,q8_0,q4_0)",
    )
    p.add_argument(
        "--threads",
        default=None,
        help="comma list of thread counts (default: the CPUs this process may use)",
    )
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument(
        "--reps",
        type=int,
        default=MIN_REPS,
        help=f"interleaved rounds, at least {MIN_REPS} (default {MIN_REPS})",
    )
    p.add_argument("--prompt", default=None, help="prompt text (default: a fixed paragraph)")
    p.add_argument(
        "--kernels",
        default="auto",
        choices=("auto", "dense", "bitmask"),
        help="sparsec linear kernels (default auto: timed per layer at compile)",
    )
    p.add_argument(
        "--target",
        default="auto",
        help="comma list of sparsec instruction sets to compile and measure side by side: "
        "auto (the best this CPU runs), avx512-amx, avx512, avx2-vnni, avx2 (see `sparsec compile "
        "--help`); each but auto adds its name to the system's (default auto)",
    )
    p.add_argument(
        "--cache-dir",
        default="out/bench",
        help="where compiled models, exports and GGUFs are kept (default out/bench)",
    )
    p.add_argument(
        "--probe-mb", type=int, default=256, help="read-bandwidth probe buffer in MiB (default 256)"
    )
    p.add_argument("--json", dest="json_out", default=None, help="write the report as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    p.set_defaults(func=bench_command)


def parse_options(args):
    """Check every argument before anything slow happens; returns BenchOptions."""
    from sparsec.bench.runner import DEFAULT_PROMPT, BenchOptions
    from sparsec.bench.variants import GGUF_TYPES, parse_sparsity

    compare = [] if args.compare.strip().lower() == "none" else _csv(args.compare)
    for c in compare:
        if c not in COMPARATORS:
            raise SparsecError(
                f"--compare {c!r} is unknown; choose from {', '.join(COMPARATORS)} or none"
            )
    precisions = _csv(args.precision)
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise SparsecError(f"--precision {args.precision!r}: choose from fp32, int8")
    llama_types = [t.lower() for t in _csv(args.llama_types)]
    bad = [t for t in llama_types if t not in GGUF_TYPES]
    if bad or not llama_types:
        raise SparsecError(
            f"--llama-types {args.llama_types!r}: choose from {', '.join(GGUF_TYPES)}"
        )
    targets = _csv(args.target)
    if not targets or len(set(targets)) != len(targets):
        raise SparsecError(f"--target {args.target!r}: name each instruction set once")
    from sparsec.codegen.target import host_target

    for target in targets:
        host_target(target)  # unknown, or not on this CPU: fails now, naming it
    if args.threads is None:
        threads = [len(os.sched_getaffinity(0))]
    else:
        try:
            threads = [int(t) for t in _csv(args.threads)]
        except ValueError:
            raise SparsecError(
                f"--threads {args.threads!r} must be a comma list of integers, e.g. 1,2"
            ) from None
        if not threads or any(not 1 <= t <= 64 for t in threads):
            raise SparsecError(f"--threads {args.threads!r}: each count must be in 1..64")
    if args.reps < MIN_REPS:
        raise SparsecError(
            f"--reps {args.reps}: at least {MIN_REPS} rounds are needed for a median with min/max"
        )
    if args.reps > MAX_REPS:
        raise SparsecError(
            f"--reps {args.reps} is outside the allowed range {MIN_REPS}..{MAX_REPS}"
        )
    if args.new_tokens < 2:
        raise SparsecError(f"--new-tokens {args.new_tokens}: at least 2 (one decode step)")
    if not 1 <= args.probe_mb <= MAX_PROBE_MB:
        raise SparsecError(
            f"--probe-mb {args.probe_mb} is outside the allowed range 1..{MAX_PROBE_MB}"
        )
    from sparsec.models import resolve

    source = resolve(args.model)  # a bad MODEL fails now, with the models module's message
    sparsities = parse_sparsity(args.sparsity)
    _check_outputs(args, source, [s for s in sparsities if isinstance(s, Path)])
    if args.plot:
        from sparsec.bench.plot import require_matplotlib

        require_matplotlib()
    return BenchOptions(
        model=args.model,
        sparsities=sparsities,
        precisions=precisions,
        compare=compare,
        llama_types=llama_types,
        threads=threads,
        new_tokens=args.new_tokens,
        reps=args.reps,
        prompt=args.prompt or DEFAULT_PROMPT,
        kernels=args.kernels,
        targets=targets,
        cache_dir=Path(args.cache_dir),
        probe_bytes=args.probe_mb << 20,
        command=getattr(args, "command_line", None)
        or "sparsec " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        json_out=Path(args.json_out) if args.json_out else None,
    )


def _check_outputs(args, source, sparsify_folders: list[Path]) -> None:
    """--json, --plot and --cache-dir: not the model's files or a sparsify folder's, not
    a device, and not one another."""
    from sparsec.models import input_paths
    from sparsec.paths import check_output_path

    inputs = input_paths(source)
    input_dirs = (*inputs["input_dirs"], *sparsify_folders)
    # Its files sit beside whatever is there (not replacing the folder): a folder will do.
    check_output_path(args.cache_dir, directory=True, what="--cache-dir")
    outputs = {}
    for flag, path in (("--json", args.json_out), ("--plot", args.plot)):
        if not path:
            continue
        out = check_output_path(
            path, inputs=inputs["inputs"], input_dirs=input_dirs, what=flag
        ).resolve()
        if out in outputs:
            raise SparsecError(f"{flag} {path} is also {outputs[out]}'s file; name two files")
        outputs[out] = flag


def bench_command(args) -> int:
    from sparsec.bench import report as report_mod
    from sparsec.bench.runner import run_bench
    from sparsec.errors import require_compiler_stack

    opts = parse_options(args)
    require_compiler_stack()
    result = run_bench(opts)
    report_mod.print_summary(result, file=sys.stdout)
    if args.json_out:
        report_mod.write_json(result, Path(args.json_out))
        print(f"wrote {args.json_out}")
    if args.plot:
        from sparsec.bench.plot import plot_report

        plot_report(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
