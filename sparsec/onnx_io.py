"""Writing .onnx files safely: check the destination first, never leave half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sparsec.errors import SparsecError


def check_writable(out: Path) -> None:
    """Fail before any long work if ``out`` cannot be written."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise SparsecError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise SparsecError(f"cannot write {out}: folder {parent} is not writable")
    if out.is_dir():
        raise SparsecError(f"cannot write {out}: it is a folder")


def save_atomic(model, out: Path) -> None:
    """Save an ``onnx_ir.Model`` to a temp file beside ``out``, then rename it over."""
    import onnx_ir as ir

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    os.close(fd)
    try:
        ir.save(model, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
