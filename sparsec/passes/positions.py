"""Learned-position offset folding (an onnx-ir pass).

Rewrites ``Gather(table, Add(position_ids, c))`` with a constant integer ``c >= 0`` and
a constant 2-D ``table`` into ``Gather(table[c:], position_ids)``: OPT's learned
positional embedding reads row ``position + 2`` of its table. After it, every learned
position table is read at ``position_ids`` itself, as the contract states (row ``p``
is position ``p``); the code generator gathers those rows with the embedding kernel.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sparsec import contract
from sparsec.passes._graph import add_initializer, attr, const, is_op, value_names
from sparsec.passes.report import PassReport


class LearnedPositionsPass(ir.passes.InPlacePass):
    """``Gather(table, position_ids + c)`` -> ``Gather(table[c:], position_ids)``."""

    def __init__(self):
        super().__init__()
        self.report = PassReport("positions")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        taken = value_names(graph)
        count = 0
        for node in list(graph):
            if not is_op(node, "Gather") or attr(node, "axis", 0) != 0:
                continue
            table, index = node.inputs
            add = index.producer()
            if not is_op(add, "Add") or const(table) is None or const(table).ndim != 2:
                continue
            names = [v.name for v in add.inputs]
            if contract.POSITION_IDS not in names:
                continue
            offset = const(add.inputs[1 - names.index(contract.POSITION_IDS)])
            if offset is None or offset.size != 1 or offset.dtype.kind not in "iu":
                continue
            c = int(offset.reshape(()))
            rows = const(table)
            if not 0 <= c < rows.shape[0]:
                self.report.not_fused.append(f"Gather {node.name!r}: offset {c} out of the table")
                continue
            sliced = add_initializer(
                graph, taken, f"{table.name}.from_{c}", np.ascontiguousarray(rows[c:])
            )
            position_ids = add.inputs[names.index(contract.POSITION_IDS)]
            node.replace_input_with(0, sliced)
            node.replace_input_with(1, position_ids)
            if not add.outputs[0].uses():
                graph.remove(add, safe=True)
            if not table.uses() and not table.is_graph_output():
                graph.initializers.pop(table.name, None)
            count += 1
        if count:
            self.report.fused["position offsets folded"] = count
        return ir.passes.PassResult(model, modified=count > 0)
