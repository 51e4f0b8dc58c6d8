"""W8A8 quantization: int8 weights per output channel, int8 activations per token.

Both are symmetric (no zero point) and kept in float ("fake quant"): a value is
replaced by the nearest point of its int8 grid, ``clip(round(x / s), -127, 127) * s``.
The compiler's ``--precision int8`` re-derives the integers from these values, so the
grid computed here must be the one in docs/graph-contract.md (``PerTokenFakeQuant``
and ``DequantizeLinear`` with a per-output-channel scale). ``torch.round`` rounds half
to even, as numpy and ONNX ``Round`` do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

QMAX = 127


def weight_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scales of a PyTorch ``[out, in]`` weight: ``max|row| / 127``."""
    return w.detach().abs().amax(dim=1) / QMAX


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [out, in], scale float32 [out])`` with ``w ≈ q * scale[:, None]``."""
    scale = weight_scales(w).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w.detach().float() / safe[:, None]), -QMAX, QMAX)
    return q.to(torch.int8), scale


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` snapped to its symmetric per-output-channel int8 grid (zeros stay zero)."""
    q, scale = quantize_weight(w)
    return (q.float() * scale[:, None]).to(w.dtype)


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric per-token int8 fake quantization over the last axis (``PerTokenFakeQuant``).

    Gradients pass straight through the rounding, so this also serves quantization-aware
    training.
    """
    scale = x.detach().abs().amax(dim=-1, keepdim=True) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.clamp(torch.round(x / safe), -QMAX, QMAX) * scale
    return x + (y - x).detach()


def fake_quant_weight_ste(w: torch.Tensor) -> torch.Tensor:
    """``fake_quant_weight`` whose gradient passes straight through to ``w``."""
    return w + (fake_quant_weight(w) - w).detach()


def quantize_weights_(linears: dict[str, nn.Linear]) -> dict[str, list[float]]:
    """Snap every listed Linear's weight to its int8 grid in place; return the scales."""
    scales = {}
    with torch.no_grad():
        for name, linear in linears.items():
            q, scale = quantize_weight(linear.weight)
            linear.weight.copy_(q.float() * scale[:, None])
            scales[name] = scale.tolist()
    return scales


class ActivationFakeQuant:
    """Per-token fake quantization of the inputs of the given Linears (the "A8" of W8A8).

    A context manager: the forward pre-hooks exist only inside ``with``.
    """

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.handles = []

    def __enter__(self) -> ActivationFakeQuant:
        for linear in self.linears.values():
            self.handles.append(
                linear.register_forward_pre_hook(lambda _m, args: (fake_quant_per_token(args[0]),))
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class QuantAwareLinears:
    """Quantization-aware training: inside ``with``, the given Linears compute in W8A8
    fake quantization (weights on their per-channel int8 grid, inputs per token), with
    straight-through gradients, so training sees the rounding the int8 model will have.
    The float weights stay the trained parameters; ``quantize_weights_`` snaps them after.
    """

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears

    @staticmethod
    def _forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quant_weight_ste(linear.weight)
        return nn.functional.linear(fake_quant_per_token(x), weight, linear.bias)

    def __enter__(self) -> QuantAwareLinears:
        for linear in self.linears.values():
            linear.forward = lambda x, linear=linear: self._forward(linear, x)
        return self

    def __exit__(self, *exc) -> None:
        for linear in self.linears.values():
            del linear.forward  # back to nn.Linear.forward


def write_quantization_json(folder: Path, scales: dict[str, list[float]]) -> None:
    """Describe the W8A8 scheme next to the weights (see docs/sparsify.md)."""
    doc = {
        "scheme": "w8a8",
        "weights": {
            "dtype": "int8",
            "symmetric": True,
            "granularity": "per_output_channel",
            "note": "weights in model.safetensors are already q * scale; q = round(w / scale)",
            "scales": {f"{name}.weight": s for name, s in scales.items()},
        },
        "activations": {
            "dtype": "int8",
            "symmetric": True,
            "granularity": "per_token",
            "applies_to": "inputs of the quantized Linear layers",
        },
    }
    (Path(folder) / "quantization.json").write_text(json.dumps(doc, indent=1) + "\n")
