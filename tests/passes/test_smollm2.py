"""SmolLM2-135M (slow): every block fuses, and the optimized graph matches the export.

Uses the export at $SPARSEC_SMOL_ONNX, or exports the built-in model first (minutes).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir
import pytest

from sparsec.passes import optimize
from sparsec.passes.verify import compare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_onnx(tmp_path_factory) -> Path:
    given = os.environ.get("SPARSEC_SMOL_ONNX")
    if given:
        return Path(given)
    from sparsec.export import export_model
    from sparsec.models import load_model

    model, tokenizer = load_model("smollm2-135m", quiet=True)
    return export_model(
        model, tokenizer, tmp_path_factory.mktemp("smol") / "smol.onnx", source="smollm2-135m"
    )


@pytest.fixture(scope="module")
def smol_optimized(smol_onnx):
    return optimize(ir.load(smol_onnx))


def test_every_block_fuses(smol_optimized):
    model, report = smol_optimized
    assert report.nodes_before == 2244  # the tied head's Transpose is an initializer at export
    assert report.fused("RMSNormalization") == 61
    assert report.fused("SkipRMSNormalization") == 60
    assert report.fused("CachedAttention") == 30
    assert report.fused("SwiGLU") == 30
    for op in ("Softmax", "Pow", "ReduceMean"):
        assert op not in report.ops_after
    assert report.outside_contract == {}
    assert report.ops_after["MatMul"] == 30 * 4 + 1
    assert len(report.sparsity) == 30 * 7 + 1


@pytest.mark.parametrize("engine", ["onnxruntime", "numpy"])
def test_matches_the_export(smol_onnx, smol_optimized, engine):
    model, _ = smol_optimized
    for r in compare(ir.load(smol_onnx), model, engine=engine):
        assert r.ok(1e-4), r
