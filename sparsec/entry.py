"""The ``sparsec`` console script: imports the CLI inside a handler, so a Ctrl-C while
Python is still importing it reports "interrupted" (exit 130), not a traceback; and
runs the command as the process's last act (``final``: a signal arriving after it
finished no longer kills the process with its outputs already complete). A torchrun rank
whose collective failed leaves at once with its status (see distributed.exit_status)."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from sparsec.cli import main as cli_main
    except KeyboardInterrupt:
        print("sparsec: interrupted", file=sys.stderr)
        return 130
    code = cli_main(final=True)
    distributed = sys.modules.get("sparsec.sparsify.distributed")  # loaded by sparsify only
    return distributed.exit_status(code) if distributed is not None else code
