"""What a sparsify run leaves beside the weights: recipe.yaml, report.json, report.md and
(when matplotlib is installed) recovery.png, the perplexity-against-steps curve."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.sparsify.owl import OUTLIER_M
from sparsec.sparsify.sparsegpt import BLOCK_SIZE, DAMPENING
from sparsec.sparsify.squarehead import CE_WEIGHT, EPS, FEATURE_WEIGHT
from sparsec.sparsify.train import TrainConfig

# recipe.yaml's layout; `sparsify --recipe` refuses a recipe of a later one. 1: the first
# that records every option that shapes the weights and the report (older recipes, with
# no recipe_format, are read too: what they lack takes its default).
RECIPE_FORMAT = 1
SMOOTHING = (
    "SmoothQuant, alpha 0.5, folded into the norm weights before the q/k/v and gate/up "
    "Linears and into the gated MLP's up rows (up_proj, or the up half of a fused "
    "gate_up_proj)"
)


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
                # MODEL pruned further with steps 0: the dense model of the "dense" row.
                **({"dense_reference": opts.teacher} if opts.teacher and not opts.steps else {}),
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
                    "example_share": opts.example_share,
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
                    "smoothing": SMOOTHING if opts.smooth else "none",
                }
            }
        )
    return {
        "sparsec_version": version,
        "recipe_format": RECIPE_FORMAT,
        "model": opts.model,
        "stages": stages,
        "evaluation": {
            "sources": list(opts.eval),
            "tokens": opts.eval_tokens,
            "every": opts.eval_every,
            "curve_tokens": opts.curve_tokens,
        },
        "output_format": opts.output_format,
    }


def write_recipe(path: Path, opts, state: dict, version: str) -> None:
    import yaml

    path.write_text(yaml.safe_dump(recipe(opts, state, version), sort_keys=False))


# --- reading a recipe back (sparsify --recipe) -------------------------------------------


@dataclass(frozen=True)
class _Key:
    """One key of recipe.yaml: its type, the SparsifyOptions field it sets (None: a
    description, read and checked but setting nothing) or the value sparsec fixes."""

    kind: str  # str, int, number, bool, strings (a list of str) or any
    option: str | None = None
    nullable: bool = False
    fixed: object = None  # not an option: the recipe must have this sparsec's value
    convert: Callable | None = None  # (value, whole recipe) -> the option's value


def _dense_teacher(value: str, doc: dict) -> str | None:
    """``MODEL (dense)``, the default teacher, is no --teacher."""
    return None if value == f"{doc.get('model')} (dense)" else value


def _smoothing(value: str, doc: dict) -> bool:
    if value == "none":
        return False
    if value.startswith("SmoothQuant"):
        return True
    raise ValueError("expected 'none' or the SmoothQuant description sparsec writes")


_INFO = _Key("str")
_CALIBRATION = {
    "sources": _Key("strings", "calibration"),
    "samples": _Key("int", "calibration_samples"),
    "seq_len": _Key("int", "calibration_seq_len"),
    "seed": _Key("int", "seed"),
}
_OWL = {
    "method": _INFO,
    "lambda": _Key("number", "owl_lambda"),
    "outlier_m": _Key("number", fixed=OUTLIER_M),
    "per_layer": _Key("any"),  # measured, not set
}
_PRUNE = {
    "method": _Key("str", "method"),
    "sparsity": _Key("number", "sparsity"),
    "from_sparsity": _Key("number"),  # measured: MODEL's share of zeros
    "pattern": _Key("str", "pattern"),
    "layer_sparsity": _OWL,
    "dense_reference": _Key("str", "teacher"),
    "targets": _INFO,
    "calibration": _CALIBRATION,
    "block_size": _Key("int", fixed=BLOCK_SIZE),
    "dampening": _Key("number", fixed=DAMPENING),
    "hessian": _INFO,
    "sequential": _INFO,
}
_DISTILL = {
    "teacher": _Key("str", "teacher", convert=_dense_teacher),
    "output_loss": _Key("str", "output_loss"),
    "data": _Key("strings", "train"),
    "example_share": _Key("number", "example_share", nullable=True),
    "loss": {
        "feature": _INFO,
        "feature_weight": _Key("number", fixed=FEATURE_WEIGHT),
        "output": _INFO,
        "output_weight": _Key("number", fixed=CE_WEIGHT),
        "eps": _Key("number", fixed=EPS),
    },
    "masks": _INFO,
    "optimizer": _INFO,
    "schedule": _INFO,
    # TrainConfig's fields (the lr as used: --lr or the default by sparsity)
    "steps": _Key("int", "steps"),
    "lr": _Key("number", "lr"),
    "warmup": _Key("number", "warmup"),
    "batch_size": _Key("int", "batch_size"),
    "seq_len": _Key("int", "seq_len"),
    "seed": _Key("int", "seed"),
    "weight_decay": _Key("number", fixed=TrainConfig.weight_decay),
    "bf16": _Key("bool", "bf16"),
}
_QUANTIZE = {
    "scheme": _Key("str", fixed="w8a8"),
    "weights": _INFO,
    "activations": _INFO,
    "quantization_aware_steps": _Key("int", "qat_steps"),
    "smoothing": _Key("str", "smooth", convert=_smoothing),
}
_STAGES = {"prune": _PRUNE, "squarehead_distillation": _DISTILL, "quantize": _QUANTIZE}
_TOP = {
    "sparsec_version": _INFO,
    "recipe_format": _Key("int"),
    "model": _INFO,
    "stages": None,  # a list of one-key mappings, read by read_recipe
    "evaluation": {
        "sources": _Key("strings", "eval"),
        "tokens": _Key("int", "eval_tokens"),
        "every": _Key("int", "eval_every"),
        "curve_tokens": _Key("int", "curve_tokens"),
    },
    "output_format": _Key("str", "output_format"),
}
_REQUIRED = {
    "": ("stages",),
    "stages.prune": ("sparsity",),
    "stages.squarehead_distillation": ("steps",),
}


def _typed(kind: str, value) -> bool:
    if kind == "any":
        return True
    if kind == "strings":
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    if isinstance(value, bool):
        return kind == "bool"
    return isinstance(value, {"str": str, "int": int, "number": (int, float)}.get(kind, ()))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_KINDS = {
    "str": "a string",
    "int": "an integer",
    "number": "a number",
    "bool": "true or false",
    "strings": "a list of strings",
}


def read_recipe(path: Path) -> tuple[dict, dict]:
    """The options a recipe.yaml records, as ``({field: value}, {field: key})``: every
    SparsifyOptions field it sets and the key that set it (``stages.prune.sparsity``).

    A file that is not a recipe sparsec wrote (bad YAML, an unknown key, a wrong type, a
    later recipe_format, a fixed constant of another value) raises SparsecError naming
    the file and the key."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise SparsecError(f"--recipe {path}: cannot read it ({reason})") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise SparsecError(f"{path}: not valid YAML: {problem}{where}") from e

    def fail(key: str, problem: str) -> SparsecError:
        return SparsecError(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")

    if not isinstance(doc, dict):
        raise fail("", "not a sparsec recipe (a mapping with sparsec_version, model, stages)")
    fmt = doc.get("recipe_format", 0)
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > RECIPE_FORMAT:
        raise fail(
            "recipe_format",
            f"{fmt} is a later recipe format than this sparsec reads ({RECIPE_FORMAT}); "
            f"the recipe was written by sparsec {doc.get('sparsec_version')}: upgrade sparsec",
        )
    values: dict = {}
    keys: dict = {}

    def walk(mapping: dict, schema: dict, prefix: str) -> None:
        for name in _REQUIRED.get(prefix, ()):
            if name not in mapping:
                raise fail(f"{prefix}.{name}".lstrip("."), "missing (sparsec always writes it)")
        for name, value in mapping.items():
            key = f"{prefix}.{name}".lstrip(".")
            if name not in schema:
                raise fail(key, f"unknown key; sparsec writes {', '.join(schema)} here")
            spec = schema[name]
            if name == "stages" and not prefix:
                read_stages(value)
            elif isinstance(spec, dict):
                if not isinstance(value, dict):
                    raise fail(key, f"expected a mapping of {', '.join(spec)}")
                walk(value, spec, key)
            else:
                read_key(key, spec, value)

    def read_key(key: str, spec: _Key, value) -> None:
        if spec.kind == "number" and isinstance(value, str):  # YAML 1.1 reads 1e-4 as text
            with contextlib.suppress(ValueError):
                value = float(value)
        if not (value is None and spec.nullable) and not _typed(spec.kind, value):
            raise fail(key, f"expected {_KINDS[spec.kind]}, not {_shown(value)}")
        if spec.fixed is not None and value != spec.fixed:
            raise fail(
                key,
                f"{value!r}, but this sparsec's is fixed at {spec.fixed!r} (not an option): "
                "the run cannot be reproduced here",
            )
        if spec.option is None:
            return
        if spec.convert is not None:
            try:
                value = spec.convert(value, doc)
            except ValueError as e:
                raise fail(key, f"{value!r}: {e}") from e
        elif spec.kind == "number" and value is not None:
            value = float(value)
        if spec.option in values and values[spec.option] != value:
            raise fail(
                key,
                f"{value!r} differs from {keys[spec.option]}, {values[spec.option]!r}: both "
                f"are --{spec.option.replace('_', '-')}",
            )
        values[spec.option] = value
        keys[spec.option] = key

    def read_stages(stages) -> None:
        if not isinstance(stages, list):
            raise fail("stages", "expected a list of stages (prune, squarehead_distillation, ...)")
        bodies: dict = {}
        for i, item in enumerate(stages):
            if not (isinstance(item, dict) and len(item) == 1):
                raise fail(
                    f"stages[{i}]", f"expected one of {', '.join(_STAGES)}, not {_shown(item)}"
                )
            ((name, body),) = item.items()
            key = f"stages.{name}"
            if name not in _STAGES:
                raise fail(key, f"unknown stage; sparsec writes {', '.join(_STAGES)}")
            if name in bodies or (name == "prune") != (i == 0):
                raise fail(key, "out of place: prune comes first, then each stage at most once")
            if not isinstance(body, dict):
                raise fail(key, f"expected a mapping of {', '.join(_STAGES[name])}")
            bodies[name] = body
            walk(body, _STAGES[name], key)
        if "prune" not in bodies:
            raise fail("stages", "no prune stage")
        # What the stages that are there, or not, record.
        owl = "layer_sparsity" in bodies["prune"]
        values["layer_sparsity"] = "owl" if owl else "uniform"
        keys["layer_sparsity"] = "stages.prune.layer_sparsity" if owl else "stages.prune"
        if "squarehead_distillation" not in bodies:
            values["steps"], keys["steps"] = 0, "stages"
        values["int8"] = "quantize" in bodies
        keys["int8"] = "stages.quantize" if values["int8"] else "stages"

    walk(doc, _TOP, "")
    return values, keys


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
