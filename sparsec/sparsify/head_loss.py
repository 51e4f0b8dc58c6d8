"""The output losses (cross-entropy and KL from the teacher) fused with the LM head.

The plain way (``squarehead.language_model_loss`` and ``logit_kl_loss``, kept as the
reference) materialises ``[tokens, vocab]`` logits for student and teacher, their float32
copies, log-softmaxes and gradients: a dozen 100 MB tensors a step on SmolLM2 (512
tokens x 49152). On the CPU the elementwise passes and the page faults of those fresh
allocations cost more than the head's matmuls: profiled on 2 threads, 1.1-1.3 s of a
3.2 s distillation step. Here the head runs a chunk of tokens at a time and the gradient
of the logits is formed in the same pass (``softmax(s) - onehot`` for cross-entropy,
``softmax(s) - softmax(t)`` for KL). Only that gradient outlives its chunk, in one buffer
in the matmul dtype (bfloat16 under ``--bf16``); two matmuls turn it into the gradients
of the hidden states and of the head weight, which the backward pass returns. The same
idea as Liger-Kernel's fused linear cross-entropy.
"""

from __future__ import annotations

import torch

CHUNK = 64  # tokens a chunk: 12.6 MB of float32 logits at SmolLM2's vocabulary


def target_counts(input_ids: torch.Tensor, token_mask: torch.Tensor) -> tuple[int, int]:
    """``(real next-token targets, real tokens)`` of a batch: what the cross-entropy and
    the KL term are averaged over."""
    return int((_targets(input_ids, token_mask) >= 0).sum()), int(token_mask.bool().sum())


def _targets(input_ids: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets per position, -100 where there is none (last position, padding)."""
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:].masked_fill(~token_mask[:, 1:].bool(), -100)
    return targets


class _FusedHeadLoss(torch.autograd.Function):
    """loss = ce_weight * CE(student) + kl_weight * KL(teacher || student), chunk by chunk.

    Returns ``(loss, ce, kl)``; ``ce`` and ``kl`` are for logging (``kl`` is NaN without a
    teacher). Matmuls run in ``dtype`` (bfloat16 under ``--bf16``), softmaxes in float32.
    ``counts``: the ``(targets, KL rows)`` the sums are divided by, when they are not this
    batch's own (a rank's share of a global batch divides by the global counts).
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, kl_rows, weights):
        ce_weight, kl_weight, dtype, counts = weights
        if counts is None:
            n_ce = max(1, int((targets >= 0).sum()))
            n_kl = max(1, int(kl_rows.sum()))
        else:
            n_ce, n_kl = (max(1, int(n)) for n in counts)
        w = weight.to(dtype)
        wt = teacher_weight.to(dtype) if teacher_hidden is not None else None
        h_all = hidden.to(dtype)
        # The logits' gradient, one row per token, in the matmul dtype: two matmuls after
        # the loop turn it into the hidden states' and the head's gradients.
        grad_logits = torch.empty(hidden.shape[0], w.shape[0], dtype=dtype, device=hidden.device)
        ce_sum = hidden.new_zeros((), dtype=torch.float64)
        kl_sum = hidden.new_zeros((), dtype=torch.float64)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], CHUNK):
                rows = slice(start, start + CHUNK)
                log_s = torch.log_softmax(h_all[rows] @ w.T, dim=-1, dtype=torch.float32)
                target = targets[rows]
                has_target = target >= 0
                picked = log_s.gather(1, target.clamp(min=0)[:, None])[:, 0]
                ce_sum += -(picked * has_target).sum(dtype=torch.float64)
                # d(loss)/d(logits) = (ce_w/n_ce + kl_w/n_kl) * p_s - kl_w/n_kl * p_t
                #                     - ce_w/n_ce * onehot(target)
                ce_scale = has_target.float() * (ce_weight / n_ce)
                if wt is not None:
                    t_logits = teacher_hidden[rows].to(dtype) @ wt.T
                    log_t = torch.log_softmax(t_logits, dim=-1, dtype=torch.float32)
                    p_t = log_t.exp()
                    kl_row = (p_t * log_t.sub_(log_s)).sum(-1)
                    kl_mask = kl_rows[rows].float()
                    kl_sum += (kl_row * kl_mask).sum(dtype=torch.float64)
                    kl_scale = kl_mask * (kl_weight / n_kl)
                    grad = log_s.exp_().mul_((ce_scale + kl_scale)[:, None])
                    grad.sub_(p_t.mul_(kl_scale[:, None]))
                else:
                    grad = log_s.exp_().mul_(ce_scale[:, None])
                grad.scatter_add_(1, target.clamp(min=0)[:, None], -ce_scale[:, None])
                grad_logits[rows] = grad
            grad_hidden = (grad_logits @ w).float()
            grad_weight = (grad_logits.T @ h_all).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ce = (ce_sum / n_ce).float()
        kl = (kl_sum / n_kl).float() if wt is not None else torch.tensor(float("nan"))
        loss = ce_weight * ce + (kl_weight * kl if wt is not None else 0.0)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return (
            (grad_hidden * grad_loss).to(hidden_dtype),
            (grad_weight * grad_loss).to(weight_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def fused_head_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    token_mask: torch.Tensor,
    ce_weight: float,
    kl_weight: float = 0.0,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head_weight: torch.Tensor | None = None,
    counts: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, float, float]:
    """Output loss from the final (normed) hidden states ``[batch, seq, dim]`` and the head.

    Cross-entropy on the next tokens of ``input_ids`` (mean over real targets, as
    ``language_model_loss``), plus with a teacher the KL divergence from its next-token
    distribution (mean over real tokens, as ``logit_kl_loss``). Returns the weighted loss
    and the unweighted ``ce`` and ``kl`` (NaN without a teacher) as floats.

    ``counts``: the number of real targets and of real tokens to take the means over, in
    place of this batch's own (``target_counts``): under torchrun a rank's share of a
    batch is divided by the whole batch's counts, so the shares' losses sum to its loss.
    """
    if (teacher_hidden is None) != (teacher_head_weight is None):
        raise ValueError("teacher_hidden and teacher_head_weight go together")
    if teacher_hidden is None and kl_weight:
        raise ValueError("a KL term needs the teacher's hidden states")
    kind = hidden.device.type  # the autocast of the device the loss runs on
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    dim = hidden.shape[-1]
    loss, ce, kl = _FusedHeadLoss.apply(
        hidden.reshape(-1, dim),
        head_weight,
        None if teacher_hidden is None else teacher_hidden.reshape(-1, dim).detach(),
        None if teacher_head_weight is None else teacher_head_weight.detach(),
        _targets(input_ids, token_mask).reshape(-1),
        token_mask.reshape(-1).bool(),
        (float(ce_weight), float(kl_weight), dtype, counts),
    )
    return loss, ce.item(), kl.item()
