"""Residual add + LayerNorm fusion (onnxscript rewriter rules) into
``sparsec.SkipLayerNormalization``.

Rewrites ``sum = Add(x, skip)`` followed by ``y = LayerNormalization(sum, scale[,
bias])`` over the last axis in float32 into ``y, sum = sparsec.SkipLayerNormalization(x,
skip, scale[, bias])``; ``sum`` keeps feeding whatever read the Add (the residual
stream). OPT, GPT-2 and MPT blocks, as ``SkipRMSNormalization`` is Llama's. The same
conditions as there: rank-3 addends whose static shapes do not broadcast.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from sparsec import contract
from sparsec.passes._graph import attr
from sparsec.passes._rules import RuleSetPass
from sparsec.passes.skip_rmsnorm import residual_add_failure


class _SkipLayerNorm(pattern.RewriteRuleClassBase):
    def __init__(self, bias: bool):
        super().__init__(name="SkipLayerNorm" + ("[bias]" if bias else ""))
        self.bias = bias

    def pattern(self, op, x, skip, scale, bias):
        total = op.Add(x, skip, _outputs=["total"])
        inputs = (total, scale, bias) if self.bias else (total, scale)
        y = op.LayerNormalization(*inputs, _allow_other_attributes=True, _outputs=["y"])
        return y, total

    def check(self, context, x, skip, y, **_):
        result = pattern.MatchResult()
        norm = y.producer()
        if attr(norm, "axis", -1) != -1 or attr(norm, "stash_type", 1) != 1:
            return result.fail("LayerNormalization is not over the last axis in float32", norm)
        if len(norm.outputs) > 1 and any(o.uses() for o in norm.outputs[1:]):
            return result.fail("the mean or inverse deviation output is read", norm)
        why = residual_add_failure(x, skip)
        return result.fail(why, [x, skip]) if why else result

    def rewrite(self, op, x, skip, scale, y, bias=None, **_):
        inputs = (x, skip, scale, bias) if self.bias else (x, skip, scale)
        return op.SkipLayerNormalization(
            *inputs,
            epsilon=attr(y.producer(), "epsilon", 1e-5),
            _domain=contract.DOMAIN,
            _version=contract.DOMAIN_VERSION,
            _outputs=2,
        )


class SkipLayerNormPass(RuleSetPass):
    """``Add`` + ``LayerNormalization`` -> ``sparsec.SkipLayerNormalization``."""

    name = "skip_layernorm"
    produces = "SkipLayerNormalization"

    def rules(self, model):
        rules = [_SkipLayerNorm.rule(bias=True), _SkipLayerNorm.rule(bias=False)]
        return pattern.RewriteRuleSet(rules, commute=True)

    def leftovers(self, model):
        return [
            n
            for n in model.graph
            if n.op_type == "LayerNormalization"
            and n.inputs[0].producer() is not None
            and n.inputs[0].producer().op_type == "Add"
        ]
