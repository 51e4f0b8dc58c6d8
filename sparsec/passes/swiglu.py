"""SwiGLU MLP fusion (onnxscript rewriter rules) into ``sparsec.SwiGLU``.

Rewrites ``MatMul(Mul(Mul(g, Sigmoid(g)), MatMul(x, w_up)), w_down)`` with
``g = MatMul(x, w_gate)`` (gate, up, SiLU, multiply, down; any operand order of the
Muls) into ``SwiGLU(x, w_gate, w_up, w_down)``, when the three weights are constant
``[D, F]``, ``[D, F]``, ``[F, D]`` float32 initializers or ``DequantizeLinear`` of int8
ones (the qdq pass's form). When ``x`` and the hidden activation each pass through
``sparsec.PerTokenFakeQuant`` (W8A8), those fold into ``quantize_activations=1``; an
MLP with only one of the two quantized stays as it is.

GeGLU (Gemma: ``Gelu(g, approximate="tanh")`` in place of ``g * Sigmoid(g)``) becomes
the same op with ``activation="gelu_tanh"``.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from sparsec import contract
from sparsec.passes._graph import const, is_op
from sparsec.passes._rules import RuleSetPass


def _weight_shape(value: ir.Value) -> tuple[int, ...] | None:
    """Shape of a constant weight or of a DequantizeLinear of an int8 constant."""
    array = const(value)
    if array is not None:
        return array.shape if array.dtype.name == "float32" else None
    dq = value.producer()
    if is_op(dq, "DequantizeLinear"):
        q = const(dq.inputs[0])
        if q is not None and q.dtype.name == "int8" and const(dq.inputs[1]) is not None:
            return q.shape
    return None


class _SwiGLU(pattern.RewriteRuleClassBase):
    def __init__(self, quantized: bool, activation: str = "silu"):
        name = "SwiGLU" if activation == "silu" else "GeGLU"
        super().__init__(name=name + ("[w8a8]" if quantized else ""))
        self.quantized = quantized
        self.activation = activation

    def pattern(self, op, x, w_gate, w_up, w_down):
        quant = dict(_domain=contract.DOMAIN)
        x_in = op.PerTokenFakeQuant(x, **quant) if self.quantized else x
        gate = op.MatMul(x_in, w_gate)
        if self.activation == "silu":
            activated = op.Mul(gate, op.Sigmoid(gate))
        else:
            activated = op.Gelu(gate, approximate="tanh")
        hidden = op.Mul(activated, op.MatMul(x_in, w_up))
        if self.quantized:
            hidden = op.PerTokenFakeQuant(hidden, **quant)
        return op.MatMul(hidden, w_down)

    def check(self, context, x, w_gate, w_up, w_down, **_):
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("input is not float32", x)
        shapes = [_weight_shape(w) for w in (w_gate, w_up, w_down)]
        if any(s is None or len(s) != 2 for s in shapes):
            bad = next(
                w
                for w, s in zip((w_gate, w_up, w_down), shapes, strict=True)
                if s is None or len(s) != 2
            )
            return result.fail(
                f"weight {bad.name!r} is not a constant 2-D (or int8 DQ) weight", bad
            )
        (d, f), (d2, f2), (f3, d3) = shapes
        if not (d == d2 == d3 and f == f2 == f3):
            return result.fail(f"weight shapes {shapes} are not [D, F], [D, F], [F, D]", w_gate)
        return result

    def rewrite(self, op, x, w_gate, w_up, w_down, **_):
        # SiLU is the default: a Llama graph has no activation attribute
        extra = {} if self.activation == "silu" else {"activation": self.activation}
        return op.SwiGLU(
            x,
            w_gate,
            w_up,
            w_down,
            quantize_activations=int(self.quantized),
            _domain=contract.DOMAIN,
            _version=contract.DOMAIN_VERSION,
            **extra,
        )


class SwiGLUPass(RuleSetPass):
    """Gate/up/SiLU/multiply/down -> ``sparsec.SwiGLU``."""

    name = "swiglu"
    produces = "SwiGLU"
    anchors = ("Sigmoid",)

    def rules(self, model):
        rules = [_SwiGLU.rule(q, a) for a in ("silu", "gelu_tanh") for q in (True, False)]
        return pattern.RewriteRuleSet(rules, commute=True)
