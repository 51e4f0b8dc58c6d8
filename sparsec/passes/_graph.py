"""Small helpers shared by the passes: attributes, constants, fresh names."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def attr(node: ir.Node, name: str, default=None):
    """The value of attribute ``name`` of ``node``, or ``default``."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def const(value: ir.Value | None) -> np.ndarray | None:
    """The constant array of ``value``, or None when it is computed (or absent)."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def scalar(value: ir.Value | None) -> float | None:
    """The single element of a constant ``value`` as a float, else None."""
    array = const(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def is_op(node: ir.Node | None, op_type: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op_type and (node.domain or "") == domain


def value_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        names.update(o.name for o in node.outputs if o.name)
    return names


def unique_name(taken: set[str], base: str) -> str:
    """``base``, or ``base.N`` with the smallest N that is free; marks it taken."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}.{i}"
    taken.add(name)
    return name


def add_initializer(graph: ir.Graph, taken: set[str], base: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array)
    value = ir.Value(
        name=unique_name(taken, base),
        shape=ir.Shape(array.shape),
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    graph.register_initializer(value)
    return value


def add_lazy_initializer(
    graph: ir.Graph, taken: set[str], base: str, load, dtype: ir.DataType, shape: list[int]
) -> ir.Value:
    """An initializer whose array ``load()`` computes when it is read (a transposed or
    cut weight), not now: a pass holds no copy of the model's weights."""
    shape = ir.Shape(shape)

    def tensor():
        return ir.Tensor(np.ascontiguousarray(load()))

    value = ir.Value(
        name=unique_name(taken, base),
        shape=shape,
        type=ir.TensorType(dtype),
        const_value=ir.LazyTensor(tensor, dtype=dtype, shape=shape),
    )
    graph.register_initializer(value)
    return value
