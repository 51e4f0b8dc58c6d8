"""Cleanup: onnx-ir's common passes plus onnxscript's constant folding.

Rewrites:
- constant subexpressions into initializers and no-op ``Cast`` nodes away (onnxscript
  ``fold_constants`` with node-level shape inference), including
  a ``Transpose`` of a weight initializer of any size (the tied ``lm_head`` of a
  dynamo export is ``MatMul(x, Transpose(embedding))``: the contract wants an
  initializer ``[in, out]`` there);
- ``Constant`` nodes into initializers, ``Identity`` nodes away, common subexpressions
  into one, unused nodes, initializers and opset imports away, nodes into topological
  order (onnx-ir common passes).

Nothing here changes what the graph computes.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from sparsec.passes.report import PassReport


def _fold_weight_transposes(node: ir.Node) -> bool | None:
    # Always fold a Transpose of an initializer, whatever its size; leave every other
    # decision (and the Q/DQ ops, kept for the qdq pass) to the folder's defaults.
    if node.op_type == "Transpose" and node.domain == "" and node.inputs[0] is not None:
        if node.inputs[0].const_value is not None:
            return True
    return None


class CleanupPass(ir.passes.InPlacePass):
    """Constant folding, identity elimination, CSE, unused-node removal, topological sort."""

    def __init__(self, name: str = "cleanup", *, fold: bool = True):
        super().__init__()
        self.fold = fold
        self.report = PassReport(name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.optimizer import fold_constants

        before = len(model.graph)
        if self.fold:
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
            fold_constants(
                model,
                onnx_shape_inference=True,  # types let it drop no-op Casts (TorchScript)
                output_size_limit=1 << 40,  # weights may be large; they are folded once
                should_fold=_fold_weight_transposes,
            )
        for p in (
            common.IdentityEliminationPass(),
            common.CommonSubexpressionEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedOpsetsPass(),
            common.TopologicalSortPass(),
        ):
            p(model)
        after = len(model.graph)
        if after != before:
            self.report.notes.append(
                f"removed {before - after} nodes (folded, duplicate or unused)"
            )
        return ir.passes.PassResult(model, modified=after != before)
