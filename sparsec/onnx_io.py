"""Writing .onnx files safely: check the destination first, never leave half a file.

A graph whose initializers pass ``EXTERNAL_DATA_BYTES`` is written with its weights in
a data file beside it (ONNX external data: protobuf cannot hold a message over 2 GB).
The data file's name is unique to each write (``model.onnx.<token>.data``), so writing
it never touches the data of the ``model.onnx`` already there; the ``.onnx`` is then
renamed over in one step, and only after that is the previous write's data file
removed. An interrupted write leaves the previous model whole.
"""

from __future__ import annotations

import errno
import glob
import os
import secrets
import tempfile
from pathlib import Path

from sparsec.errors import SparsecError
from sparsec.interrupts import check_stop
from sparsec.paths import check_output_path

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
    check_output_path(out, what="output")  # devices, /proc, over-long names


def onnx_inputs(src: str | os.PathLike) -> tuple[Path, ...]:
    """The files a command reading the graph ``src`` reads: it and its data files."""
    src = Path(src)
    return (src, *data_files(src))


def check_onnx_output(out: str | os.PathLike, src: str | os.PathLike, what: str = "-o") -> Path:
    """``check_output_path`` for a command that reads the graph ``src`` and writes ``out``,
    also when ``out`` is a graph saved with ``save_atomic``: that removes the data files
    of the ``out`` it replaces, which must not be ``src``'s (a renamed graph still refers
    to its data file by the old name)."""
    out = check_output_path(out, inputs=onnx_inputs(src), what=what)
    stale = {path.resolve() for path in data_files(out)}
    if stale and Path(src).is_file():
        clash = sorted(external_data_paths(src) & stale)
        if clash:
            raise SparsecError(
                f"{what} {out}: replacing it would remove {clash[0].name}, which the input "
                f"{src} reads its weights from; write the output to another path"
            )
    return out


def external_data_paths(src: str | os.PathLike) -> set[Path]:
    """The external data files the graph ``src`` refers to (resolved paths); read only
    when needed, as it parses the graph."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(src), load_external_data=False)
    except (OSError, DecodeError):
        return set()  # not readable as ONNX: the command's own load says so
    folder = Path(src).parent
    return {
        (folder / entry.value).resolve()
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }


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
    data = folder / f"{out.name}.{secrets.token_hex(4)}.data" if external else None
    old_data = data_files(out)
    umask = os.umask(0)
    os.umask(umask)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        if data is None:
            ir.save(model, tmp)
        else:  # the location is relative to the .onnx, which ends up in the same folder
            ir.save(model, tmp, external_data=data.name)
            os.chmod(data, 0o666 & ~umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        check_stop()  # an interrupt a library swallowed still keeps the previous output
        os.replace(tmp, out)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if data is not None:
            data.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _write_error(exc, out, model) from exc
        raise
    for stale in old_data:  # the previous model's weights; nothing refers to them now
        if stale != data:
            stale.unlink(missing_ok=True)


def _write_error(exc: OSError, out: Path, model) -> SparsecError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        mb = max(1, round(initializer_bytes(model) / 1e6))
        return SparsecError(
            f"no space left writing {out} (needs about {mb} MB); free some space or write "
            "elsewhere (the previous file, if any, is unchanged)"
        )
    return SparsecError(f"cannot write {out}: {exc.strerror or exc}")
