"""Sparsify on every model family: SparseGPT (and OWL), SquareHead, W8A8 and smoothing
find the decoder layers and their Linears from the model, not from Llama's names.

Each family is a tiny random model built from its own transformers config class
(``sparsec.testing.TINY_CONFIG`` sizes), called through the sparsify library directly
(no ``ModelConfig``: whether sparsec supports a family is ``load_model``'s question):

- Llama 3.x: ``llama3`` RoPE scaling, untied LM head;
- Qwen2: q/k/v Linears with a bias;
- Qwen3: per-head RMSNorm on q and k;
- Mistral: sliding-window attention (a window shorter than the calibration text);
- Phi-3: fused ``qkv_proj`` and ``gate_up_proj``, partial rotary;
- OPT: LayerNorm with a bias, a bias on every Linear, a ReLU MLP (``fc1``, ``fc2``), its
  layers under ``model.decoder``;
- GPT-2: Conv1D projections (nn.Linear after ``models.as_linear_modules``), a fused
  ``c_attn``, a GELU MLP (whose down input cannot be smoothed);
- MPT: ALiBi, LayerNorm without bias, a fused ``Wqkv``, a GELU MLP.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from sparsec.models import as_linear_modules
from sparsec.sparsify.layer_walk import (
    InputSource,
    find_decoder_layers,
    prunable_linears,
    trace_groups,
)
from sparsec.sparsify.owl import outlier_ratios, owl_sparsities
from sparsec.sparsify.patterns import parse_pattern
from sparsec.sparsify.prune import capture_first_layer_inputs, prune_model, run_layer
from sparsec.sparsify.quant import (
    ActivationFakeQuant,
    QuantAwareLinears,
    quantize_weights_,
)
from sparsec.sparsify.smooth import activation_maxima, smooth_
from sparsec.sparsify.squarehead import distillation_loss, record_layer_outputs
from sparsec.sparsify.train import MaskedTrainer, TrainConfig
from sparsec.testing import TINY_CONFIG

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
FAMILIES = {
    "llama3": ("Llama", {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2", {}),
    "qwen3": ("Qwen3", {"head_dim": 16}),
    "mistral": ("Mistral", {"sliding_window": 8, "head_dim": 16}),
    "phi3": ("Phi3", {"partial_rotary_factor": 0.5}),
    # (without dropout: the SquareHead steps compare two losses of one batch)
    "opt": ("OPT", {"ffn_dim": 128, "word_embed_proj_dim": 64, "dropout": 0.0}),
    "gpt2": ("GPT2", {"n_inner": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}),
    "mpt": ("Mpt", {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256}),
}
# Not a family: every Linear with a bias, the MLP's too (up_proj's bias rows are divided
# when down's input is smoothed).
BIASED_LLAMA = {"llama-biases": ("Llama", {"attention_bias": True, "mlp_bias": True})}
# Per decoder layer, the Linear groups in execution order (Linears reading one tensor).
GROUPS = {
    "llama3": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    "phi3": [["qkv_proj"], ["o_proj"], ["gate_up_proj"], ["down_proj"]],
    "opt": [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]],
    "gpt2": [["c_attn"], ["c_proj"], ["c_fc"], ["c_proj"]],
    "mpt": [["Wqkv"], ["out_proj"], ["up_proj"], ["down_proj"]],
}
# The down projection's input is act(up) with a GELU: no scale commutes with it.
UNSMOOTHED_DOWN = {"gpt2", "mpt"}
# Per family: where the decoder layers are, their two norms (before attention, before
# the MLP), the MLP Linear whose rows make the last Linear's input, and the final norm.
LAYOUT = {
    "llama": ("model.layers", "input_layernorm", "post_attention_layernorm", "up_proj",
              "model.norm"),
    "phi3": ("model.layers", "input_layernorm", "post_attention_layernorm", "gate_up_proj",
             "model.norm"),
    "opt": ("model.decoder.layers", "self_attn_layer_norm", "final_layer_norm", "fc1",
            "model.decoder.final_layer_norm"),
    "gpt2": ("transformer.h", "ln_1", "ln_2", "c_fc", "transformer.ln_f"),
    "mpt": ("transformer.blocks", "norm_1", "norm_2", "up_proj", "transformer.norm_f"),
}  # fmt: skip


def layout(family: str) -> tuple:
    return LAYOUT.get(family, LAYOUT["llama"])


SEQ = 32  # longer than Mistral's window of 8, so the window changes the attention


def make_family(family: str, seed: int = 0, **overrides) -> nn.Module:
    name, config_overrides = {**FAMILIES, **BIASED_LLAMA}[family]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{name}Config")(
        **{**TINY_CONFIG, **config_overrides, **overrides}
    )
    model = as_linear_modules(transformers.AutoModelForCausalLM.from_config(config).float().eval())
    with torch.no_grad():  # transformers starts biases at zero, where they test nothing
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)
    return model


def tokens(batch: int, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def loss_of(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(logits).all()
    return float(
        nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].flatten()
        )
    )


def parameters_outside(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter but the decoder Linears' weights: embeddings, LM head, norms, biases."""
    pruned = {id(lin.weight) for lin in prunable_linears(model).values()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in pruned}


# --- the walk ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_walk_finds_layers_and_groups(family):
    model = make_family(family)
    path, layers = find_decoder_layers(model)
    assert path == layout(family)[0] and len(layers) == TINY_CONFIG["num_hidden_layers"]
    expected = GROUPS.get(family, GROUPS["llama3"])
    for layer in trace_groups(model, tokens(1, 16)):
        assert [[short(n) for n in group] for group, _ in layer] == expected
    linears = prunable_linears(model)
    assert {short(n) for n in linears} == {n for group in expected for n in group}
    assert not any(isinstance(m, nn.Embedding) for m in linears.values())
    assert model.get_output_embeddings() not in linears.values()


def test_every_layer_gets_its_own_attention_mask():
    """Qwen2 with a sliding-window layer after a full-attention one: the captured kwargs
    of each layer, chained through ``run_layer``, give the model's own hidden states.
    Layer 0's mask reused for layer 1 (the ablation) does not."""
    model = make_family("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids = tokens(2, 16)
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
    captured = capture_first_layer_inputs(model, ids, chunk=1)
    layers = find_decoder_layers(model)[1]
    after_0 = run_layer(layers[0], captured.at_layer(0, captured.hidden))
    after_1 = run_layer(layers[1], captured.at_layer(1, after_0))
    torch.testing.assert_close(torch.cat(after_0), expected[1])
    with torch.no_grad():
        final = model.model.norm(torch.cat(after_1))
    torch.testing.assert_close(final, expected[2], rtol=1e-5, atol=1e-5)
    reused = run_layer(layers[1], captured.at_layer(0, after_0))  # the ablation
    assert not torch.allclose(model.model.norm(torch.cat(reused)), expected[2], atol=1e-3)
    # prune_model passes each layer its own: at sparsity 0 its layer outputs are the model's.
    outputs = []
    prune_model(
        model,
        ids,
        0.0,
        parse_pattern("unstructured"),
        chunk=1,
        on_layer=lambda _i, _r, _m, out: outputs.append(torch.cat(out.hidden)),
    )
    torch.testing.assert_close(outputs[0], expected[1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(outputs[1]), expected[2], rtol=1e-5, atol=1e-5)


# --- SparseGPT and OWL ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsegpt_half_of_every_linear(family):
    model = make_family(family)
    calibration, held_out = tokens(32), tokens(4, seed=1)
    dense = copy.deepcopy(model)
    outside = parameters_outside(model)
    masks = {}
    prune_model(
        model,
        calibration,
        0.5,
        parse_pattern("unstructured"),
        chunk=4,
        on_layer=lambda _i, _reports, m, _outputs: masks.update(m),
    )
    linears = prunable_linears(model)
    assert set(masks) == set(linears)  # the masks name the model's own modules
    for name, lin in linears.items():
        zeros = int((lin.weight == 0).sum())
        assert zeros == lin.weight.numel() // 2, name
        assert torch.equal(lin.weight != 0, masks[name]), name
    for name, p in parameters_outside(model).items():  # norms, embedding, head, biases
        assert torch.equal(p, outside[name]), name
    if family == "qwen2":
        assert sum(".bias" in n for n in outside) == 3 * TINY_CONFIG["num_hidden_layers"]
    if family == "phi3":
        assert any(n.endswith("qkv_proj") for n in linears)
        assert any(n.endswith("gate_up_proj") for n in linears)

    dense_loss, pruned_loss = loss_of(dense, held_out), loss_of(model, held_out)
    assert pruned_loss < dense_loss + 0.5, (dense_loss, pruned_loss)
    # SparseGPT's updates used the right activations: closer to the dense model than
    # magnitude pruning to the same sparsity.
    magnitude = copy.deepcopy(dense)
    prune_model(magnitude, calibration, 0.5, parse_pattern("unstructured"), method="magnitude")
    with torch.no_grad():
        ref = dense(input_ids=held_out).logits
        error = (model(input_ids=held_out).logits - ref).pow(2).mean()
        error_magnitude = (magnitude(input_ids=held_out).logits - ref).pow(2).mean()
    assert error < error_magnitude, (float(error), float(error_magnitude))


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_owl_layer_sparsities(family):
    model = make_family(family)
    calibration = tokens(4)
    ratios = outlier_ratios(model, calibration, m=3.0)
    sparsities = owl_sparsities(ratios, 0.5, lam=0.05)
    assert len(sparsities) == TINY_CONFIG["num_hidden_layers"]
    assert sparsities[0] != sparsities[1] and np.mean(sparsities) == pytest.approx(0.5)
    prune_model(model, calibration, sparsities, parse_pattern("unstructured"), chunk=2)
    for name, lin in prunable_linears(model).items():
        layer = int(name.split(".")[2])
        expected = int(sparsities[layer] * lin.weight.numel() + 0.5)
        assert int((lin.weight == 0).sum()) == expected, name


# --- SquareHead -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_squarehead_steps(family):
    teacher = make_family(family)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    masks = {}
    prune_model(
        student,
        tokens(4),
        0.5,
        parse_pattern("unstructured"),
        method="magnitude",
        on_layer=lambda _i, _r, m, _o: masks.update(m),
    )
    ids, mask = tokens(2, 16, seed=2), torch.ones(2, 16, dtype=torch.long)

    # The hooks catch every decoder layer's output: the model's own hidden states.
    with torch.no_grad(), record_layer_outputs(teacher) as hidden:
        out = teacher(input_ids=ids, output_hidden_states=True)
    assert len(hidden) == TINY_CONFIG["num_hidden_layers"]
    for caught, own in zip(hidden[:-1], out.hidden_states[1:-1], strict=True):
        assert torch.equal(caught, own)
    final_norm = teacher.get_submodule(layout(family)[4])
    torch.testing.assert_close(final_norm(hidden[-1]), out.hidden_states[-1])

    trainer = MaskedTrainer(student, TrainConfig(steps=2, lr=1e-3, warmup=0.0), masks)
    before = {n: lin.weight.detach().clone() for n, lin in prunable_linears(student).items()}
    parts = [
        trainer.train_step(lambda: distillation_loss(student, teacher, ids, mask)) for _ in range(2)
    ]
    assert all(np.isfinite(p["loss"]) and p["squarehead"] > 0 for p in parts)
    assert parts[1]["squarehead"] < parts[0]["squarehead"]
    for name, lin in prunable_linears(student).items():
        assert not torch.equal(lin.weight, before[name]), name  # it trains every Linear
        assert torch.equal(lin.weight != 0, masks[name]), name  # and keeps the zeros


# --- W8A8 -------------------------------------------------------------------------------


def w8a8_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """W8A8 by hand: int8 weights per output channel, int8 activations per token, the
    integer product scaled back, the bias added after, in float. The scales and the
    rounding are float32 arithmetic, as in the model (float64 would round a value a hair
    from a tie the other way); the product is exact integer arithmetic."""
    x, w = x.astype(np.float32), w.astype(np.float32)
    sw = np.abs(w).max(axis=1) / np.float32(127)
    qw = np.clip(np.round(w / np.where(sw > 0, sw, 1)[:, None]), -127, 127)
    sx = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    qx = np.clip(np.round(x / np.where(sx > 0, sx, 1)), -127, 127)
    y = (qx.astype(np.int64) @ qw.astype(np.int64).T) * sx.astype(np.float64) * sw[None, :]
    return y if b is None else y + b


def linear_inputs_and_outputs(model: nn.Module, ids: torch.Tensor):
    """Every decoder Linear's input (as it arrives, before any pre-hook such as the fake
    quant of its input) and output, and the logits."""
    inputs, outputs = {}, {}

    def catch_input(name):
        def hook(_module, args):
            inputs[name] = args[0]

        return hook

    def catch_output(name):
        def hook(_module, _args, out):
            outputs[name] = out

        return hook

    handles = []
    for name, lin in prunable_linears(model).items():
        handles.append(lin.register_forward_pre_hook(catch_input(name), prepend=True))
        handles.append(lin.register_forward_hook(catch_output(name)))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return {name: (inputs[name], outputs[name]) for name in outputs}, logits


@pytest.mark.parametrize("family", [*FAMILIES, *BIASED_LLAMA])
def test_w8a8_matches_a_hand_written_reference(family):
    model = make_family(family)
    ids = tokens(2, 16)
    with torch.no_grad():
        float_logits = model(input_ids=ids).logits
    qat = copy.deepcopy(model)
    float_weights = {
        n: lin.weight.detach().numpy().copy() for n, lin in prunable_linears(model).items()
    }
    quantize_weights_(prunable_linears(model))
    with ActivationFakeQuant(prunable_linears(model)):
        seen, logits = linear_inputs_and_outputs(model, ids)
    assert set(seen) == set(prunable_linears(model))  # fused Linears included
    biased = 0
    for name, lin in prunable_linears(model).items():
        x, out = seen[name]  # x: the float input, before the fake quant
        b = None if lin.bias is None else lin.bias.detach().double().numpy()
        ref = w8a8_reference(x.numpy(), float_weights[name], b)
        np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-4, atol=1e-5, err_msg=name)
        # The check is sharp: without A8, or without the bias, it would not match.
        dense = x.double().numpy() @ float_weights[name].T.astype(np.float64)
        dense += 0 if b is None else b
        assert not np.allclose(out.double().numpy(), dense, rtol=1e-4, atol=1e-5), name
        if b is not None:
            biased += 1
            assert not np.allclose(out.double().numpy(), ref - b, rtol=1e-4, atol=1e-5), name
    assert (
        biased
        == {"qwen2": 3, "llama-biases": 7, "opt": 6, "gpt2": 4}.get(family, 0)
        * TINY_CONFIG["num_hidden_layers"]
    )

    assert torch.isfinite(logits).all()
    relative = float((logits - float_logits).norm() / float_logits.norm())
    assert 0 < relative < 0.1, relative
    with QuantAwareLinears(prunable_linears(qat)), torch.no_grad():  # QAT computes the same
        torch.testing.assert_close(qat(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


# --- smoothing --------------------------------------------------------------------------


def with_outliers(model: nn.Module, family: str) -> nn.Module:
    """Outlier channels in every smoothed input, as real LLMs have, so that the smoothing
    factors are far from 1."""
    _, attn_norm, mlp_norm, up, _ = layout(family)
    with torch.no_grad():
        for layer in find_decoder_layers(model)[1]:
            layer.get_submodule(attn_norm).weight[3] = 30.0
            layer.get_submodule(mlp_norm).weight[7] = -25.0
            for name, lin in layer.named_modules():  # the up rows of down's input
                if name.rsplit(".", 1)[-1] == up:
                    rows = lin.out_features // 2 if up == "gate_up_proj" else 0
                    lin.weight[rows + 11] *= 30.0
    return model


def w8a8_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(model)
    quantize_weights_(prunable_linears(model))
    with ActivationFakeQuant(prunable_linears(model)), torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", [*FAMILIES, *BIASED_LLAMA])
def test_smoothing_is_exact_and_covers_gated_mlps(family):
    model = with_outliers(make_family(family, seed=3), family)
    _, attn_norm, mlp_norm, up, _ = layout(family)
    calibration, ids = tokens(4), tokens(2, 16, seed=1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    maxima = activation_maxima(model, calibration, batch_size=2)
    layers = find_decoder_layers(model)[1]
    for layer, sites in zip(layers, maxima, strict=True):
        names = [[short(n) for n in group] for group, _, _ in sites]
        expected = GROUPS.get(family, GROUPS["llama3"])
        if family in UNSMOOTHED_DOWN:
            assert names == [expected[0], expected[2]]  # not o_proj's, nor down's input
            (_, attn, _), (_, mlp, _) = sites
            assert attn.parameter is layer.get_submodule(attn_norm).weight
            assert mlp.parameter is layer.get_submodule(mlp_norm).weight
            continue
        assert names == [expected[0], expected[2], expected[3]]  # not o_proj's input
        (_, attn, _), (_, mlp, _), (_, down, x_down) = sites
        assert attn.parameter is layer.get_submodule(attn_norm).weight
        assert mlp.parameter is layer.get_submodule(mlp_norm).weight
        # a LayerNorm's bias is divided with its weight (OPT)
        assert attn.bias is getattr(layer.get_submodule(attn_norm), "bias", None)
        width = x_down.shape[0]
        up_linear = next(m for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] == up)
        assert down.linear is up_linear
        if family == "phi3":  # down's input is up * act(gate), the halves of one output
            assert down.rows == slice(width, 2 * width)
        else:  # up * act(gate), or relu(fc1) (OPT)
            assert down.rows is None

    smoothed = copy.deepcopy(model)
    sites = 2 if family in UNSMOOTHED_DOWN else 3
    assert smooth_(smoothed, activation_maxima(smoothed, calibration, batch_size=2)) == sites * len(
        layers
    )
    with torch.no_grad():
        after = smoothed(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # the same float model
    error = (w8a8_logits(model, ids) - before).abs().mean()
    error_smoothed = (w8a8_logits(smoothed, ids) - before).abs().mean()
    assert error_smoothed < 0.8 * error, (float(error), float(error_smoothed))


def test_phi3_down_smoothing_folds_into_the_up_half_only():
    """The ablation: the same factors folded into the gate half of ``gate_up_proj``
    change the function (the activation does not commute with a scale); into the up half
    they do not."""
    model = with_outliers(make_family("phi3", seed=3), "phi3")
    calibration, ids = tokens(4), tokens(2, 16, seed=1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    width = TINY_CONFIG["intermediate_size"]
    for gate_half in (False, True):
        trial = copy.deepcopy(model)
        maxima = activation_maxima(trial, calibration, batch_size=2)
        if gate_half:
            for layer in maxima:
                group, source, x = layer[-1]
                layer[-1] = (group, InputSource(linear=source.linear, rows=slice(0, width)), x)
        smooth_(trial, maxima)
        with torch.no_grad():
            after = trial(input_ids=ids).logits
        assert torch.allclose(after, before, rtol=1e-4, atol=1e-4) is not gate_half


def _up_first_by_slicing(mlp):
    def forward(h):
        out = mlp.gate_up_proj(h)
        width = out.shape[-1] // 2
        return mlp.down_proj(out[..., :width] * mlp.activation_fn(out[..., width:]))

    return forward


def _split_act_first(mlp):
    def forward(h):
        gate, up = torch.split(mlp.gate_up_proj(h), mlp.down_proj.in_features, dim=-1)
        return mlp.down_proj(mlp.activation_fn(gate) * up)

    return forward


def _interleaved(mlp):
    def forward(h):
        out = mlp.gate_up_proj(h)
        return mlp.down_proj(out[..., 1::2] * mlp.activation_fn(out[..., ::2]))

    return forward


@pytest.mark.parametrize(
    "layout, rows",
    [
        (_up_first_by_slicing, slice(0, 128)),
        (_split_act_first, slice(128, 256)),
        (_interleaved, None),  # not a run of rows: not folded
    ],
)
def test_fused_gate_up_other_layouts(layout, rows):
    """The up rows are read off the view itself (``[..., a:b]``, ``split``, operands in
    either order); a strided view (interleaved gate/up) is not a row range and is left
    unsmoothed rather than folded wrongly."""
    model = with_outliers(make_family("phi3", seed=3), "phi3")
    for layer in find_decoder_layers(model)[1]:
        layer.mlp.forward = layout(layer.mlp)
    calibration, ids = tokens(4), tokens(2, 16, seed=1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    maxima = activation_maxima(model, calibration, batch_size=2)
    for layer, sites in zip(find_decoder_layers(model)[1], maxima, strict=True):
        downs = [source for group, source, _ in sites if any("down" in n for n in group)]
        if rows is None:
            assert downs == []
        else:
            assert downs == [InputSource(linear=layer.mlp.gate_up_proj, rows=rows)]
    smooth_(model, maxima)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
