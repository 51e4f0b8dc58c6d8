"""SquareHead loss on hand-made numbers, and masks that survive training."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sparsec.errors import SparsecError
from sparsec.sparsify.layer_walk import prunable_linears
from sparsec.sparsify.patterns import parse_pattern
from sparsec.sparsify.prune import prune_model
from sparsec.sparsify.squarehead import (
    EPS,
    distillation_loss,
    language_model_loss,
    logit_kl_loss,
    record_layer_outputs,
    squarehead_layer_losses,
    squarehead_loss,
)
from sparsec.sparsify.train import (
    MaskedTrainer,
    TrainConfig,
    bf16_linear_weights_,
    require_bf16_cpu,
    warmup_then_decay,
)


def test_squarehead_matches_formula_by_hand():
    # One sequence of three tokens, two features; the last token is padding.
    teacher = [torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])]
    student = [torch.tensor([[[1.0, 1.0], [2.0, 4.0], [-50.0, 7.0]]])]
    mask = torch.tensor([[1, 1, 0]])
    # Real tokens only: squared errors 0, 1, 1, 0 -> mean 0.5;
    # teacher energy 1, 4, 9, 16 -> mean 7.5.
    expected = 0.5 / (7.5 + EPS)
    got = squarehead_layer_losses(student, teacher, mask)
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(expected, rel=1e-6)


def test_squarehead_sums_layers():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 5, 8, generator=g) * s for s in (1.0, 10.0)]
    student = [t + 0.1 * torch.randn(t.shape, generator=g) for t in teacher]
    mask = torch.ones(2, 5, dtype=torch.long)
    per_layer = [
        ((s - t) ** 2).mean() / ((t**2).mean() + EPS) for s, t in zip(student, teacher, strict=True)
    ]
    assert float(squarehead_loss(student, teacher, mask)) == pytest.approx(
        float(sum(per_layer)), rel=1e-6
    )
    # Normalising by the teacher's energy makes the loss scale-free per layer.
    scaled = squarehead_layer_losses([s * 7 for s in student], [t * 7 for t in teacher], mask)
    torch.testing.assert_close(scaled, squarehead_layer_losses(student, teacher, mask))


def test_language_model_loss_ignores_padding():
    logits = torch.randn(1, 4, 10)
    ids = torch.tensor([[1, 2, 3, 9]])
    mask = torch.tensor([[1, 1, 1, 0]])
    expected = torch.nn.functional.cross_entropy(logits[0, :2], ids[0, 1:3])
    torch.testing.assert_close(language_model_loss(logits, ids, mask), expected)


def test_distillation_loss_uses_decoder_layer_outputs(tiny_model):
    model, _ = tiny_model
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    with record_layer_outputs(model) as hidden:
        model(input_ids=ids, attention_mask=mask)
    assert len(hidden) == model.config.num_hidden_layers  # no embedding output
    # Student == teacher: no feature loss, only the language-model loss.
    loss, parts = distillation_loss(model, model, ids, mask)
    assert parts["squarehead"] == 0.0
    assert parts["loss"] == pytest.approx(parts["ce"])


def test_logit_kl_matches_formula_by_hand():
    # Two real tokens over a 2-word vocabulary, then a padding token that must not count.
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.01, 0.99]]]))
    student = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1], [0.99, 0.01]]]))
    mask = torch.tensor([[1, 1, 0]])
    first = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    expected = (first + 0.0) / 2  # the second token's distributions agree
    # Logits are unnormalised: shifting a row by a constant must not change anything.
    got = logit_kl_loss(student + 3.0, teacher - 1.0, mask)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_kl_distillation_trains_on_the_teacher_not_the_text(tiny_model):
    model, _ = tiny_model
    ids = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(ids)
    # Student == teacher: both losses vanish, though the text's cross-entropy does not.
    loss, parts = distillation_loss(model, model, ids, mask, output_loss="kl")
    assert parts["squarehead"] == 0.0
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6)
    assert parts["loss"] == pytest.approx(0.0, abs=1e-6)
    assert parts["ce"] > 1.0  # reported for the log, not part of the loss
    # A different student: the loss is SquareHead + KL, and its gradient reaches the weights.
    student = copy.deepcopy(model)
    with torch.no_grad():
        student.lm_head.weight.mul_(1.5)
    loss, parts = distillation_loss(student, model, ids, mask, output_loss="kl")
    assert parts["kl"] > 0
    assert parts["loss"] == pytest.approx(parts["squarehead"] + parts["kl"], rel=1e-5)
    loss.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0
    # ce+kl trains on both.
    _, both = distillation_loss(student, model, ids, mask, output_loss="ce+kl")
    assert both["kl"] == pytest.approx(parts["kl"], rel=1e-5)
    assert both["loss"] == pytest.approx(both["squarehead"] + both["ce"] + both["kl"], rel=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_masks_survive_training_steps(tiny_model, bf16):
    teacher, _ = tiny_model
    student = copy.deepcopy(teacher)
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    masks = {}
    prune_model(
        student,
        calibration,
        0.6,
        parse_pattern("unstructured"),
        on_layer=lambda i, reports, m, outputs: masks.update(m),
    )
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(student).items()}
    trainer = MaskedTrainer(student, TrainConfig(steps=5, lr=1e-3, bf16=bf16), masks)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        mask = torch.ones_like(ids)
        trainer.train_step(
            lambda ids=ids, mask=mask: distillation_loss(student, teacher, ids, mask)
        )
    for name, linear in prunable_linears(student).items():
        w = linear.weight.detach()
        keep = masks[f"{name}"]
        assert torch.all(w[~keep] == 0), name  # pruned weights stay exactly zero
        assert not torch.equal(w[keep], before[name][keep]), name  # kept weights trained
        assert int((w == 0).sum()) >= int(0.6 * w.numel() + 0.5) - 0


def test_bf16_steps_keep_float32_state_and_track_the_float32_loss(tiny_model):
    teacher, _ = tiny_model
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    losses = {}
    for bf16 in (False, True):
        student = copy.deepcopy(teacher)
        with torch.no_grad():  # a student that differs from its teacher
            for p in prunable_linears(student).values():
                p.weight.mul_(0.9)
        trainer = MaskedTrainer(student, TrainConfig(steps=2, lr=1e-3, bf16=bf16))
        step = trainer.train_step
        losses[bf16] = step(lambda s=student: distillation_loss(s, teacher, ids, mask))
        assert all(p.dtype == torch.float32 for p in student.parameters())
        moments = trainer.optimizer.state_dict()["state"][0]
        assert moments["exp_avg"].dtype == torch.float32
    assert losses[True]["squarehead"] > 0
    for part in ("squarehead", "ce"):
        assert losses[True][part] == pytest.approx(losses[False][part], rel=0.05), part


def test_bf16_is_refused_where_it_would_be_emulated():
    require_bf16_cpu(frozenset({"avx512f", "avx512bf16"}))
    require_bf16_cpu(frozenset({"amxbf16"}))
    with pytest.raises(SparsecError, match="AVX512-BF16 or AMX"):
        require_bf16_cpu(frozenset({"avx512f", "avx512vnni"}))


def test_warmup_then_linear_decay():
    f = warmup_then_decay(steps=10, warmup=0.2)
    values = [f(s) for s in range(10)]
    assert values[:2] == [0.5, 1.0]
    assert values[2] == 1.0 and values[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(values[1:], values[2:], strict=False))


@pytest.mark.parametrize("tied", [True, False])
def test_bf16_teacher_weights_compute_what_autocast_does(tiny_model, tied):
    from sparsec.testing import make_tiny_llama

    if tied:
        model = copy.deepcopy(tiny_model[0])
    else:
        model = make_tiny_llama(seed=1, tie_word_embeddings=False)[0]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits
        bf16_linear_weights_(model)
        got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert layer.input_layernorm.weight.dtype == torch.float32
    # A head tied to the embeddings stays float32; an untied one is a plain Linear.
    assert model.lm_head.weight.dtype == (torch.float32 if tied else torch.bfloat16)
