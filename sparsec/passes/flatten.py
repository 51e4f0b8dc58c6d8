"""Token flattening removal (an onnx-ir pass): no ``Reshape`` between ``[B, S, D]`` and
``[B*S, D]`` around row-wise work.

Rewrites
- a ``Reshape`` whose output has the same static or named shape as its input (the
  exporter's ``input_ids.view(-1, seq)``) into nothing;
- ``r = Reshape(x [B, S, D], [-1, D])`` (or of ``x [B, S, H, hd]`` to ``[-1, H*hd]``, the
  attention's heads merged on the way: GPT-2) whose every transitive reader, up to a
  ``Reshape(.., [B, S, W])`` back, works row by row (LayerNormalization and
  RMSNormalization over the last axis, ``MatMul`` by a constant weight, ``Add``/``Mul``/
  ``Sub``/``Div`` of two such rows or of a constant vector, element-wise activations,
  ``sparsec.PerTokenFakeQuant``) into the same work on ``x`` itself: OPT flattens its
  tokens around each MLP; the fusions then see the ``[B, S, D]`` residual stream they
  match in every other family.

A flattened region with any other reader (a shape computation, a graph output, an op
that mixes rows) is left as it is and named in the report. Rows are independent in
all of the above, so the result is the same tensor, unflattened.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sparsec import contract
from sparsec.passes._graph import add_initializer, attr, const, is_op, value_names
from sparsec.passes.report import PassReport

_UNARY = {"Relu", "Gelu", "Tanh", "Sigmoid", "Erf", "Neg", "Abs", "Sqrt"}
_BINARY = {"Add", "Mul", "Sub", "Div", "Pow"}
_NORMS = {"LayerNormalization", "RMSNormalization"}


def _known(shape: ir.Shape | None) -> bool:
    return shape is not None and all(
        isinstance(d, int) or getattr(d, "value", None) is not None for d in shape
    )


def _same(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    if not (_known(a) and _known(b)) or a.rank() != b.rank():
        return False
    return all(
        (x == y) if isinstance(x, int) or isinstance(y, int) else x.value == y.value
        for x, y in zip(a, b, strict=True)
    )


def _row_vector(value: ir.Value, width) -> bool:
    """A constant that broadcasts along rows: a scalar or a ``[width]`` vector."""
    array = const(value)
    return array is not None and (array.size == 1 or array.shape == (width,))


class _Region:
    """The values computed row by row from one flattening Reshape."""

    def __init__(self, start: ir.Value, target: ir.Shape):
        self.target = target  # [B, S, ...] of the unflattened tensor
        self.values: list[ir.Value] = [start]
        self.ends: list[ir.Node] = []  # Reshapes back to ``target``

    def grow(self) -> str | None:
        """Follow every reader; None when the region is closed, else why not."""
        seen = {id(self.values[0])}
        stack = [self.values[0]]
        while stack:
            value = stack.pop()
            if value.is_graph_output():
                return f"{value.name!r} is a graph output"
            for user, index in value.uses():
                why = self._accepts(user, index, value, seen)
                if why is not None:
                    return why
                if is_op(user, "Reshape"):
                    if user not in self.ends:
                        self.ends.append(user)
                    continue
                for out in user.outputs:
                    if id(out) not in seen:
                        seen.add(id(out))
                        self.values.append(out)
                        stack.append(out)
        return None

    def _accepts(self, user: ir.Node, index: int, value: ir.Value, seen: set) -> str | None:
        op = user.op_type if user.domain == "" else f"{user.domain}.{user.op_type}"
        width = value.shape[-1] if value.shape is not None else None
        if is_op(user, "Reshape") and index == 0:
            shape = user.outputs[0].shape
            if (
                shape is not None
                and shape.rank() == 3
                and _same(ir.Shape(list(shape)[:2]), ir.Shape(list(self.target)[:2]))
                and shape[2] == width
            ):
                return None
            rows = f"[{self.target[0]}, {self.target[1]}, W]"
            return f"Reshape {user.name!r} gives {shape}, not {rows}"
        if user.domain == "" and user.op_type in _NORMS and index == 0:
            if attr(user, "axis", -1) in (-1, 1):
                return None
        elif is_op(user, "MatMul") and index == 0:
            b = user.inputs[1]
            if b.shape is not None and b.shape.rank() == 2 and id(b) not in seen:
                return None
        elif user.domain == "" and user.op_type in _UNARY:
            return None
        elif user.domain == "" and user.op_type in _BINARY:
            other = user.inputs[1 - index]
            if id(other) in seen or _row_vector(other, width):
                return None
            if _reached_later(other, self.values[0]):
                return None  # the other addend is in the region too, reached later
        elif is_op(user, "PerTokenFakeQuant", contract.DOMAIN):
            return None
        return f"{op} {user.name!r} reads the flattened {value.name!r}"


def _reached_later(value: ir.Value, start: ir.Value) -> bool:
    """Whether ``value`` is computed from ``start`` (walking producers)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is start:
            return True
        if id(v) in seen or v.producer() is None:
            continue
        seen.add(id(v))
        stack.extend(i for i in v.producer().inputs if i is not None)
    return False


class RowFlattenPass(ir.passes.InPlacePass):
    """``Reshape`` to ``[B*S, D]`` and back around row-wise ops -> no Reshape."""

    def __init__(self):
        super().__init__()
        self.report = PassReport("flatten")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        taken = value_names(graph)
        identities = regions = 0
        for node in list(graph):
            if not is_op(node, "Reshape") or node.graph is None:
                continue
            x, out = node.inputs[0], node.outputs[0]
            if out.is_graph_output():
                continue
            if _same(x.shape, out.shape):
                out.replace_all_uses_with(x)
                graph.remove(node, safe=True)
                identities += 1
                continue
            if not (
                _known(x.shape)
                and x.shape.rank() in (3, 4)
                and out.shape is not None
                and out.shape.rank() == 2
                and isinstance(out.shape[1], int)
                and all(isinstance(d, int) for d in list(x.shape)[2:])
                and out.shape[1] == int(np.prod(list(x.shape)[2:]))
            ):
                continue
            region = _Region(out, x.shape)
            why = region.grow()
            if why is not None or not region.ends:
                self.report.not_fused.append(
                    f"flattening Reshape {node.name!r} kept: {why or 'never reshaped back'}"
                )
                continue
            rows = x
            if x.shape.rank() == 4:  # merge the heads: [B, S, H, hd] -> [B, S, H*hd]
                keep = add_initializer(graph, taken, "merge_heads", np.array([0, 0, -1]))
                merge = ir.node("Reshape", [x, keep], name=f"{node.name}.merge_heads")
                rows = merge.outputs[0]
                rows.name = f"{out.name}.rows"
                rows.shape = ir.Shape([x.shape[0], x.shape[1], out.shape[1]])
                rows.type = out.type
                graph.insert_before(node, merge)
            for end in region.ends:
                end.outputs[0].replace_all_uses_with(end.inputs[0])
            for value in region.values[1:]:
                if value.shape is not None and value.shape.rank() == 2:
                    value.shape = ir.Shape([x.shape[0], x.shape[1], value.shape[1]])
            out.replace_all_uses_with(rows)
            for end in region.ends:
                graph.remove(end, safe=True)
            graph.remove(node, safe=True)
            regions += 1
        if identities:
            self.report.notes.append(f"removed {identities} Reshape(s) to the same shape")
        if regions:
            self.report.fused["unflattened row-wise regions"] = regions
        return ir.passes.PassResult(model, modified=bool(identities or regions))
