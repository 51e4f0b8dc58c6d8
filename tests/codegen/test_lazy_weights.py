"""Lowering keeps no copy of the float weights (issue 22): each linear weight is read
from the graph when the emitter packs it, so a graph of many GB (memory-mapped external
data, or lazy reads of a checkpoint in `sparsec build`) is never held whole."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sparsec.codegen.program import lower
from sparsec.passes import optimize


def test_lowered_weights_are_read_on_demand(tiny_onnx):
    model, _ = optimize(ir.load(tiny_onnx))
    graph_weights = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    prog = lower(model, where="tiny")
    weights = [w for ins in prog.linears() for w in ins.args["weights"]]
    assert weights
    for w in weights:
        assert callable(w.source), w.name  # no array kept by the program
        value = w.value
        assert value.shape == w.shape and value.flags.c_contiguous
        np.testing.assert_array_equal(value, graph_weights[w.name].T)  # [out, in]
