"""A user's path with a checkpoint folder of another family, through the CLI:
sparsify (SparseGPT 50%, SquareHead steps, W8A8) -> export (with its checks against
PyTorch) -> optimize -> compile -> the runtime's greedy tokens against transformers'
on the sparsified model. Phi-3 (fused projections, partial rotary) runs in CI, the
other families in the slow set."""

from __future__ import annotations

import json

import pytest
from family_helpers import check_greedy, check_logits

from sparsec import runtime
from sparsec.cli import main
from sparsec.models import as_linear_modules, save_model
from sparsec.sparsify.layer_walk import prunable_linears
from sparsec.testing import FAMILIES, fake_quant_w8a8, make_tiny_family

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
) * 30
PROMPT = "Sphinx of black quartz, judge"

FAST = "phi3"
CASES = [pytest.param(f, marks=[] if f == FAST else [pytest.mark.slow]) for f in FAMILIES]


@pytest.mark.parametrize("family", CASES)
def test_checkpoint_folder_through_every_command(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = make_tiny_family(family, seed=2)
    save_model(model, tokenizer, tmp_path / "hf")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    data = ["--calibration", str(text), "--train", str(text), "--eval", str(text)]
    sparse = tmp_path / "sparse"
    assert main(["sparsify", str(tmp_path / "hf"), "-o", str(sparse), "--sparsity", "0.5",
                 "--int8", "--steps", "2", "--calibration-samples", "4", "--seq-len", "24",
                 "--batch-size", "2", "--eval-tokens", "256", "--quiet", *data]) == 0  # fmt: skip
    assert json.loads((sparse / "report.json").read_text())

    onnx, opt, so = tmp_path / "m.onnx", tmp_path / "m.opt.onnx", tmp_path / "m.so"
    assert main(["export", str(sparse), "-o", str(onnx)]) == 0  # verifies against PyTorch
    assert main(["optimize", str(onnx), "-o", str(opt)]) == 0
    assert main(["compile", str(opt), "-o", str(so), "--max-context", "128"]) == 0

    reference = as_linear_modules(AutoModelForCausalLM.from_pretrained(sparse).float().eval())
    for linear in prunable_linears(reference).values():  # every decoder Linear, any family
        w = linear.weight
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    reference = fake_quant_w8a8(reference)  # the W8A8 model the int8 export carries
    rt = runtime.load(so)
    assert rt.manifest["precision"] == "int8"
    assert rt.config.family == ("llama" if family == "llama3" else family)
    ids = tokenizer(PROMPT).input_ids
    check_logits(rt, reference, ids, "int8")
    assert check_greedy(rt, reference, ids, tokenizer.eos_token_id, "int8") >= 8
