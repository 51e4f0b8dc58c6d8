"""SquareHead distillation loss (Kurtic et al. 2023, IST-DASLab/SparseFinetuning).

For every decoder layer l (its output, not the embeddings):

    loss_l = mean((h_s - h_t)²) / (mean(h_t²) + eps)

with both means over the non-padding tokens (and the hidden features). Normalising by
the teacher's energy puts all layers on the same scale, so no per-layer weights are
needed. The total is ``sum_l loss_l * 1.0 + output_loss * 1.0``, where the output loss is
the paper's cross-entropy on the text's next tokens (``"ce"``), or the KL divergence from
the teacher's next-token distribution (``"kl"``, Hinton-style logit distillation), which
teaches the whole distribution rather than the one token the text has, or both summed
(``"ce+kl"``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from sparsec.sparsify.head_loss import fused_head_loss, target_counts
from sparsec.sparsify.layer_walk import decoder_layers

EPS = 1e-6
FEATURE_WEIGHT = 1.0
CE_WEIGHT = 1.0
OUTPUT_LOSSES = ("ce", "kl", "ce+kl")


def squarehead_layer_losses(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    token_mask: torch.Tensor,
    eps: float = EPS,
) -> torch.Tensor:
    """``[layers]`` normalised MSEs; hidden states ``[batch, seq, dim]``, mask ``[batch, seq]``."""
    keep = token_mask.bool()
    losses = []
    for h_s, h_t in zip(student, teacher, strict=True):
        h_s, h_t = h_s[keep].float(), h_t[keep].float()  # [tokens, dim]
        losses.append(((h_s - h_t) ** 2).mean() / ((h_t**2).mean() + eps))
    return torch.stack(losses)


def squarehead_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    token_mask: torch.Tensor,
    eps: float = EPS,
) -> torch.Tensor:
    return squarehead_layer_losses(student, teacher, token_mask, eps).sum()


@contextmanager
def record_layer_outputs(model: nn.Module):
    """Collect every decoder layer's output during the forwards inside the ``with``."""
    outputs: list[torch.Tensor] = []

    def keep(_module, _args, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)

    handles = [layer.register_forward_hook(keep) for layer in decoder_layers(model)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def language_model_loss(logits: torch.Tensor, input_ids: torch.Tensor, token_mask: torch.Tensor):
    """Next-token cross-entropy over real (non-padding) target tokens."""
    targets = input_ids[:, 1:].masked_fill(~token_mask[:, 1:].bool(), -100)
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )


def logit_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, token_mask):
    """Mean over real tokens of KL(teacher || student) between next-token distributions."""
    keep = token_mask.bool()
    log_s = torch.log_softmax(student_logits[keep].float(), dim=-1)  # [tokens, vocab]
    log_t = torch.log_softmax(teacher_logits[keep].float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    output_loss: str = "ce",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SquareHead + the output loss on one batch; returns the loss and its parts.

    The output loss runs fused with the LM head (``head_loss``): the same values as
    ``language_model_loss`` and ``logit_kl_loss`` on full logits, without materialising them.

    ``reduce`` (under torchrun: a float64 all-reduce sum over the ranks) makes the batch
    one rank's share of a global batch: every mean is taken over the global batch's
    tokens (the teacher's energies and the token counts are summed over the ranks first),
    so the ranks' losses sum to the loss of the whole batch and their gradients to its
    gradient. The metrics are then the whole batch's.
    """
    kl_term = output_loss in ("kl", "ce+kl")
    with torch.no_grad(), record_layer_outputs(teacher) as teacher_hidden:
        teacher_final = teacher.get_decoder()(
            input_ids=input_ids, attention_mask=token_mask, use_cache=False
        ).last_hidden_state
    with record_layer_outputs(student) as student_hidden:
        final = student.get_decoder()(
            input_ids=input_ids, attention_mask=token_mask, use_cache=False
        ).last_hidden_state
    counts = None
    if reduce is None:
        feature = squarehead_loss(student_hidden, teacher_hidden, token_mask)
    else:
        feature, counts = _share_of_squarehead(
            student_hidden, teacher_hidden, input_ids, token_mask, reduce
        )
    head, ce, kl = fused_head_loss(
        final,
        student.get_output_embeddings().weight,
        input_ids,
        token_mask,
        ce_weight=CE_WEIGHT if output_loss != "kl" else 0.0,  # ce is logged even if not trained
        kl_weight=CE_WEIGHT if kl_term else 0.0,
        teacher_hidden=teacher_final if kl_term else None,
        teacher_head_weight=teacher.get_output_embeddings().weight if kl_term else None,
        counts=counts,
    )
    loss = FEATURE_WEIGHT * feature + head
    parts = {"squarehead": feature.item(), "ce": ce}
    if kl_term:
        parts["kl"] = kl
    metrics = {"loss": loss.item(), **parts}
    if reduce is not None:  # the shares' parts sum to the whole batch's
        summed = reduce(torch.tensor(list(metrics.values()), dtype=torch.float64))
        metrics = dict(zip(metrics, summed.tolist(), strict=True))
    return loss, metrics


def _share_of_squarehead(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    eps: float = EPS,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """This rank's share of the global batch's SquareHead loss, and the global batch's
    ``(targets, tokens)`` counts for the output loss, in one all-reduce.

    ``loss_l = Σ_ranks Σ (h_s - h_t)² / n / (Σ_ranks Σ h_t² / n + eps)`` with ``n`` the
    global batch's elements: each rank contributes its numerator over the global
    denominator, so the contributions sum to ``squarehead_loss`` of the whole batch.
    """
    keep = token_mask.bool()
    numerators, energies = [], []
    elements = 0
    for h_s, h_t in zip(student, teacher, strict=True):
        h_s, h_t = h_s[keep].float(), h_t[keep].float()  # [tokens, dim]
        numerators.append(((h_s - h_t) ** 2).sum())
        energies.append((h_t.detach() ** 2).sum(dtype=torch.float64))
        elements = h_t.numel()
    counts = [elements, *target_counts(input_ids, token_mask)]
    counts = torch.tensor(counts, dtype=torch.float64, device=keep.device)
    summed = reduce(torch.cat([torch.stack(energies), counts]))
    n = summed[len(energies)].clamp(min=1)
    energy = (summed[: len(energies)] / n).float()
    n = n.float()
    losses = [num / n / (e + eps) for num, e in zip(numerators, energy, strict=True)]
    targets, tokens = summed[len(energies) + 1 :].tolist()
    return torch.stack(losses).sum(), (int(targets), int(tokens))
