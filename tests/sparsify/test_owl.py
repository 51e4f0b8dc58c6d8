"""OWL layer sparsities: the outlier ratio against a by-hand reference, the rescaling, and the
pipeline pruning each layer to its own sparsity."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

# The pipeline tests' tiny-model options (tests/sparsify is on sys.path).
from test_sparsify_pipeline import options

from sparsec.errors import SparsecError
from sparsec.sparsify.layer_walk import decoder_layers
from sparsec.sparsify.owl import outlier_ratios, owl_sparsities
from sparsec.sparsify.pipeline import sparsify


def test_sparsities_keep_the_mean_and_spread_by_outliers():
    ratios = [0.01, 0.03, 0.02, 0.05]
    got = owl_sparsities(ratios, 0.6, lam=0.08)
    assert np.mean(got) == pytest.approx(0.6, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(0.16, abs=1e-12)  # spread 2 * lambda
    # More outliers, more weights kept.
    assert np.argsort(got).tolist() == np.argsort(ratios)[::-1].tolist()


def test_equal_ratios_or_zero_lambda_give_uniform_sparsity():
    assert owl_sparsities([0.02] * 5, 0.7) == [0.7] * 5
    assert owl_sparsities([0.01, 0.09], 0.5, lam=0.0) == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("sparsity, lam", [(0.1, 0.08), (0.95, 0.08), (0.5, -0.01)])
def test_lambda_that_would_leave_0_to_0_99_is_refused(sparsity, lam):
    with pytest.raises(SparsecError, match="--owl-lambda"):
        owl_sparsities([0.0, 1.0], sparsity, lam)


def _reference_ratio(model, calibration, layer_index: int, m: float) -> float:
    """Layer ``layer_index``'s outlier ratio from a plain full-model forward."""
    layer = decoder_layers(model)[layer_index]
    linears = [mod for mod in layer.modules() if isinstance(mod, torch.nn.Linear)]
    seen: dict[int, list[np.ndarray]] = {id(lin): [] for lin in linears}
    hooks = [
        lin.register_forward_hook(
            lambda mod, args, _o: seen[id(mod)].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for lin in linears
    ]
    with torch.no_grad():
        model(input_ids=calibration, use_cache=False)
    for h in hooks:
        h.remove()
    scores = []
    for lin in linears:
        x = torch.cat(seen[id(lin)]).double().numpy()
        norms = np.sqrt((x * x).mean(0))
        scores.append((np.abs(lin.weight.detach().double().numpy()) * norms[None, :]).ravel())
    scores = np.concatenate(scores)
    return float((scores > m * scores.mean()).mean())


def test_outlier_ratios_match_a_plain_forward(tiny_model):
    model, _ = tiny_model
    calibration = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1))
    ratios = outlier_ratios(model, calibration, m=3.0, chunk=4)
    assert len(ratios) == model.config.num_hidden_layers
    for i in range(len(ratios)):
        assert ratios[i] == pytest.approx(_reference_ratio(model, calibration, i, 3.0), abs=1e-9)


def test_planted_outliers_raise_a_layers_ratio(tiny_model):
    model, _ = tiny_model
    model = copy.deepcopy(model)
    calibration = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    before = outlier_ratios(model, calibration)
    with torch.no_grad():
        w = decoder_layers(model)[1].mlp.up_proj.weight
        w[:, :3] *= 50.0  # three input columns of large weights
    after = outlier_ratios(model, calibration)
    assert after[1] > before[1] + 0.005
    assert after[0] == pytest.approx(before[0])  # layers before it see the same inputs


def _options(model_dir, text: Path, out: Path, **overrides):
    return options(
        model_dir, text, out, **{"layer_sparsity": "owl", "owl_lambda": 0.1, **overrides}
    )


def test_pipeline_prunes_each_layer_to_its_owl_sparsity(tiny_model_dir, text_file, tmp_path):
    import yaml

    out = sparsify(_options(tiny_model_dir, text_file, tmp_path / "out"))
    report = json.loads((out / "report.json").read_text())
    per_layer = report["layer_sparsity"]
    assert len(set(round(s, 6) for s in per_layer)) > 1
    assert np.mean(per_layer) == pytest.approx(0.5, abs=1e-9)
    weights = load_file(out / "model.safetensors")
    for i, target in enumerate(per_layer):
        for name, w in weights.items():
            if name.startswith(f"model.layers.{i}.") and name.endswith("proj.weight"):
                assert float((w == 0).float().mean()) == pytest.approx(target, abs=2e-3), name
    assert report["overall_sparsity"] == pytest.approx(0.5, abs=2e-3)
    prune = yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["prune"]
    assert prune["layer_sparsity"]["per_layer"] == pytest.approx(per_layer)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(pattern="2:4"), "use --pattern unstructured or block16"),
        (dict(owl_lambda=0.3), "--owl-lambda 0.3 must be between 0 and 0.245"),
        (dict(layer_sparsity="random"), "unknown --layer-sparsity 'random'"),
    ],
)
def test_bad_owl_options_are_clear_errors(tiny_model_dir, text_file, tmp_path, overrides, message):
    with pytest.raises(SparsecError, match=message):
        sparsify(_options(tiny_model_dir, text_file, tmp_path / "out", **overrides))
