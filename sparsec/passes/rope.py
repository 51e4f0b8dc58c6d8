"""RoPE fusion (onnxscript rewriter rules) into ONNX ``RotaryEmbedding`` (opset 23).

Rewrites the rotate-half rotary embedding of a ``[B, heads, S, hd]`` tensor ``x``

    cos/sin = Unsqueeze(Cos/Sin(Concat(f, f, axis=-1)) [* constant], [1]),
    f = Mul(Cast(Unsqueeze(position_ids, [-1]), float), inv_freq)
    y = Add(Mul(x, cos), Mul(Concat(Neg(x[..., hd/2:]), x[..., :hd/2]), sin))

(the Hugging Face Llama form, as both torch exporters write it) into
``RotaryEmbedding(x, cos_cache, sin_cache, position_ids)`` with the tables
``cache[p, i] = cos/sin(float32(p) * inv_freq[i]) [* constant]`` for
``p < max_position_embeddings``
(from ``sparsec.config``) as initializers shared by every layer. The tables hold the
same float32 angles the exported graph computes at run time.

Partial rotary (``Concat(rotate(x[..., :r]), x[..., r:])``, Phi-3's
``partial_rotary_factor``) becomes ``RotaryEmbedding(x, ..., rotary_embedding_dim=r)``.

Left as it is: interleaved RoPE, cos/sin that are not a function
of ``position_ids`` and a constant ``inv_freq`` (e.g. scaled by a computed factor).
Positions at or beyond ``max_position_embeddings`` are outside the tables.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from sparsec import metadata
from sparsec.passes import functions
from sparsec.passes._graph import add_initializer, attr, const, value_names
from sparsec.passes._rules import RuleSetPass

INT64_MAX = np.iinfo(np.int64).max


def rope_tables(inv_freq: np.ndarray, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` tables ``[positions, hd/2]`` of the float32 angles ``p * inv_freq``."""
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None]
    angles = angles.astype(np.float64)  # cos of the float32 angle, rounded once
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _ints(value) -> list[int] | None:
    array = const(value)
    return None if array is None else [int(a) for a in array.reshape(-1)]


class _RoPE(pattern.RewriteRuleClassBase):
    def __init__(self, tables: dict, scaled: bool):
        # Several layers share cos/sin: their nodes stay until unused-node removal.
        super().__init__(name="RoPE" + ("[scaled]" if scaled else ""), remove_nodes=False)
        self.tables = tables  # {"graph", "taken", "positions", key -> (cos, sin) values}
        self.scaled = scaled

    def pattern(
        self, op, x, position_ids, unsq, inv_freq, heads1, heads2, scale1, scale2,
        s1, e1, a1, st1, s2, e2, a2, st2,
    ):  # fmt: skip
        positions = op.Cast(op.Unsqueeze(position_ids, unsq), to=ir.DataType.FLOAT)
        freqs = op.Mul(positions, inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos, sin = op.Cos(emb), op.Sin(emb)
        if self.scaled:  # Hugging Face's attention_scaling, 1.0 for plain RoPE
            cos, sin = op.Mul(cos, scale1), op.Mul(sin, scale2)
        cos = op.Unsqueeze(cos, heads1)
        sin = op.Unsqueeze(sin, heads2)
        x1 = op.Slice(x, s1, e1, a1, st1)
        x2 = op.Slice(x, s2, e2, a2, st2)
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(
        self, context, x, position_ids, unsq, inv_freq, heads1, heads2, scale1, scale2,
        s1, e1, a1, st1, s2, e2, a2, st2, **_,
    ):  # fmt: skip
        result = pattern.MatchResult()
        if self.scaled:
            c1, c2 = const(scale1), const(scale2)
            if c1 is None or c2 is None or c1.size != 1 or c2.size != 1 or c1.item() != c2.item():
                return result.fail("cos and sin are not scaled by one constant", scale1)
        if x.dtype != ir.DataType.FLOAT or x.shape is None or x.shape.rank() != 4:
            return result.fail("x is not a float32 [B, heads, S, hd] tensor", x)
        hd = x.shape[3]
        if not isinstance(hd, int) or hd % 2:
            return result.fail("head size is not a static even number", x)
        half = hd // 2
        if position_ids.dtype != ir.DataType.INT64 or (
            position_ids.shape is not None and position_ids.shape.rank() != 2
        ):
            return result.fail("position_ids is not int64 [B, S]", position_ids)
        if _ints(unsq) not in ([2], [-1]):
            return result.fail("positions are not unsqueezed on the last axis", unsq)
        if _ints(heads1) != [1] or _ints(heads2) != [1]:
            return result.fail("cos/sin are not broadcast over the heads axis", heads1)
        freq = const(inv_freq)
        if freq is None or freq.dtype != np.float32 or freq.size != half:
            return result.fail(f"inv_freq is not a constant float32 [{half}]", inv_freq)
        for axes, steps in ((a1, st1), (a2, st2)):
            if _ints(axes) not in ([3], [-1]) or _ints(steps) != [1]:
                return result.fail("Slice is not over the head axis with step 1", axes)
        if _ints(s1) != [0] or _ints(e1) != [half]:
            return result.fail("first Slice is not x[..., :hd/2]", s1)
        end = _ints(e2)
        if _ints(s2) != [half] or end is None or end[0] < hd:
            return result.fail("second Slice is not x[..., hd/2:]", s2)
        if self.tables.get("positions") is None:
            return result.fail("no max_position_embeddings in sparsec.config for the tables")
        return result

    def rewrite(self, op, x, position_ids, inv_freq, scale1=None, **_):
        freq = const(inv_freq).reshape(-1)
        factor = const(scale1).astype(np.float32).reshape(()) if self.scaled else None
        key = (freq.tobytes(), None if factor is None else factor.tobytes())
        if key not in self.tables:
            cos, sin = rope_tables(freq, self.tables["positions"])
            if factor is not None:  # the same float32 product the graph computes
                cos, sin = cos * factor, sin * factor
            graph, taken = self.tables["graph"], self.tables["taken"]
            self.tables[key] = (
                add_initializer(graph, taken, "rope.cos_cache", cos),
                add_initializer(graph, taken, "rope.sin_cache", sin),
            )
        cos_cache, sin_cache = self.tables[key]
        return op.RotaryEmbedding(x, cos_cache, sin_cache, position_ids, interleaved=0)


class _PartialRoPE(pattern.RewriteRuleClassBase):
    """``Concat(RotaryEmbedding(x[..., :r]), x[..., r:])`` -> ``RotaryEmbedding(x,
    rotary_embedding_dim=r)``: the partial rotary of Phi-3/Phi-4 (``partial_rotary_factor``),
    run after the full form has fused on the rotated slice."""

    def __init__(self):
        super().__init__(name="RoPE[partial]")

    def pattern(self, op, x, cos, sin, position_ids, s1, e1, a1, st1, s2, e2, a2, st2):
        rotated = op.RotaryEmbedding(
            op.Slice(x, s1, e1, a1, st1), cos, sin, position_ids, _outputs=["rotated"]
        )
        return op.Concat(rotated, op.Slice(x, s2, e2, a2, st2), axis=-1)

    def check(self, context, x, rotated, s1, e1, a1, st1, s2, e2, a2, st2, **_):
        result = pattern.MatchResult()
        node = rotated.producer()
        if any(attr(node, a, 0) for a in ("interleaved", "rotary_embedding_dim", "num_heads")):
            return result.fail("the inner RotaryEmbedding is not the plain full form", rotated)
        if x.shape is None or x.shape.rank() != 4 or not isinstance(x.shape[3], int):
            return result.fail("x is not [B, heads, S, hd] with a static hd", x)
        hd, r = x.shape[3], _ints(e1)
        for axes, steps in ((a1, st1), (a2, st2)):
            if _ints(axes) not in ([3], [-1]) or _ints(steps) != [1]:
                return result.fail("Slice is not over the head axis with step 1", axes)
        if _ints(s1) != [0] or r is None or not 0 < r[0] < hd or r[0] % 2:
            return result.fail("first Slice is not x[..., :r] with an even r < hd", e1)
        end = _ints(e2)
        if _ints(s2) != r or end is None or end[0] < hd:
            return result.fail("second Slice is not x[..., r:]", s2)
        return result

    def rewrite(self, op, x, cos, sin, position_ids, e1, **_):
        r = _ints(e1)[0]
        return op.RotaryEmbedding(x, cos, sin, position_ids, interleaved=0, rotary_embedding_dim=r)


def max_positions(model: ir.Model) -> int | None:
    config = metadata.config(model.metadata_props)
    return None if config is None else config.max_position_embeddings


class RoPEPass(RuleSetPass):
    """Rotate-half RoPE with cos/sin from ``position_ids`` -> ``RotaryEmbedding``."""

    name = "rope"
    produces = "RotaryEmbedding"
    anchors = ("Neg", "Cos", "Sin")

    def rules(self, model):
        self.tables = {
            "graph": model.graph,
            "taken": value_names(model.graph),
            "positions": max_positions(model),
        }
        rules = [_RoPE.rule(self.tables, scaled) for scaled in (False, True)]
        return pattern.RewriteRuleSet(rules, commute=True)

    def after(self, model, count):
        if count:
            # The partial form's root is a Concat over RotaryEmbedding nodes that the
            # rules above have just created: a second sweep sees them.
            partial = pattern.RewriteRuleSet([_PartialRoPE.rule()]).apply_to_model(model)
            if partial:
                self.report.fused["RotaryEmbedding[partial]"] = partial
            functions.raise_opset(model)

    def leftovers(self, model):
        # Cos/Sin are left behind until unused-node removal; a Neg left means a rotation
        # that did not fuse.
        return [n for n in model.graph if n.op_type == "Neg" and n.domain == ""]
