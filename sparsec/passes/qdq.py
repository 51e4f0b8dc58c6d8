"""Q/DQ folding: quantized weights into the contract's ``DequantizeLinear`` form.

Rewrites the ``B`` input of every ``MatMul`` that is a quantized constant weight:

- ``DequantizeLinear(QuantizeLinear(W))`` of a float initializer (fake-quantized
  weights): quantized here, once, into an int8 initializer;
- ``DequantizeLinear(Wq)`` of an int8 initializer with a zero zero-point, or of a
  uint8 one with zero-point 128 (shifted to int8 exactly), as onnxruntime's
  quantization tools write it;
- either of them behind a ``Transpose`` (``[out, in]`` weights), transposed here;

into ``DequantizeLinear(Wq int8 [in, out], scale float32 [out], axis=1)`` with no zero
point (docs/graph-contract.md "Quantized weights"). A per-tensor scale becomes a
per-output-channel one. The values the MatMul sees are unchanged bit for bit.

Not folded, and reported: asymmetric zero points, scales per *input* channel, blocked
quantization, non-constant weights. Activation ``QuantizeLinear``/``DequantizeLinear``
pairs (static activation quantization) have no op in the contract and are left as
they are; per-token activation quantization is the ``fake_quant`` pass.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sparsec.passes._graph import add_initializer, attr, is_op, unique_name, value_names
from sparsec.passes.report import PassReport


class NotFoldable(Exception):
    """Why a weight's Q/DQ chain does not fold (goes into the report)."""


def _const(value: ir.Value | None, what: str) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is None:
        raise NotFoldable(f"{what} {value.name!r} is not a constant")
    return value.const_value.numpy()


def _along(t: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if t.ndim == 0:
        return t
    shape = [1] * ndim
    shape[axis] = t.shape[0]
    return t.reshape(shape)


def _quantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int, dtype):
    """ONNX ``QuantizeLinear``: saturate(round_half_even(w / scale) + zero_point)."""
    info = np.iinfo(dtype)
    s = _along(scale, axis, w.ndim)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.round(w / s)
    q = np.where(s == 0, 0.0, q)  # a zero scale dequantizes to 0 whatever q is
    if zp is not None:
        q = q + _along(zp.astype(np.float32), axis, w.ndim)
    return np.clip(q, info.min, info.max).astype(dtype)


def _same_const(a: ir.Value | None, b: ir.Value | None) -> bool:
    if a is None or b is None:
        return a is b
    if a is b:
        return True
    if a.const_value is None or b.const_value is None:
        return False
    x, y = a.const_value.numpy(), b.const_value.numpy()
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def _fold(weight: ir.Value) -> tuple[np.ndarray, np.ndarray] | None:
    """``(Wq int8 [in, out], scale [out])`` for a foldable quantized weight, None when
    ``weight`` is not quantized; raises NotFoldable with the reason otherwise."""
    node = weight.producer()
    transposed = False
    if is_op(node, "Transpose"):
        if tuple(attr(node, "perm", (1, 0))) != (1, 0):
            return None
        transposed = True
        node = node.inputs[0].producer()
    if not is_op(node, "DequantizeLinear"):
        return None
    dq = node
    if attr(dq, "block_size", 0):
        raise NotFoldable(f"DequantizeLinear {dq.name!r} uses blocked quantization")
    if attr(dq, "output_dtype", 0) not in (0, ir.DataType.FLOAT):
        raise NotFoldable(f"DequantizeLinear {dq.name!r} does not output float32")
    x, scale_v = dq.inputs[0], dq.inputs[1]
    zp_v = dq.inputs[2] if len(dq.inputs) > 2 else None
    scale = _const(scale_v, "scale")
    zp = _const(zp_v, "zero point")
    source = x.producer()
    if is_op(source, "QuantizeLinear"):
        q_zp = source.inputs[2] if len(source.inputs) > 2 else None
        if not (
            _same_const(source.inputs[1], scale_v)
            and _same_const(q_zp, zp_v)
            and attr(source, "axis", 1) == attr(dq, "axis", 1)
        ):
            raise NotFoldable(
                f"QuantizeLinear {source.name!r} and DequantizeLinear {dq.name!r} use "
                "different scales, zero points or axes"
            )
        w = _const(source.inputs[0], "weight")
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            raise NotFoldable(f"QuantizeLinear {source.name!r} does not quantize a float32 matrix")
        if attr(source, "block_size", 0):
            raise NotFoldable(f"QuantizeLinear {source.name!r} uses blocked quantization")
        dtype = zp.dtype if zp is not None else np.uint8
        if attr(source, "output_dtype", 0):
            dtype = ir.DataType(attr(source, "output_dtype", 0)).numpy()
        axis = attr(dq, "axis", 1) % 2
        q = _quantize(w, scale.astype(np.float32), zp, axis, dtype)
    else:
        q = _const(x, "quantized weight")
        if q is None or q.ndim != 2:
            raise NotFoldable(f"DequantizeLinear {dq.name!r} does not dequantize a 2-D weight")
        axis = attr(dq, "axis", 1) % 2
    if scale.dtype != np.float32:
        raise NotFoldable(f"DequantizeLinear {dq.name!r}: scale is {scale.dtype}, not float32")
    # Shift to symmetric int8 when that is exact.
    if q.dtype == np.uint8 and zp is not None and np.all(zp == 128):
        q = (q.astype(np.int16) - 128).astype(np.int8)
    elif q.dtype == np.int8 and (zp is None or not np.any(zp)):
        pass
    else:
        raise NotFoldable(
            f"DequantizeLinear {dq.name!r}: {q.dtype} weights with a non-symmetric zero point "
            "(the contract has symmetric int8 weights only)"
        )
    if transposed:
        q, axis = np.ascontiguousarray(q.T), 1 - axis
    if scale.ndim == 0 or scale.size == 1:
        scale = np.full(q.shape[1], scale.reshape(()), np.float32)
    elif axis != 1:
        raise NotFoldable(
            f"DequantizeLinear {dq.name!r}: scales per input channel (the contract has one "
            "scale per output channel)"
        )
    return q, scale.astype(np.float32)


def _is_contract_form(weight: ir.Value) -> bool:
    dq = weight.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) > 2:
        return False
    q, scale = dq.inputs[0], dq.inputs[1]
    return (
        q.const_value is not None
        and q.const_value.dtype == ir.DataType.INT8
        and len(q.shape or ()) == 2
        and scale.const_value is not None
        and scale.const_value.dtype == ir.DataType.FLOAT
        and list(scale.shape or ()) == [q.shape[1]]
        and attr(dq, "axis", 1) in (1, -1)
    )


class FoldWeightQDQPass(ir.passes.InPlacePass):
    """Quantized MatMul weights into ``DequantizeLinear(Wq int8 [in, out], scale [out])``."""

    def __init__(self):
        super().__init__()
        self.report = PassReport("qdq")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded: dict[int, ir.Value] = {}  # id(original B value) -> contract-form value
        failures: dict[str, str] = {}
        taken = value_names(graph)
        already: set[str] = set()
        for node in list(graph):
            if not is_op(node, "MatMul") or len(node.inputs) != 2 or node.inputs[1] is None:
                continue
            weight = node.inputs[1]
            if _is_contract_form(weight):
                already.add(weight.name)
                continue
            if id(weight) not in folded:
                try:
                    result = _fold(weight)
                except NotFoldable as e:
                    failures[weight.name] = str(e)
                    continue
                if result is None:
                    continue
                q, scale = result
                base = weight.name or "weight"
                q_init = add_initializer(graph, taken, f"{base}.int8", q)
                s_init = add_initializer(graph, taken, f"{base}.scale", scale)
                dq = ir.node(
                    "DequantizeLinear",
                    [q_init, s_init],
                    attributes={"axis": 1},
                    name=unique_name(taken, f"{base}.dq"),
                )
                out = dq.outputs[0]
                out.name = unique_name(taken, f"{base}.dequantized")
                out.shape, out.type = ir.Shape(q.shape), ir.TensorType(ir.DataType.FLOAT)
                graph.insert_before(node, dq)
                folded[id(weight)] = dq.outputs[0]
            node.replace_input_with(1, folded[id(weight)])
        if folded:
            self.report.fused["DequantizeLinear int8 weight"] = len(folded)
        if already:
            self.report.notes.append(f"{len(already)} weights already in the contract's int8 form")
        for name, why in failures.items():
            self.report.not_fused.append(f"weight {name!r}: {why}")
        activation_q = sum(
            1 for n in graph if is_op(n, "QuantizeLinear") and n.inputs[0].const_value is None
        )
        if activation_q:
            self.report.not_fused.append(
                f"{activation_q} QuantizeLinear nodes on activations (static activation "
                "quantization has no op in the contract; left as they are)"
            )
        return ir.passes.PassResult(model, modified=bool(folded))
