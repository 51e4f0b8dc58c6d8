"""SmoothQuant-style smoothing: the float model is unchanged, zeros stay, W8A8 error drops."""

from __future__ import annotations

import torch

from sparsec.sparsify.layer_walk import prunable_linears
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
    """Found from the traced forward, not from names: each norm's weight before q/k/v and
    gate/up, the rows of up_proj before down_proj; o_proj's input has no such factor."""
    model, _ = make_tiny_llama(seed=2)
    calib = torch.randint(
        0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0)
    )
    maxima = activation_maxima(model, calib, batch_size=2)
    cfg = model.config
    assert len(maxima) == cfg.num_hidden_layers
    for layer, sites in zip(model.model.layers, maxima, strict=True):
        assert [list(group) for group, _, _ in sites] == [
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            ["mlp.gate_proj", "mlp.up_proj"],
            ["mlp.down_proj"],
        ]
        (_, attn_src, attn), (_, mlp_src, mlp), (_, down_src, down) = sites
        assert attn_src.parameter is layer.input_layernorm.weight
        assert mlp_src.parameter is layer.post_attention_layernorm.weight
        assert down_src.linear is layer.mlp.up_proj and down_src.parameter is None
        assert attn.shape == (cfg.hidden_size,) and mlp.shape == (cfg.hidden_size,)
        assert down.shape == (cfg.intermediate_size,)
        assert bool((attn > 0).all()) and bool((down >= 0).all())


def test_a_layout_without_a_foldable_input_is_refused():
    """A plain (not gated) MLP with a tanh (no scale commutes with it; a ReLU's would
    fold into fc_in's rows) after a norm with no weight: nothing to fold into."""
    import pytest
    from transformers import LlamaConfig

    from sparsec.errors import SparsecError

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in, self.fc_out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x, **_):
            return (x + self.fc_out(torch.tanh(self.fc_in(torch.tanh(x)))),)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig(num_hidden_layers=2, vocab_size=10)
            self.embed = torch.nn.Embedding(10, 8)
            self.layers = torch.nn.ModuleList([Block(), Block()])

        def forward(self, input_ids, use_cache=False):
            x = self.embed(input_ids)
            for layer in self.layers:
                x = layer(x)[0]
            return x

    with pytest.raises(SparsecError, match="no Linear input of this model can be smoothed"):
        activation_maxima(Toy(), torch.randint(0, 10, (2, 5)))
