"""Up-front memory and disk checks of the long stages: refuse a job that cannot fit,
with the estimate and what to do, before minutes of work end in the OOM killer or a
full disk (issue 22). Stdlib only: the runtime imports it too.

The estimates are measured ratios of anonymous memory (Intel Xeon, RssAnon peaks):
``sparsec compile`` of a single-file graph holds about 2.3x its bytes (SmolLM2-135M,
0.66 GB: 1.48 GB; the protobuf and, then, a lowered copy of the weights); of a graph
with external data, whose weights are mapped pages of the data file that the kernel can
drop, 0.38x since lowering keeps no copy (Llama-3.2-1B-shaped fp32, 5.99 GB: 2.26 GB
anonymous; int8 1.7 GB; was 1.0x with the copy). Set
``SPARSEC_NO_RESOURCE_CHECK=1`` to run anyway (swap, or a known-better estimate).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sparsec.errors import SparsecError

SKIP_ENV = "SPARSEC_NO_RESOURCE_CHECK"
COMPILE_MEMORY_PER_GRAPH_BYTE = {"single file": 2.4, "external data": 0.5}
BASE_MEMORY = 512 << 20  # Python, onnx-ir, llvmlite, the LLVM module
# Packed weights per graph byte: fp32 about 1x (plus padding); int8 a quarter plus scales.
PACKED_PER_GRAPH_BYTE = {"fp32": 1.05, "int8": 0.3}


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _gb(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _free(folder: Path) -> tuple[Path, int]:
    """(the nearest existing folder, its free bytes)."""
    folder = folder.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def _check_memory(need: float, doing: str, advice: str) -> None:
    have = available_memory()
    if have is not None and need > have:
        raise SparsecError(
            f"{doing} needs about {_gb(need)} of memory and {_gb(have)} is available; "
            f"{advice}, or set {SKIP_ENV}=1 to try anyway"
        )


def check_compile(graph_bytes: int, precision: str, out: Path, *, external: bool) -> None:
    """Refuse a compile of a graph of ``graph_bytes`` (the .onnx and its data files;
    ``external``: its weights are in data files) that this machine's memory or disk
    cannot hold."""
    if os.environ.get(SKIP_ENV):
        return
    layout = "external data" if external else "single file"
    _check_memory(
        COMPILE_MEMORY_PER_GRAPH_BYTE[layout] * graph_bytes + BASE_MEMORY,
        f"compiling this graph ({_gb(graph_bytes)} of weights)",
        "free memory, compile on a larger machine",
    )
    _check_disk(PACKED_PER_GRAPH_BYTE.get(precision, 1.05) * graph_bytes, out, "compiling")


def check_export_disk(params: int, out: Path) -> None:
    """Refuse an export whose float32 graph (4 bytes a parameter) cannot fit beside
    ``out``."""
    if os.environ.get(SKIP_ENV):
        return
    _check_disk(4.05 * params, out, "the export", temporary=False)


def _check_disk(packed: float, out: Path, doing: str, *, temporary: bool = True) -> None:
    """``packed`` bytes in TMPDIR (the weights' temporary file) and beside ``out``."""
    needs: dict[Path, tuple[int, list[str]]] = {}
    places = [(out.parent, f"the output {out.name}")]
    if temporary:
        places.insert(
            0, (Path(tempfile.gettempdir()), "the packed weights' temporary file (TMPDIR)")
        )
    for folder, what in places:
        where, free = _free(folder)
        device = where.stat().st_dev
        total, whats = needs.get(device, (0, []))
        needs[device] = (total + packed, [*whats, what])
        if needs[device][0] > free:
            raise SparsecError(
                f"{where} has {_gb(free)} free and {doing} needs about "
                f"{_gb(needs[device][0])} there for {' and '.join(needs[device][1])}; free "
                f"some space, point TMPDIR or -o elsewhere, or set {SKIP_ENV}=1 to try anyway"
            )


# The export's check runs the model in PyTorch (float32) and the exported graph under
# onnxruntime side by side: about twice the float32 weights.
VERIFY_MEMORY_PER_FP32_BYTE = 2.3


def check_verify_memory(params: int) -> None:
    """Refuse up front an export check (PyTorch and onnxruntime, both float32) of a
    model of ``params`` parameters that this machine's memory cannot hold."""
    if os.environ.get(SKIP_ENV):
        return
    _check_memory(
        VERIFY_MEMORY_PER_FP32_BYTE * 4 * params + BASE_MEMORY,
        f"checking the export against PyTorch ({params / 1e9:.2f}B parameters, float32 "
        "in PyTorch and in onnxruntime)",
        "pass --no-verify (the export itself reads one weight at a time)",
    )


# `sparsec build` reads one weight at a time: beside the runtime stack it holds the
# largest weight a few times over (read, converted, transposed, packed) and the float32
# embedding table. Measured (Intel Xeon): see the README's real-sizes table.
BUILD_COPIES_OF_LARGEST = 4


def check_build(params: int, largest: int, precision: str, out: Path) -> None:
    """Refuse a ``sparsec build`` (``params`` parameters, the largest tensor ``largest``
    elements) that this machine's memory or disk cannot hold."""
    if os.environ.get(SKIP_ENV):
        return
    _check_memory(
        BUILD_COPIES_OF_LARGEST * 4 * largest + 2 * BASE_MEMORY,
        f"building this model (largest tensor {largest / 1e6:.0f}M elements)",
        "free memory",
    )
    _check_disk(PACKED_PER_GRAPH_BYTE.get(precision, 1.05) * 4 * params, out, "building")
