"""Gemm lowering (an onnx-ir pass): the exporter's 2-D ``Gemm`` into the contract's
``MatMul`` + bias ``Add``.

Rewrites ``Y = Gemm(A, B[, C])`` with ``alpha = beta = 1``, ``transA = 0``, a constant
weight ``B`` (an initializer, or ``DequantizeLinear`` of one) and a constant 1-D bias
``C`` into ``Y = Add(MatMul(A, B'), C)``, ``B' = B`` transposed when ``transB = 1``
(PyTorch's ``[out, in]`` Linear weight as the contract's ``[in, out]``). The dynamo
exporter writes a Linear on a 2-D input this way (OPT flattens the tokens before its
MLP); every later pass and the code generator know only MatMul.

A transposed initializer is a lazy tensor (read and transposed when the graph is saved
or compiled: no second copy in memory); a transposed ``DequantizeLinear`` becomes a
``Transpose`` node that the qdq pass folds into the int8 weight.
"""

from __future__ import annotations

import onnx_ir as ir

from sparsec.passes._graph import add_lazy_initializer, attr, const, is_op, unique_name, value_names
from sparsec.passes.report import PassReport


def _why_not(node: ir.Node) -> str | None:
    if attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0:
        return "alpha or beta is not 1"
    if attr(node, "transA", 0):
        return "transA is set"
    b = node.inputs[1]
    if not (
        b.const_value is not None
        or is_op(b.producer(), "DequantizeLinear")
        and b.producer().inputs[0].const_value is not None
    ):
        return "its weight is computed"
    if b.shape is None or b.shape.rank() != 2:
        return "its weight is not 2-D"
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is not None:
        bias = const(c)
        width = b.shape[0] if attr(node, "transB", 0) else b.shape[1]
        if bias is None or bias.ndim != 1 or bias.shape[0] != width:
            return "its bias is not a constant [out] vector"
    return None


class GemmToMatMulPass(ir.passes.InPlacePass):
    """``Gemm(A, W, b)`` -> ``Add(MatMul(A, W^T), b)`` (linear layers only)."""

    def __init__(self):
        super().__init__()
        self.report = PassReport("gemm")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        taken = value_names(graph)
        count = 0
        replaced: list[ir.Value] = []
        for node in list(graph):
            if not is_op(node, "Gemm"):
                continue
            why = _why_not(node)
            if why is not None:
                self.report.not_fused.append(f"Gemm {node.name!r} left as it is: {why}")
                continue
            a, b = node.inputs[0], node.inputs[1]
            c = node.inputs[2] if len(node.inputs) > 2 else None
            new_nodes = []
            if attr(node, "transB", 0):
                if b.const_value is not None:
                    replaced.append(b)
                    b = add_lazy_initializer(
                        graph,
                        taken,
                        f"{b.name}.T",
                        lambda t=b.const_value: t.numpy().T,
                        b.dtype,
                        list(b.shape)[::-1],
                    )
                else:
                    t = ir.node("Transpose", [b], {"perm": [1, 0]}, name=f"{node.name}.weight_t")
                    t.outputs[0].name = unique_name(taken, f"{b.name}.T")
                    new_nodes.append(t)
                    b = t.outputs[0]
            matmul = ir.node("MatMul", [a, b], name=unique_name(taken, f"{node.name}.matmul"))
            new_nodes.append(matmul)
            out = matmul.outputs[0]
            if c is not None:
                out.name = unique_name(taken, f"{node.name}.linear")
                add = ir.node("Add", [out, c], name=unique_name(taken, f"{node.name}.bias"))
                new_nodes.append(add)
                out = add.outputs[0]
            old = node.outputs[0]
            out.shape, out.type = old.shape, old.type
            graph.insert_before(node, new_nodes)
            old.replace_all_uses_with(out)
            if old.is_graph_output():
                graph.outputs[graph.outputs.index(old)] = out
                out.name, old.name = old.name, f"{old.name}.gemm"
            graph.remove(node, safe=True)
            count += 1
        if count:
            self.report.fused["MatMul (+ bias Add)"] = count
        for value in replaced:  # the untransposed weights, when nothing else reads them
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name, None)
        return ir.passes.PassResult(model, modified=count > 0)
