"""Sampler: greedy ties, top-k ties, nucleus set, the prefilter shortcut, the distribution."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec.runtime import sampling
from sparsec.runtime.sampling import Sampler


def test_greedy_ties_go_to_lowest_id():
    logits = np.array([0.0, 3.0, 1.0, 3.0, 3.0], np.float32)
    assert Sampler(0.0)(logits) == 1
    assert Sampler(0.0, top_k=1, top_p=0.1, seed=3)(logits) == 1  # filters ignored


def test_top_k_keeps_ties_with_the_kth():
    logits = np.array([5.0, 1.0, 4.0, 4.0, 0.0, 4.0])
    ids, probs = Sampler(1.0, top_k=2).distribution(logits)
    assert ids.tolist() == [0, 2, 3, 5]
    e = np.exp(logits[ids] - 5.0)
    np.testing.assert_allclose(probs, e / e.sum())


def test_top_p_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs)
    assert Sampler(1.0, top_p=0.79).distribution(logits)[0].tolist() == [1, 3]
    assert Sampler(1.0, top_p=0.81).distribution(logits)[0].tolist() == [1, 2, 3]
    assert Sampler(1.0, top_p=0.01).distribution(logits)[0].tolist() == [1]
    ids, p = Sampler(1.0, top_p=1.0).distribution(logits)
    assert ids.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(p, probs)


def test_top_p_ties_by_lowest_id():
    logits = np.zeros(4)
    assert Sampler(1.0, top_p=0.5).distribution(logits)[0].tolist() == [0, 1]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    vocab=st.sampled_from([300, 2000]),
    temperature=st.floats(0.1, 3.0),
    top_p=st.floats(0.05, 1.0),
    top_k=st.one_of(st.none(), st.integers(1, 400)),
)
def test_prefilter_equals_full_sort(monkeypatch_session, seed, vocab, temperature, top_p, top_k):
    rng = np.random.default_rng(seed)
    # Repeated values exercise the tie rules at the prefilter boundary.
    logits = np.round(rng.normal(0, 3, vocab), 1).astype(np.float32)
    fast = Sampler(temperature, top_k, top_p).distribution(logits)
    with monkeypatch_session.context() as mp:
        mp.setattr(sampling, "_NUCLEUS_PREFILTER", 10**9)
        slow = Sampler(temperature, top_k, top_p).distribution(logits)
    assert fast[0].tolist() == slow[0].tolist()
    np.testing.assert_allclose(fast[1], slow[1])


@pytest.fixture(scope="module")
def monkeypatch_session():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_draws_follow_the_distribution():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    sampler = Sampler(1.0, seed=0)
    counts = np.bincount([sampler(logits) for _ in range(20000)], minlength=4) / 20000
    # 5 standard errors of a binomial proportion at n=20000 is below 0.02
    np.testing.assert_allclose(counts, [0.1, 0.2, 0.3, 0.4], atol=0.02)
    hot = Sampler(2.0, seed=0)
    counts = np.bincount([hot(logits) for _ in range(20000)], minlength=4) / 20000
    p = np.sqrt([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(counts, p / p.sum(), atol=0.02)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = np.array([2.0, -1.0, 3.0, 0.5, -4.0], np.float32)
    sampler = Sampler(0.0, repetition_penalty=2.0)
    assert sampler(logits) == 2
    sampler.see([2, 1])
    sampler.see(4)
    out = sampler.penalize(logits)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.float32([2.0, -2.0, 1.5, 0.5, -8.0]))
    assert logits[2] == 3.0  # the caller's row is untouched (the native code owns it)
    assert sampler(logits) == 0  # 2.0 now beats the penalized 1.5
    # a numpy float64 penalty scales in float32 too (not float64, then rounded)
    odd = np.float32([np.nextafter(np.float32(1), np.float32(2)) * 7])
    strong = Sampler(0.0, repetition_penalty=np.float64(1.1))
    strong.see([0])
    np.testing.assert_array_equal(strong.penalize(odd), odd / np.float32(1.1))


@pytest.mark.parametrize("penalty", [None, 1.0])
def test_repetition_penalty_off(penalty):
    logits = np.array([1.0, 3.0], np.float32)
    sampler = Sampler(0.0, repetition_penalty=penalty)
    sampler.see([1])
    assert sampler.penalize(logits) is logits and sampler(logits) == 1


def test_repetition_penalty_comes_before_temperature():
    logits = np.log(np.array([0.5, 0.5]))
    sampler = Sampler(2.0, repetition_penalty=1.5)
    sampler.see([0])
    x = np.array([logits[0] * 1.5, logits[1]]) / 2.0  # both logits are negative
    p = np.exp(x - x.max())
    np.testing.assert_allclose(sampler.distribution(sampler.penalize(logits))[1], p / p.sum())
