"""Linear layers ``y[n, out] (+)= x[n, in] @ W[out, in]^T``: the public codegen API.

The pieces live in sibling modules: layouts and the numpy reference in linear_pack.py,
the IR emitter in linear_kernel.py, activation quantization in quantize.py, and the
host-measured format choice in autotune.py.

Kernel signatures (all shapes, strides, offsets are compile-time constants):

- fp32 formats: ``void name(const uint8_t* w, const float* x, float* y,
  int32 n_tokens, int32 tid, int32 nthreads)``
- int8 formats: ``void name(const uint8_t* w, const uint8_t* xq, const float* xscale,
  float* y, int32 n_tokens, int32 tid, int32 nthreads)`` where ``xq``/``xscale`` come
  from the kernel of ``emit_quantize_tokens`` (rows ``quantized_row_bytes(in)`` apart).

``w`` is the layer's ``PackedLinear.data`` placed 64-byte aligned in the weights blob.
Thread ``tid`` of ``nthreads`` writes a contiguous slice of output rows (by equal
rows for dense formats, by equal bytes for sparse ones); there is no barrier inside.
"""

from __future__ import annotations

from llvmlite import ir

from sparsec.codegen.linear_kernel import emit_linear_kernel
from sparsec.codegen.linear_pack import (
    LINEAR_FORMATS,
    PackedLinear,
    pack_linear,
    pack_linear_quantized,
    reference_linear,
    unpack_weight,
    weight_scale,
)
from sparsec.codegen.quantize import (
    emit_quantize_tokens,
    quantize_tokens_reference,
    quantize_weight_rows,
    quantized_row_bytes,
)
from sparsec.codegen.target import Target

__all__ = [
    "LINEAR_FORMATS",
    "PackedLinear",
    "choose_linear_format",
    "emit_linear",
    "emit_quantize_tokens",
    "pack_linear",
    "pack_linear_quantized",
    "quantize_tokens_reference",
    "quantize_weight_rows",
    "quantized_row_bytes",
    "reference_linear",
    "unpack_weight",
    "weight_scale",
]


def emit_linear(
    module: ir.Module,
    name: str,
    packed: PackedLinear,
    *,
    max_tokens: int,
    accumulate: bool = False,
    x_stride: int | None = None,
    y_stride: int | None = None,
    target: Target | None = None,
) -> ir.Function:
    """Emit the kernel ``name`` computing ``packed``'s layer into ``module``.

    ``x_stride``: elements between token rows of x (int8: bytes between rows of xq,
    default ``quantized_row_bytes(in)``); ``y_stride``: floats between rows of y.
    ``accumulate``: ``y += x @ W.T`` (fuses the residual add). ``target``: the ISA and
    CPU tuning (default: this host's).
    """
    return emit_linear_kernel(
        module,
        name,
        packed,
        max_tokens=max_tokens,
        accumulate=accumulate,
        x_stride=x_stride,
        y_stride=y_stride,
        target=target,
    )


def choose_linear_format(*args, **kwargs) -> str:
    """See ``sparsec.codegen.autotune.choose_linear_format``."""
    from sparsec.codegen.autotune import choose_linear_format as choose

    return choose(*args, **kwargs)
