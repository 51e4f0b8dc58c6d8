"""Progress output for long steps: one line per stage with its elapsed time."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


@contextmanager
def stage(message: str, *, quiet: bool = False):
    """Print ``message ...`` then ``done in N s`` (or ``failed after N s``) on stderr."""
    start = time.perf_counter()
    if not quiet:
        print(f"{message} ...", file=sys.stderr, flush=True)
    try:
        yield
    except BaseException:
        if not quiet:
            print(f"{message}: failed after {time.perf_counter() - start:.1f} s", file=sys.stderr)
        raise
    if not quiet:
        print(
            f"{message}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True
        )
