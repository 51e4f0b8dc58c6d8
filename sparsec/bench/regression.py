"""CI regression checks of the generated linear kernels (benchmarks/kernel_regression.py).

A fixed kernel set (SmolLM2-135M's layer shapes at 0/50/70/90% sparsity, every format of
``LINEAR_FORMATS``, plus the int8 activation-quantize kernels and the dense output layer)
is emitted with fixed random weights and checked two ways against committed baselines:

- Deterministic: the fingerprint of each kernel's machine code (``fingerprint.py``).
  Any change fails with a per-kernel diff.
- Statistical: each kernel's decode time (1 token, 1 thread, weights replicated to a
  fixed working set) divided by the time the read-bandwidth probe needs for the same
  number of bytes, measured alternately in the same run. Memory contention and CPU
  frequency move both terms, so the ratio is far steadier on a shared machine than
  either time. A kernel fails when its ratio exceeds the baseline's by more than the
  tolerance in the first measurement and in every confirmation re-measurement.
"""

from __future__ import annotations

import ctypes
import os
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Kernels are emitted with the model compiler's prefill chunk, so the code is the code
# that runs in a model.so (sparsec.codegen.compile.DEFAULT_MAX_TOKENS).
MAX_TOKENS = 64
SMOLLM2_SHAPES = {  # [out, in] of each distinct SmolLM2-135M linear layer
    "q_o": (576, 576),
    "k_v": (192, 576),
    "gate_up": (1536, 576),
    "down": (576, 1536),
}
LM_HEAD = ("lm_head", (49152, 576))
SPARSITIES = (0.0, 0.5, 0.7, 0.9)
# Fingerprints are taken for one fixed LLVM cpu, whatever the host, so the baseline
# compares like with like on any machine (same llvmlite version).
FINGERPRINT_CPU = "znver4"
# Timing settings (see docs in benchmarks/kernel_regression.py for how they were chosen).
TIMING_THREADS = 1
WORKING_SET = 24 << 20
SAMPLES = 15  # alternating kernel/probe measurements per kernel
INNER_REPS = 3  # repetitions per measurement (the median is taken)
DEFAULT_TOLERANCE = 0.25
CONFIRMATIONS = 2  # re-measurements of a kernel over tolerance before it fails


@dataclass(frozen=True)
class KernelSpec:
    role: str
    fmt: str
    shape: tuple[int, int]
    sparsity: float

    @property
    def name(self) -> str:
        out, inp = self.shape
        return f"{self.fmt}_{self.role}_{out}x{inp}_s{round(self.sparsity * 100):02d}"

    @property
    def int8(self) -> bool:
        return self.fmt.endswith("_i8")


def kernel_set() -> list[KernelSpec]:
    """Every (shape, sparsity, format) of the check, plus the dense output layer."""
    from sparsec.codegen.linear import LINEAR_FORMATS

    specs = [
        KernelSpec(role, fmt, shape, sp)
        for role, shape in SMOLLM2_SHAPES.items()
        for sp in SPARSITIES
        for fmt in LINEAR_FORMATS
    ]
    specs += [KernelSpec(LM_HEAD[0], fmt, LM_HEAD[1], 0.0) for fmt in ("dense_f32", "dense_i8")]
    return specs


def timing_set(specs: list[KernelSpec] | None = None) -> list[KernelSpec]:
    """The kernels timed: a dense kernel's time does not depend on its zeros, so dense
    formats are timed at sparsity 0 only; sparse formats at every sparsity."""
    specs = kernel_set() if specs is None else specs
    return [s for s in specs if s.fmt.startswith("bitmask") or s.sparsity == 0.0]


def make_weight(spec: KernelSpec) -> np.ndarray:
    """The spec's fixed random weight ([out, in] float32) with exactly its share of zeros."""
    rng = np.random.default_rng(zlib.crc32(f"{spec.role}{spec.shape}{spec.sparsity}".encode()))
    w = (rng.standard_normal(spec.shape) * 0.05).astype(np.float32)
    k = int(round(spec.sparsity * w.size))
    if k:
        w.reshape(-1)[rng.choice(w.size, size=k, replace=False)] = 0.0
    return w


Emitter = Callable[[object, str, object], object]  # (module, name, packed) -> ir.Function


def emit_kernel(module, name: str, packed):
    """The kernel as the model compiler emits it."""
    from sparsec.codegen.linear import emit_linear

    return emit_linear(module, name, packed, max_tokens=MAX_TOKENS)


def _build_module(specs: list[KernelSpec], packs: dict, emitter: Emitter):
    from llvmlite import ir

    from sparsec.codegen.linear import emit_quantize_tokens

    module = ir.Module(name="kernel_regression")
    for spec in specs:
        emitter(module, spec.name, packs[spec.name])
    for in_features in sorted({s.shape[1] for s in specs if s.int8}):
        emit_quantize_tokens(module, f"quantize_{in_features}", in_features, max_tokens=MAX_TOKENS)
    return module


def pack_all(specs: list[KernelSpec]) -> dict:
    from sparsec.codegen.linear import pack_linear

    weights: dict = {}
    packs = {}
    for spec in specs:
        key = (spec.role, spec.shape, spec.sparsity)
        if key not in weights:
            weights[key] = make_weight(spec)
        packs[spec.name] = pack_linear(weights[key], spec.fmt)
    return packs


@contextmanager
def _target_cpu(cpu: str):
    old = os.environ.get("SPARSEC_TARGET_CPU")
    os.environ["SPARSEC_TARGET_CPU"] = cpu
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPARSEC_TARGET_CPU", None)
        else:
            os.environ["SPARSEC_TARGET_CPU"] = old


def fingerprints(
    specs: list[KernelSpec], packs: dict, emitter: Emitter = emit_kernel, cpu: str = FINGERPRINT_CPU
) -> dict[str, dict[str, int]]:
    """Kernel name (and ``quantize_<in>``) -> fingerprint, compiled for ``cpu``."""
    from sparsec.bench.fingerprint import fingerprint_module
    from sparsec.codegen import target

    module = _build_module(specs, packs, emitter)
    with _target_cpu(cpu):
        asm = target.emit_assembly(module)
        obj = target.compile_ir(module)
    wanted = {s.name for s in specs} | {f"quantize_{s.shape[1]}" for s in specs if s.int8}
    fps = fingerprint_module(asm, obj)
    return {name: fps[name] for name in sorted(wanted)}


# --------------------------------------------------------------------------- timing


@dataclass
class KernelTiming:
    """One kernel's measurement: ``samples`` alternating timings of the kernel (all its
    copies once) and of the probe reading as many bytes.

    ``ratio`` = fastest kernel time / fastest probe time. On a shared machine noise only
    ever adds time, and it comes in bursts (another process on the core or its SMT
    sibling) that hit compute-bound kernels far harder than the memory-bound probe, so
    per-sample ratios are bimodal; the two minimums are the uncontended speeds and
    were the steadiest estimator in repeated runs (see benchmarks/kernel_regression.py).
    """

    name: str
    nbytes: int  # bytes read per sample (weights x copies)
    copies: int
    kernel_seconds: list[float]  # per sample, all copies
    probe_seconds: list[float]
    confirmations: list[float] = field(default_factory=list)  # ratios of re-measurements

    @property
    def ratio(self) -> float:
        return min(self.kernel_seconds) / min(self.probe_seconds)

    @property
    def sample_ratios(self) -> list[float]:
        return [k / p for k, p in zip(self.kernel_seconds, self.probe_seconds, strict=True)]

    @property
    def kernel_us(self) -> float:
        """Fastest time of one call."""
        return min(self.kernel_seconds) / self.copies * 1e6

    @property
    def probe_gbps(self) -> float:
        return self.nbytes / min(self.probe_seconds) / 1e9

    def as_dict(self) -> dict:
        r = self.sample_ratios
        return {
            "ratio": round(self.ratio, 4),
            "sample_ratio_min": round(min(r), 4),
            "sample_ratio_max": round(max(r), 4),
            "kernel_us": round(self.kernel_us, 2),
            "probe_gbps": round(self.probe_gbps, 2),
            "bytes": self.nbytes,
            "copies": self.copies,
            "samples": len(r),
        }


class TimingLibrary:
    """The timed kernels compiled into one library with the kernel timer, and the probe."""

    def __init__(self, specs: list[KernelSpec], packs: dict, emitter: Emitter = emit_kernel):
        from sparsec.bench.bandwidth import ReadBandwidthProbe
        from sparsec.codegen import target
        from sparsec.codegen.autotune import TIMER_SOURCE, bind_timer

        self.specs = specs
        self.packs = packs
        module = _build_module(specs, packs, emitter)
        self.lib = bind_timer(target.build_and_load(module, [TIMER_SOURCE]))
        self.probe = ReadBandwidthProbe()

    def _address(self, name: str) -> int:
        return ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value

    def _time(self, calls: list[tuple[int, int, list[int]]], reps: int) -> np.ndarray:
        from sparsec.codegen.autotune import time_calls

        return time_calls(self.lib, calls, 1, TIMING_THREADS, reps)

    def measure(self, spec: KernelSpec, samples: int = SAMPLES) -> KernelTiming:
        from sparsec.bench.bandwidth import aligned_buffer
        from sparsec.codegen.linear import quantized_row_bytes

        packed = self.packs[spec.name]
        size = packed.data.nbytes
        copies = max(1, -(-WORKING_SET // size))
        # One aligned buffer holds the copies back to back (each 64-byte aligned).
        blob = aligned_buffer(copies * size)
        for i in range(copies):
            blob[i * size : (i + 1) * size] = packed.data
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, spec.shape[1])).astype(np.float32)
        y = np.zeros((1, spec.shape[0]), np.float32)
        xq = np.zeros((1, quantized_row_bytes(spec.shape[1])), np.uint8)
        xs = np.zeros(1, np.float32)
        fn = self._address(spec.name)
        if spec.int8:
            quant = self._address(f"quantize_{spec.shape[1]}")
            self._time([(quant, 0, [x.ctypes.data, xq.ctypes.data, xs.ctypes.data, 0])], 1)
            args = [xq.ctypes.data, xs.ctypes.data, y.ctypes.data]
            kind = 1
        else:
            args = [x.ctypes.data, y.ctypes.data, 0]
            kind = 0
        calls = [(fn, kind, [blob.ctypes.data + i * size, *args]) for i in range(copies)]
        ref = aligned_buffer(blob.nbytes)  # the probe reads as many bytes, elsewhere
        self._time(calls, 1)  # warm up: page faults, code, frequency
        self.probe.time_read(ref, TIMING_THREADS, 1)
        kernel_s, probe_s = [], []
        for _ in range(samples):
            kernel_s.append(float(self._time(calls, INNER_REPS).min()))
            probe_s.append(float(self.probe.time_read(ref, TIMING_THREADS, INNER_REPS).min()))
        return KernelTiming(spec.name, blob.nbytes, copies, kernel_s, probe_s)


# --------------------------------------------------------------------------- checks


@dataclass
class TimingVerdict:
    name: str
    baseline: dict
    timing: KernelTiming
    tolerance: float

    @property
    def best(self) -> float:
        return min([self.timing.ratio, *self.timing.confirmations])

    @property
    def change(self) -> float:
        """Best measured ratio over the baseline's, minus 1 (+0.30 = 30% slower)."""
        return self.best / self.baseline["ratio"] - 1

    @property
    def failed(self) -> bool:
        return self.change > self.tolerance

    def line(self) -> str:
        t, b = self.timing, self.baseline
        r = t.sample_ratios
        confirm = (
            " confirmations " + ", ".join(f"{c:.3f}" for c in t.confirmations)
            if t.confirmations
            else ""
        )
        status = "FAIL" if self.failed else ("faster" if self.change < -self.tolerance else "ok")
        return (
            f"{status:6} {self.name}: ratio {t.ratio:.3f} (per-sample spread {min(r):.3f}.."
            f"{max(r):.3f}, {len(r)} samples){confirm} vs baseline {b['ratio']:.3f} "
            f"(spread {b['sample_ratio_min']:.3f}..{b['sample_ratio_max']:.3f}): "
            f"{self.change:+.0%}; kernel {t.kernel_us:.1f} us/call "
            f"({t.nbytes / t.copies / t.kernel_us / 1e3:.1f} GB/s), probe "
            f"{t.probe_gbps:.1f} GB/s over {t.nbytes >> 20} MB"
        )


def check_timings(
    lib: TimingLibrary,
    baseline: dict[str, dict],
    specs: list[KernelSpec],
    tolerance: float,
    confirmations: int = CONFIRMATIONS,
    log: Callable[[str], None] = print,
) -> list[TimingVerdict]:
    """Measure every kernel, then re-measure the ones over tolerance, up to
    ``confirmations`` more passes. Re-measuring after the whole pass, not right away,
    puts seconds between the measurements, so one burst of load on the machine cannot
    fail a kernel on its own."""
    verdicts = [
        TimingVerdict(spec.name, baseline[spec.name], lib.measure(spec), tolerance)
        for spec in specs
    ]
    by_name = {spec.name: spec for spec in specs}
    for _ in range(confirmations):
        suspects = [v for v in verdicts if v.failed]
        for v in suspects:
            v.timing.confirmations.append(lib.measure(by_name[v.name]).ratio)
    for v in verdicts:
        log(v.line())
    return verdicts


def write_json(path: Path, data: dict) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
