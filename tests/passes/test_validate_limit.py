"""The attention fusion's onnxruntime check runs by default only up to
``VALIDATE_MAX_BYTES`` of weights (it holds them all again); above that it is skipped
and the report says so, and ``validate=True`` (``sparsec optimize --validate``) forces
it."""

from __future__ import annotations

import onnx_ir as ir

from sparsec.passes import attention, optimize, pipeline


def test_validation_limit(tiny_onnx, monkeypatch):
    calls = []
    real = attention.validate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "validate", counting)
    _, report = optimize(ir.load(tiny_onnx))
    assert calls and not report.skipped  # small: checked

    calls.clear()
    monkeypatch.setattr(pipeline, "VALIDATE_MAX_BYTES", 0)
    _, report = optimize(ir.load(tiny_onnx))
    assert not calls
    assert len(report.skipped) == 1 and "attention fusion" in report.skipped[0]

    _, report = optimize(ir.load(tiny_onnx), validate=True)
    assert calls and not report.skipped
