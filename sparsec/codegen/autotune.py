"""Host-measured choice between dense and bitmask linear kernels, with a JSON cache.

``choose_linear_format`` packs a layer's weight in each candidate format, runs the
kernels on this CPU and keeps the fastest. A kernel's code depends only on its format
and shape (the weights are data), so libraries are compiled once per (format, shape)
and reused for every layer of that shape. Results are cached on disk, keyed by what
decides the outcome, so a second compile of the same model measures nothing.

``LinearLibrary`` (compile, run on real threads, time) also serves tests and benchmarks.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
from llvmlite import ir

from sparsec.codegen import target
from sparsec.codegen.linear_kernel import emit_linear_kernel
from sparsec.codegen.linear_pack import PackedLinear, pack_linear
from sparsec.codegen.quantize import emit_quantize_tokens, quantized_row_bytes
from sparsec.codegen.tuning import HOST_MEASURED_FIELDS
from sparsec.errors import SparsecError

TIMER_SOURCE = Path(__file__).with_name("kernel_timer.c")
CACHE_FILE = "linear_formats.json"
# Weights are replicated up to this many bytes while timing so they stream from L3/DRAM
# as in a real model step, instead of sitting in L2.
TIMING_WORKING_SET = 16 << 20


class _Call(ctypes.Structure):
    # struct sparsec_call of kernel_timer.c
    _fields_ = [("fn", ctypes.c_void_p), ("kind", ctypes.c_int64), ("a", ctypes.c_void_p * 4)]


def bind_timer(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare ``sparsec_time_calls`` of a library linked with kernel_timer.c."""
    fn = lib.sparsec_time_calls
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.POINTER(_Call),
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_double),
    ]
    return lib


def time_calls(lib: ctypes.CDLL, calls, n_tokens: int, nthreads: int, reps: int) -> np.ndarray:
    """Seconds per repetition of running ``calls`` ((address, kind, [pointers]) each) in
    order on ``nthreads`` threads, with a barrier after each call."""
    arr = (_Call * len(calls))()
    for c, (fn, kind, args) in zip(arr, calls, strict=True):
        c.fn, c.kind = fn, kind
        c.a[:] = args
    times = (ctypes.c_double * reps)()
    if lib.sparsec_time_calls(arr, len(calls), n_tokens, nthreads, reps, times) != 0:
        raise SparsecError(f"could not start {nthreads} timing threads")
    return np.array(times[:], dtype=np.float64)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class LinearLibrary:
    """Linear kernels (one per (format, shape)) compiled together with the kernel timer.

    ``specs``: (name, packed) pairs; a kernel reads any weights of its format and shape.
    int8 shapes also get a quantize kernel ``<name>_quant``.
    """

    def __init__(
        self,
        specs,
        max_tokens: int,
        accumulate: bool = False,
        out: Path | None = None,
        tgt: target.Target | None = None,
    ):
        tgt = tgt or target.default_target()
        module = ir.Module()
        self.packed = {}
        for name, packed in specs:
            emit_linear_kernel(
                module, name, packed, max_tokens=max_tokens, accumulate=accumulate, target=tgt
            )
            if packed.precision == "int8":
                emit_quantize_tokens(
                    module,
                    f"{name}_quant",
                    packed.in_features,
                    max_tokens=max_tokens,
                    isa=tgt.isa,
                )
            self.packed[name] = packed
        self.max_tokens = max_tokens
        if out is None:
            lib = target.build_and_load(module, [TIMER_SOURCE], tgt)
        else:
            lib = target.load_library(target.build_library(module, [TIMER_SOURCE], out, tgt))
        self.lib = bind_timer(lib)

    def address(self, name: str) -> int:
        return ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value

    def calls(self, name: str, data: np.ndarray, x: np.ndarray, y: np.ndarray, xq=None, xs=None):
        """The call records computing ``y = x @ W.T`` (with quantization for int8)."""
        packed = self.packed[name]
        if packed.precision == "fp32":
            return [(self.address(name), 0, [_ptr(data), _ptr(x), _ptr(y), 0])]
        return [
            (self.address(f"{name}_quant"), 0, [_ptr(x), _ptr(xq), _ptr(xs), 0]),
            (self.address(name), 1, [_ptr(data), _ptr(xq), _ptr(xs), _ptr(y)]),
        ]

    def time_calls(self, calls, n_tokens: int, nthreads: int, reps: int) -> np.ndarray:
        """Seconds per repetition of running ``calls`` in order on ``nthreads`` threads."""
        if not 1 <= n_tokens <= self.max_tokens:
            raise SparsecError(f"n_tokens {n_tokens} outside 1..{self.max_tokens}")
        return time_calls(self.lib, calls, n_tokens, nthreads, reps)

    def run(self, name: str, x: np.ndarray, y: np.ndarray, nthreads: int = 1, data=None):
        """Run the layer on ``nthreads`` real threads: ``y (+)= x @ W.T`` in place."""
        packed = self.packed[name]
        data = packed.data if data is None else data
        n = x.shape[0]
        xq = np.zeros((n, quantized_row_bytes(packed.in_features)), np.uint8)
        xs = np.zeros(n, np.float32)
        self.time_calls(self.calls(name, data, x, y, xq, xs), n, nthreads, 1)
        return y


@functools.cache
def _library(
    fmt: str, out_features: int, in_features: int, max_tokens: int, tgt: target.Target
) -> LinearLibrary:
    dummy = pack_linear(np.zeros((out_features, in_features), np.float32), fmt, tgt.isa)
    return LinearLibrary([("lin", dummy)], max_tokens, tgt=tgt)


def measure_linear(
    packed: PackedLinear,
    *,
    n_tokens: int = 1,
    nthreads: int = 1,
    reps: int = 7,
    tgt: target.Target | None = None,
) -> float:
    """Median seconds of one call of ``packed``'s kernel on this host (weights not in L2)."""
    return measure_linears([packed], n_tokens=n_tokens, nthreads=nthreads, reps=reps, tgt=tgt)[0]


def measure_linears(
    packs: list[PackedLinear],
    *,
    n_tokens: int = 1,
    nthreads: int = 1,
    reps: int = 7,
    tgt: target.Target | None = None,
) -> list[float]:
    """Median seconds per call of each kernel, built for ``tgt`` (default: this host's),
    run here; repetitions alternate between the kernels so that load from other
    processes hits all candidates alike."""
    tgt = tgt or target.default_target()
    kernels = [(p, tgt) for p in packs]
    return measure_kernels(kernels, n_tokens=n_tokens, nthreads=nthreads, reps=reps)


def measure_kernels(
    kernels: list[tuple[PackedLinear, target.Target]],
    *,
    n_tokens: int = 1,
    nthreads: int = 1,
    reps: int = 7,
) -> list[float]:
    """``measure_linears`` with each kernel built for its own target (host_tuning.py
    compares tunings this way)."""
    benches = []
    for packed, tgt in kernels:
        lib = _library(packed.fmt, packed.out_features, packed.in_features, max(n_tokens, 1), tgt)
        copies = max(1, min(64, TIMING_WORKING_SET // max(packed.data.nbytes, 1)))
        keep = [packed.data.copy() for _ in range(copies)]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n_tokens, packed.in_features)).astype(np.float32)
        y = np.zeros((n_tokens, packed.out_features), np.float32)
        xq = np.zeros((n_tokens, quantized_row_bytes(packed.in_features)), np.uint8)
        xs = np.zeros(n_tokens, np.float32)
        keep += [x, y, xq, xs]  # the call records hold raw pointers into these
        calls = [c for blob in keep[:copies] for c in lib.calls("lin", blob, x, y, xq, xs)]
        lib.time_calls(calls, n_tokens, nthreads, 1)  # warm up (page faults, code)
        benches.append((lib, calls, copies, keep, []))
    for _ in range(reps):
        for lib, calls, copies, _keep, times in benches:
            times.append(lib.time_calls(calls, n_tokens, nthreads, 1)[0] / copies)
    return [statistics.median(times) for *_, times in benches]


DENSE_ONLY_BELOW = 0.2  # sparsity under which dense is chosen without timing


def cache_dir() -> Path:
    env = os.environ.get("SPARSEC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "sparsec"


def load_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or corrupt cache: measure again
    return cache if isinstance(cache, dict) else {}


def store_cache(path: Path, key: str, entry: dict) -> None:
    cache = load_cache(path)
    cache[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=0, sort_keys=True)
        os.replace(tmp, path)  # atomic: readers never see a half-written file
    except OSError as exc:
        raise SparsecError(
            f"cannot write the kernel timing cache {path} ({exc.strerror or exc}); set "
            "SPARSEC_CACHE_DIR to a writable folder"
        ) from None


def choose_linear_format(
    weight: np.ndarray,
    precision: str,
    allowed: str = "auto",
    *,
    n_tokens: int = 1,
    nthreads: int = 1,
    reps: int = 7,
    use_cache: bool = True,
    tgt: target.Target | None = None,
) -> str:
    """The linear format for ``weight`` ([out, in] float32) at ``precision`` fp32|int8.

    ``allowed``: "dense" or "bitmask" force that family; "auto" times both, built for
    ``tgt`` (default: this host's target), on this host (decode shape ``n_tokens`` by
    default) and returns the faster one.
    """
    from sparsec import __version__

    tgt = tgt or target.default_target()

    suffix = {"fp32": "f32", "int8": "i8"}.get(precision)
    if suffix is None:
        raise SparsecError(f"unknown precision {precision!r}; use fp32 or int8")
    if allowed in ("dense", "bitmask"):
        fmt = f"{allowed}_{suffix}"
        if fmt not in tgt.isa.formats:
            raise SparsecError(
                f"--kernels {allowed}: the {tgt.isa.name} target has no {fmt} kernel; use "
                "--kernels auto or dense"
            )
        return fmt
    if allowed != "auto":
        raise SparsecError(f"unknown linear kernel choice {allowed!r}; use auto, dense or bitmask")
    candidates = [f for f in tgt.isa.formats if f.endswith("_" + suffix)]
    w = np.asarray(weight, dtype=np.float32)
    sparsity = round(1.0 - np.count_nonzero(w) / max(w.size, 1), 2)
    if sparsity < DENSE_ONLY_BELOW:
        # A bitmask reads as many weight bytes plus the mask and decodes it: it cannot
        # win here, and timing it on a busy machine could only pick it by noise.
        return f"dense_{suffix}"
    key = json.dumps(
        [
            list(w.shape),
            sparsity,
            precision,
            candidates,
            n_tokens,
            nthreads,
            target.host_cpu_model(),
            tgt.isa.name,
            tgt.cpu,
            {name: getattr(tgt.tuning, name) for name in HOST_MEASURED_FIELDS},  # (other code)
            __version__,
        ]
    )
    path = cache_dir() / CACHE_FILE
    if use_cache:
        hit = load_cache(path).get(key)
        if hit and hit.get("format") in candidates:
            return hit["format"]
    seconds = measure_linears(
        [pack_linear(w, fmt, tgt.isa) for fmt in candidates],
        n_tokens=n_tokens,
        nthreads=nthreads,
        reps=reps,
        tgt=tgt,
    )
    times = dict(zip(candidates, seconds, strict=True))
    best = min(times, key=times.get)
    if use_cache:
        store_cache(path, key, {"format": best, "seconds": times})
    return best
