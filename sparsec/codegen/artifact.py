"""Writing the model.so artifact (ABI v3): linked ELF + weights + manifest + trailer.

The reader side (``sparsec.runtime.artifact``) owns the format constants and the
manifest schema; the writer validates against the same schema, so it cannot produce
a file the runtime rejects. Output is atomic: a temp file in the target directory,
fsynced, then renamed over ``out``.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from sparsec import __version__
from sparsec.errors import SparsecError
from sparsec.interrupts import check_stop
from sparsec.runtime.artifact import (
    ABI_VERSION,
    MAGIC,
    TRAILER_FORMAT,
    TRAILER_MAGIC,
    WEIGHTS_ALIGNMENT,
    WEIGHTS_CHUNK,
    ManifestError,
    chunk_digests,
    digest,
    validate_manifest,
)

_COPY_CHUNK = 64 << 20


def _weights_view(weights: bytes | bytearray | memoryview | np.ndarray) -> memoryview:
    if isinstance(weights, np.ndarray):
        weights = np.ascontiguousarray(weights).reshape(-1).view(np.uint8)
    return memoryview(weights).cast("B")


def write_artifact(
    elf_path: str | os.PathLike,
    weights: bytes | np.ndarray,
    manifest: dict,
    out: str | os.PathLike,
) -> dict:
    """Write ``out`` = the ELF at ``elf_path`` + ``weights`` + ``manifest``; return the manifest.

    Fills ``magic``, ``abi_version``, ``sparsec_version`` (if absent), ``code`` (size,
    blake2b) and ``weights`` (offset, size, chunk_bytes, one blake2b per chunk) itself,
    and seals the manifest with its own hash in the trailer. Never leaves a half-written
    ``out``: on any failure the temp file is removed and a previous ``out`` is untouched.
    """
    elf_path, out = Path(elf_path), Path(out)
    try:
        elf = elf_path.read_bytes()
    except OSError as exc:
        raise SparsecError(f"cannot read the linked library {elf_path}: {exc}") from exc
    if not elf.startswith(b"\x7fELF"):
        raise SparsecError(f"{elf_path} is not an ELF shared object")
    data = _weights_view(weights)

    manifest = copy.deepcopy(manifest)
    manifest["magic"] = MAGIC
    manifest["abi_version"] = ABI_VERSION
    manifest.setdefault("sparsec_version", __version__)
    weights_offset = -(-len(elf) // WEIGHTS_ALIGNMENT) * WEIGHTS_ALIGNMENT
    manifest["code"] = {"size": len(elf), "blake2b": digest(elf)}
    manifest["weights"] = {
        "offset": weights_offset,
        "size": len(data),
        "chunk_bytes": WEIGHTS_CHUNK,
        "blake2b": chunk_digests(data, WEIGHTS_CHUNK),
    }
    try:
        validate_manifest(manifest)
        raw = json.dumps(manifest, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ManifestError, TypeError, ValueError, RecursionError) as exc:
        raise SparsecError(f"cannot write {out}: invalid manifest ({exc})") from exc
    manifest_offset = weights_offset + len(data)
    trailer = struct.pack(
        TRAILER_FORMAT, manifest_offset, len(raw), bytes.fromhex(digest(raw)), TRAILER_MAGIC
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(elf)
            f.write(b"\0" * (weights_offset - len(elf)))
            for start in range(0, len(data), _COPY_CHUNK):
                f.write(data[start : start + _COPY_CHUNK])
            f.write(raw)
            f.write(trailer)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755 & ~_umask())  # like a linker's output
        check_stop()  # an interrupt a library swallowed must not replace ``out``
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            total = weights_offset + len(data) + len(raw) + len(trailer)
            raise SparsecError(
                f"no space left writing {out} (needs about {max(1, round(total / 1e6))} MB); "
                "free some space or write it elsewhere"
            ) from exc
        raise SparsecError(f"cannot write {out}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(out.parent)
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem supports it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
