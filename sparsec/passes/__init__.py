"""Graph passes: an exported sparsec graph into the optimized graph of
docs/graph-contract.md section 3 (fused RMSNorm, RoPE + attention + in-place KV cache,
SwiGLU, int8 weights, a sparsity record).

One pass per module: ``cleanup``, ``qdq``, ``fake_quant``, ``rmsnorm``, ``skip_rmsnorm``,
``rope``, ``attention``, ``swiglu``, ``names``, ``sparsity``; ``pipeline`` runs them,
``reference`` holds the numpy semantics of every op, ``functions`` their ONNX bodies.
Importing this package is cheap: onnx-ir and onnxscript load on first use.
"""

from __future__ import annotations


def optimize(model, *, validate: bool | None = None, check: bool = True):
    """Optimize an ``onnx_ir.Model`` in place; returns ``(model, OptimizeReport)``.
    ``validate``: the attention fusion's onnxruntime check (None: when the weights are
    small enough, ``pipeline.VALIDATE_MAX_BYTES``)."""
    from sparsec.passes.pipeline import optimize as run

    return run(model, validate=validate, check=check)


def optimize_file(src, dst, *, report: bool = False, validate: bool | None = None):
    """Optimize ``src`` (.onnx) into ``dst`` atomically; returns the OptimizeReport and
    prints it when ``report``."""
    from sparsec.passes.pipeline import optimize_file as run

    return run(src, dst, report=report, validate=validate)


__all__ = ["optimize", "optimize_file"]
