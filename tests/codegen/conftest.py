"""Helpers for codegen tests: compile linear kernels once per shape and call them."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from isa_helpers import host_target_or_skip, skip_unless_offered
from llvmlite import ir

from sparsec.codegen import target
from sparsec.codegen.linear import emit_linear, emit_quantize_tokens, pack_linear
from sparsec.codegen.quantize import quantized_row_bytes

P = ctypes.c_void_p
I32 = ctypes.c_int32


class LinearKernel:
    """A compiled linear kernel (plus its quantize kernel for int8 formats).

    The code depends only on format, shape and options, never on the weight values,
    so one build serves every weight of that shape.
    """

    def __init__(self, fmt, out_features, in_features, max_tokens, tgt=None, **emit_kwargs):
        tgt = tgt or target.default_target()
        self.isa = tgt.isa
        module = ir.Module()
        dummy = pack_linear(np.zeros((out_features, in_features), np.float32), fmt, tgt.isa)
        emit_linear(module, "lin", dummy, max_tokens=max_tokens, target=tgt, **emit_kwargs)
        self.int8 = fmt.endswith("_i8")
        self.in_features = in_features
        self.x_stride = emit_kwargs.get("x_stride")
        if self.int8:
            emit_quantize_tokens(module, "quant", in_features, max_tokens=max_tokens, isa=tgt.isa)
        self.lib = target.build_and_load(module, target=tgt)
        self.fn = self.lib.lin
        self.fn.restype = None
        self.fn.argtypes = [P, P, P, P, I32, I32, I32] if self.int8 else [P, P, P, I32, I32, I32]
        if self.int8:
            self.quant = self.lib.quant
            self.quant.restype = None
            self.quant.argtypes = [P, P, P, I32, I32, I32]

    def quantize(self, x: np.ndarray, n: int):
        xq = np.zeros((n, quantized_row_bytes(self.in_features)), np.uint8)
        xs = np.zeros(n, np.float32)
        self.quant(x.ctypes.data, xq.ctypes.data, xs.ctypes.data, n, 0, 1)
        return xq, xs

    def __call__(self, data, x, y, n, nthreads=1, tids=None):
        """Run tid slices (default: all, in order) of ``y (+)= x[:n] @ W.T`` in place."""
        assert x.flags.c_contiguous and y.flags.c_contiguous
        tids = range(nthreads) if tids is None else tids
        if self.int8:
            xq, xs = self.quantize(x, n)
            if self.x_stride is not None:  # the kernel reads xq rows x_stride bytes apart
                wide = np.full((n, self.x_stride), 0x55, np.uint8)
                wide[:, : xq.shape[1]] = xq
                xq = wide
            for tid in tids:
                self.fn(
                    data.ctypes.data,
                    xq.ctypes.data,
                    xs.ctypes.data,
                    y.ctypes.data,
                    n,
                    tid,
                    nthreads,
                )
        else:
            for tid in tids:
                self.fn(data.ctypes.data, x.ctypes.data, y.ctypes.data, n, tid, nthreads)
        return y


_KERNELS: dict = {}


@pytest.fixture(scope="session")
def kernel_for():
    """``kernel_for(fmt, out, in, max_tokens, target)``: a LinearKernel for an explicit
    target (tests comparing two ISAs' kernels on one CPU)."""
    return LinearKernel


@pytest.fixture(scope="session", params=list(target.ISAS.values()), ids=lambda isa: isa.name)
def isa(request) -> target.Isa:
    """Each ISA sparsec emits code for (skipped where this CPU cannot run it)."""
    host_target_or_skip(request.param)
    return request.param


@pytest.fixture(scope="session")
def linear_kernel(isa):
    """``linear_kernel(fmt, out, in, max_tokens, **emit_kwargs)`` for the ``isa`` fixture's
    ISA (pack weights with ``pack_linear(w, fmt, isa)``), cached per session."""
    tgt = host_target_or_skip(isa)

    def get(fmt, out_features, in_features, max_tokens=16, **emit_kwargs):
        skip_unless_offered(isa, fmt)
        key = (isa.name, fmt, out_features, in_features, max_tokens)
        key += (tuple(sorted(emit_kwargs.items())),)
        if key not in _KERNELS:
            _KERNELS[key] = LinearKernel(
                fmt, out_features, in_features, max_tokens, tgt, **emit_kwargs
            )
        return _KERNELS[key]

    return get
