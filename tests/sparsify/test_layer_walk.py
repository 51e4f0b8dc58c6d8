"""The generic decoder-layer walk: layers, Linear groups and the paused per-chunk forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.sparsify.layer_walk import (
    find_decoder_layers,
    linear_groups,
    prunable_linears,
    walk_layer,
)
from sparsec.sparsify.patterns import parse_pattern
from sparsec.sparsify.prune import LayerInputs, capture_first_layer_inputs, prune_layer


class FusedBlock(nn.Module):
    """Not a Llama layer: fused qkv with bias, a causal running mean for attention, and a
    plain (not gated) GELU MLP with biases; other module names throughout."""

    def __init__(self, dim: int = 32, width: int = 64):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.Wqkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc_in = nn.Linear(dim, width)
        self.fc_out = nn.Linear(width, dim)

    def forward(self, x, scale=1.0):
        q, k, v = self.Wqkv(self.ln(x)).chunk(3, dim=-1)
        weights = torch.sigmoid((q * k).sum(-1, keepdim=True))
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        mixed = (weights * v).cumsum(1) / steps
        h = x + self.out(mixed) * scale
        return (h + self.fc_out(nn.functional.gelu(self.fc_in(self.ln2(h)))),)


def _chunks(n=3, dim=32, seq=24):
    g = torch.Generator().manual_seed(0)
    return LayerInputs([torch.randn(2, seq, dim, generator=g) for _ in range(n)], [{}] * n)


def test_llama_layers_and_groups_are_found(tiny_model):
    model = tiny_model[0]
    path, layers = find_decoder_layers(model)
    assert path == "model.layers" and len(layers) == model.config.num_hidden_layers
    assert next(iter(prunable_linears(model))) == "model.layers.0.self_attn.q_proj"
    inputs = capture_first_layer_inputs(model, torch.randint(0, 256, (2, 16)), chunk=2)
    groups = linear_groups(layers[0], inputs.hidden[0], inputs.kwargs[0])
    assert [list(g) for g in groups] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_groups_of_another_layout():
    inputs = _chunks()
    groups = linear_groups(FusedBlock(), inputs.hidden[0], inputs.kwargs[0])
    assert [list(g) for g in groups] == [["Wqkv"], ["out"], ["fc_in"], ["fc_out"]]


def test_a_group_sees_its_inputs_after_the_groups_before_it_were_pruned():
    """Zeroing the fused qkv at its pause makes every chunk's ``out`` input zero: the
    walk paused the forwards, it did not just record a dense pass."""
    block, inputs = FusedBlock(), _chunks()
    groups = linear_groups(block, inputs.hidden[0], inputs.kwargs[0])
    seen = {}

    def on_group(group, xs):
        seen[next(iter(group))] = xs
        if "Wqkv" in group:
            group["Wqkv"].weight.data.zero_()
            group["Wqkv"].bias.data.zero_()

    dense_out = [block(x)[0] for x in inputs.hidden]
    outputs = walk_layer(block, inputs.hidden, inputs.kwargs, groups, on_group)
    assert list(seen) == ["Wqkv", "out", "fc_in", "fc_out"]
    assert len(seen["out"]) == 3 and all(not x.any() for x in seen["out"])
    for x, got, dense in zip(inputs.hidden, outputs, dense_out, strict=True):
        assert torch.equal(got, block(x)[0])  # the layer's output with qkv zeroed ...
        assert not torch.equal(got, dense)  # ... not the dense one


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_staged_pruning_of_another_layout_equals_rerunning_it(pattern):
    inputs = _chunks()
    results = []
    for staged in (True, False):
        block = FusedBlock()
        torch.manual_seed(1)
        block.load_state_dict(FusedBlock().state_dict())
        reports, masks, out = prune_layer(
            block, inputs, 0.5, parse_pattern(pattern), "blocks.0", staged=staged
        )
        results.append((masks, out.hidden))
        assert [r.name for r in reports] == [
            f"blocks.0.{n}" for n in ("Wqkv", "out", "fc_in", "fc_out")
        ]
        assert all(abs(r.sparsity - 0.5) < 1e-9 for r in reports)
    (masks_a, out_a), (masks_b, out_b) = results
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_failure_at_a_pause_propagates_and_leaves_no_hooks():
    block, inputs = FusedBlock(), _chunks()
    groups = linear_groups(block, inputs.hidden[0], inputs.kwargs[0])

    def on_group(group, xs):
        if "fc_in" in group:
            raise SparsecError("stop here")

    with pytest.raises(SparsecError, match="stop here"):
        walk_layer(block, inputs.hidden, inputs.kwargs, groups, on_group)
    assert all(not m._forward_pre_hooks for m in block.modules())
    reference = copy.deepcopy(block)
    assert torch.equal(block(inputs.hidden[0])[0], reference(inputs.hidden[0])[0])


def test_a_linear_the_forward_never_runs_is_named():
    block, inputs = FusedBlock(), _chunks()
    block.unused = nn.Linear(32, 32)
    with pytest.raises(SparsecError, match=r"never run by its forward: \['unused'\]"):
        linear_groups(block, inputs.hidden[0], inputs.kwargs[0])


def test_the_callers_grad_mode_is_kept():
    """The chunks' forwards share this thread's grad mode: it must come back as it was."""
    block, inputs = FusedBlock(), _chunks()
    groups = linear_groups(block, inputs.hidden[0], inputs.kwargs[0])
    assert torch.is_grad_enabled()
    walk_layer(block, inputs.hidden, inputs.kwargs, groups, lambda group, xs: None)
    assert torch.is_grad_enabled()
