"""Logit soft-capping fusion (onnxscript rewriter rules) into ``sparsec.SoftCap``.

Rewrites ``Mul(Tanh(Div(x, c)), c)`` (or ``Mul(Tanh(Mul(x, 1/c)), c)``) whose output is
the ``logits`` graph output into ``sparsec.SoftCap(x, cap=c)``: Gemma 2's
``final_logit_softcapping``, ``logits = c * tanh(logits / c)``. The soft-cap of the
attention scores is an attribute of ``CachedAttention`` (the attention pass) instead.
"""

from __future__ import annotations

import math

from onnxscript.rewriter import pattern

from sparsec import contract
from sparsec.passes._graph import scalar
from sparsec.passes._rules import RuleSetPass


class _SoftCap(pattern.RewriteRuleClassBase):
    def __init__(self, divide: bool):
        super().__init__(name="SoftCap" + ("[div]" if divide else "[mul]"))
        self.divide = divide

    def pattern(self, op, x, inner, outer):
        scaled = op.Div(x, inner) if self.divide else op.Mul(x, inner)
        return op.Mul(op.Tanh(scaled), outer, _outputs=["y"])

    def check(self, context, x, inner, outer, y, **_):
        result = pattern.MatchResult()
        a, c = scalar(inner), scalar(outer)
        if a is None or c is None or c <= 0 or not math.isfinite(c):
            return result.fail("the caps are not positive constant scalars", [inner, outer])
        expected = c if self.divide else 1.0 / c
        if not math.isclose(a, expected, rel_tol=1e-6):
            return result.fail(f"tanh(x / {c:g}) * {c:g} has another inner scale", inner)
        if y.name != contract.LOGITS:
            return result.fail("the soft-cap does not give the logits", y)
        return result

    def rewrite(self, op, x, outer, **_):
        return op.SoftCap(
            x,
            cap=float(scalar(outer)),
            _domain=contract.DOMAIN,
            _version=contract.DOMAIN_VERSION,
        )


class LogitSoftCapPass(RuleSetPass):
    """``c * tanh(logits / c)`` -> ``sparsec.SoftCap``."""

    name = "softcap"
    produces = "SoftCap"

    def rules(self, model):
        return pattern.RewriteRuleSet([_SoftCap.rule(divide=d) for d in (True, False)])
