"""Fused-projection splitting (an onnx-ir pass): one MatMul per slice of its output.

Rewrites ``MatMul(x, W)`` whose output is only cut into column blocks, by ``Slice``
on the last axis (step 1, constant bounds) or ``Split`` on the last axis, into one
``MatMul(x, W[:, a:b])`` per block, when ``W`` is a constant float32 ``[in, out]``
initializer or the contract's ``DequantizeLinear(int8 [in, out], scale [out], axis=1)``
(split with its scales). The blocks must tile the columns exactly (no overlap, no
column unread).

A constant ``[out]`` bias ``Add`` between the MatMul and the cut (GPT-2's ``c_attn``) is
cut with it: each block gets its MatMul and its part of the bias. A float weight's
blocks are lazy tensors, cut from the weight when read (the code generator reads one
layer at a time): the pass holds no copy of the weights (a 7B's Wqkv held 6 GB).

Phi-3 stores q|k|v as one ``qkv_proj`` and gate|up as one ``gate_up_proj``; after the
split the graph has the Llama form, so the attention and SwiGLU fusions match it as
they are, and the code generator fuses the MatMuls that share an input back into one
linear (program.py). The weight values are unchanged, only cut.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from sparsec.passes._graph import (
    add_initializer,
    add_lazy_initializer,
    attr,
    const,
    is_op,
    unique_name,
    value_names,
)
from sparsec.passes.report import PassReport


def _weight(value: ir.Value) -> tuple[np.ndarray, np.ndarray | None, ir.Node | None] | None:
    """``(w [in, out], scale [out] | None, dq node | None)`` of a splittable weight."""
    w = const(value)
    if w is not None:
        return (w, None, None) if w.dtype == np.float32 and w.ndim == 2 else None
    dq = value.producer()
    if not is_op(dq, "DequantizeLinear") or len(dq.inputs) > 2 and dq.inputs[2] is not None:
        return None
    q, scale = const(dq.inputs[0]), const(dq.inputs[1])
    if q is None or scale is None or q.dtype != np.int8 or q.ndim != 2:
        return None
    if scale.ndim != 1 or scale.shape[0] != q.shape[1] or attr(dq, "axis", 1) not in (1, -1):
        return None
    return q, scale, dq


def _ints(value: ir.Value | None) -> list[int] | None:
    array = const(value)
    return None if array is None else [int(a) for a in array.reshape(-1)]


def _blocks(out: ir.Value, width: int) -> list[tuple[ir.Value, int, int]] | None:
    """``[(block output, start, end)]`` when every use of ``out`` cuts columns."""
    rank = out.shape.rank() if out.shape is not None else None
    last = None if rank is None else rank - 1
    blocks = []
    for user, index in out.uses():
        if index != 0:
            return None
        if is_op(user, "Slice"):
            starts, ends = _ints(user.inputs[1]), _ints(user.inputs[2])
            axes = _ints(user.inputs[3]) if len(user.inputs) > 3 else None
            steps = _ints(user.inputs[4]) if len(user.inputs) > 4 else None
            if starts is None or ends is None or len(starts) != 1 or axes not in ([-1], [last]):
                return None
            if steps not in (None, [1]) or not 0 <= starts[0] < width:
                return None
            blocks.append((user.outputs[0], starts[0], min(ends[0], width)))
        elif is_op(user, "Split") and attr(user, "axis", 0) in (-1, last):
            sizes = _ints(user.inputs[1]) if len(user.inputs) > 1 else None
            parts = len(user.outputs)
            if sizes is None:
                if attr(user, "num_outputs") != parts or width % parts:
                    return None  # uneven num_outputs splits: not needed so far
                sizes = [width // parts] * parts
            start = 0
            for value, size in zip(user.outputs, sizes, strict=True):
                blocks.append((value, start, start + size))
                start += size
        else:
            return None
    if any(value.is_graph_output() for value, _, _ in blocks):
        return None
    blocks.sort(key=lambda b: b[1])
    edges = [0] + [b[2] for b in blocks]
    if not blocks or any(b[1] != e for b, e in zip(blocks, edges, strict=False)):
        return None
    return blocks if edges[-1] == width and len(blocks) > 1 else None


def _index(add: ir.Node, out_of: ir.Node) -> int:
    """Which input of ``add`` the MatMul ``out_of`` computes."""
    return 0 if add.inputs[0] is out_of.outputs[0] else 1


def _bias_add(out: ir.Value, width: int) -> ir.Node | None:
    """The one ``Add`` of a constant ``[width]`` bias that alone reads ``out``, if any."""
    users = list(out.uses())
    if len(users) != 1 or not is_op(users[0][0], "Add"):
        return None
    add = users[0][0]
    bias = const(add.inputs[1 - users[0][1]])
    if bias is None or bias.shape != (width,) or add.outputs[0].is_graph_output():
        return None
    return add


class SplitFusedLinearPass(ir.passes.InPlacePass):
    """``Slice``/``Split`` of ``MatMul(x, W)`` columns -> one MatMul per block."""

    def __init__(self):
        super().__init__()
        self.report = PassReport("split fused linears")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        taken = value_names(graph)
        count = 0
        for node in list(graph):
            if not is_op(node, "MatMul") or node.outputs[0].is_graph_output():
                continue
            found = _weight(node.inputs[1])
            if found is None:
                continue
            w, scale, dq = found
            out, bias = node.outputs[0], None
            add = _bias_add(out, w.shape[1])
            if add is not None:
                out, bias = add.outputs[0], const(add.inputs[1 - _index(add, out_of=node)])
            blocks = _blocks(out, w.shape[1])
            if blocks is None:
                continue
            base = (dq.inputs[0] if dq is not None else node.inputs[1]).name
            at = node
            source = node.inputs[1].const_value if dq is None else None
            rows = w.shape[0]
            for value, start, end in blocks:
                if source is not None:  # cut when read: no copy of a 7B's Wqkv here
                    part = add_lazy_initializer(
                        graph,
                        taken,
                        f"{base}.cols{start}",
                        lambda t=source, a=start, b=end: t.numpy()[:, a:b],
                        ir.DataType.FLOAT,
                        [rows, end - start],
                    )
                else:
                    part = add_initializer(graph, taken, f"{base}.cols{start}", w[:, start:end])
                if dq is not None:
                    s = add_initializer(graph, taken, f"{base}.cols{start}.scale", scale[start:end])
                    deq = ir.node("DequantizeLinear", [part, s], {"axis": 1})
                    deq.outputs[0].name = unique_name(taken, f"{base}.cols{start}.dq")
                    graph.insert_after(at, deq)
                    at, part = deq, deq.outputs[0]
                mm = ir.node("MatMul", [node.inputs[0], part])
                mm.name = unique_name(taken, f"{node.name or 'matmul'}.cols{start}")
                mm.outputs[0].name = unique_name(taken, f"{node.outputs[0].name}.cols{start}")
                mm.outputs[0].shape, mm.outputs[0].type = value.shape, value.type
                graph.insert_after(at, mm)
                at, result = mm, mm.outputs[0]
                if bias is not None:
                    b = add_initializer(graph, taken, f"{base}.bias.cols{start}", bias[start:end])
                    plus = ir.node("Add", [result, b], name=unique_name(taken, f"{mm.name}.bias"))
                    plus.outputs[0].name = unique_name(taken, f"{result.name}.biased")
                    plus.outputs[0].shape, plus.outputs[0].type = value.shape, value.type
                    graph.insert_after(at, plus)
                    at, result = plus, plus.outputs[0]
                ir.convenience.replace_all_uses_with(value, result)
            count += 1
        if count:
            common.RemoveUnusedNodesPass()(model)
            self.report.fused["MatMul split"] = count
        return ir.passes.PassResult(model, modified=bool(count))
