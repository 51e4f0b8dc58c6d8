"""Reading the model.so artifact: trailer, manifest, weights (ABI v1, see docs/runtime.md).

Layout of one ``model.so``::

    [ELF shared object][zero pad to 4096][weights][manifest JSON][trailer]

with ``trailer = struct.pack("<QQ8s", manifest_offset, manifest_size, b"SPARSEC1")``.
dlopen ignores the bytes after the ELF image, so the same file is both a loadable
library and a container. Everything here uses plain file IO and never touches the
native code: a damaged or foreign file is rejected before dlopen can crash on it.
The writer (``sparsec.codegen.artifact``) imports the constants and the manifest
validator from here, so both sides agree by construction.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsec.contract import ConfigError, ModelConfig
from sparsec.errors import SparsecError

MAGIC = "sparsec-model"
TRAILER_MAGIC = b"SPARSEC1"
TRAILER_FORMAT = "<QQ8s"
TRAILER_SIZE = struct.calcsize(TRAILER_FORMAT)  # 24
ABI_VERSION = 1
WEIGHTS_ALIGNMENT = 4096  # weights start on a page so they can be mmapped directly
HUGE_PAGE = 2 << 20
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HASH_CHUNK = 16 << 20  # hash in 16 MiB slices: hashlib releases the GIL, memory stays flat

_RECOMPILE = "recompile it with `sparsec compile`"


class ManifestError(SparsecError):
    """A manifest that breaks the ABI v1 schema; the message is the detail only."""


@dataclass(frozen=True)
class Artifact:
    """A checked artifact file: its manifest and where its parts are."""

    path: Path
    file_size: int
    manifest_offset: int
    manifest: dict

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["config"])  # checked by read_artifact

    @property
    def weights_offset(self) -> int:
        return self.manifest["weights"]["offset"]

    @property
    def weights_size(self) -> int:
        return self.manifest["weights"]["size"]


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Read and check the trailer and manifest of ``path`` (no mmap, no dlopen)."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise SparsecError(f"{name} does not exist; pass the path of a compiled model.so")
    if not path.is_file():
        raise SparsecError(f"{name} is not a file; pass the path of a compiled model.so")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < TRAILER_SIZE:
                _not_sparsec(name)
            f.seek(size - TRAILER_SIZE)
            offset, length, magic = struct.unpack(TRAILER_FORMAT, f.read(TRAILER_SIZE))
            if magic != TRAILER_MAGIC:
                _not_sparsec(name)
            if offset + length + TRAILER_SIZE != size:
                raise SparsecError(
                    f"{name} is truncated or corrupt (its trailer points at a manifest of "
                    f"{length} bytes at offset {offset}, but the file has {size} bytes); "
                    f"{_RECOMPILE} or copy it again"
                )
            f.seek(offset)
            raw = f.read(length)
    except OSError as exc:
        raise SparsecError(f"cannot read {name}: {exc.strerror or exc}") from exc
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SparsecError(f"{name} has a corrupt manifest ({exc}); {_RECOMPILE}") from exc
    if not isinstance(manifest, dict) or manifest.get("magic") != MAGIC:
        raise SparsecError(f"{name} has a corrupt manifest (no magic {MAGIC!r}); {_RECOMPILE}")
    check_abi_version(manifest, name)
    try:
        validate_manifest(manifest)
        weights = manifest["weights"]
        if weights["offset"] + weights["size"] > offset:
            raise ManifestError(
                f"weights [{weights['offset']}, +{weights['size']}) overlap the manifest "
                f"at offset {offset}"
            )
    except ManifestError as exc:
        raise SparsecError(f"{name} has a corrupt manifest ({exc}); {_RECOMPILE}") from exc
    return Artifact(path=path, file_size=size, manifest_offset=offset, manifest=manifest)


def _not_sparsec(name: str):
    raise SparsecError(
        f"{name} is not a sparsec model (no SPARSEC1 trailer); compile one with `sparsec compile`"
    )


def check_abi_version(manifest: dict, name: str) -> None:
    """Checked before the rest of the schema: a newer ABI may have other fields."""
    from sparsec import __version__

    abi = manifest.get("abi_version")
    if abi == ABI_VERSION and type(abi) is int:
        return
    made_by = manifest.get("sparsec_version", "an unknown version")
    raise SparsecError(
        f"{name} uses model ABI version {abi!r} but this sparsec {__version__} loads ABI "
        f"version {ABI_VERSION}; load it with sparsec {made_by} (the version that compiled "
        f"it) or recompile it with this one"
    )


# --------------------------------------------------------------------------- schema

_INT = "int"
_NUM = "number"
_STR = "str"


def _check(obj: dict, key: str, kind, where: str, *, nullable: bool = False, positive=False):
    if key not in obj:
        raise ManifestError(f"field '{where}{key}' is missing")
    value = obj[key]
    if value is None and nullable:
        return value
    ok = {
        _INT: lambda v: type(v) is int and v >= 0,
        _NUM: lambda v: type(v) in (int, float) and math.isfinite(v),
        _STR: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
        list: lambda v: isinstance(v, list),
    }[kind](value)
    if ok and positive:
        ok = value > 0
    if not ok:
        want = {_INT: "a non-negative integer", _NUM: "a number", _STR: "a string"}.get(
            kind, getattr(kind, "__name__", str(kind))
        )
        if positive:
            want = "a positive integer"
        raise ManifestError(f"field '{where}{key}' is {value!r}, expected {want}")
    return value


def _token_ids(value, where: str) -> None:
    ids = value if isinstance(value, list) else [value]
    if value is None:
        return
    if not all(type(i) is int and i >= 0 for i in ids):
        raise ManifestError(f"field '{where}' is {value!r}, expected token id(s) or null")


def validate_manifest(m: dict) -> None:
    """Raise ManifestError unless ``m`` follows the ABI v1 manifest schema."""
    if m.get("magic") != MAGIC:
        raise ManifestError(f"field 'magic' is {m.get('magic')!r}, expected {MAGIC!r}")
    if m.get("abi_version") != ABI_VERSION:
        raise ManifestError(f"field 'abi_version' is {m.get('abi_version')!r}")
    _check(m, "sparsec_version", _STR, "")
    features = _check(m, "cpu_features", list, "")
    if not all(isinstance(f, str) for f in features):
        raise ManifestError("field 'cpu_features' must be a list of strings")
    target = _check(m, "target", dict, "")
    _check(target, "triple", _STR, "target.")
    _check(target, "cpu", _STR, "target.")
    try:
        config = ModelConfig.from_dict(_check(m, "config", dict, ""))
    except ConfigError as e:
        raise ManifestError(f"field 'config': {e}") from e
    _check(m, "tokenizer", _STR, "")
    _check(m, "chat_template", _STR, "", nullable=True)
    gen = _check(m, "generation", dict, "")
    for key in ("bos_token_id", "eos_token_id"):
        if key not in gen:
            raise ManifestError(f"field 'generation.{key}' is missing")
        _token_ids(gen[key], f"generation.{key}")
    _check(m, "precision", _STR, "")
    max_context = _check(m, "max_context", _INT, "", positive=True)
    _check(m, "max_tokens_per_call", _INT, "", positive=True)
    _check(m, "default_threads", _INT, "", positive=True)
    kv = _check(m, "kv_cache", dict, "")
    shape = _check(kv, "shape", list, "kv_cache.")
    expected = config.kv_cache_shape(max_context)
    if shape != expected:
        raise ManifestError(
            f"field 'kv_cache.shape' is {shape}, expected [L, 2, KVH, max_context, head_dim] "
            f"= {expected}"
        )
    if kv.get("dtype") != "float32":
        raise ManifestError(f"field 'kv_cache.dtype' is {kv.get('dtype')!r}, expected 'float32'")
    weights = _check(m, "weights", dict, "")
    offset = _check(weights, "offset", _INT, "weights.")
    _check(weights, "size", _INT, "weights.")
    _check(weights, "blake2b", _STR, "weights.")
    if offset % WEIGHTS_ALIGNMENT:
        raise ManifestError(f"field 'weights.offset' {offset} is not {WEIGHTS_ALIGNMENT}-aligned")
    layers = _check(m, "layers", list, "")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise ManifestError(f"field 'layers[{i}]' is not an object")
        where = f"layers[{i}]."
        _check(layer, "name", _STR, where)
        shape = _check(layer, "shape", list, where)
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ManifestError(f"field '{where}shape' is {shape!r}, expected integers")
        _check(layer, "sparsity", _NUM, where)
        for key in ("pattern", "kernel"):
            _check(layer, key, _STR, where)
        for key in ("bytes", "flops"):
            _check(layer, key, _INT, where)
    comp = _check(m, "compile", dict, "")
    _check(comp, "seconds", _NUM, "compile.")
    _check(comp, "created", _STR, "compile.")
    _check(comp, "source", _STR, "compile.")


# --------------------------------------------------------------------------- weights


def transparent_huge_pages() -> str:
    """The kernel's transparent huge page mode: always, madvise, never (or unavailable)."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return "unavailable"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unavailable"


def load_weights(
    artifact: Artifact, huge_pages: bool | None = None, verify: bool = True
) -> tuple[np.ndarray, str]:
    """The weights, and how they are held: ``"huge pages"`` or ``"file mapping"``.

    Decode streams every weight once per token, and with 4 KiB pages it takes a TLB miss
    every 4 KiB: a copy into 2 MiB transparent huge pages decodes 3-6% faster (measured
    on SmolLM2 70% fp32). The file mapping instead shares the page cache between
    processes and costs no private memory. ``huge_pages``: None = huge pages when the
    kernel offers them, True = require them, False = map the file.
    """
    if artifact.weights_size == 0:
        return np.zeros(WEIGHTS_ALIGNMENT, dtype=np.uint8), "file mapping"  # a valid pointer
    thp = transparent_huge_pages()
    usable = thp in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")
    if huge_pages and not usable:
        raise SparsecError(
            f"huge pages were requested for {artifact.path}, but transparent huge pages are "
            f"{thp} on this system ({THP_ENABLED}); load with huge_pages=False "
            "(sparsec run --no-huge-pages) or enable them (echo madvise > that file)"
        )
    if huge_pages is False or not usable:
        weights = map_weights(artifact)
        if verify:
            verify_weights(artifact, weights)
        return weights, "file mapping"
    return _read_into_huge_pages(artifact, verify), "huge pages"


def _read_into_huge_pages(artifact: Artifact, verify: bool) -> np.ndarray:
    size = artifact.weights_size
    try:
        region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        raise SparsecError(
            f"cannot allocate {size / 2**20:.0f} MiB for the weights of {artifact.path}: {exc}; "
            "load with huge_pages=False to map the file instead"
        ) from exc
    whole = np.frombuffer(region, dtype=np.uint8)
    start = -whole.ctypes.data % HUGE_PAGE  # THP needs 2 MiB-aligned ranges
    region.madvise(mmap.MADV_HUGEPAGE, start, size)
    weights = whole[start : start + size]
    view = memoryview(weights)
    h = hashlib.blake2b()
    try:
        with open(artifact.path, "rb") as f:
            f.seek(artifact.weights_offset)
            for pos in range(0, size, HASH_CHUNK):
                chunk = view[pos : pos + HASH_CHUNK]
                if f.readinto(chunk) != len(chunk):
                    raise SparsecError(
                        f"{artifact.path} is truncated (weights end early); {_RECOMPILE}"
                    )
                if verify:
                    h.update(chunk)
    except OSError as exc:
        raise SparsecError(f"cannot read the weights of {artifact.path}: {exc}") from exc
    if verify:
        _check_digest(artifact, h.hexdigest())
    weights.flags.writeable = False
    return weights


def map_weights(artifact: Artifact) -> np.ndarray:
    """The weights as a read-only uint8 memmap (page-aligned; never copied)."""
    if artifact.weights_size == 0:
        return np.zeros(WEIGHTS_ALIGNMENT, dtype=np.uint8)  # a valid pointer for the ABI
    try:
        return np.memmap(
            artifact.path,
            dtype=np.uint8,
            mode="r",
            offset=artifact.weights_offset,
            shape=(artifact.weights_size,),
        )
    except (OSError, ValueError) as exc:
        raise SparsecError(f"cannot map the weights of {artifact.path}: {exc}") from exc


def weights_digest(weights) -> str:
    """blake2b (64-byte digest, hex) of a bytes-like or uint8 array, in slices."""
    view = memoryview(weights).cast("B")
    h = hashlib.blake2b()
    for start in range(0, len(view), HASH_CHUNK):
        h.update(view[start : start + HASH_CHUNK])
    return h.hexdigest()


def verify_weights(artifact: Artifact, weights: np.ndarray) -> None:
    size = artifact.weights_size
    _check_digest(artifact, weights_digest(weights[:size] if size else b""))


def _check_digest(artifact: Artifact, actual: str) -> None:
    if actual != artifact.manifest["weights"]["blake2b"]:
        raise SparsecError(
            f"{artifact.path} has corrupt weights (blake2b mismatch: the file changed after "
            f"compilation); {_RECOMPILE} or copy it again (verify=False skips this check)"
        )
