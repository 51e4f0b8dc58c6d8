"""How far each model family gets through export -> optimize -> compile today.

For planning the model-families work: each case builds a tiny random model from the
family's transformers config class (``sparsec.testing.TINY_CONFIG`` sizes), lifts the
``ModelConfig`` refusal for the probed values only (``contract.SUPPORTED``, in this
process), and runs the stages, printing
one JSON line per case: the stage reached, the fusions that did not happen and why,
and, when it compiles, max |Δlogits| against transformers (teacher-forced, 30 tokens).
A refusal lifted here is not support: the families issue lifts it with the tests.

    .venv/bin/python benchmarks/family_probe.py [CASE ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# case: (config class, config overrides, ModelConfig values to allow)
CASES = {
    "llama3-rope": ("LlamaConfig", {"rope_scaling": LLAMA3}, {"rope.type": "llama3"}),
    "linear-rope": (
        "LlamaConfig",
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"rope.type": "linear"},
    ),
    "llama-untied": ("LlamaConfig", {"tie_word_embeddings": False}, {}),
    "qwen2-bias": ("Qwen2Config", {}, {"family": "qwen2", "attention_bias": True}),
    "qwen3-qknorm": ("Qwen3Config", {"head_dim": 16}, {"family": "qwen3"}),
    "mistral-window": (
        "MistralConfig",
        {"sliding_window": 8, "head_dim": 16},
        {"family": "mistral", "sliding_window": 8},
    ),
    "phi3-partial": (
        "Phi3Config",
        {"partial_rotary_factor": 0.5},
        {"family": "phi3", "rope.partial_rotary_factor": 0.5},
    ),
}


def probe(case: str) -> dict:
    import numpy as np
    import torch
    import transformers

    from sparsec import contract, runtime
    from sparsec.codegen.compile import compile_model
    from sparsec.export import export_model
    from sparsec.passes import optimize_file
    from sparsec.testing import TINY_CONFIG, make_byte_tokenizer

    config_class, overrides, allow = CASES[case]
    for field, value in allow.items():
        contract.SUPPORTED[field] = (*contract.SUPPORTED[field], value)
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**TINY_CONFIG, **overrides})
    model_class = getattr(transformers, config_class.replace("Config", "ForCausalLM"))
    model = model_class(config).float().eval()
    ids = list(range(40, 70))
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    result: dict = {"case": case, "reached": "start"}
    folder = Path(tempfile.mkdtemp(prefix="family-probe-"))
    try:
        export_model(model, make_byte_tokenizer(), folder / "m.onnx", source=case)
        result["reached"] = "export"
        report = optimize_file(folder / "m.onnx", folder / "m.opt.onnx")
        result["reached"] = "optimize"
        result["not_fused"] = [f"{p.name}: {why}" for p in report.passes for why in p.not_fused]
        result["left_outside_contract"] = report.outside_contract
        compile_model(folder / "m.opt.onnx", folder / "m.so", max_context=64, quiet=True)
        result["reached"] = "compile"
        logits = runtime.load(folder / "m.so").forward(ids)
        result["max_abs_dlogits"] = float(np.abs(logits - reference).max())
    except Exception as e:  # a probe: report where the pipeline stops and why
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return result


def main(argv: list[str]) -> int:
    if len(argv) == 1:  # one case, in this process
        print(json.dumps(probe(argv[0])))
        return 0
    for case in argv or CASES:  # each case in its own process: SUPPORTED is patched
        out = subprocess.run(
            [sys.executable, __file__, case], capture_output=True, text=True, check=False
        )
        lines = out.stdout.strip().splitlines()
        print(lines[-1] if lines else json.dumps({"case": case, "crashed": out.returncode}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
