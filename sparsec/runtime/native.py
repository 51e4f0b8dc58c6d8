"""The native ABI v3 of a generated model.so, bound with ctypes.

    int32_t sparsec_abi_version(void);
    int32_t sparsec_build_info(int64_t* out, int32_t capacity);
    void*   sparsec_create(const uint8_t* weights, float* kv_cache, int32_t n_threads);
    int32_t sparsec_forward(void* ctx, const int32_t* tokens, int32_t n_tokens,
                            int32_t position, float* logits, int32_t all_logits);
    int32_t sparsec_forward_rows(void* ctx, const int32_t* tokens, int32_t n_rows,
                                 const int32_t* positions, float* const* caches,
                                 float* logits, int32_t all_logits);
    void    sparsec_destroy(void* ctx);

Only pointers and int32s cross the boundary; the runtime owns every buffer (weights
mmap, KV cache, token and logits arrays) and keeps them alive until destroy.

The code is loaded from the verified bytes in memory (``read_code``), written to an
anonymous memfd and dlopened through ``/proc/self/fd``: what runs is what was hashed
(the file may change after the check), and every load is a new library, so loading a
path again after the file was replaced runs the new code (dlopen of the same path
would return the library already loaded). ``sparsec_build_info`` reports the
constants the code was specialised to (``BUILD_FIELDS``); they are compared with the
manifest before any buffer is sized from it or any native call gets a pointer.
"""

from __future__ import annotations

import _ctypes
import ctypes
import os

from sparsec.contract import KV_CACHE_DTYPES
from sparsec.errors import SparsecError
from sparsec.runtime.artifact import ABI_VERSION, PRECISIONS, Artifact, read_code

FORWARD_OK = 0
FORWARD_BAD_COUNT = 1  # n_tokens outside 1..max_tokens_per_call
FORWARD_OVER_CAPACITY = 2  # position + n_tokens > capacity
FORWARD_NULL = 3  # a null pointer
FORWARD_BAD_TOKEN = 4  # a token id outside the vocabulary
FORWARD_SAME_SLOT = 5  # two rows of one step write the same cache slot

_SYMBOLS = (
    "sparsec_abi_version",
    "sparsec_build_info",
    "sparsec_create",
    "sparsec_forward",
    "sparsec_forward_rows",
    "sparsec_destroy",
)

# The build constants, in the order sparsec_build_info writes them. The compiler passes
# them to driver.c as one -DSPC_BUILD_INFO={...} made by ``build_info_define``, so the
# order lives only here.
BUILD_FIELDS = (
    "abi_version",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_key_value_heads",
    "head_dim",
    "max_context",
    "max_tokens_per_call",
    "precision",
    "weights_size",
    "kv_cache_dtype",
)


def build_constants(manifest: dict) -> dict[str, int]:
    """What the code of an artifact with this manifest must report, field by field."""
    config = manifest["config"]
    return {
        "abi_version": manifest["abi_version"],
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_key_value_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "max_context": manifest["max_context"],
        "max_tokens_per_call": manifest["max_tokens_per_call"],
        "precision": PRECISIONS.index(manifest["precision"]),
        "weights_size": manifest["weights"]["size"],
        # a cache of the wrong element type would be written past its end
        "kv_cache_dtype": list(KV_CACHE_DTYPES).index(manifest["kv_cache"]["dtype"]),
    }


def build_info_define(manifest: dict) -> str:
    """The value of -DSPC_BUILD_INFO for the code of an artifact with this manifest."""
    values = build_constants(manifest)
    return "{" + ",".join(str(values[field]) for field in BUILD_FIELDS) + "}"


class NativeLibrary:
    """The verified code of an artifact, dlopened privately, its build constants checked."""

    def __init__(self, artifact: Artifact):
        name = str(artifact.path)
        self.name = name
        code = read_code(artifact)
        # The fd stays open while the library is loaded: glibc finds loaded libraries by
        # path first, so the /proc/self/fd/N name must not be reused until dlclose.
        try:
            self._fd = os.memfd_create("sparsec-model", os.MFD_CLOEXEC)
            view = memoryview(code)
            while view:  # os.write may write less than asked
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise SparsecError(f"cannot stage the code of {name} in memory: {exc}") from exc
        try:
            lib = ctypes.CDLL(f"/proc/self/fd/{self._fd}", mode=os.RTLD_LOCAL)
        except (OSError, UnicodeDecodeError) as exc:
            os.close(self._fd)
            # The code matched its hash, so it was built for another platform or libc.
            raise SparsecError(
                f"cannot load the native code of {name} ({exc}); it was built for another "
                "platform: recompile it with `sparsec compile` on this machine"
            ) from exc
        self._lib = lib
        try:
            self._bind(artifact)
        except SparsecError:
            self.unload()
            raise

    def _bind(self, artifact: Artifact) -> None:
        lib, name = self._lib, self.name
        missing = [s for s in _SYMBOLS if not hasattr(lib, s)]
        if missing:
            raise SparsecError(
                f"{name} does not export {', '.join(missing)}; it is not a sparsec ABI "
                f"v{ABI_VERSION} model library: recompile it with `sparsec compile`"
            )
        lib.sparsec_abi_version.argtypes = []
        lib.sparsec_abi_version.restype = ctypes.c_int32
        lib.sparsec_build_info.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        lib.sparsec_build_info.restype = ctypes.c_int32
        lib.sparsec_create.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
        lib.sparsec_create.restype = ctypes.c_void_p
        # Pointers go in as plain ints (c_void_p): no per-call array conversion.
        lib.sparsec_forward.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int32,
            ctypes.c_int32,
            ctypes.c_void_p,
            ctypes.c_int32,
        ]
        lib.sparsec_forward.restype = ctypes.c_int32
        lib.sparsec_forward_rows.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int32,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int32,
        ]
        lib.sparsec_forward_rows.restype = ctypes.c_int32
        lib.sparsec_destroy.argtypes = [ctypes.c_void_p]
        lib.sparsec_destroy.restype = None

        expected_abi = artifact.manifest["abi_version"]
        abi = lib.sparsec_abi_version()
        if abi != expected_abi:
            raise SparsecError(
                f"{name}: its native code implements ABI version {abi} but its manifest says "
                f"{expected_abi}; the file is inconsistent: recompile it with `sparsec compile`"
            )
        info = (ctypes.c_int64 * len(BUILD_FIELDS))()
        count = lib.sparsec_build_info(info, len(BUILD_FIELDS))
        if count != len(BUILD_FIELDS):
            raise SparsecError(
                f"{name}: its native code reports {count} build constants, this sparsec "
                f"expects {len(BUILD_FIELDS)}; recompile it with `sparsec compile`"
            )
        expected = build_constants(artifact.manifest)
        for field, actual in zip(BUILD_FIELDS, info, strict=True):
            if actual != expected[field]:
                raise SparsecError(
                    f"{name}: its manifest says {field} = {_shown(field, expected[field])} "
                    f"but its code was built for {_shown(field, actual)}; the file was "
                    "assembled from parts of different models: recompile it with "
                    "`sparsec compile`"
                )

    def create(self, weights_ptr: int, kv_cache_ptr: int, n_threads: int) -> NativeModel:
        return NativeModel(self, weights_ptr, kv_cache_ptr, n_threads)

    def unload(self) -> None:
        """dlclose the library and release its memfd; no call into it may follow."""
        if self._lib is not None:
            _ctypes.dlclose(self._lib._handle)
            self._lib = None
            os.close(self._fd)


def _shown(field: str, value: int):
    if field == "precision" and 0 <= value < len(PRECISIONS):
        return PRECISIONS[value]
    if field == "kv_cache_dtype" and 0 <= value < len(KV_CACHE_DTYPES):
        return list(KV_CACHE_DTYPES)[value]
    return value


class NativeModel:
    """One context created from a NativeLibrary; closing it unloads the library."""

    def __init__(self, library: NativeLibrary, weights_ptr: int, kv_cache_ptr: int, n_threads):
        lib = library._lib
        ctx = lib.sparsec_create(weights_ptr, kv_cache_ptr, n_threads)
        if not ctx:
            raise SparsecError(
                f"{library.name}: sparsec_create failed with {n_threads} thread(s) (out of "
                "memory, or cannot start threads); try fewer threads"
            )
        self._library = library
        self._destroy = lib.sparsec_destroy
        self.ctx: int = ctx
        self.forward = lib.sparsec_forward  # (ctx, tokens, n, position, logits, all) -> int
        # (ctx, tokens, n, positions, caches, logits, all) -> int
        self.forward_rows = lib.sparsec_forward_rows

    def exported(self, ctype, name: str):
        """The library's data symbol ``name`` as ``ctype`` (e.g. a ctypes array type)."""
        try:
            return ctype.in_dll(self._library._lib, name)
        except ValueError as exc:
            raise SparsecError(
                f"{self._library.name} does not export {name} that its manifest names; the "
                "file is inconsistent: recompile it"
            ) from exc

    def close(self) -> None:
        if self.ctx:
            self._destroy(self.ctx)
            self.ctx = 0
            self.forward = self.forward_rows = self._destroy = None
            self._library.unload()


def forward_error(code: int, n_tokens: int, position: int, limit: int, capacity: int) -> str:
    if code == FORWARD_BAD_COUNT:
        return f"native forward rejected {n_tokens} tokens (it takes 1..{limit} per call)"
    if code == FORWARD_OVER_CAPACITY:
        return (
            f"native forward rejected {n_tokens} tokens at position {position}: the cache "
            f"holds {capacity}"
        )
    if code == FORWARD_BAD_TOKEN:
        return "native forward rejected a token id outside the vocabulary"
    if code == FORWARD_SAME_SLOT:
        return "native forward rejected two rows that write the same cache slot"
    return f"native forward failed with code {code}"
