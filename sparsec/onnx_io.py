"""Writing .onnx files safely: check the destination first, never leave half a file.

A graph whose initializers pass ``EXTERNAL_DATA_BYTES`` is written with its weights in
a data file beside it (ONNX external data: protobuf cannot hold a message over 2 GB).
The data file's name is unique to each write (``model.onnx.<token>.data``), so writing
it never touches the data of the ``model.onnx`` already there; the ``.onnx`` is then
renamed over in one step, and only after that is the previous write's data file
removed. An interrupted write leaves the previous model whole.
"""

from __future__ import annotations

import glob
import os
import secrets
import tempfile
from pathlib import Path

from sparsec.errors import SparsecError

# Above this many bytes of initializers a graph is saved with external data. Far
# enough below protobuf's 2 GB for the graph and its metadata.
EXTERNAL_DATA_BYTES = 1 << 30


def check_writable(out: Path) -> None:
    """Fail before any long work if ``out`` cannot be written."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise SparsecError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise SparsecError(f"cannot write {out}: folder {parent} is not writable")
    if out.is_dir():
        raise SparsecError(f"cannot write {out}: it is a folder")


def initializer_bytes(model) -> int:
    """The bytes of ``model``'s initializers (without reading lazily held ones)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += tensor.nbytes
    return total


def data_files(out: Path) -> list[Path]:
    """The external-data files sparsec writes for ``out`` (any write's)."""
    return sorted(out.parent.glob(f"{glob.escape(out.name)}.*.data"))


def save_atomic(model, out: Path, *, external: bool | None = None) -> None:
    """Save an ``onnx_ir.Model`` to a temp file beside ``out``, then rename it over.

    ``external``: weights in a data file beside ``out`` (None: when the initializers
    pass ``EXTERNAL_DATA_BYTES``)."""
    import onnx_ir as ir

    out = Path(out)
    if external is None:
        external = initializer_bytes(model) > EXTERNAL_DATA_BYTES
    folder = out.parent if str(out.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    data = folder / f"{out.name}.{secrets.token_hex(4)}.data" if external else None
    old_data = data_files(out)
    umask = os.umask(0)
    os.umask(umask)
    try:
        if data is None:
            ir.save(model, tmp)
        else:  # the location is relative to the .onnx, which ends up in the same folder
            ir.save(model, tmp, external_data=data.name)
            os.chmod(data, 0o666 & ~umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if data is not None:
            data.unlink(missing_ok=True)
        raise
    for stale in old_data:  # the previous model's weights; nothing refers to them now
        if stale != data:
            stale.unlink(missing_ok=True)
