"""SmoothQuant-style smoothing: the float model is unchanged, zeros stay, W8A8 error drops."""

from __future__ import annotations

import torch

from sparsec.sparsify.prune import prunable_linears
from sparsec.sparsify.quant import ActivationFakeQuant, quantize_weights_
from sparsec.sparsify.smooth import activation_maxima, smooth_
from sparsec.testing import make_tiny_llama, zero_smallest


def _model_with_outliers():
    model, _ = make_tiny_llama(seed=5)
    zero_smallest(model, 0.5)
    with torch.no_grad():  # outlier input channels, as real LLMs have
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] = 60.0
            layer.post_attention_layernorm.weight[7] = -45.0
            layer.mlp.up_proj.weight[11] *= 40.0
    return model


def _w8a8_error(model, ids) -> float:
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        q = _copy(model)
        quantize_weights_(prunable_linears(q))
        with ActivationFakeQuant(prunable_linears(q)):
            out = q(input_ids=ids).logits
    return float((out - ref).abs().mean())


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_float_outputs_and_zeros_unchanged_and_w8a8_error_drops():
    model = _model_with_outliers()
    calib = torch.randint(
        0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)
    )
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    zeros = {n: lin.weight == 0 for n, lin in prunable_linears(model).items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    error_before = _w8a8_error(model, ids)

    smoothed = _copy(model)
    smooth_(smoothed, activation_maxima(smoothed, calib))
    with torch.no_grad():
        after = smoothed(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # same float model
    for name, lin in prunable_linears(smoothed).items():
        assert torch.equal(lin.weight == 0, zeros[name]), name  # sparsity pattern kept
    assert not torch.equal(
        smoothed.model.layers[0].input_layernorm.weight,
        model.model.layers[0].input_layernorm.weight,
    )
    error_after = _w8a8_error(smoothed, ids)
    assert error_after < 0.5 * error_before, (error_before, error_after)


def test_maxima_cover_the_three_smoothed_inputs():
    model, _ = make_tiny_llama(seed=2)
    calib = torch.randint(
        0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0)
    )
    maxima = activation_maxima(model, calib, batch_size=2)
    cfg = model.config
    assert len(maxima) == cfg.num_hidden_layers
    for attn, mlp, down in maxima:
        assert attn.shape == (cfg.hidden_size,) and mlp.shape == (cfg.hidden_size,)
        assert down.shape == (cfg.intermediate_size,)
        assert bool((attn > 0).all()) and bool((down >= 0).all())
