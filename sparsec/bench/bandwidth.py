"""Read bandwidth of this machine, measured in the same run as the model benchmarks.

Decode on a CPU streams every weight once per token, so a decode step can be no faster
than ``bytes per token / read bandwidth``. ``ReadBandwidthProbe`` builds
``read_bandwidth.c`` (512-bit loads on N threads over a buffer far larger than the
caches) with the system C compiler at first use, caches the library by source hash,
and times reads of any buffer: the ceiling for ``sparsec bench``'s roofline.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsec.errors import SparsecError

SOURCE = Path(__file__).with_name("read_bandwidth.c")
HEADER = Path(__file__).parents[1] / "codegen" / "native" / "timed_threads.h"  # included
CFLAGS = ("-O2", "-shared", "-fPIC", "-pthread", "-mavx512f")
# Far beyond the 32 MB L3 of a Zen 4 CCD, and about SmolLM2's fp32 weights (540 MB) /
# 2: the probe then reads from DRAM as a decode step does.
DEFAULT_PROBE_BYTES = 256 << 20
ALIGN = 64


def _cache_dir() -> Path:
    env = os.environ.get("SPARSEC_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "sparsec") / "bench"


def _build(out: Path) -> None:
    from sparsec.codegen.target import find_cc

    cc = find_cc()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".read_bandwidth.", suffix=".so")
    os.close(fd)
    cmd = [cc, *CFLAGS, str(SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        os.unlink(tmp)
        raise SparsecError(
            f"cannot run the C compiler {cc!r} for the bandwidth probe: {exc}"
        ) from exc
    if proc.returncode != 0:
        os.unlink(tmp)
        raise SparsecError(
            f"building the bandwidth probe {SOURCE.name} failed ({cc} exited "
            f"{proc.returncode}): " + proc.stderr.strip().replace("\n", " | ")
        )
    os.replace(tmp, out)  # atomic: a concurrent run sees the old file or the new one


def aligned_buffer(nbytes: int, fill: int = 0x5A) -> np.ndarray:
    """A 64-byte aligned uint8 buffer of ``nbytes`` (rounded up to 256), every page written.

    Written, not zeroed: pages that were only ever zero-filled map to the kernel's
    shared zero page, and reading those would measure a cache, not memory.
    """
    nbytes = -(-nbytes // 256) * 256
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    buf = raw[start : start + nbytes]
    buf.fill(fill)
    return buf


@dataclass(frozen=True)
class Bandwidth:
    """Read bandwidth in GB/s (1e9 bytes/s) over ``reps`` repetitions."""

    threads: int
    nbytes: int
    median: float
    min: float
    max: float
    reps: int

    def as_dict(self) -> dict:
        return {
            "threads": self.threads,
            "bytes": self.nbytes,
            "gbps_median": round(self.median, 2),
            "gbps_min": round(self.min, 2),
            "gbps_max": round(self.max, 2),
            "reps": self.reps,
        }


class ReadBandwidthProbe:
    """The compiled probe. ``time_read`` times reads of a given buffer, ``measure`` of
    a fresh buffer of ``nbytes``."""

    def __init__(self, cache_dir: Path | None = None):
        sources = SOURCE.read_bytes() + HEADER.read_bytes()
        digest = hashlib.blake2b(sources + " ".join(CFLAGS).encode(), digest_size=8)
        path = (cache_dir or _cache_dir()) / f"read_bandwidth-{digest.hexdigest()}.so"
        if not path.is_file():
            _build(path)
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise SparsecError(f"cannot load the bandwidth probe {path}: {exc}") from exc
        fn = self.lib.sparsec_read_bandwidth
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_double),
        ]
        self._buffers: dict[int, np.ndarray] = {}

    def time_read(self, buf: np.ndarray, nthreads: int = 1, reps: int = 5) -> np.ndarray:
        """Seconds of each of ``reps`` full reads of ``buf`` (from ``aligned_buffer``)."""
        if buf.dtype != np.uint8 or buf.ctypes.data % ALIGN or buf.nbytes % 256:
            raise SparsecError("bandwidth probe buffer must be 64-byte aligned uint8, n*256 bytes")
        times = (ctypes.c_double * reps)()
        rc = self.lib.sparsec_read_bandwidth(buf.ctypes.data, buf.nbytes, nthreads, reps, times)
        if rc != 0:
            raise SparsecError(f"bandwidth probe could not run on {nthreads} threads")
        return np.array(times[:], dtype=np.float64)

    def buffer(self, nbytes: int) -> np.ndarray:
        """A probe buffer of ``nbytes``, kept for reuse (allocating 256 MB costs ~50 ms)."""
        if nbytes not in self._buffers:
            self._buffers[nbytes] = aligned_buffer(nbytes)
        return self._buffers[nbytes]

    def measure(
        self, nthreads: int = 1, nbytes: int = DEFAULT_PROBE_BYTES, reps: int = 5
    ) -> Bandwidth:
        buf = self.buffer(nbytes)
        self.time_read(buf, nthreads, 1)  # warm up: TLB, frequency
        gbps = [buf.nbytes / t / 1e9 for t in self.time_read(buf, nthreads, reps)]
        return Bandwidth(
            nthreads, buf.nbytes, statistics.median(gbps), min(gbps), max(gbps), len(gbps)
        )
