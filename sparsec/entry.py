"""The ``sparsec`` console script: imports the CLI inside a handler, so a Ctrl-C while
Python is still importing it reports "interrupted" (exit 130), not a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from sparsec.cli import main as cli_main
    except KeyboardInterrupt:
        print("sparsec: interrupted", file=sys.stderr)
        return 130
    return cli_main()
