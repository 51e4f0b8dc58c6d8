"""The native ABI v1 of a generated model.so, bound with ctypes.

    int32_t sparsec_abi_version(void);
    void*   sparsec_create(const uint8_t* weights, float* kv_cache, int32_t n_threads);
    int32_t sparsec_forward(void* ctx, const int32_t* tokens, int32_t n_tokens,
                            int32_t position, float* logits, int32_t all_logits);
    void    sparsec_destroy(void* ctx);

Only pointers and int32s cross the boundary; the runtime owns every buffer (weights
mmap, KV cache, token and logits arrays) and keeps them alive until destroy.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from sparsec.errors import SparsecError

FORWARD_OK = 0
FORWARD_BAD_COUNT = 1  # n_tokens outside 1..max_tokens_per_call
FORWARD_OVER_CAPACITY = 2  # position + n_tokens > capacity

_SYMBOLS = ("sparsec_abi_version", "sparsec_create", "sparsec_forward", "sparsec_destroy")


class NativeModel:
    """A dlopened model library and one context created from it."""

    def __init__(
        self,
        path: Path,
        expected_abi: int,
        weights_ptr: int,
        kv_cache_ptr: int,
        n_threads: int,
    ):
        name = str(path)
        try:
            # An absolute path, or dlopen would search the library path instead.
            lib = ctypes.CDLL(str(Path(path).resolve()), mode=os.RTLD_LOCAL)
        except OSError as exc:
            raise SparsecError(
                f"cannot load the native code of {name} ({exc}); the file is damaged or was "
                "built for another platform: recompile it with `sparsec compile`"
            ) from exc
        missing = [s for s in _SYMBOLS if not hasattr(lib, s)]
        if missing:
            raise SparsecError(
                f"{name} does not export {', '.join(missing)}; it is not a sparsec model "
                "library: recompile it with `sparsec compile`"
            )
        lib.sparsec_abi_version.argtypes = []
        lib.sparsec_abi_version.restype = ctypes.c_int32
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
        lib.sparsec_destroy.argtypes = [ctypes.c_void_p]
        lib.sparsec_destroy.restype = None

        abi = lib.sparsec_abi_version()
        if abi != expected_abi:
            raise SparsecError(
                f"{name}: its native code implements ABI version {abi} but its manifest says "
                f"{expected_abi}; the file is inconsistent: recompile it with `sparsec compile`"
            )
        ctx = lib.sparsec_create(weights_ptr, kv_cache_ptr, n_threads)
        if not ctx:
            raise SparsecError(
                f"{name}: sparsec_create failed with {n_threads} thread(s) (out of memory, or "
                "cannot start threads); try fewer threads"
            )
        self._lib = lib
        self.ctx: int = ctx
        self.forward = lib.sparsec_forward  # (ctx, tokens, n, position, logits, all) -> int

    def close(self) -> None:
        if self.ctx:
            self._lib.sparsec_destroy(self.ctx)
            self.ctx = 0


def forward_error(code: int, n_tokens: int, position: int, limit: int, capacity: int) -> str:
    if code == FORWARD_BAD_COUNT:
        return f"native forward rejected {n_tokens} tokens (it takes 1..{limit} per call)"
    if code == FORWARD_OVER_CAPACITY:
        return (
            f"native forward rejected {n_tokens} tokens at position {position}: the cache "
            f"holds {capacity}"
        )
    return f"native forward failed with code {code}"
