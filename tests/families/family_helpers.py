"""Helpers of the model-family tests: compare a compiled model with transformers."""

from __future__ import annotations

import numpy as np
import torch

from sparsec.testing import int8_tie_position

FP32_ATOL = 1e-4
INT8_ATOL = 1e-4
INT8_FLIP_ATOL = 0.1
# Greedy steps are compared while transformers' top-2 margin exceeds this: fp32 logits
# agree to ~2e-6; int8 ones follow the W8A8 reference to ~1e-6 until an activation sits
# on a rounding tie (int8_tie_position).
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
    np.testing.assert_allclose(got[strict:], want[strict:], atol=INT8_FLIP_ATOL)


def check_greedy(rt, ref, ids, eos_token_id, precision: str, new_tokens: int = 48) -> int:
    """Greedy tokens equal transformers' up to the first step whose top-2 logit margin
    is within ``GREEDY_MARGIN`` (where rounding may pick either) and, for int8, up to
    the first position where the W8A8 reference rounds an activation next to a tie
    (fp32 noise may round it the other way there); returns how many were compared."""
    out = rt.generate(ids, max_new_tokens=new_tokens)
    with torch.no_grad():
        hf = ref.generate(
            torch.tensor([ids]),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = hf.sequences[0, len(ids) :].tolist()
    compared = len(tokens)
    for step, logits in enumerate(hf.logits):
        top2 = torch.topk(logits[0], 2).values
        if float(top2[0] - top2[1]) <= GREEDY_MARGIN[precision]:
            compared = step
            break
    if precision == "int8":  # token k is read off position len(ids) + k - 1
        tie = int8_tie_position(ref, ids + tokens)
        compared = min(compared, max(0, tie - len(ids) + 1))
    assert out.token_ids[:compared] == tokens[:compared]
    if compared == len(tokens):
        assert len(out.token_ids) == len(tokens)
    return compared
