"""qdq pass: quantized weights in every form we meet become the contract's
DequantizeLinear(int8 [in, out], scale [out], axis=1), computing the same."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from passes_helpers import assert_pass_preserves, ops

from sparsec.passes import optimize
from sparsec.passes.cleanup import CleanupPass
from sparsec.passes.qdq import FoldWeightQDQPass
from sparsec.passes.verify import compare


def _per_channel(w: np.ndarray, axis: int):
    """Symmetric int8 per-channel quantization along ``axis`` of ``w``."""
    s = (np.abs(w).max(axis=1 - axis) / 127).astype(np.float32)
    shape = [1, 1]
    shape[axis] = -1
    safe = np.where(s > 0, s, 1).reshape(shape)  # the tied lm_head has an all-zero column
    q = np.clip(np.round(w / safe), -127, 127).astype(np.int8)
    return q, s


def _init(graph, name, array):
    v = ir.Value(
        name=name,
        const_value=ir.tensor(array),
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.tensor(array).dtype),
    )
    graph.register_initializer(v)
    return v


def _quantize_weights(model, form: str) -> int:
    """Replace every MatMul's constant weight by a quantized form; returns how many."""
    graph = model.graph
    done = 0
    for node in list(graph):
        w = node.inputs[1] if node.op_type == "MatMul" else None
        if w is None or w.const_value is None:
            continue
        array = w.const_value.numpy()
        base = f"q{done}"
        if form == "fake_quant":  # DQ(Q(float W)), per output channel, int8 zero points
            _, s = _per_channel(array, 1)
            scale, zp = (
                _init(graph, base + "s", s),
                _init(graph, base + "z", np.zeros_like(s, np.int8)),
            )
            q = ir.node("QuantizeLinear", [w, scale, zp], {"axis": 1})
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], {"axis": 1})
            new = [q, dq]
        elif form == "transposed":  # int8 [out, in], per row, then Transpose
            qa, s = _per_channel(np.ascontiguousarray(array.T), 0)
            dq = ir.node(
                "DequantizeLinear",
                [_init(graph, base, qa), _init(graph, base + "s", s)],
                {"axis": 0},
            )
            t = ir.node("Transpose", [dq.outputs[0]], {"perm": [1, 0]})
            new = [dq, t]
        elif form == "uint8":  # per-tensor uint8 with zero point 128
            s = np.float32(np.abs(array).max() / 127)
            qa = (np.clip(np.round(array / s), -127, 127) + 128).astype(np.uint8)
            dq = ir.node(
                "DequantizeLinear",
                [
                    _init(graph, base, qa),
                    _init(graph, base + "s", s),
                    _init(graph, base + "z", np.uint8(128)),
                ],
            )
            new = [dq]
        elif form == "asymmetric":
            qa, s = _per_channel(array, 1)
            dq = ir.node(
                "DequantizeLinear",
                [
                    _init(graph, base, qa),
                    _init(graph, base + "s", s),
                    _init(graph, base + "z", np.full_like(s, 3, np.int8)),
                ],
                {"axis": 1},
            )
            new = [dq]
        graph.insert_before(node, new)
        node.replace_input_with(1, new[-1].outputs[0])
        done += 1
    return done


@pytest.mark.parametrize("form", ["fake_quant", "transposed", "uint8"])
def test_weight_forms_fold_into_the_contract_form(tiny_onnx, form):
    model = ir.load(tiny_onnx)
    CleanupPass()(model)
    n = _quantize_weights(model, form)
    assert n == 15  # 2 layers x 7 + lm_head
    quantized = ir.from_proto(ir.to_proto(model))  # the input, kept for comparison
    report = assert_pass_preserves(model, FoldWeightQDQPass(), rtol=0)  # bit for bit
    assert report.fused == {"DequantizeLinear int8 weight": 15}
    model, report = optimize(model)
    assert report.outside_contract == {}
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 15
    for dq in dqs:
        q, s = (v.const_value.numpy() for v in dq.inputs)
        assert len(dq.inputs) == 2 and dq.attributes["axis"].value == 1
        assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (q.shape[1],)
    sparsity = model.metadata_props["sparsec.sparsity"]
    assert all(dq.inputs[0].name in sparsity for dq in dqs)  # keyed by the int8 initializer
    for r in compare(quantized, model):
        assert r.ok(1e-5), r


def test_asymmetric_weights_stay_and_are_reported(tiny_onnx):
    model = ir.load(tiny_onnx)
    CleanupPass()(model)
    _quantize_weights(model, "asymmetric")
    report = assert_pass_preserves(model, FoldWeightQDQPass(), rtol=0)
    assert report.fused == {}
    assert len(report.not_fused) == 15 and "non-symmetric zero point" in report.not_fused[0]


def test_onnxruntime_static_qdq_folds_weights_and_reports_activations(tiny_onnx, tmp_path):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            kv = {
                f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 16), np.float32)
                for i in range(2)
                for k in ("key", "value")
            }
            self.items = iter(
                [
                    {
                        "input_ids": rng.integers(0, 256, (1, 4)),
                        "attention_mask": np.ones((1, 4), np.int64),
                        "position_ids": np.arange(4)[None],
                        **kv,
                    }
                ]
            )

        def get_next(self):
            return next(self.items, None)

    path = tmp_path / "qdq.onnx"
    quantize_static(
        str(tiny_onnx), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": True},
    )  # fmt: skip
    model = ir.load(path)
    model.metadata_props.update(ir.load(tiny_onnx).metadata_props)
    from passes_helpers import outputs_at

    before = outputs_at(model)
    model, report = optimize(model)
    qdq = next(p for p in report.passes if p.name == "qdq")
    assert qdq.fused["DequantizeLinear int8 weight"] >= 14
    assert any("static activation" in why for why in qdq.not_fused)
    assert "QuantizeLinear" in report.outside_contract  # sparsec compile would refuse it
    # attention stays unfused (its MatMuls read quantized activations) and says so
    assert next(p for p in report.passes if p.name == "attention").not_fused
    after = outputs_at(model)
    for b, a in zip(before, after, strict=True):
        for name in b:
            err = np.abs(a[name] - b[name]).max() / np.abs(b[name]).max()
            assert err < 1e-5, name
    assert "Softmax" in ops(model)
