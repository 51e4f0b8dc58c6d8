"""Residual add + RMSNorm fusion (onnxscript rewriter rules) into
``sparsec.SkipRMSNormalization``.

Rewrites ``sum = Add(x, skip)`` followed by ``y = RMSNormalization(sum, scale)`` (from
the rmsnorm pass) into ``y, sum = sparsec.SkipRMSNormalization(x, skip, scale)``; the
``sum`` output keeps feeding whatever read the Add (the residual stream). An add of
rank-3 tensors fuses unless their static shapes show it broadcasts (a bias add stays);
the op's Add broadcasts like ONNX Add, so the result is the same either way.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from sparsec import contract
from sparsec.passes._graph import attr
from sparsec.passes._rules import RuleSetPass


def residual_add_failure(x, skip) -> str | None:
    """Why ``Add(x, skip)`` is not a residual add of two ``[B, S, D]`` rows, or None."""
    for v in (x, skip):
        if v.shape is not None and v.shape.rank() != 3:
            return f"{v.name!r} is not [B, S, D]"
    if x.shape is not None and skip.shape is not None:
        for a, b in zip(x.shape, skip.shape, strict=True):
            if isinstance(a, int) and isinstance(b, int) and a != b:
                return "the add broadcasts (a bias, not a residual)"
    return None


class _SkipRMSNorm(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__(name="SkipRMSNorm")

    def pattern(self, op, x, skip, scale):
        total = op.Add(x, skip, _outputs=["total"])
        y = op.RMSNormalization(total, scale, _allow_other_attributes=True, _outputs=["y"])
        return y, total

    def check(self, context, x, skip, y, **_):
        result = pattern.MatchResult()
        norm = y.producer()
        if attr(norm, "axis", -1) != -1 or attr(norm, "stash_type", 1) != 1:
            return result.fail("RMSNormalization is not over the last axis in float32", norm)
        why = residual_add_failure(x, skip)
        return result.fail(why, [x, skip]) if why else result

    def rewrite(self, op, x, skip, scale, y, **_):
        return op.SkipRMSNormalization(
            x,
            skip,
            scale,
            epsilon=attr(y.producer(), "epsilon", 1e-5),
            _domain=contract.DOMAIN,
            _version=contract.DOMAIN_VERSION,
            _outputs=2,
        )


class SkipRMSNormPass(RuleSetPass):
    """``Add`` + ``RMSNormalization`` -> ``sparsec.SkipRMSNormalization``."""

    name = "skip_rmsnorm"
    produces = "SkipRMSNormalization"

    def rules(self, model):
        return pattern.RewriteRuleSet([_SkipRMSNorm.rule()], commute=True)

    def leftovers(self, model):
        # RMSNormalizations that read an Add: a residual add that did not fuse.
        return [
            n
            for n in model.graph
            if n.op_type == "RMSNormalization"
            and n.inputs[0].producer() is not None
            and n.inputs[0].producer().op_type == "Add"
        ]
