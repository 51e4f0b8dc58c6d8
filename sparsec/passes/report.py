"""What the passes did: per pass what fused and how often, what did not and why, node
counts, ops left outside the contract, and the per-layer sparsity table."""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field


def op_counts(model) -> dict[str, int]:
    """Top-level op types of ``model`` (``domain.Op`` for custom domains), most first."""
    counts = collections.Counter(
        f"{node.domain}.{node.op_type}" if node.domain else node.op_type for node in model.graph
    )
    return dict(counts.most_common())


@dataclass
class PassReport:
    name: str
    fused: dict[str, int] = field(default_factory=dict)  # what was created -> how often
    not_fused: list[str] = field(default_factory=list)  # what stayed as it was, and why
    notes: list[str] = field(default_factory=list)  # other changes worth knowing
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0


@dataclass
class SparsityRow:
    name: str  # weight initializer
    layer: int | None  # decoder layer, None outside the layers
    role: str  # q_proj, k_proj, ..., lm_head
    shape: list[int]
    sparsity: float
    pattern: str


@dataclass
class OptimizeReport:
    nodes_before: int = 0
    nodes_after: int = 0
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    passes: list[PassReport] = field(default_factory=list)
    sparsity: list[SparsityRow] = field(default_factory=list)
    outside_contract: dict[str, int] = field(default_factory=dict)  # op -> count
    skipped: list[str] = field(default_factory=list)  # checks not run, and why (printed)

    def fused(self, what: str) -> int:
        """How often ``what`` was created, over all passes."""
        return sum(p.fused.get(what, 0) for p in self.passes)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        lines = [f"nodes: {self.nodes_before} -> {self.nodes_after}", "", "passes:"]
        for p in self.passes:
            fused = ", ".join(f"{what} x{n}" for what, n in p.fused.items()) or "nothing fused"
            counts = f"{p.nodes_before:>6} -> {p.nodes_after:<6}"
            lines.append(f"  {p.name:<14} {counts} {p.seconds:5.1f} s  {fused}")
            lines += [f"  {'':<14} note: {n}" for n in p.notes]
            lines += [f"  {'':<14} not fused: {n}" for n in p.not_fused]
        lines += ["", "ops after: " + ", ".join(f"{op} {n}" for op, n in self.ops_after.items())]
        if self.outside_contract:
            left = ", ".join(f"{op} x{n}" for op, n in self.outside_contract.items())
            lines.append(
                f"OUTSIDE THE CONTRACT (sparsec compile rejects these): {left}; "
                "see 'not fused' above for why"
            )
        else:
            lines.append("all ops are in the optimized-graph contract")
        if self.sparsity:
            lines += [
                "",
                "sparsity:",
                f"  {'layer':>5}  {'role':<10} {'shape':<12} {'sparsity':>8}  pattern",
            ]
            for row in self.sparsity:
                layer = "-" if row.layer is None else str(row.layer)
                shape = "x".join(map(str, row.shape))
                lines.append(
                    f"  {layer:>5}  {row.role:<10} {shape:<12} {row.sparsity:>8.1%}  {row.pattern}"
                )
        return "\n".join(lines)
