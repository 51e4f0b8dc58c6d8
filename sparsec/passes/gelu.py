"""GELU fusion (onnxscript rewriter rules) into ONNX ``Gelu`` (opset 20).

Rewrites the element-wise formulas of a model's Python GELU into one op:

- ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`` (GPT-2's ``gelu_new``,
  ``gelu_pytorch_tanh``) into ``Gelu(x, approximate="tanh")``;
- ``0.5 * x * (1 + erf(x / sqrt(2)))`` into ``Gelu(x)``.

Each constant must be the formula's, within float32 rounding; ``x^3`` may be
``Pow(x, 3)`` or ``x * x * x``. The multiplications commute. The tanh form computes the
same function whatever the grouping; ``Gelu``'s kernels evaluate it without the
cancellation at large negative ``x`` (docs/codegen.md).
"""

from __future__ import annotations

import math

import numpy as np
from onnxscript.rewriter import pattern

from sparsec.passes._graph import scalar
from sparsec.passes._rules import RuleSetPass

_CONSTANTS = {
    "half": 0.5,
    "one": 1.0,
    "cube": 0.044715,
    "three": 3.0,
    "root": math.sqrt(2 / math.pi),
    "root2": math.sqrt(2.0),
}


def _is(value, name: str) -> bool:
    c = scalar(value)
    return c is not None and bool(np.isclose(c, _CONSTANTS[name], rtol=1e-6, atol=0))


class _GeluTanh(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__(name="GeluTanh")

    def pattern(self, op, x, half, three, cube, root, one):
        halved = op.Mul(x, half)
        inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, three), cube)), root)
        return op.Mul(halved, op.Add(op.Tanh(inner), one))

    def check(self, context, half, three, cube, root, one, **_):
        result = pattern.MatchResult()
        for value, name in ((half, "half"), (three, "three"), (cube, "cube"), (root, "root")):
            if not _is(value, name):
                return result.fail(f"{value.name!r} is not GELU's constant {name}", value)
        if not _is(one, "one"):
            return result.fail(f"{one.name!r} is not 1", one)
        return result

    def rewrite(self, op, x, **_):
        return op.Gelu(x, approximate="tanh")


class _GeluErf(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__(name="GeluErf")

    def pattern(self, op, x, half, root2, one):
        return op.Mul(op.Mul(x, half), op.Add(op.Erf(op.Div(x, root2)), one))

    def check(self, context, half, root2, one, **_):
        result = pattern.MatchResult()
        for value, name in ((half, "half"), (root2, "root2"), (one, "one")):
            if not _is(value, name):
                return result.fail(f"{value.name!r} is not GELU's constant {name}", value)
        return result

    def rewrite(self, op, x, **_):
        return op.Gelu(x)


class GeluPass(RuleSetPass):
    """GELU formulas -> ``Gelu`` (tanh or erf form)."""

    name = "gelu"
    produces = "Gelu"
    anchors = ("Tanh", "Erf")

    def leftovers(self, model):
        # A Tanh or Erf of GELU's inner argument (x + 0.044715 x^3, or x / sqrt 2) that
        # did not fuse; other uses of Tanh (Gemma's soft-caps) are not GELUs.
        left = []
        for node in model.graph:
            if node.domain or node.op_type not in ("Tanh", "Erf"):
                continue
            inner = node.inputs[0].producer()
            if inner is not None and inner.op_type in ("Mul", "Div"):
                if any(_is(v, "root") or _is(v, "root2") for v in inner.inputs if v is not None):
                    left.append(node)
        return left

    def rules(self, model):
        rules = [_GeluTanh.rule(), _GeluErf.rule()]
        return pattern.RewriteRuleSet(rules, commute=True)

    def after(self, model, count):
        if count:
            from sparsec.passes import functions

            functions.raise_opset(model)
