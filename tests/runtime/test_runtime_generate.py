"""forward() and generate() against the numpy twin of the fake model."""

from __future__ import annotations

import numpy as np
import pytest
import runtime_fake as fake

from sparsec import runtime
from sparsec.errors import SparsecError

# A text whose bytes are all distinct, with 2- and 4-byte characters: a chain model
# can spell it (each byte's successor is unique) and it splits characters across tokens.
CHAIN_TEXT = "aé жq😀b"


@pytest.fixture(scope="module")
def tok():
    return fake.tokenizer()


@pytest.fixture
def chain_model(make_model, tok):
    """Greedy continuation of 'a' spells CHAIN_TEXT[1:], then eos."""
    ids = tok.encode(CHAIN_TEXT, add_special_tokens=False).ids
    assert len(ids) == len(set(ids)) == len(CHAIN_TEXT.encode())
    successor = dict(zip(ids[:-1], ids[1:], strict=True))
    successor[ids[-1]] = fake.EOS
    successor[fake.BOS] = ids[0]
    with runtime.load(make_model(weights=fake.chain_weights(successor))) as m:
        yield m


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- forward


def test_forward_matches_reference(model, weights):
    ref = fake.Reference(weights)
    ids = [fake.BOS, 5, 17, 200, 3]
    close(model.forward(ids), ref.forward(ids))
    assert model.position == 5
    more = model.forward([9, 8], all_logits=False)
    assert more.shape == (fake.V,)
    close(more, ref.forward([9, 8])[-1])
    assert model.position == 7


def test_chunked_forward_equals_one_token_at_a_time(model, weights):
    ids = list(range(3, 3 + 3 * fake.T + 2))  # 26 tokens: chunks of 8, 8, 8, 2
    chunked = model.forward(ids)
    model.reset()
    assert model.position == 0
    single = np.stack([model.forward([t])[0] for t in ids])
    close(chunked, single)
    close(chunked, fake.Reference(weights).forward(ids))


def test_rewind_reruns_from_an_earlier_position(model, weights):
    ref = fake.Reference(weights)
    prefix, a, b = [fake.BOS, 5, 17], [200, 3], [9, 8, 7]
    model.forward(prefix + a)
    model.rewind(len(prefix))
    assert model.position == len(prefix)
    # the cache after the prefix is overwritten: b sees the prefix, not a
    close(model.forward(b), ref.forward(prefix + b)[len(prefix) :])
    assert model.position == len(prefix) + len(b)
    # ablation: without the rewind, b runs after a and its logits differ
    model.reset()
    model.forward(prefix + a)
    assert not np.allclose(model.forward(b), ref.forward(prefix + b)[len(prefix) :], atol=1e-3)
    # the same step at one position, again and again (how the kernel check times decode)
    model.rewind(4)
    first = model.forward([11])
    model.rewind(4)
    close(model.forward([11]), first)


def test_rewind_errors(model):
    model.forward([1, 2, 3])
    with pytest.raises(SparsecError, match=r"cannot rewind to position 4: the cache holds 3"):
        model.rewind(4)
    with pytest.raises(SparsecError, match=r"cannot rewind to position -1.*use 0\.\.3"):
        model.rewind(-1)
    with pytest.raises(SparsecError, match="rewind position must be an int, got 1.5"):
        model.rewind(1.5)
    model.rewind(0)
    assert model.position == 0


def test_forward_errors(model):
    with pytest.raises(
        SparsecError, match=r"token_ids\[2\] = 260 is outside the vocabulary \[0, 260\)"
    ):
        model.forward([1, 2, 260])
    with pytest.raises(SparsecError, match=r"token_ids\[0\] = -1 is outside"):
        model.forward([-1])
    with pytest.raises(SparsecError, match="token_ids is empty"):
        model.forward([])
    model.forward(list(range(fake.C - 1)), all_logits=False)
    with pytest.raises(
        SparsecError, match="forward of 2 tokens at position 63 exceeds the max context 64"
    ):
        model.forward([1, 2])


# --------------------------------------------------------------------------- greedy


def test_greedy_matches_reference(model, weights, tok):
    r = model.generate("Hello", max_new_tokens=12)
    assert r.prompt_token_ids == tok.encode("Hello").ids and r.prompt_token_ids[0] == fake.BOS
    expected = fake.Reference(weights).greedy(r.prompt_token_ids, 12, eos={fake.EOS})
    assert r.token_ids == expected
    assert r.finish_reason == "length" and len(r.token_ids) == 12
    assert r.text == tok.decode(expected)
    assert r.stats.prompt_tokens == 6 and r.stats.new_tokens == 12 and r.stats.decode_steps == 11
    # token ids in, same result; and every call starts from an empty cache
    assert model.generate(r.prompt_token_ids, max_new_tokens=12).token_ids == expected


def test_long_prompt_prefills_in_chunks(model, weights):
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, 256, 3 * fake.T + 5)]
    r = model.generate(prompt, max_new_tokens=6)
    assert r.token_ids == fake.Reference(weights).greedy(prompt, 6)
    assert model.position == len(prompt) + 5  # the last new token is never fed back


def test_chunked_prefill_equals_one_shot(model, make_model, weights):
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 256, 40)]
    chunked = model.generate(prompt, max_new_tokens=10)  # prefill in 8-token calls
    model.reset()
    chunked_logits = model.forward(prompt)
    with runtime.load(make_model(weights, lib="one_shot", max_tokens_per_call=fake.C)) as m:
        one_shot = m.generate(prompt, max_new_tokens=10)  # one 40-token call
        m.reset()
        close(m.forward(prompt), chunked_logits)
    assert one_shot.token_ids == chunked.token_ids


def test_chain_text_eos_and_streaming(chain_model, tok):
    r = chain_model.generate("a", max_new_tokens=30)
    assert r.text == CHAIN_TEXT[1:]
    assert r.finish_reason == "eos" and r.token_ids[-1] == fake.EOS
    assert len(r.token_ids) == len(CHAIN_TEXT[1:].encode()) + 1

    stream = chain_model.generate("a", max_new_tokens=30, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == r.text
    assert all(p and "\ufffd" not in p for p in pieces)
    assert "😀" in pieces  # four tokens, emitted once complete
    assert stream.result.token_ids == r.token_ids and stream.result.text == r.text


def test_max_new_tokens_cuts_a_character(chain_model):
    # 'é' is two byte tokens: stopping after the first leaves an incomplete character.
    r = chain_model.generate("a", max_new_tokens=1)
    assert r.finish_reason == "length" and len(r.token_ids) == 1
    assert r.text == "\ufffd"


@pytest.mark.parametrize(
    "stop, text",
    [
        ("ж", "é "),
        (["q😀", "zz"], "é ж"),  # spans five tokens and two characters
        (["😀b", " ж"], "é"),  # the earliest match wins
        ("b", "é жq😀"),
    ],
)
def test_stop_strings(chain_model, stop, text):
    r = chain_model.generate("a", max_new_tokens=30, stop=stop)
    assert r.text == text and r.finish_reason == "stop"
    stream = chain_model.generate("a", max_new_tokens=30, stop=stop, stream=True)
    assert "".join(stream) == text  # a stop string's first part is never emitted


def test_unmatched_stop_prefix_is_released(chain_model):
    r = chain_model.generate("a", max_new_tokens=30, stop="qX")
    stream = chain_model.generate("a", max_new_tokens=30, stop="qX", stream=True)
    assert "".join(stream) == r.text == CHAIN_TEXT[1:] and r.finish_reason == "eos"


def test_eos_list(make_model, weights):
    first = fake.Reference(weights).greedy(fake.tokenizer().encode("Hi").ids, 8)
    target = next(t for i, t in enumerate(first) if i >= 3 and t not in first[:i])
    unused = next(t for t in range(fake.V) if t not in first)
    generation = {"bos_token_id": fake.BOS, "eos_token_id": [unused, target]}
    with runtime.load(make_model(generation=generation)) as m:
        r = m.generate("Hi", max_new_tokens=8)
    assert r.finish_reason == "eos" and r.token_ids == first[: first.index(target) + 1]


# --------------------------------------------------------------------------- sampling


def reference_sample(logits, rng, temperature, top_k, top_p):
    """Independent spelling of the documented protocol: full sorts, one uniform draw."""
    x = logits.astype(np.float64) / temperature
    order = np.lexsort((np.arange(len(x)), -x))  # by logit desc, then id
    keep = order if top_k is None else order[x[order] >= x[order[top_k - 1]]]
    p = np.exp(x[keep] - x[keep].max())
    p /= p.sum()
    if top_p is not None:
        cum = np.cumsum(p)
        n = int(np.argmax(cum >= top_p)) + 1 if cum[-1] >= top_p else len(p)
        keep, p = keep[:n], p[:n]
    ids_sorted = np.argsort(keep, kind="stable")
    keep, p = keep[ids_sorted], p[ids_sorted]
    cdf = np.cumsum(p / p.sum())
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(keep[min(i, len(keep) - 1)])


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, None), (0.7, 20, None), (1.3, None, 0.8), (0.9, 40, 0.6)],
)
def test_sampling_matches_reference(model, weights, temperature, top_k, top_p):
    r = model.generate(
        [fake.BOS, 1, 2],
        max_new_tokens=15,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=7,
    )
    ref, rng = fake.Reference(weights), np.random.default_rng(7)
    logits = ref.forward([fake.BOS, 1, 2])[-1]
    expected = []
    for _ in range(15):
        expected.append(reference_sample(logits, rng, temperature, top_k, top_p))
        logits = ref.forward([expected[-1]])[-1]
    assert r.token_ids == expected


def test_repetition_penalty_matches_reference(model, weights):
    prompt, penalty = [fake.BOS, 1, 2, 1], 1.8
    p = np.float32(penalty)
    plain = model.generate(prompt, max_new_tokens=20)
    r = model.generate(prompt, max_new_tokens=20, repetition_penalty=penalty)
    ref, seen, expected = fake.Reference(weights), set(prompt), []
    logits = ref.forward(prompt)[-1].astype(np.float32)
    for _ in range(20):
        ids = sorted(seen)
        picked = logits[ids]
        logits[ids] = np.where(picked < 0, picked * p, picked / p)
        expected.append(int(np.argmax(logits)))
        seen.add(expected[-1])
        logits = ref.forward([expected[-1]])[-1].astype(np.float32)
    assert r.token_ids == expected
    assert r.token_ids != plain.token_ids  # the penalty changed the greedy path
    assert len(set(r.token_ids)) > len(set(plain.token_ids))


def test_seed_reproducibility(model):
    kwargs = dict(max_new_tokens=20, temperature=1.5, seed=123)
    a = model.generate("x", **kwargs)
    b = model.generate("x", **kwargs)
    c = model.generate("x", **{**kwargs, "seed": 124})
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_streaming_equals_non_streaming_on_random_bytes(model):
    kwargs = dict(max_new_tokens=40, temperature=1.0, seed=5)
    r = model.generate("Hello", **kwargs)
    stream = model.generate("Hello", stream=True, **kwargs)
    pieces = list(stream)
    assert "".join(pieces) == r.text == stream.result.text
    assert stream.result.token_ids == r.token_ids


# --------------------------------------------------------------------------- errors


def gen_error(model, *args, **kwargs) -> str:
    with pytest.raises(SparsecError) as info:
        model.generate(*args, **kwargs)
    return str(info.value)


def test_context_overflow_names_the_numbers(model):
    msg = gen_error(model, list(range(60)), max_new_tokens=5)
    assert msg.startswith(
        "prompt (60 tokens) + max_new_tokens (5) = 65 exceeds the max context 64 of "
    )
    assert model.generate(list(range(60)), max_new_tokens=4).finish_reason == "length"


def test_bad_prompts(model):
    assert gen_error(model, "") == "the prompt is empty; pass some text or token ids"
    assert gen_error(model, []) == "prompt is empty; pass at least one token"
    assert gen_error(model, [1, 300]) == "prompt[1] = 300 is outside the vocabulary [0, 260)"
    assert gen_error(model, [[1, 2]]).startswith("prompt must be a flat list of integer token ids")
    assert gen_error(model, [1.5]).startswith("prompt must be a flat list of integer token ids")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=1.0, top_p=0.0), "top_p must be in (0, 1]"),
        (dict(temperature=1.0, top_p=1.5), "top_p must be in (0, 1]"),
        (dict(temperature=1.0, top_k=0), "top_k must be an integer >= 1"),
        (dict(top_k=2.5), "top_k must be an integer >= 1"),
        (dict(seed="1"), "seed must be an integer or None"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
        (dict(repetition_penalty="1.2"), "repetition_penalty must be a finite number > 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(stop=""), "stop must be a non-empty string or a list of them"),
        (dict(stop=["ok", 3]), "stop must be a non-empty string or a list of them"),
    ],
)
def test_bad_parameters(model, kwargs, message):
    assert gen_error(model, "hi", **kwargs).startswith(message)
    # checked when generate() is called, not when the stream is first read
    assert gen_error(model, "hi", stream=True, **kwargs).startswith(message)


def test_stream_interrupted_by_another_call(chain_model):
    stream = chain_model.generate("a", max_new_tokens=30, stream=True)
    assert next(stream) == "é"
    with pytest.raises(SparsecError, match="not finished; iterate it to the end first"):
        _ = stream.result
    chain_model.generate([3], max_new_tokens=2)
    with pytest.raises(SparsecError, match="this generation was interrupted"):
        list(stream)


def test_closed_model(model_path):
    m = runtime.load(model_path)
    m.close()
    with pytest.raises(SparsecError, match="was closed; load it again"):
        m.generate("hi")
    m.close()  # idempotent
