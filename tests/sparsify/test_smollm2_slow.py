"""SmolLM2-135M end to end at a small budget (minutes): run with ``pytest -m slow``."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_sparsify_small_budget(tmp_path):
    from sparsec.sparsify.pipeline import SparsifyOptions, sparsify

    out = sparsify(
        SparsifyOptions(
            model="smollm2-135m",
            output=tmp_path / "s50",
            sparsity=0.5,
            calibration_samples=8,
            calibration_seq_len=256,
            steps=2,
            int8=True,
            eval=["builtin:verne"],
            eval_tokens=2048,
            curve_tokens=512,
            quiet=True,
        )
    )
    report = json.loads((out / "report.json").read_text())
    assert len(report["pruning"]) == 30 * 7
    for layer in report["pruning"]:
        rows, cols = layer["shape"]
        assert layer["sparsity"] == int(0.5 * rows * cols + 0.5) / (rows * cols)
    ppl = {stage: v["builtin:verne"] for stage, v in report["perplexity"].items()}
    # Dense SmolLM2 is about 24 on Verne; 50% one-shot on a tiny budget stays far from
    # destroyed (magnitude pruning at 70% reaches tens of thousands).
    assert ppl["dense"] < 40
    assert ppl["one-shot"] < 4 * ppl["dense"]
    assert ppl["int8"] < 1.1 * ppl["distilled"]
