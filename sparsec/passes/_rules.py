"""The frame of a pass that is an onnxscript rewriter rule set.

A subclass names its rules, the op they create and the ops a full match would have
consumed ("anchors"). After rewriting, anchors still in the graph did not fuse; the
rewriter's matching tracer then says how far the best partial match got and why it
stopped, which goes into the report.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

from sparsec.passes.report import PassReport


class RuleSetPass(ir.passes.InPlacePass):
    name = "rules"
    produces = ""  # what each rewrite creates, for the report
    anchors: tuple[str, ...] = ()  # op types that a complete fusion leaves no trace of

    def __init__(self):
        super().__init__()
        self.report = PassReport(self.name)

    def rules(self, model: ir.Model) -> pattern.RewriteRuleSet:
        raise NotImplementedError

    def before(self, model: ir.Model) -> None:
        """Hook run before matching (e.g. read the model config)."""

    def after(self, model: ir.Model, count: int) -> None:
        """Hook run after rewriting ``count`` matches (e.g. raise the opset)."""

    def leftovers(self, model: ir.Model) -> list[ir.Node]:
        return [n for n in model.graph if n.domain == "" and n.op_type in self.anchors]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.before(model)
        rules = self.rules(model)
        count = rules.apply_to_model(model) if rules is not None else 0
        if count:
            self.report.fused[self.produces] = count
        self.after(model, count)
        if rules is not None:
            self.explain(model, rules)
        return ir.passes.PassResult(model, modified=count > 0)

    def explain(self, model: ir.Model, rules: pattern.RewriteRuleSet) -> None:
        left = self.leftovers(model)
        if not left:
            return
        tracer = MatchingTracer()
        rules.apply_to_model(model, tracer=tracer)  # with a tracer nothing is rewritten
        why = _best_failure(tracer)
        names = ", ".join(repr(n.name) for n in left[:3]) + (", ..." if len(left) > 3 else "")
        ops = "/".join(sorted({n.op_type for n in left}))
        self.report.not_fused.append(
            f"{len(left)} {ops} node(s) left outside {self.produces} ({names}): {why}"
        )


def _best_failure(tracer: MatchingTracer) -> str:
    best = None
    for rule, matches in tracer.best_matches_map.items():
        for info in matches:
            if info.status == MatchStatus.SUCCESS:
                continue
            if best is None or info.score() > best[1].score():
                best = (rule, info)
    if best is None:
        return "no node matched the start of the pattern"
    rule, info = best
    reason = info.match_result.reason or "the graph does not have the pattern's structure"
    status = {
        MatchStatus.NO_MATCH: "structure differs",
        MatchStatus.CONDITION_FAILED: "condition failed",
        MatchStatus.REPLACEMENT_FAILED: "replacement failed",
    }.get(info.status, info.status.name)
    return (
        f"best partial match: rule {rule.name} at node {info.root_node.name!r}, {status}: {reason}"
    )
