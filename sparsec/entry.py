"""The ``sparsec`` console script: imports the CLI inside a handler, so a Ctrl-C while
Python is still importing it reports "interrupted" (exit 130), not a traceback; and
runs the command as the process's last act (``final``: a signal arriving after it
finished no longer kills the process with its outputs already complete)."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from sparsec.cli import main as cli_main
    except KeyboardInterrupt:
        print("sparsec: interrupted", file=sys.stderr)
        return 130
    return cli_main(final=True)
