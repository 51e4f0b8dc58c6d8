"""The ``sparsec`` command line.

Each stage owns its subcommands in a light module with ``register(subparsers)``; heavy
imports (torch, onnx, llvmlite) happen only inside the command that needs them, so
``sparsec run`` works on a runtime-only install and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from sparsec import __version__
from sparsec.errors import SparsecError
from sparsec.interrupts import (
    clear_stop,
    install_handlers,
    interrupt_in_chain,
    stop_requested,
)

# Order is the order shown in --help: the pipeline, then the tools around it.
COMMAND_MODULES = (
    "sparsec.models",
    "sparsec.sparsify.command",
    "sparsec.export",
    "sparsec.passes.command",
    "sparsec.codegen.command",
    "sparsec.build",
    "sparsec.runtime.command",
    "sparsec.serve.command",
    "sparsec.bench.command",
)

DESCRIPTION = """\
Compile sparse, quantized LLMs into one native CPU library.

pipeline:  MODEL --sparsify--> HF folder --export--> model.onnx
           --optimize--> model.opt.onnx --compile--> model.so --run/generate/serve
           (or MODEL --build--> model.so: export, optimize and compile in one step)

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


class StdoutError(Exception):
    """Writing to standard output failed (closed, or a full disk behind a redirection)."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.error = error


class _CheckedStdout:
    """sys.stdout during a command: a failed write raises StdoutError, so main tells it
    from the command's own file errors (a BrokenPipeError stays one: see main)."""

    def __init__(self, inner):
        self._inner = inner

    def write(self, text):
        try:
            return self._inner.write(text)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutError(e) from e

    def flush(self):
        try:
            return self._inner.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutError(e) from e

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _devnull_stdout(stdout) -> None:
    """Point ``stdout``'s file descriptor at /dev/null: what it still holds, and the
    flush at exit, go nowhere instead of failing again (and printing a traceback)."""
    try:
        fd = stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return  # not a file (captured output in tests)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None, *, final: bool = False) -> int:
    """Run one command; returns its exit status. ``final``: the process exits right
    after (the console script): once the command has finished, a late Ctrl-C or SIGTERM
    is ignored instead of killing a process whose outputs are already complete."""
    try:
        # Importing the commands' modules takes a moment: a Ctrl-C here is an interrupt
        # too, not a traceback.
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("sparsec: interrupted", file=sys.stderr)
        return 130
    if sys.stdout is None:  # started with file descriptor 1 closed (`sparsec ... >&-`)
        print(
            f"sparsec {args.command}: error: standard output is closed; redirect it, "
            "e.g. >/dev/null",
            file=sys.stderr,
        )
        return 1
    stdout = sys.stdout
    sys.stdout = _CheckedStdout(stdout)
    previous = install_handlers()
    clear_stop()
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        if stop_requested() is not None:  # a library swallowed the interrupt
            return _interrupted(args)
    except SparsecError as e:
        # An interrupt a library wrapped in its own error (torch's exporter), which
        # sparsec then reported as that stage's failure.
        if interrupt_in_chain(e) is not None or stop_requested() is not None:
            return _interrupted(args)
        print(f"sparsec {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted(args)
    except BrokenPipeError:
        # The reader went away (`sparsec inspect m.so | head`): stop quietly, as Unix
        # tools do, and keep Python from failing again when it flushes stdout at exit.
        _devnull_stdout(stdout)
        return 141
    except StdoutError as e:
        _devnull_stdout(stdout)
        print(
            f"sparsec {args.command}: error: cannot write to standard output: {e}",
            file=sys.stderr,
        )
        return 1
    finally:
        sys.stdout = stdout
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if final else handler)
        clear_stop()
    return int(code or 0)


def _interrupted(args) -> int:
    """Ctrl-C (exit 130) or SIGTERM (exit 143, as a process killed by it): the command's
    atomic writes left every output as it was."""
    if stop_requested() == signal.SIGTERM:
        print(f"sparsec {args.command}: terminated", file=sys.stderr)
        return 143
    print(f"sparsec {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
