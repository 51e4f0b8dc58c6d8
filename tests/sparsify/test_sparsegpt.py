"""SparseGPT on single layers and whole tiny models, against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsec.errors import SparsecError
from sparsec.sparsify.patterns import (
    check_sparsity,
    magnitude_mask,
    mask_follows,
    parse_pattern,
)
from sparsec.sparsify.sparsegpt import sparsegpt_prune


def correlated_inputs(cols: int, tokens: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features and uneven scales, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.exp(torch.randn(cols, generator=g))
    return (torch.randn(tokens, cols, generator=g) @ mix) * scale


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * (x.T.double() @ x.double()) / x.shape[0]


def reference_sparsegpt(w, h, sparsity, pattern, block=128, damp=0.01):
    """The algorithm written plainly in numpy float64: every OBS update applied to all
    later columns at once (no lazy batching), masks chosen the same way."""
    w = w.astype(np.float64).copy()
    rows, cols = w.shape
    h = h.copy()
    h[np.diag_indices(cols)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    pruned = np.zeros_like(w, dtype=bool)
    done = 0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        d = np.diag(hinv)[i1:i2]
        if pattern.kind == "unstructured":
            score = (w[:, i1:i2] ** 2 / d**2).ravel()
            k = int(sparsity * rows * i2 + 0.5) - done
            done += k
            flat = np.zeros(score.size, dtype=bool)
            flat[np.argsort(score, kind="stable")[:k]] = True
            pruned[:, i1:i2] = flat.reshape(rows, -1)
        for j in range(i1, i2):
            if pattern.kind == "nm" and (j - i1) % pattern.m == 0:
                score = w[:, j : j + pattern.m] ** 2 / np.diag(hinv)[j : j + pattern.m] ** 2
                drop = np.argsort(score, axis=1, kind="stable")[:, : pattern.m - pattern.n]
                np.put_along_axis(pruned[:, j : j + pattern.m], drop, True, axis=1)
            q = np.where(pruned[:, j], 0.0, w[:, j])
            err = (w[:, j] - q) / hinv[j, j]
            w[:, j:] -= np.outer(err, hinv[j, j:])
            w[:, j] = q
    return w, ~pruned


@pytest.mark.parametrize("pattern_name", ["unstructured", "2:4"])
def test_lazy_batch_update_matches_plain_obs(pattern_name):
    rows, cols = 24, 200  # two column blocks, the second partial
    pattern = parse_pattern(pattern_name)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(rows, cols, generator=g)
    h = hessian_of(correlated_inputs(cols, 600, seed=2))
    result = sparsegpt_prune(w, h, 0.5, pattern)
    ref_w, ref_keep = reference_sparsegpt(w.numpy(), h.numpy(), 0.5, pattern)
    assert (result.mask.numpy() == ref_keep).mean() > 0.99  # near-ties may flip a few
    same = result.mask.numpy() == ref_keep
    np.testing.assert_allclose(result.weight.numpy()[same.all(1)], ref_w[same.all(1)], atol=2e-3)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("cols", [64, 200, 320])
def test_unstructured_sparsity_is_exact(sparsity, cols):
    w = torch.randn(40, cols)
    h = hessian_of(correlated_inputs(cols, 300, seed=3))
    result = sparsegpt_prune(w, h, sparsity, parse_pattern("unstructured"))
    zeros = int((result.weight == 0).sum())
    assert zeros == int(sparsity * w.numel() + 0.5)
    assert torch.equal(result.mask, result.weight != 0)


@pytest.mark.parametrize("name", ["2:4", "1:4", "4:8", "block16", "block32"])
def test_structured_patterns(name):
    pattern = parse_pattern(name)
    sparsity = 1 - pattern.n / pattern.m if pattern.kind == "nm" else 0.6
    w = torch.randn(32, 256)
    h = hessian_of(correlated_inputs(256, 400, seed=4))
    result = sparsegpt_prune(w, h, sparsity, pattern)
    assert mask_follows(result.weight != 0, pattern)
    # Exact in units of the pattern's group (a block counts as one unit).
    groups = w.numel() // pattern.m
    assert int((result.weight == 0).sum()) == int(sparsity * groups + 0.5) * pattern.m


@pytest.mark.parametrize("name", ["unstructured", "2:4", "block16"])
def test_sparsegpt_reconstructs_better_than_magnitude(name):
    """The point of SparseGPT: ||W X - W' X|| below magnitude pruning's on the same layer."""
    pattern = parse_pattern(name)
    cols, rows = 128, 64
    x = correlated_inputs(cols, 2000, seed=5)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(6))
    sparsity = 0.5
    sgpt = sparsegpt_prune(w, hessian_of(x), sparsity, pattern).weight
    mag = w * magnitude_mask(w, sparsity, pattern)
    err_sgpt = float(((x @ (w - sgpt).T) ** 2).sum())
    err_mag = float(((x @ (w - mag).T) ** 2).sum())
    assert (sgpt == 0).sum() == (mag == 0).sum()
    assert err_sgpt < 0.6 * err_mag


def test_dead_inputs_are_pruned_first():
    x = correlated_inputs(64, 300, seed=7)
    x[:, :8] = 0  # eight features never fire
    w = torch.randn(16, 64)
    result = sparsegpt_prune(w, hessian_of(x), 0.25, parse_pattern("unstructured"))
    assert (result.weight[:, :8] == 0).all()
    assert int((result.weight == 0).sum()) == 256


def test_bad_patterns_and_sparsities():
    with pytest.raises(SparsecError, match="outside"):
        check_sparsity(1.0, parse_pattern("unstructured"))
    with pytest.raises(SparsecError, match="outside"):
        check_sparsity(-0.1, parse_pattern("unstructured"))
    with pytest.raises(SparsecError, match="--sparsity 0.5"):
        check_sparsity(0.7, parse_pattern("2:4"))
    with pytest.raises(SparsecError, match="unknown sparsity pattern"):
        parse_pattern("diagonal")
    with pytest.raises(SparsecError, match="N:M needs"):
        parse_pattern("4:2")
    with pytest.raises(SparsecError, match="at least 16"):
        parse_pattern("block4")
    with pytest.raises(SparsecError, match="does not divide"):
        parse_pattern("3:5").check_width("layer", 64)


def test_staged_llama_layer_equals_rerunning_the_layer(tiny_model):
    """The cached-activation path prunes exactly like re-running the layer per group."""
    import copy

    from sparsec.sparsify.layer_walk import decoder_layers
    from sparsec.sparsify.prune import capture_first_layer_inputs, prune_layer

    model = tiny_model[0]
    calibration = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(0))
    inputs = capture_first_layer_inputs(model, calibration, chunk=2)
    results = []
    for staged in (True, False):
        layer = copy.deepcopy(decoder_layers(model)[0])
        pattern = parse_pattern("unstructured")
        _, masks, out = prune_layer(layer, inputs, 0.5, pattern, "l0", staged=staged)
        results.append((layer, masks, out))
    (a, masks_a, out_a), (b, masks_b, out_b) = results
    for name in masks_a:
        assert torch.equal(masks_a[name], masks_b[name]), name
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=n)
    for xa, xb in zip(out_a.hidden, out_b.hidden, strict=True):
        torch.testing.assert_close(xa, xb, rtol=1e-4, atol=1e-4)
