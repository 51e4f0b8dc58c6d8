"""The fused LM-head losses against the plain full-logits reference: values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsec.sparsify import head_loss
from sparsec.sparsify.head_loss import fused_head_loss
from sparsec.sparsify.squarehead import (
    distillation_loss,
    language_model_loss,
    logit_kl_loss,
    record_layer_outputs,
    squarehead_loss,
)

VOCAB, DIM = 97, 16


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding: no loss on or toward these positions
    mask[2, 10:] = 0
    hidden = torch.randn(3, 11, DIM, generator=g)
    weight = torch.randn(VOCAB, DIM, generator=g) * 0.5
    teacher_hidden = hidden + 0.3 * torch.randn(3, 11, DIM, generator=g)
    teacher_weight = weight + 0.1 * torch.randn(VOCAB, DIM, generator=g)
    return ids, mask, hidden, weight, teacher_hidden, teacher_weight


def _reference(ids, mask, hidden, weight, teacher_hidden, teacher_weight, ce_w, kl_w):
    logits = hidden @ weight.T
    ce = language_model_loss(logits, ids, mask)
    kl = logit_kl_loss(logits, teacher_hidden @ teacher_weight.T, mask)
    return ce_w * ce + kl_w * kl, ce, kl


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 2.0)])
def test_fused_head_loss_matches_full_logits(monkeypatch, weights):
    monkeypatch.setattr(head_loss, "CHUNK", 5)  # several chunks, the last one partial
    ce_w, kl_w = weights
    ids, mask, hidden, weight, t_hidden, t_weight = _case()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want, want_ce, want_kl = _reference(ids, mask, h_ref, w_ref, t_hidden, t_weight, ce_w, kl_w)
    want.backward()

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got, ce, kl = fused_head_loss(h, w, ids, mask, ce_w, kl_w, t_hidden, t_weight)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert ce == pytest.approx(float(want_ce.detach()), rel=1e-5)
    assert kl == pytest.approx(float(want_kl.detach()), rel=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-6)
    # Padding positions neither get a loss nor pass a gradient back.
    assert h.grad[1, 7:].abs().max() == 0


def test_fused_head_loss_without_teacher_is_cross_entropy():
    ids, mask, hidden, weight, _, _ = _case(1)
    h = hidden.clone().requires_grad_()
    got, ce, kl = fused_head_loss(h, weight, ids, mask, ce_weight=1.0)
    got = got.item()
    assert got == pytest.approx(language_model_loss(hidden @ weight.T, ids, mask).item())
    assert ce == pytest.approx(got)
    assert kl != kl  # NaN: no teacher, no KL
    with pytest.raises(ValueError, match="teacher"):
        fused_head_loss(h, weight, ids, mask, ce_weight=1.0, kl_weight=1.0)


def test_fused_head_loss_under_bf16_autocast_stays_close():
    ids, mask, hidden, weight, t_hidden, t_weight = _case(2)
    want, _, _ = _reference(ids, mask, hidden, weight, t_hidden, t_weight, 1.0, 1.0)
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _, _ = fused_head_loss(h, weight, ids, mask, 1.0, 1.0, t_hidden, t_weight)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=2e-2)
    assert h.grad.dtype == torch.float32


@pytest.mark.parametrize("output_loss", ["ce", "kl", "ce+kl"])
def test_distillation_gradients_match_the_full_logits_path(tiny_model, output_loss):
    teacher, _ = tiny_model
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 256, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0

    loss, parts = distillation_loss(student, teacher, ids, mask, output_loss)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    # The reference: SquareHead plus the plain losses on full logits.
    with torch.no_grad(), record_layer_outputs(teacher) as t_hidden:
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    with record_layer_outputs(student) as s_hidden:
        logits = student(input_ids=ids, attention_mask=mask).logits
    ref = squarehead_loss(s_hidden, t_hidden, mask)
    if output_loss != "kl":
        ref = ref + language_model_loss(logits, ids, mask)
    if output_loss != "ce":
        ref = ref + logit_kl_loss(logits, t_logits, mask)
    ref.backward()
    assert parts["loss"] == pytest.approx(ref.item(), rel=1e-5)
    for name, param in student.named_parameters():
        torch.testing.assert_close(fused[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
