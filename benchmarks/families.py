"""The model-family table of the README: each family's tiny model through every stage.

For each family of ``sparsec.testing.FAMILIES`` (random weights at tiny sizes, with the
family's differences switched on: a window shorter than the prompt, random biases and
norm scales): export -> optimize -> compile -> run, dense fp32 and 70% magnitude-zeroed
fp32 and int8, against transformers (fp32) or the W8A8 reference (int8, from the first
rounding tie on the int8 rows may differ by one step; see tests/families). Prints one
row per family: ops left outside the contract, max |Δlogits| over every position of a
57-token prompt (teacher-forced), and greedy tokens equal to transformers' of the 48
generated (up to the first step whose top-2 margin is within the tolerance, in brackets
when that cut the comparison short).

    .venv/bin/python benchmarks/families.py [FAMILY ...]     # about 2 minutes
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "The quick brown fox jumps over the lazy dog, and then it"
NEW = 48


def _greedy(rt, ref, ids, tokenizer, tolerance):
    import torch

    out = rt.generate(ids, max_new_tokens=NEW).token_ids
    with torch.no_grad():
        hf = ref.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                          pad_token_id=tokenizer.eos_token_id, output_logits=True,
                          return_dict_in_generate=True)  # fmt: skip
    tokens = hf.sequences[0, len(ids) :].tolist()
    clear = next(
        (
            i
            for i, lg in enumerate(hf.logits)
            if float(lg[0].topk(2).values.diff().abs()) <= tolerance
        ),
        len(tokens),
    )
    equal = next((i for i, (a, b) in enumerate(zip(out, tokens, strict=False)) if a != b), NEW)
    return min(equal, clear), clear


def row(family: str, folder: Path) -> str:
    import numpy as np
    import torch

    from sparsec import runtime
    from sparsec.codegen.compile import compile_model
    from sparsec.export import export_model
    from sparsec.passes import optimize_file
    from sparsec.testing import (
        fake_quant_w8a8,
        int8_tie_position,
        make_tiny_family,
        zero_smallest,
    )

    cells = [family]
    for sparsity, precision, kernels in ((0.0, "fp32", "dense"), (0.7, "fp32", "bitmask"),
                                         (0.7, "int8", "bitmask")):  # fmt: skip
        model, tokenizer = make_tiny_family(family, seed=1)
        if sparsity:
            zero_smallest(model, sparsity)
        stem = folder / f"{family}-s{round(sparsity * 100)}"
        if not stem.with_suffix(".opt.onnx").exists():
            export_model(model, tokenizer, stem.with_suffix(".onnx"), source=family)
            report = optimize_file(stem.with_suffix(".onnx"), stem.with_suffix(".opt.onnx"))
            if sparsity == 0.0:
                cells.append(", ".join(report.outside_contract) or "none")
        so = stem.with_name(f"{stem.name}-{precision}.so")
        compile_model(stem.with_suffix(".opt.onnx"), so, precision=precision, kernels=kernels,
                      max_context=128, quiet=True)  # fmt: skip
        rt = runtime.load(so, threads=2)
        ref = fake_quant_w8a8(model) if precision == "int8" else model
        ids = tokenizer(PROMPT).input_ids
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].numpy()
        error = np.abs(rt.forward(ids) - want).max(axis=-1)
        # int8: rows from the first activation rounding tie on may differ by one step
        tie = int8_tie_position(ref, ids) if precision == "int8" else len(ids)
        cell = f"{error[:tie].max():.1e}"
        if tie < len(ids):
            cell += f" (tie at row {tie}; after: {error[tie:].max():.0e})"
        equal, clear = _greedy(rt, ref, ids, tokenizer, 1e-4 if precision == "fp32" else 1e-3)
        cells.append(cell)
        cells.append(f"{equal}/{NEW}" + (f" [{clear}]" if clear < NEW else ""))
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> int:
    from sparsec.testing import FAMILIES

    print("| family | outside contract | fp32 dense Δ | greedy | fp32 70% Δ | greedy "
          "| int8 70% Δ | greedy |")  # fmt: skip
    print("| --- " * 8 + "|")
    with tempfile.TemporaryDirectory(prefix="families-") as tmp:
        for family in argv or FAMILIES:
            print(row(family, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
