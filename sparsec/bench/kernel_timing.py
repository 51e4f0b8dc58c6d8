"""How the kernel check times its items on this host (see ``kernel_suite``).

- ``LinearTiming``: linear kernels compiled into one library with the kernel timer
  (``codegen/kernel_timer.c``), 1 token on ``KERNEL_THREADS`` threads, the weights
  replicated to a ``WORKING_SET`` so they stream from L3/DRAM as in a model step.
- ``StepTiming``: compiled models through the runtime; a decode step at
  ``DECODE_POSITION`` (the cache filled once, then ``Model.rewind`` puts every run at
  the same place) and a ``PREFILL_TOKENS`` chunk just before it.

Each ``time(name, reps)`` returns the fastest of ``reps`` runs in seconds per call.
"""

from __future__ import annotations

import ctypes
import re
import time
from pathlib import Path

import numpy as np

KERNEL_THREADS = 1
WORKING_SET = 24 << 20
DECODE_POSITION = 1000  # attention over 1000 cached tokens: ~6 MB of KV per step
PREFILL_TOKENS = 64
STEPS = (("decode", 1), ("decode", 2), (f"prefill{PREFILL_TOKENS}", 1))  # (kind, threads)


class LinearTiming:
    """Timed linear kernels: one library (host cpu) with the kernel timer."""

    def __init__(self, module, specs, packs: dict, tgt=None):
        from sparsec.codegen import target
        from sparsec.codegen.autotune import TIMER_SOURCE, bind_timer

        self.specs = {s.name: s for s in specs}
        self.packs = packs
        self.lib = bind_timer(target.build_and_load(module, [TIMER_SOURCE], tgt))
        self.prepared: tuple[str, list, list] | None = None

    def _address(self, name: str) -> int:
        return ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value

    def _run(self, calls, reps: int) -> np.ndarray:
        from sparsec.codegen.autotune import time_calls

        return time_calls(self.lib, calls, 1, KERNEL_THREADS, reps)

    def prepare(self, name: str) -> None:
        """Replicate the weights to the working set (one aligned buffer, copies back to
        back) and quantize the input once for int8; keeps one item's buffers."""
        from sparsec.bench.bandwidth import aligned_buffer
        from sparsec.codegen.linear import quantized_row_bytes

        spec, packed = self.specs[name], self.packs[name]
        size = packed.data.nbytes
        copies = max(1, -(-WORKING_SET // size))
        blob = aligned_buffer(copies * size)
        for i in range(copies):
            blob[i * size : (i + 1) * size] = packed.data
        x = np.random.default_rng(0).standard_normal((1, spec.shape[1])).astype(np.float32)
        y = np.zeros((1, spec.shape[0]), np.float32)
        xq = np.zeros((1, quantized_row_bytes(spec.shape[1])), np.uint8)
        xs = np.zeros(1, np.float32)
        if spec.int8:
            quant = self._address(spec.quantize_name)
            self._run([(quant, 0, [x.ctypes.data, xq.ctypes.data, xs.ctypes.data, 0])], 1)
            args, kind = [xq.ctypes.data, xs.ctypes.data, y.ctypes.data], 1
        else:
            args, kind = [x.ctypes.data, y.ctypes.data, 0], 0
        fn = self._address(name)
        calls = [(fn, kind, [blob.ctypes.data + i * size, *args]) for i in range(copies)]
        self.prepared = (name, calls, [blob, x, y, xq, xs])  # buffers live with the calls
        self._run(calls, 1)  # warm up: page faults, code, frequency

    def time(self, name: str, reps: int) -> float:
        """Fastest of ``reps`` repetitions, in seconds per call."""
        if self.prepared is None or self.prepared[0] != name:
            self.prepare(name)
        calls = self.prepared[1]
        return float(self._run(calls, reps).min()) / len(calls)


class StepTiming:
    """Timed model steps through the runtime: decode at a fixed position (the cache is
    filled once, then ``rewind`` puts each repetition at the same place) and prefill."""

    def __init__(self, libraries: dict[str, Path]):
        self.libraries = libraries
        self.loaded: dict[tuple[str, int], object] = {}

    def _model(self, variant: str, threads: int):
        key = (variant, threads)
        if key not in self.loaded:
            from sparsec import runtime

            for other in [k for k in self.loaded if k[0] != variant]:  # one variant held
                self.loaded.pop(other).close()
            model = runtime.load(self.libraries[variant], threads=threads, verify=False)
            ids = np.random.default_rng(1).integers(0, 256, DECODE_POSITION)
            model.forward(ids, all_logits=False)  # fill the cache up to the decode position
            self.loaded[key] = model
        return self.loaded[key]

    @staticmethod
    def parse(name: str) -> tuple[str, str, int]:
        variant, step = name.split(":")
        kind, threads = re.fullmatch(r"(decode|prefill\d+)@(\d)t", step).groups()
        return variant, kind, int(threads)

    def prepare(self, name: str) -> None:
        variant, kind, threads = self.parse(name)
        self._model(variant, threads)
        self.time(name, 1)  # warm up

    def time(self, name: str, reps: int) -> float:
        variant, kind, threads = self.parse(name)
        model = self._model(variant, threads)
        if kind == "decode":
            position, tokens = DECODE_POSITION, [7]
        else:
            position = DECODE_POSITION - PREFILL_TOKENS
            tokens = list(range(1, PREFILL_TOKENS + 1))
        best = float("inf")
        for _ in range(reps):
            model.rewind(position)
            t0 = time.perf_counter()
            model.forward(tokens, all_logits=False)
            best = min(best, time.perf_counter() - t0)
        model.rewind(DECODE_POSITION)
        return best

    def close(self) -> None:
        for model in self.loaded.values():
            model.close()
        self.loaded.clear()
