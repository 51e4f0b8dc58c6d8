"""W8A8 fake quantization against numpy references of docs/graph-contract.md."""

from __future__ import annotations

import json

import numpy as np
import torch

from sparsec.sparsify.quant import (
    ActivationFakeQuant,
    QuantAwareLinears,
    fake_quant_per_token,
    fake_quant_weight,
    quantize_weight,
    quantize_weights_,
    write_quantization_json,
)


def numpy_per_token(x: np.ndarray) -> np.ndarray:
    s = np.abs(x).max(axis=-1, keepdims=True) / 127
    safe = np.where(s > 0, s, 1)
    return np.clip(np.round(x / safe), -127, 127) * s


def test_per_token_matches_contract_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 33, generator=g) * torch.exp(torch.randn(2, 5, 1, generator=g))
    x[0, 1] = 0  # an all-zero token quantizes to zero
    x[1, 2, :4] = torch.tensor([0.5, 1.5, -2.5, 127.0])  # exact half steps: round to even
    got = fake_quant_per_token(x).numpy()
    np.testing.assert_allclose(got, numpy_per_token(x.numpy()), rtol=1e-6, atol=1e-7)
    assert np.all(got[0, 1] == 0)


def test_per_token_gradient_is_straight_through():
    x = torch.randn(3, 8, requires_grad=True)
    fake_quant_per_token(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_weight_quant_is_per_output_channel_and_keeps_zeros():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 40, generator=g) * torch.arange(1, 7).unsqueeze(1)
    w[w.abs() < 0.5] = 0.0  # a sparse weight
    w[3] = 0.0  # an all-zero row
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    np.testing.assert_allclose(scale.numpy(), np.abs(w.numpy()).max(1) / 127, rtol=1e-7)
    fq = fake_quant_weight(w)
    ref = numpy_per_token(w.numpy())  # per row of [out, in] = per output channel
    np.testing.assert_allclose(fq.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert torch.all(fq[w == 0] == 0)
    # Snapping is idempotent: the compiler re-derives exactly these integers.
    q2, scale2 = quantize_weight(fq)
    assert torch.equal(q2, q)
    torch.testing.assert_close(scale2, scale)


def test_quantize_weights_in_place_and_json(tiny_model, tmp_path):
    import copy

    from sparsec.sparsify.layer_walk import prunable_linears

    model = copy.deepcopy(tiny_model[0])
    linears = prunable_linears(model)
    originals = {n: m.weight.detach().clone() for n, m in linears.items()}
    scales = quantize_weights_(linears)
    for name, linear in linears.items():
        torch.testing.assert_close(linear.weight, fake_quant_weight(originals[name]))
    write_quantization_json(tmp_path, scales)
    doc = json.loads((tmp_path / "quantization.json").read_text())
    assert doc["scheme"] == "w8a8"
    assert doc["activations"]["granularity"] == "per_token"
    first = next(iter(linears))
    assert len(doc["weights"]["scales"][f"{first}.weight"]) == linears[first].out_features


def test_activation_hooks_quantize_linear_inputs_only_inside_with():
    linear = torch.nn.Linear(16, 4)
    x = torch.randn(3, 16)
    with ActivationFakeQuant({"l": linear}):
        inside = linear(x)
    torch.testing.assert_close(inside, linear(fake_quant_per_token(x)))
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias))


def test_quant_aware_linears_compute_w8a8_with_straight_through_gradients():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 4)
    x = torch.randn(3, 16)
    w8a8 = torch.nn.functional.linear(
        fake_quant_per_token(x), fake_quant_weight(linear.weight), linear.bias
    )
    with QuantAwareLinears({"l": linear}):
        inside = linear(x)
        inside.sum().backward()
    torch.testing.assert_close(inside, w8a8, rtol=0, atol=0)
    # straight through: d/dW sum(x_q @ W_q.T) = sum over tokens of x_q, for every row
    expected = fake_quant_per_token(x).sum(0).expand(4, 16)
    torch.testing.assert_close(linear.weight.grad, expected)
    float_out = torch.nn.functional.linear(x, linear.weight, linear.bias)
    torch.testing.assert_close(linear(x), float_out)  # back to float after the with
    assert not np.array_equal(float_out.detach().numpy(), w8a8.detach().numpy())
