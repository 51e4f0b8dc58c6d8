"""RMSNorm fusion (onnxscript rewriter rules) into ONNX ``RMSNormalization`` (opset 23).

Rewrites, with ``r = Sqrt(ReduceMean(Pow(x, 2), axes=[-1]) + epsilon)``:

- ``Mul(scale, Mul(x, Reciprocal(r)))``  (torch dynamo export of ``x * rsqrt(...)``)
- ``Mul(scale, Mul(x, Div(1, r)))``       (TorchScript export)
- ``Mul(scale, Div(x, r))``

(any operand order of the Muls) into ``RMSNormalization(x, scale, axis=-1, epsilon)``,
when ``scale`` is a constant ``[D]`` matching the last axis of a float32 ``x``. Other
normalizations (over other axes, with a bias, in another precision) stay as they are.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from sparsec.passes import functions
from sparsec.passes._graph import attr, const, scalar
from sparsec.passes._rules import RuleSetPass


class _RMSNorm(pattern.RewriteRuleClassBase):
    def __init__(self, form: str):
        super().__init__(name=f"RMSNorm[{form}]")
        self.form = form

    def pattern(self, op, x, two, axes, epsilon, one, scale):
        mean = op.ReduceMean(op.Pow(x, two), axes, _allow_other_attributes=True, _outputs=["mean"])
        rms = op.Sqrt(op.Add(mean, epsilon))
        if self.form == "reciprocal":
            normalized = op.Mul(x, op.Reciprocal(rms))
        elif self.form == "one_over":
            normalized = op.Mul(x, op.Div(one, rms))
        else:
            normalized = op.Div(x, rms)
        return op.Mul(scale, normalized)

    def check(self, context, x, two, axes, epsilon, one, scale, mean, **_):
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("input is not float32", x)
        if scalar(two) != 2.0:
            return result.fail("Pow exponent is not the constant 2", two)
        rank = x.shape.rank() if x.shape is not None else None
        axes_value = const(axes)
        if axes_value is None or axes_value.size != 1:
            return result.fail("ReduceMean axes is not one constant axis", axes)
        if int(axes_value.reshape(())) != -1 and (
            rank is None or int(axes_value.reshape(())) != rank - 1
        ):
            return result.fail("ReduceMean does not reduce the last axis", axes)
        node = mean.producer()
        if attr(node, "keepdims", 1) != 1 or attr(node, "noop_with_empty_axes", 0) != 0:
            return result.fail("ReduceMean does not keep the reduced axis", node)
        if scalar(epsilon) is None:
            return result.fail("epsilon is not a constant scalar", epsilon)
        if self.form == "one_over" and scalar(one) != 1.0:
            return result.fail("Div numerator is not the constant 1", one)
        weight = const(scale)
        if weight is None or weight.ndim != 1 or weight.dtype.name != "float32":
            return result.fail("scale is not a constant float32 vector", scale)
        last = x.shape[-1] if x.shape is not None and rank else None
        if isinstance(last, int) and last != weight.shape[0]:
            return result.fail("scale length differs from the normalized axis", scale)
        return result

    def rewrite(self, op, x, epsilon, scale, **_):
        return op.RMSNormalization(x, scale, axis=-1, epsilon=scalar(epsilon))


class RMSNormPass(RuleSetPass):
    """RMSNorm subgraphs -> ``RMSNormalization``."""

    name = "rmsnorm"
    produces = "RMSNormalization"
    anchors = ("ReduceMean", "Pow")

    def rules(self, model):
        forms = ("reciprocal", "one_over", "divide")
        return pattern.RewriteRuleSet([_RMSNorm.rule(f) for f in forms], commute=True)

    def after(self, model, count):
        if count:
            functions.raise_opset(model)
