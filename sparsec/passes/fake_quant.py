"""Per-token activation fake quantization (onnxscript rewriter rules) into
``sparsec.PerTokenFakeQuant``.

Rewrites the symmetric per-token int8 fake quantization of ``x`` as the torch dynamo
exporter writes ``sparsec.sparsify.quant.fake_quant_per_token``:

    s = Div(ReduceMax(Abs(x), axes=[-1], keepdims=1), 127)
    y = Mul(Clip(Round(Div(x, Where(Greater(s, 0), s, ones))), -127, 127), s)

optionally in its straight-through form ``Add(x, Sub(y, x))`` (equal to ``y`` bit for
bit: ``|y - x| <= s/2`` and ``y`` is 0 or at least ``s``, so the subtraction and the
addition are exact), into ``PerTokenFakeQuant(x)``. ``ones`` is the constant 1 or
``Expand(1, Shape(s))``. Other grids (asymmetric, per-tensor, other bit widths) stay.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from sparsec import contract
from sparsec.passes._graph import attr, const, scalar
from sparsec.passes._rules import RuleSetPass


class _FakeQuant(pattern.RewriteRuleClassBase):
    def __init__(self, expanded_one: bool):
        super().__init__(name="PerTokenFakeQuant" + ("[expand]" if expanded_one else ""))
        self.expanded_one = expanded_one

    def pattern(self, op, x, axes, qmax, zero, one, qmin, qmax2):
        row_max = op.ReduceMax(op.Abs(x), axes, _allow_other_attributes=True, _outputs=["row_max"])
        s = op.Div(row_max, qmax)
        ones = (
            op.Expand(one, op.Shape(s, _allow_other_attributes=True)) if self.expanded_one else one
        )
        safe = op.Where(op.Greater(s, zero), s, ones)
        return op.Mul(op.Clip(op.Round(op.Div(x, safe)), qmin, qmax2), s)

    def check(self, context, x, axes, qmax, zero, one, qmin, qmax2, row_max, **_):
        result = pattern.MatchResult()
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("input is not float32", x)
        rank = x.shape.rank() if x.shape is not None else None
        axis = const(axes)
        if axis is None or axis.size != 1 or int(axis.reshape(())) not in (-1, (rank or 0) - 1):
            return result.fail("ReduceMax is not over the last axis", axes)
        if attr(row_max.producer(), "keepdims", 1) != 1:
            return result.fail("ReduceMax does not keep the reduced axis", row_max)
        if (scalar(qmax), scalar(qmax2), scalar(qmin), scalar(zero)) != (127.0, 127.0, -127.0, 0.0):
            return result.fail("not the symmetric int8 grid -127..127", qmax)
        if scalar(one) != 1.0:
            return result.fail("the zero-scale fallback is not 1", one)
        return result

    def rewrite(self, op, x, **_):
        return op.PerTokenFakeQuant(x, _domain=contract.DOMAIN, _version=contract.DOMAIN_VERSION)


class _StraightThrough(pattern.RewriteRuleClassBase):
    """``x + (PerTokenFakeQuant(x) - x)`` is ``PerTokenFakeQuant(x)`` bit for bit."""

    def __init__(self):
        # The PerTokenFakeQuant stays; the Add and Sub die (unused-node removal).
        super().__init__(name="StraightThrough", remove_nodes=False)

    def pattern(self, op, x):
        y = op.PerTokenFakeQuant(x, _domain=contract.DOMAIN, _outputs=["y"])
        return op.Add(x, op.Sub(y, x))

    def rewrite(self, op, x, y, **_):
        return op.Identity(y)


class FakeQuantPass(RuleSetPass):
    """Per-token int8 fake quantization of activations -> ``sparsec.PerTokenFakeQuant``."""

    name = "fake_quant"
    produces = "PerTokenFakeQuant"
    anchors = ("Round",)

    def rules(self, model):
        rules = [_FakeQuant.rule(expand) for expand in (True, False)] + [_StraightThrough.rule()]
        return pattern.RewriteRuleSet(rules, commute=True)

    def before(self, model):
        self._had = self._count(model)

    def after(self, model, count):
        if count:  # the straight-through rule leaves an Identity and dead nodes
            common.IdentityEliminationPass()(model)
            common.RemoveUnusedNodesPass()(model)
            # one rewrite per quantizer, not per rule applied (straight-through is a second)
            self.report.fused[self.produces] = self._count(model) - self._had

    @staticmethod
    def _count(model) -> int:
        return sum(1 for n in model.graph if n.op_type == "PerTokenFakeQuant")
