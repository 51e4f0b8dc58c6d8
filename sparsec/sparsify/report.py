"""What a sparsify run leaves beside the weights: recipe.yaml, report.json, report.md and
(when matplotlib is installed) recovery.png, the perplexity-against-steps curve."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from sparsec.sparsify.owl import OUTLIER_M
from sparsec.sparsify.sparsegpt import BLOCK_SIZE, DAMPENING
from sparsec.sparsify.squarehead import CE_WEIGHT, EPS, FEATURE_WEIGHT


def layer_sparsity(linears: dict[str, nn.Linear]) -> list[dict]:
    """Measured fraction of exact zeros in every pruned Linear weight."""
    rows = []
    with torch.no_grad():
        for name, linear in linears.items():
            w = linear.weight
            rows.append(
                {
                    "name": f"{name}.weight",
                    "shape": list(w.shape),
                    "sparsity": float((w == 0).sum()) / w.numel(),
                }
            )
    return rows


def recipe(opts, state: dict, version: str) -> dict:
    stages = [
        {
            "prune": {
                "method": opts.method,
                "sparsity": opts.sparsity,
                "from_sparsity": round(state.get("input_sparsity", 0.0), 6),
                "pattern": opts.pattern,
                **(
                    {
                        "layer_sparsity": {
                            "method": "owl (outlier-weighted, Yin et al. 2024)",
                            "lambda": opts.owl_lambda,
                            "outlier_m": OUTLIER_M,
                            "per_layer": state.get("layer_sparsity"),
                        }
                    }
                    if opts.layer_sparsity == "owl"
                    else {}
                ),
                "targets": "every Linear of every decoder layer (embedding and LM head dense)",
                "calibration": {
                    "sources": list(opts.calibration),
                    "samples": opts.calibration_samples,
                    # Cut to the model's context length when longer (pipeline.py).
                    "seq_len": state.get("calibration_seq_len", opts.calibration_seq_len),
                    "seed": opts.seed,
                },
                **(
                    {
                        "block_size": BLOCK_SIZE,
                        "dampening": DAMPENING,
                        "hessian": "2/n sum x x^T over calibration tokens",
                        "sequential": "layer by layer on pruned inputs; q/k/v, o, gate/up, down",
                    }
                    if opts.method == "sparsegpt"
                    else {}
                ),
            }
        }
    ]
    if opts.steps:
        stages.append(
            {
                "squarehead_distillation": {
                    "teacher": opts.teacher or f"{opts.model} (dense)",
                    "output_loss": opts.output_loss,
                    "data": list(opts.train),
                    "loss": {
                        "feature": "sum over decoder layers of mean((hs-ht)^2) / (mean(ht^2)+eps)",
                        "feature_weight": FEATURE_WEIGHT,
                        "output": {
                            "ce": "cross-entropy on the training text's next tokens",
                            "kl": "KL(teacher || student) over next-token distributions",
                            "ce+kl": "cross-entropy on the text + KL(teacher || student)",
                        }[opts.output_loss],
                        "output_weight": CE_WEIGHT,
                        "eps": EPS,
                    },
                    "masks": "fixed; weights multiplied by their mask after every step",
                    "optimizer": "AdamW",
                    "schedule": "linear warmup then linear decay",
                    **state.get("train_config", {}),
                }
            }
        )
    if opts.int8:
        stages.append(
            {
                "quantize": {
                    "scheme": "w8a8",
                    "weights": "int8 symmetric per output channel, round half to even",
                    "activations": "int8 symmetric per token (inputs of the pruned Linears)",
                    "quantization_aware_steps": opts.qat_steps,
                    "smoothing": (
                        "SmoothQuant, alpha 0.5, folded into the norm weights before the q/k/v "
                        "and gate/up Linears and into the gated MLP's up rows (up_proj, or the "
                        "up half of a fused gate_up_proj)"
                        if opts.smooth
                        else "none"
                    ),
                }
            }
        )
    return {"sparsec_version": version, "model": opts.model, "stages": stages}


def write_recipe(path: Path, opts, state: dict, version: str) -> None:
    import yaml

    path.write_text(yaml.safe_dump(recipe(opts, state, version), sort_keys=False))


def write_report(folder: Path, opts, state: dict) -> None:
    ppl = state["perplexity"]
    report = {
        "model": opts.model,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "perplexity": ppl,
        "perplexity_ratio_to_dense": {
            stage: {s: v / ppl["dense"][s] for s, v in results.items()}
            for stage, results in ppl.items()
        },
        "recovery_curve": {"source": state.get("curve_source"), "points": state["curve"]},
        "layers": state["final_layers"],
        "pruning": state["layers"],
        "overall_sparsity": overall_sparsity(state["final_layers"]),
        "input_sparsity": state.get("input_sparsity", 0.0),
        "layer_sparsity": state.get("layer_sparsity"),
        "timings_s": state["timings"],
    }
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / "report.md").write_text(markdown(report))
    if state["curve"]:
        plot_curve(folder / "recovery.png", state["curve"], state.get("curve_source"), ppl)


def overall_sparsity(layers: list[dict]) -> float:
    """Fraction of zeros over all the weights ``layer_sparsity`` measured."""
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers)
    return zeros / sum(r["shape"][0] * r["shape"][1] for r in layers)


def markdown(report: dict) -> str:
    ppl = report["perplexity"]
    sources = list(ppl["dense"])
    lines = [
        f"# sparsec sparsify report: {report['model']}",
        "",
        f"Sparsity {report['options']['sparsity']:.0%} ({report['options']['pattern']}, "
        f"{report['options']['method']}, {report['options']['layer_sparsity']} across "
        "layers); measured over all pruned Linears: "
        f"{report['overall_sparsity']:.4f}.",
        "",
        "## Perplexity",
        "",
        "| stage | " + " | ".join(Path(s).name for s in sources) + " |",
        "| --- | " + " | ".join("---" for _ in sources) + " |",
    ]
    for stage, results in ppl.items():
        cells = [f"{results[s]:.2f} ({results[s] / ppl['dense'][s]:.2f}x)" for s in sources]
        if stage == "input":  # a model pruned before, pruned further by this run
            stage = f"input ({report['input_sparsity']:.1%} sparse)"
        elif stage == "dense" and "input" in ppl:
            stage = "dense (teacher)"
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    curve = report["recovery_curve"]["points"]
    if curve:
        lines += ["", f"## Recovery curve ({report['recovery_curve']['source']})", ""]
        lines += ["| step | perplexity |", "| --- | --- |"]
        lines += [f"| {p['step']} | {p['perplexity']:.2f} |" for p in curve]
    lines += [
        "",
        "## Per-layer sparsity",
        "",
        "| weight | shape | sparsity |",
        "| --- | --- | --- |",
    ]
    for row in report["layers"]:
        lines.append(
            f"| {row['name']} | {row['shape'][0]}x{row['shape'][1]} | {row['sparsity']:.4f} |"
        )
    lines += [
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["timings_s"].items()),
    ]
    return "\n".join(lines) + "\n"


def plot_curve(path: Path, curve: list[dict], source: str | None, ppl: dict) -> bool:
    """Perplexity against distillation steps; skipped (False) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["step"] for p in curve], [p["perplexity"] for p in curve], marker="o")
    ax.set_xlabel("SquareHead steps")
    ax.set_ylabel(f"perplexity ({Path(source).name if source else 'eval'}, first tokens)")
    ax.set_title("Recovery after one-shot pruning")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
