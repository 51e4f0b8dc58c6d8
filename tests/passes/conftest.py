"""Fixtures of the graph-pass tests: fresh copies of the tiny export, and the tiny graph
optimized once."""

from __future__ import annotations

import onnx_ir as ir
import pytest


@pytest.fixture
def exported(tiny_onnx):
    """A fresh ``onnx_ir.Model`` of the tiny export (passes change models in place)."""
    return ir.load(tiny_onnx)


@pytest.fixture(scope="session")
def optimized_tiny(tiny_onnx):
    """``(model, report)``: the tiny export through the whole pipeline, once."""
    from sparsec.passes import optimize

    return optimize(ir.load(tiny_onnx))
