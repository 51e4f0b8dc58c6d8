"""``sparsec sparsify --recipe OUT/recipe.yaml``: a recipe re-runs the run that wrote it."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from sparsec import cli
from sparsec.sparsify import pipeline
from sparsec.sparsify.report import read_recipe, recipe
from sparsec.sparsify.train import TrainConfig

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
) * 30
# Small enough for the tiny model: a run takes well under a second.
SMALL = ["--calibration-samples", "4", "--calibration-seq-len", "48", "--seq-len", "24",
         "--eval-tokens", "256", "--batch-size", "2", "--quiet"]  # fmt: skip
DATA = ["--calibration", "text.txt", "--train", "text.txt", "--eval", "text.txt"]
# Non-default options of the first run (the lr is left to its default by sparsity).
FIRST = ["--sparsity", "0.5", "--seed", "7", "--steps", "2", "--int8", "--owl-lambda", "0.05",
         "--layer-sparsity", "owl", "--output-loss", "ce+kl"]  # fmt: skip
# SparsifyOptions fields a recipe does not record: where and how a run runs, not what.
NOT_RECORDED = {
    "model",
    "output",
    "checkpoint_dir",
    "checkpoint_every",
    "resume",
    "quiet",
    "device",
}


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    """One sparsify run from the command line, data named relative to its folder:
    (that folder, the SparsifyOptions it ran with)."""
    folder = tmp_path_factory.mktemp("first")
    (folder / "text.txt").write_text(TEXT)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        seen = _spy(mp)
        argv = ["sparsify", str(tiny_model_dir), "-o", "out", *FIRST, *DATA, *SMALL]
        assert cli.main(argv) == 0
    return folder, seen[0]


def _spy(mp) -> list:
    """Record the SparsifyOptions of every run (which still runs)."""
    seen = []
    real = pipeline.sparsify

    def spy(opts):
        seen.append(opts)
        return real(opts)

    mp.setattr(pipeline, "sparsify", spy)
    return seen


def _options_of(monkeypatch, argv) -> pipeline.SparsifyOptions:
    """The SparsifyOptions the command line makes (nothing runs)."""
    seen = []
    monkeypatch.setattr(pipeline, "sparsify", lambda opts: seen.append(opts))
    assert cli.main(argv) == 0
    return seen[0]


def refused(capsys, argv) -> str:
    assert cli.main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsec sparsify: error: "), lines
    return lines[0]


def test_recipe_alone_reproduces_the_run(first_run, tiny_model_dir, monkeypatch):
    folder, first = first_run
    monkeypatch.chdir(folder)
    seen = _spy(monkeypatch)
    argv = ["sparsify", str(tiny_model_dir), "-o", "out2", "--recipe", "out/recipe.yaml"]
    assert cli.main([*argv, "--quiet"]) == 0
    again = seen[0]
    # The same options, the lr as used (the default by sparsity, which the recipe records).
    expected = dataclasses.replace(first, output=Path("out2"), lr=pipeline.default_lr(0.5))
    assert again == expected
    assert (first.seed, first.steps, first.int8, first.layer_sparsity) == (7, 2, True, "owl")

    a, b = load_file(folder / "out/model.safetensors"), load_file(folder / "out2/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit
    for name in ("recipe.yaml", "quantization.json"):
        assert (folder / "out" / name).read_text() == (folder / "out2" / name).read_text()
    ppl = [
        json.loads((folder / o / "report.json").read_text())["perplexity"] for o in ("out", "out2")
    ]
    assert ppl[0] == ppl[1]


def test_command_line_overrides_the_recipe(first_run, tiny_model_dir, monkeypatch, tmp_path):
    folder, _ = first_run
    monkeypatch.chdir(folder)
    (folder / "other.txt").write_text(TEXT)
    base = [
        "sparsify",
        str(tiny_model_dir),
        "-o",
        str(tmp_path / "o"),
        "--recipe",
        "out/recipe.yaml",
    ]
    recorded = _options_of(monkeypatch, base)  # the ablation: the recipe's values
    assert (recorded.seed, recorded.steps, recorded.smooth, recorded.sparsity) == (7, 2, True, 0.5)
    assert (recorded.calibration, recorded.eval_tokens, recorded.quiet) == (
        ["text.txt"],
        256,
        False,
    )
    assert recorded.checkpoint_every == 300.0  # not recorded: the command line's default

    overridden = _options_of(
        monkeypatch,
        [
            *base,
            "--seed",
            "3",
            "--steps",
            "0",
            "--no-smoothing",
            "--sparsity",
            "0.6",
            "--calibration",
            "other.txt",
            "--quiet",
        ],  # fmt: skip
    )
    assert (overridden.seed, overridden.steps, overridden.smooth) == (3, 0, False)
    assert (overridden.sparsity, overridden.calibration) == (0.6, ["other.txt"])
    # --steps 0, the default, given explicitly still overrides; the rest stays recorded.
    assert (overridden.int8, overridden.owl_lambda, overridden.output_loss) == (True, 0.05, "ce+kl")


def test_recorded_data_that_is_gone_names_the_file_and_the_option(
    first_run, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    folder, _ = first_run
    monkeypatch.chdir(tmp_path)  # text.txt was relative to the first run's folder
    recipe_file = folder / "out/recipe.yaml"
    argv = ["sparsify", str(tiny_model_dir), "-o", "o", "--recipe", str(recipe_file)]
    line = refused(capsys, argv)
    assert "stages.prune.calibration.sources: text.txt does not exist" in line
    assert "pass --calibration FILE" in line
    (tmp_path / "mine.txt").write_text(TEXT)
    opts = _options_of(
        monkeypatch,
        [*argv, "--calibration", "mine.txt", "--train", "mine.txt", "--eval", "mine.txt"],
    )
    assert opts.calibration == opts.train == opts.eval == ["mine.txt"]


def test_sparsity_is_required_without_a_recipe(tiny_model_dir, capsys):
    line = refused(capsys, ["sparsify", str(tiny_model_dir), "-o", "o"])
    assert "--sparsity is required (or --recipe FILE" in line


GOOD = {
    "sparsec_version": "0.1.0",
    "recipe_format": 1,
    "model": "m",
    "stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5, "dampening": 0.01}}],
}


def _with(path: str, value) -> dict:
    doc = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    at = doc
    for p in parents:
        at = at["stages"][0]["prune"] if p == "prune" else at[p]
    at[last] = value
    return doc


@pytest.mark.parametrize(
    "text, message",
    [
        ("stages: [prune: {sparsity: 0.5}\n", "not valid YAML: .* at line 2, column 1$"),
        ("- 1\n- 2\n", ": not a sparsec recipe"),
        (_with("prune.sparsityy", 0.5), "stages.prune.sparsityy: unknown key; sparsec writes"),
        (_with("colour", "red"), ": colour: unknown key"),
        (_with("prune.sparsity", "half"), r"stages.prune.sparsity: expected a number, not 'half'"),
        (_with("prune.calibration", {"seed": 1.5}), "calibration.seed: expected an integer"),
        (_with("prune.calibration", {"samples": 0}), r"calibration.samples 0: must be an integer"),
        (_with("prune.calibration", {"sources": "a.txt"}), "expected a list of strings"),
        (_with("recipe_format", 2), "recipe_format: 2 is a later recipe format .* upgrade sparsec"),
        (_with("prune.dampening", 0.02), "dampening: 0.02, but this sparsec's is fixed at 0.01"),
        (_with("stages", []), "stages: no prune stage"),
        (_with("stages", [{"quantize": {}}]), "stages.quantize: out of place"),
        (_with("stages", [{"prune": {}}]), "stages.prune.sparsity: missing"),
        (
            _with("stages", [{"prune": {"sparsity": 0.5}}, {"quantize": {"smoothing": "on"}}]),
            "smoothing: 'on': expected 'none' or the SmoothQuant",
        ),  # fmt: skip
        (
            _with(
                "stages",
                [
                    {"prune": {"sparsity": 0.5, "calibration": {"seed": 1}}},
                    {"squarehead_distillation": {"steps": 1, "seed": 2}},
                ],
            ),
            "squarehead_distillation.seed: 2 differs from stages.prune.calibration.seed, 1",
        ),  # fmt: skip
    ],
)
def test_a_bad_recipe_is_one_line_naming_the_file_and_key(
    text, message, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad recipe was refused")

    monkeypatch.setattr("sparsec.models.load_model", fail)
    path = tmp_path / "recipe.yaml"
    path.write_text(text if isinstance(text, str) else yaml.safe_dump(text, sort_keys=False))
    line = refused(capsys, ["sparsify", str(tiny_model_dir), "-o", "o", "--recipe", str(path)])
    assert line.startswith(f"sparsec sparsify: error: {path}: ")
    assert re.search(message, line), line


def test_a_missing_recipe_file(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    line = refused(capsys, ["sparsify", str(tiny_model_dir), "-o", "o", "--recipe", str(missing)])
    assert f"--recipe {missing}: cannot read it" in line


def test_an_older_recipe_without_a_format_is_read(tmp_path):
    path = tmp_path / "recipe.yaml"
    old = {k: v for k, v in GOOD.items() if k != "recipe_format"}
    path.write_text(yaml.safe_dump(old))
    values, keys = read_recipe(path)
    assert values == {"method": "sparsegpt", "sparsity": 0.5, "layer_sparsity": "uniform",
                      "steps": 0, "int8": False}  # fmt: skip
    assert keys["sparsity"] == "stages.prune.sparsity"


# --- every option round-trips through recipe.yaml ---------------------------------------

files = st.lists(st.sampled_from(["a.txt", "builtin:verne", "/d/b.jsonl"]), min_size=1, max_size=3)
numbers = st.floats(0.001, 1.0, allow_nan=False)
OPTIONS = st.fixed_dictionaries(
    {
        "sparsity": st.sampled_from([0.3, 0.5, 0.7]),
        "pattern": st.sampled_from(["unstructured", "2:4", "block16"]),
        "method": st.sampled_from(["sparsegpt", "magnitude"]),
        "layer_sparsity": st.sampled_from(["uniform", "owl"]),
        "owl_lambda": numbers,
        "calibration": files,
        "calibration_samples": st.integers(1, 4096),
        "calibration_seq_len": st.integers(1, 4096),
        "train": files,
        "steps": st.integers(0, 3),
        "lr": st.none() | numbers,
        "batch_size": st.integers(1, 64),
        "seq_len": st.integers(2, 4096),
        "example_share": st.none() | numbers,
        "warmup": numbers,
        "teacher": st.none() | st.sampled_from(["dense/", "HuggingFaceTB/SmolLM2-135M"]),
        "output_loss": st.sampled_from(["ce", "kl", "ce+kl"]),
        "int8": st.booleans(),
        "qat_steps": st.integers(0, 3),
        "smooth": st.booleans(),
        "bf16": st.booleans(),
        "eval": files,
        "eval_tokens": st.integers(2, 10**6),
        "eval_every": st.integers(0, 100),
        "curve_tokens": st.integers(2, 10**6),
        "seed": st.integers(0, 2**32 - 1),
        "output_format": st.sampled_from(["hf", "compressed-tensors"]),
    }
)


def _reproducing(opts: pipeline.SparsifyOptions) -> dict:
    """The options that shape this run's results (those of a stage it skips do not)."""
    keep = {f.name for f in dataclasses.fields(opts)} - NOT_RECORDED
    if opts.layer_sparsity != "owl":
        keep.discard("owl_lambda")
    if not opts.steps:
        keep -= {"train", "lr", "batch_size", "seq_len", "example_share", "warmup",
                 "output_loss", "bf16"}  # fmt: skip
        keep -= {"teacher"} if opts.teacher is None else set()
    if not opts.int8:
        keep -= {"qat_steps", "smooth"}
    values = {k: v for k, v in dataclasses.asdict(opts).items() if k in keep}
    if "lr" in values and values["lr"] is None:
        values["lr"] = pipeline.default_lr(opts.sparsity)
    return values


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(OPTIONS)
def test_every_option_round_trips(tmp_path, options):
    opts = pipeline.SparsifyOptions(model="m", output=Path("o"), **options)
    state = {"calibration_seq_len": opts.calibration_seq_len, "input_sparsity": 0.0}
    if opts.layer_sparsity == "owl":
        state["layer_sparsity"] = [opts.sparsity, opts.sparsity]
    if opts.steps:
        lr = opts.lr if opts.lr is not None else pipeline.default_lr(opts.sparsity)
        config = TrainConfig(opts.steps, lr, opts.warmup, opts.batch_size, opts.seq_len, opts.seed,
                             bf16=opts.bf16)  # fmt: skip
        state["train_config"] = config.to_dict()  # as Run.distill records it
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(opts, state, "0.1.0"), sort_keys=False))
    values, keys = read_recipe(path)
    assert values == _reproducing(opts)
    assert set(keys) == set(values)


def test_a_full_recipe_records_every_option_but_where_it_ran(tmp_path):
    """A new SparsifyOptions field fails here until recipe() records it (or it is added
    to NOT_RECORDED)."""
    opts = pipeline.SparsifyOptions(
        model="m", output=Path("o"), sparsity=0.5, layer_sparsity="owl", steps=2, int8=True,
        teacher="t",
    )  # fmt: skip
    state = {"train_config": TrainConfig(2, 1e-4).to_dict(), "layer_sparsity": [0.5]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(opts, state, "0.1.0")))
    values, _ = read_recipe(path)
    assert set(values) == {f.name for f in dataclasses.fields(opts)} - NOT_RECORDED
