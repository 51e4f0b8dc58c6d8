"""The ``sparsec`` command line.

Each stage owns its subcommands in a light module with ``register(subparsers)``; heavy
imports (torch, onnx, llvmlite) happen only inside the command that needs them, so
``sparsec run`` works on a runtime-only install and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sparsec import __version__
from sparsec.errors import SparsecError

# Order is the order shown in --help: the pipeline, then the tools around it.
COMMAND_MODULES = (
    "sparsec.models",
    "sparsec.sparsify.command",
    "sparsec.export",
    "sparsec.passes.command",
    "sparsec.codegen.command",
    "sparsec.runtime.command",
    "sparsec.bench.command",
)

DESCRIPTION = """\
Compile sparse, quantized LLMs into one native CPU library.

pipeline:  MODEL --sparsify--> HF folder --export--> model.onnx
           --optimize--> model.opt.onnx --compile--> model.so --run/generate

MODEL is a Hugging Face folder, a .gguf file, or the built-in name smollm2-135m.
Run 'sparsec COMMAND --help' for the options of each step.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsec",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sparsec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# PyTorch's CPU allocator backs tensors of 2 MB and more with transparent huge pages when
# this is set (read at its first allocation, so before any command loads a model). Without
# it every large activation is a fresh mmap faulted in 4 KB at a time: 225,000 page faults
# a SmolLM2 distillation step, which then took 2.2 s instead of 1.95 s on 2 threads.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except SparsecError as e:
        print(f"sparsec {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sparsec {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`sparsec inspect m.so | head`): stop quietly, as Unix
        # tools do, and keep Python from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
