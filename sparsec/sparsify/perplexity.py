"""Perplexity on held-out text: non-overlapping windows, every token but the first scored."""

from __future__ import annotations

import math

import torch
from torch import nn

EVAL_SEQ_LEN = 512


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int = EVAL_SEQ_LEN,
    max_tokens: int | None = None,
    batch_size: int = 2,
) -> float:
    """``exp(mean NLL)`` of ``tokens`` (1-D) cut into windows of ``seq_len``.

    The last partial window is scored too, so every token of ``tokens[:max_tokens]``
    except each window's first contributes.
    """
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    # Learned position tables (OPT, GPT-2) end at max_position_embeddings, MPT's ALiBi
    # table at max_seq_len; RoPE models would extrapolate, these would index past them.
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "max_seq_len"):
        positions = getattr(config, name, None)
        if isinstance(positions, int) and positions > 1:
            seq_len = min(seq_len, positions)
    windows = [tokens[s : s + seq_len] for s in range(0, tokens.numel() - 1, seq_len)]
    windows = [w for w in windows if w.numel() > 1]
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    total_nll, total_count = 0.0, 0
    try:
        for start in range(0, len(windows), batch_size):
            group = windows[start : start + batch_size]
            width = max(w.numel() for w in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, w in enumerate(group):
                ids[row, : w.numel()] = w
                mask[row, : w.numel()] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total_nll += float(nll)
            total_count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_count)
