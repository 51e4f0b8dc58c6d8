"""Sparsity record (an onnx-ir pass): ``sparsec.sparsity`` metadata for every weight.

For each weight a MatMul or SwiGLU reads (the int8 initializer behind a
DequantizeLinear), records ``{"shape", "sparsity", "pattern"}`` under the initializer's
name in the ``sparsec.sparsity`` metadata (JSON), where codegen reads it. ``sparsity``
is the fraction of exact zeros; ``pattern`` classifies them, with groups and blocks
running along the *input* axis (axis 0 of the stored ``[in, out]`` weight; the columns
of PyTorch's ``[out, in]``), as sparsify prunes and the kernels walk:

- ``dense``: fewer than 5% zeros;
- ``N:M`` (``1:4``, ``2:4``, ``4:8``, tightest first): every aligned group of M inputs of
  an output has at most N non-zeros;
- ``block1xK`` (K = 64, 32, 16, largest first): every aligned run of K inputs of an
  output is all zero or has no zero;
- ``unstructured``: anything else.

Only metadata changes.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from sparsec import contract
from sparsec.passes._graph import is_op
from sparsec.passes.names import weight_initializers
from sparsec.passes.report import PassReport, SparsityRow

DENSE_BELOW = 0.05
NM_PATTERNS = ((1, 4), (2, 4), (4, 8))
BLOCK_SIZES = (64, 32, 16)


def classify(w: np.ndarray) -> tuple[float, str]:
    """``(sparsity, pattern)`` of a weight stored ``[in, out]``."""
    nonzero = np.ascontiguousarray((w != 0).T)  # [out, in]: groups run along the inputs
    sparsity = 1.0 - float(nonzero.mean()) if nonzero.size else 0.0
    if sparsity < DENSE_BELOW:
        return sparsity, "dense"
    inputs = nonzero.shape[-1]
    for n, m in NM_PATTERNS:
        if inputs % m == 0 and nonzero.reshape(-1, m).sum(axis=1).max() <= n:
            return sparsity, f"{n}:{m}"
    for k in BLOCK_SIZES:
        if inputs % k == 0:
            blocks = nonzero.reshape(-1, k)
            if np.array_equal(blocks.all(axis=1), blocks.any(axis=1)):
                return sparsity, f"block1x{k}"
    return sparsity, "unstructured"


def weight_inputs(graph: ir.Graph) -> list[ir.Value]:
    """The weight inputs of MatMuls and SwiGLUs, in graph order, once each."""
    seen, found = set(), []
    for node in graph:
        if is_op(node, "MatMul"):
            candidates = [node.inputs[1]]
        elif is_op(node, "SwiGLU", contract.DOMAIN):
            candidates = list(node.inputs[1:4])
        else:
            continue
        for value in candidates:
            hit = weight_initializers(value)
            if hit is not None and id(hit[0]) not in seen:
                seen.add(id(hit[0]))
                found.append(hit[0])
    return found


class SparsityRecordPass(ir.passes.InPlacePass):
    """Per-weight sparsity and pattern into the ``sparsec.sparsity`` metadata."""

    def __init__(self, roles: dict | None = None):
        super().__init__()
        self.roles = roles or {}
        self.report = PassReport("sparsity")
        self.rows: list[SparsityRow] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        record = {}
        for weight in weight_inputs(model.graph):
            array = weight.const_value.numpy()
            sparsity, kind = classify(array)
            record[weight.name] = {
                "shape": list(array.shape),
                "sparsity": round(sparsity, 6),
                "pattern": kind,
            }
            layer, role = self.roles.get(weight.name, (None, weight.name))
            self.rows.append(
                SparsityRow(
                    weight.name, layer, role.split(".")[-1], list(array.shape), sparsity, kind
                )
            )
        model.metadata_props[contract.META_SPARSITY] = json.dumps(record)
        kinds = sorted({r.pattern for r in self.rows})
        self.report.notes.append(
            f"{len(record)} weights recorded; patterns: {', '.join(kinds) or 'none'}"
        )
        return ir.passes.PassResult(model, modified=True)
