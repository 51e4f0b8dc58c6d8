"""Reading the model.so artifact: trailer, manifest, code, weights (ABI v3, docs/runtime.md).

Layout of one ``model.so``::

    [ELF shared object][zero pad to 4096][weights][manifest JSON][trailer]

with ``trailer = struct.pack("<QQ32s8s", manifest_offset, manifest_size,
blake2b-256(manifest), b"SPARSEC2")``. dlopen ignores the bytes after the ELF image, so
the same file is both a loadable library and a container.

Integrity covers the whole file: the trailer holds the manifest's hash, the manifest
holds the code's hash (``code``) and one hash per 64 MiB chunk of the weights
(``weights.blake2b``), so a chunk can be checked where it is read and a multi-GB file
need not be read twice. Everything here uses plain file IO and never touches the
native code: a damaged or foreign file is rejected before dlopen can crash on it, and
the code that is loaded is the verified copy in memory, never the file again
(``sparsec.runtime.native``). The writer (``sparsec.codegen.artifact``) imports the
constants and the manifest validator from here, so both sides agree by construction.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsec.contract import KV_CACHE_DTYPES, ConfigError, ModelConfig
from sparsec.errors import SparsecError
from sparsec.resources import available_memory
from sparsec.runtime import verified

MAGIC = "sparsec-model"
TRAILER_MAGIC = b"SPARSEC2"
# Trailers of earlier ABIs, told apart by their magic so they get the ABI message.
OLD_TRAILER_MAGICS = {b"SPARSEC1": 1}
TRAILER_FORMAT = "<QQ32s8s"
TRAILER_SIZE = struct.calcsize(TRAILER_FORMAT)  # 56
# 3: sparsec_forward_rows (rows of several sequences in one step). The file layout and
# its trailer are those of ABI 2.
ABI_VERSION = 3
DIGEST_BYTES = 32  # blake2b-256 everywhere: code, manifest, weight chunks
WEIGHTS_ALIGNMENT = 4096  # weights start on a page so they can be mmapped directly
WEIGHTS_CHUNK = 64 << 20  # one hash per 64 MiB of weights (112 hashes for 7 GB)
HUGE_PAGE = 2 << 20
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HASH_CHUNK = 16 << 20  # read in 16 MiB slices: memory stays flat
# hashlib releases the GIL on large buffers: chunks hash in parallel threads.
HASH_THREADS = min(4, len(os.sched_getaffinity(0)))  # Linux only, as the runtime is
PRECISIONS = ("fp32", "int8")
# A private copy of the weights larger than this share of MemAvailable is not made by
# default (the file is mapped instead): the copy would push the page cache and the rest
# of the process out, or invite the OOM killer.
HUGE_PAGE_MEMORY_SHARE = 0.7

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
    identity: tuple = ()  # the file when it was read (sparsec.runtime.verified)
    seal: str = ""  # the manifest's blake2b-256, from the trailer

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["config"])  # checked by read_artifact

    @property
    def weights_offset(self) -> int:
        return self.manifest["weights"]["offset"]

    @property
    def weights_size(self) -> int:
        return self.manifest["weights"]["size"]

    @property
    def code_size(self) -> int:
        return self.manifest["code"]["size"]


def digest(data) -> str:
    """blake2b-256 hex digest of a bytes-like object (the artifact's one hash)."""
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=DIGEST_BYTES).hexdigest()


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Read and check the trailer and manifest of ``path`` (no mmap, no dlopen)."""
    path = Path(path)
    name = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SparsecError(f"{name} does not exist; pass the path of a compiled model.so") from None
    except OSError as exc:  # a name too long, a symlink loop, a component not a folder
        raise SparsecError(f"cannot read {name}: {exc.strerror or exc}") from exc
    except (UnicodeEncodeError, ValueError) as exc:  # a lone surrogate, a NUL byte
        raise SparsecError(f"cannot read {name!a}: the path is not a valid file name") from exc
    if not stat.S_ISREG(st.st_mode):
        raise SparsecError(f"{name} is not a file; pass the path of a compiled model.so")
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if size < len(TRAILER_MAGIC):
                _not_sparsec(name)
            f.seek(size - len(TRAILER_MAGIC))
            magic = f.read(len(TRAILER_MAGIC))
            if magic in OLD_TRAILER_MAGICS:
                _old_abi(name, OLD_TRAILER_MAGICS[magic])
            if magic != TRAILER_MAGIC or size < TRAILER_SIZE:
                _not_sparsec(name)
            f.seek(size - TRAILER_SIZE)
            offset, length, sealed, _ = struct.unpack(TRAILER_FORMAT, f.read(TRAILER_SIZE))
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
    if digest(raw) != sealed.hex():
        raise SparsecError(
            f"{name} has a corrupt manifest (its blake2b does not match the trailer: the file "
            f"changed after compilation); {_RECOMPILE} or copy it again"
        )
    manifest = _parse_manifest(raw, name)
    check_abi_version(manifest, name)
    try:
        validate_manifest(manifest)
        weights = manifest["weights"]
        if weights["offset"] + weights["size"] != offset:
            raise ManifestError(
                f"weights [{weights['offset']}, +{weights['size']}) do not end where the "
                f"manifest starts (offset {offset})"
            )
    except ManifestError as exc:
        raise SparsecError(f"{name} has a corrupt manifest ({exc}); {_RECOMPILE}") from exc
    return Artifact(
        path=path,
        file_size=size,
        manifest_offset=offset,
        manifest=manifest,
        identity=identity,
        seal=sealed.hex(),
    )


def _parse_manifest(raw: bytes, name: str) -> dict:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: bad JSON, or an integer past Python's digit limit; RecursionError:
        # nesting deeper than the parser's stack.
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise SparsecError(f"{name} has a corrupt manifest ({detail}); {_RECOMPILE}") from exc
    if not isinstance(manifest, dict) or manifest.get("magic") != MAGIC:
        raise SparsecError(f"{name} has a corrupt manifest (no magic {MAGIC!r}); {_RECOMPILE}")
    return manifest


def _not_sparsec(name: str):
    raise SparsecError(
        f"{name} is not a sparsec model (no {TRAILER_MAGIC.decode()} trailer); compile one "
        "with `sparsec compile`"
    )


def _old_abi(name: str, abi: int):
    from sparsec import __version__

    raise SparsecError(
        f"{name} uses model ABI version {abi}, written by an earlier sparsec, but this sparsec "
        f"{__version__} loads ABI version {ABI_VERSION}; {_RECOMPILE} or load it with the "
        "sparsec that compiled it"
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


def _digest_field(obj, key, where: str) -> None:
    value = obj[key] if isinstance(obj, list) else _check(obj, key, _STR, where)
    if not (
        isinstance(value, str)
        and len(value) == 2 * DIGEST_BYTES
        and all(c in "0123456789abcdef" for c in value)
    ):
        label = f"{where}[{key}]" if isinstance(obj, list) else f"{where}{key}"
        raise ManifestError(
            f"field '{label}' is {str(value)[:80]!r}, expected a {2 * DIGEST_BYTES}-digit "
            "hex blake2b-256 digest"
        )


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
    _check(target, "isa", _STR, "target.")
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
    precision = _check(m, "precision", _STR, "")
    if precision not in PRECISIONS:
        raise ManifestError(f"field 'precision' is {precision!r}, expected one of {PRECISIONS}")
    max_context = _check(m, "max_context", _INT, "", positive=True)
    _check(m, "max_tokens_per_call", _INT, "", positive=True)
    _check(m, "default_threads", _INT, "", positive=True)
    kv = _check(m, "kv_cache", dict, "")
    dtype = kv.get("dtype")
    if not isinstance(dtype, str) or dtype not in KV_CACHE_DTYPES:  # a list is unhashable
        raise ManifestError(
            f"field 'kv_cache.dtype' is {dtype!r}, expected one of "
            f"{', '.join(map(repr, KV_CACHE_DTYPES))}"
        )
    shape = _check(kv, "shape", list, "kv_cache.")
    expected = config.kv_cache_shape(max_context, dtype)
    # type() too: 16.0 == 16 in Python, but a float cannot size a buffer.
    if shape != expected or any(type(d) is not int for d in shape):
        row = "head_dim + 4 per 32 (int8 values and scales)" if dtype == "int8" else "head_dim"
        raise ManifestError(
            f"field 'kv_cache.shape' is {shape}, expected [L, 2, KVH, max_context, {row}] "
            f"= {expected}"
        )
    code = _check(m, "code", dict, "")
    code_size = _check(code, "size", _INT, "code.", positive=True)
    _digest_field(code, "blake2b", "code.")
    weights = _check(m, "weights", dict, "")
    offset = _check(weights, "offset", _INT, "weights.")
    size = _check(weights, "size", _INT, "weights.", positive=True)
    chunk = _check(weights, "chunk_bytes", _INT, "weights.", positive=True)
    if offset % WEIGHTS_ALIGNMENT:
        raise ManifestError(f"field 'weights.offset' {offset} is not {WEIGHTS_ALIGNMENT}-aligned")
    if not code_size <= offset < code_size + WEIGHTS_ALIGNMENT:
        raise ManifestError(
            f"field 'weights.offset' {offset} is not the code's end ({code_size}) rounded up "
            f"to {WEIGHTS_ALIGNMENT}"
        )
    if chunk % WEIGHTS_ALIGNMENT:
        raise ManifestError(
            f"field 'weights.chunk_bytes' {chunk} is not {WEIGHTS_ALIGNMENT}-aligned"
        )
    hashes = _check(weights, "blake2b", list, "weights.")
    if len(hashes) != -(-size // chunk):
        raise ManifestError(
            f"field 'weights.blake2b' has {len(hashes)} hashes, expected one per "
            f"{chunk}-byte chunk of {size} bytes ({-(-size // chunk)})"
        )
    for i in range(len(hashes)):
        _digest_field(hashes, i, "weights.blake2b")
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
    if "embedding" in m:  # how the embedding is stored (sparsec inspect shows it)
        _check(m, "embedding", _STR, "")
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
    artifact: Artifact, huge_pages: bool | None = None, verify: bool | str = True
) -> tuple[np.ndarray, str, str]:
    """The weights, how they are held (``"huge pages"`` or ``"file mapping"``) and how
    their hashes were checked (``"now"``, ``"earlier"``, ``"skipped"``).

    Decode streams every weight once per token, and with 4 KiB pages it takes a TLB miss
    every 4 KiB: a copy into 2 MiB transparent huge pages decodes 3-6% faster (measured
    on SmolLM2 70% fp32). The file mapping instead shares the page cache between
    processes and costs no private memory. ``huge_pages``: None = huge pages when the
    kernel offers them and the copy fits in available memory (``HUGE_PAGE_MEMORY_SHARE``
    of MemAvailable), True = require them, False = map the file. ``verify``: True =
    check every chunk's hash against the manifest (the copy that will run, not the
    file) unless this unchanged file was verified by an earlier load
    (``sparsec.runtime.verified``); ``"always"`` = check now regardless; False = skip.
    """
    thp = transparent_huge_pages()
    usable = thp in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")
    if huge_pages and not usable:
        raise SparsecError(
            f"huge pages were requested for {artifact.path}, but transparent huge pages are "
            f"{thp} on this system ({THP_ENABLED}); load with huge_pages=False "
            "(sparsec run --no-huge-pages) or enable them (echo madvise > that file)"
        )
    available = available_memory()
    fits = available is None or artifact.weights_size <= HUGE_PAGE_MEMORY_SHARE * available
    if huge_pages and not fits:
        raise SparsecError(
            f"huge pages were requested for {artifact.path}, but its "
            f"{artifact.weights_size / 2**30:.1f} GiB of weights do not fit in the "
            f"{available / 2**30:.1f} GiB of available memory; load with huge_pages=False "
            "(sparsec run --no-huge-pages) to map the file instead"
        )
    if huge_pages is False or not usable or not fits:
        weights, how = map_weights(artifact), "file mapping"
    else:
        weights, how = _read_into_huge_pages(artifact), "huge pages"
    if not verify:
        return weights, how, "skipped"
    if verify != "always" and verified.known(artifact.path, artifact.identity, artifact.seal):
        return weights, how, "earlier"
    verify_weights(artifact, weights)
    verified.record(artifact.path, artifact.identity, artifact.seal)
    return weights, how, "now"


def _read_into_huge_pages(artifact: Artifact) -> np.ndarray:
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
    try:
        with open(artifact.path, "rb") as f:
            f.seek(artifact.weights_offset)
            for pos in range(0, size, HASH_CHUNK):
                chunk = view[pos : pos + HASH_CHUNK]
                if f.readinto(chunk) != len(chunk):
                    raise SparsecError(
                        f"{artifact.path} is truncated (weights end early); {_RECOMPILE}"
                    )
    except OSError as exc:
        raise SparsecError(f"cannot read the weights of {artifact.path}: {exc}") from exc
    weights.flags.writeable = False
    return weights


def map_weights(artifact: Artifact) -> np.ndarray:
    """The weights as a read-only uint8 memmap (page-aligned; never copied)."""
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


def chunk_digests(weights, chunk_bytes: int = WEIGHTS_CHUNK) -> list[str]:
    """blake2b-256 of each ``chunk_bytes`` slice of a bytes-like or uint8 array, hashed
    in parallel threads (hashlib releases the GIL)."""
    view = memoryview(weights).cast("B")
    starts = range(0, len(view), chunk_bytes)
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(lambda s: digest(view[s : s + chunk_bytes]), starts))


def verify_weights(artifact: Artifact, weights: np.ndarray) -> None:
    """Refuse weights whose chunk hashes differ from the manifest (names the first bad
    chunk's byte range)."""
    w = artifact.manifest["weights"]
    actual = chunk_digests(weights[: artifact.weights_size], w["chunk_bytes"])
    for i, (got, want) in enumerate(zip(actual, w["blake2b"], strict=True)):
        if got != want:
            start = i * w["chunk_bytes"]
            raise SparsecError(
                f"{artifact.path} has corrupt weights (blake2b mismatch in bytes "
                f"{start}..{min(start + w['chunk_bytes'], artifact.weights_size)}: the file "
                f"changed after compilation); {_RECOMPILE} or copy it again "
                "(verify=False skips this check)"
            )


def read_code(artifact: Artifact) -> bytes:
    """The ELF image, checked against the manifest's hash: the bytes that will be loaded.

    Always verified (a few MB): a flipped byte in code or its relocations would crash
    or silently compute something else, and nothing later could tell.
    """
    size, pad = artifact.code_size, artifact.weights_offset - artifact.code_size
    try:
        with open(artifact.path, "rb") as f:
            code = f.read(size)
            padding = f.read(pad)
    except OSError as exc:
        raise SparsecError(f"cannot read the code of {artifact.path}: {exc}") from exc
    if len(code) != size or len(padding) != pad:
        raise SparsecError(f"{artifact.path} is truncated (the code ends early); {_RECOMPILE}")
    if digest(code) != artifact.manifest["code"]["blake2b"] or padding.strip(b"\0"):
        raise SparsecError(
            f"{artifact.path} has corrupt code (blake2b mismatch: the file changed after "
            f"compilation); {_RECOMPILE} or copy it again"
        )
    return code
