"""Helpers of the model-family tests: compare a compiled model with transformers."""

from __future__ import annotations

import numpy as np
import torch

from sparsec.testing import int8_tie_position

FP32_ATOL = 1e-4
INT8_ATOL = 1e-4
INT8_FLIP_ATOL = 0.1
INT8_FLIP_REL = 0.03  # of the largest logit
# Greedy steps are compared while transformers' top-2 margin exceeds at least this:
# fp32 logits agree to ~2e-6; int8 ones follow the W8A8 reference to ~1e-6 until an
# activation sits on a rounding tie (int8_tie_position).
GREEDY_MARGIN = {"fp32": FP32_ATOL, "int8": 10 * INT8_ATOL}


def check_logits(rt, ref, ids, precision: str) -> None:
    """Teacher-forced logits at every position: a prefill, then the last 3 tokens one
    decode step at a time."""
    rt.reset()
    got = np.concatenate(
        [rt.forward(ids[:-3], all_logits=True)]
        + [np.atleast_2d(rt.forward([t], all_logits=False))[-1:] for t in ids[-3:]]
    )
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    if precision == "fp32":
        np.testing.assert_allclose(got, want, atol=FP32_ATOL)
        return
    strict = int8_tie_position(ref, ids)
    np.testing.assert_allclose(got[:strict], want[:strict], atol=INT8_ATOL)
    # After a flip, one int8 step moves the logits in proportion to their size (Gemma's
    # are larger: embeddings times sqrt(hidden), a (1 + w) final norm).
    flip = max(INT8_FLIP_ATOL, INT8_FLIP_REL * float(np.abs(want).max()))
    np.testing.assert_allclose(got[strict:], want[strict:], atol=flip)


def check_greedy(rt, ref, ids, eos_token_id, precision: str, new_tokens: int = 48) -> int:
    """Greedy tokens equal transformers' for as long as the choice is clear: up to the
    first step whose top-2 logit margin is within ``GREEDY_MARGIN`` or within twice the
    compiled model's measured deviation on that row (run as generate() runs, on
    transformers' tokens; for int8 it is ~1e-6 until the W8A8 reference rounds an
    activation next to a tie, then up to one int8 step), or where transformers' own
    generate() picked another token than its full forward; returns how many were
    compared."""
    out = rt.generate(ids, max_new_tokens=new_tokens)
    with torch.no_grad():
        hf = ref.generate(
            torch.tensor([ids]),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=eos_token_id,
        )
    tokens = hf[0, len(ids) :].tolist()
    sequence = ids + tokens[:-1]  # row len(ids) - 1 + k picks token k
    # The compiled rows as generate() computes them (a prefill, then one token a step:
    # a different summation order than one long prefill, which matters next to ties).
    rt.reset()
    got = np.stack(
        [np.atleast_2d(rt.forward(ids, all_logits=False))[-1]]
        + [np.atleast_2d(rt.forward([t], all_logits=False))[-1] for t in tokens[:-1]]
    )
    with torch.no_grad():
        want = ref(torch.tensor([sequence])).logits[0, len(ids) - 1 :].numpy()
    deviation = np.abs(got - want).max(axis=-1)
    top2 = np.sort(want, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    unclear = margins <= np.maximum(GREEDY_MARGIN[precision], 2 * deviation)
    # transformers' own incremental decode can round a W8A8 tie otherwise than its full
    # forward: where the two disagree, the reference has no single answer.
    unclear |= want.argmax(axis=-1) != np.array(tokens)
    compared = int(np.argmax(unclear)) if unclear.any() else len(tokens)
    assert out.token_ids[:compared] == tokens[:compared]
    if compared == len(tokens):
        assert len(out.token_ids) == len(tokens)
    return compared
