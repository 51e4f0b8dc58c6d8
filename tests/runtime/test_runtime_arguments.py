"""Every bad argument of the runtime API and of `sparsec run` gives one SparsecError line
naming the argument, the value and the allowed range; never a raw TypeError/ValueError,
and never a silently wrong answer (tiny temperatures, huge thread counts)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec import cli, runtime
from sparsec.errors import SparsecError
from sparsec.runtime.arguments import MAX_THREADS
from sparsec.runtime.sampling import Sampler

HUGE = 10**400  # float() overflows, and repr() refuses ints past 4300 digits


def error(call, *args, **kwargs) -> str:
    with pytest.raises(SparsecError) as info:
        call(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg.isascii()  # one printable line, whatever the value
    return msg


class BytesPath(os.PathLike):
    def __fspath__(self):
        return b"model.so"


# --------------------------------------------------------------------------- load()


@pytest.mark.parametrize(
    "path, message",
    [
        (None, "path must be a str or os.PathLike (the compiled model.so), got NoneType None"),
        (3, "path must be a str or os.PathLike (the compiled model.so), got int 3"),
        (b"m.so", "path must be a str or os.PathLike, got bytes b'm.so'; decode it with"),
        (BytesPath(), "path must be a str or os.PathLike, got bytes"),
        ("", "path is empty; pass the path of a compiled model.so"),
        ("a\0b.so", "path 'a\\x00b.so' contains a NUL character"),
    ],
)
def test_load_path_type(path, message):
    assert error(runtime.load, path).startswith(message)


@pytest.mark.parametrize("threads", [0, -1, 2**32 + 1, MAX_THREADS + 1, HUGE, 1.0, "2", True])
def test_load_threads_range(model_path, threads):
    msg = error(runtime.load, model_path, threads=threads)
    assert msg.startswith(f"threads must be an integer >= 1 and <= {MAX_THREADS} (or None = ")
    assert "CPUs this process may use" in msg


def test_load_threads_bounds_accepted(model_path):
    for threads in (1, np.int64(3), MAX_THREADS):
        with runtime.load(model_path, threads=threads) as m:
            assert m.threads == threads and isinstance(m.threads, int)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(verify="no"), "verify (True, False or 'always') must be True or False, got 'no'"),
        (dict(verify=None), "verify (True, False or 'always') must be True or False, got None"),
        (dict(huge_pages=1), "huge_pages must be True, False or None (None = when the kernel"),
    ],
)
def test_load_flags_are_bools(model_path, kwargs, message):
    assert error(runtime.load, model_path, **kwargs).startswith(message)


# --------------------------------------------------------------------------- generate()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=-1), "seed must be an integer or None (an integer >= 0 repeats a draw"),
        (dict(seed=1.0), "seed must be an integer or None"),
        (dict(stop=5), "stop must be a non-empty string or a list of them, got 5"),
        (dict(stop=b"x"), "stop must be a non-empty string or a list of them, got b'x'"),
        (dict(stop=("a", None)), "stop must be a non-empty string or a list of them"),
        (dict(stop="\ud800"), "stop contains a lone surrogate '\\ud800' at index 0"),
        (dict(stop=["ok", "x\udc80"]), "stop[1] contains a lone surrogate '\\udc80' at index 1"),
        (dict(max_new_tokens="5"), "max_new_tokens must be an integer >= 1 (prompt + "),
        (dict(max_new_tokens=5.0), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=None), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=HUGE), "prompt (3 tokens) + max_new_tokens (an integer of 1329"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0 (0 = greedy"),
        (dict(temperature=-5e-324), "temperature must be a finite number >= 0"),
        (dict(temperature=HUGE), "temperature must be a finite number >= 0"),
        (dict(temperature="0.5"), "temperature must be a finite number >= 0"),
        (dict(temperature=None), "temperature must be a finite number >= 0"),
        (dict(temperature=True), "temperature must be a finite number >= 0"),
        (dict(top_k="5"), "top_k must be an integer >= 1 (or None for all tokens), got '5'"),
        (dict(top_k=float("nan")), "top_k must be an integer >= 1"),
        (dict(top_k=-1), "top_k must be an integer >= 1"),
        (dict(top_k=True), "top_k must be an integer >= 1"),
        (dict(top_p=float("nan")), "top_p must be in (0, 1] (or None for 1), got nan"),
        (dict(top_p=float("inf")), "top_p must be in (0, 1]"),
        (dict(top_p=-0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.0000001), "top_p must be in (0, 1]"),
        (dict(top_p="0.5"), "top_p must be in (0, 1]"),
        (dict(top_p=True), "top_p must be in (0, 1]"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be a finite number > 0"),
        (dict(repetition_penalty=5e-324), "repetition_penalty must be a finite number > 0, from"),
        (dict(repetition_penalty=1e300), "repetition_penalty must be a finite number > 0"),
        (dict(repetition_penalty=0.009), "repetition_penalty must be a finite number > 0"),
        (dict(repetition_penalty=100.5), "repetition_penalty must be a finite number > 0"),
        (dict(repetition_penalty=True), "repetition_penalty must be a finite number > 0"),
        (dict(stream="yes"), "stream must be True or False, got 'yes'"),
    ],
)
def test_generate_arguments(model, kwargs, message):
    assert error(model.generate, "hi", **kwargs).startswith(message)
    if "max_new_tokens" not in kwargs:
        kwargs["max_new_tokens"] = 2
    # chat() checks generate()'s options too (its prompt is longer: the template's)
    chat_message = error(model.chat, [{"role": "user", "content": "hi"}], **kwargs)
    assert chat_message.startswith(message.replace("(3 tokens)", "(22 tokens)"))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(seed=2**200),
        dict(top_k=HUGE),  # at least the vocabulary: all tokens
        dict(top_p=5e-324),  # the most likely token only
        dict(temperature=1e308),  # uniform, without overflow
        dict(repetition_penalty=0.01),
        dict(repetition_penalty=100),
        dict(max_new_tokens=np.int64(3), stop=("a", "b"), stream=np.bool_(False)),
    ],
)
def test_extreme_but_valid_arguments_work(model, kwargs):
    r = model.generate("hi", **{"max_new_tokens": 3, "temperature": 1.0, "seed": 0, **kwargs})
    assert all(0 <= t < model.vocab_size for t in r.token_ids)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("\ud800", "the prompt contains a lone surrogate '\\ud800' at index 0, which is not"),
        ("ok\udcff", "the prompt contains a lone surrogate '\\udcff' at index 2"),
        (b"hi", "prompt must be a str or a list of token ids, got bytes b'hi'; decode it"),
        (None, "prompt must be a flat list of integer token ids, got None"),
        (5, "prompt must be a flat list of integer token ids, got 5"),
        ({"a": 1}, "prompt must be a flat list of integer token ids, got {'a': 1}"),
        ([2**70], "prompt must be a flat list of integer token ids, got [1180591620717411303424]"),
    ],
)
def test_bad_prompts(model, prompt, message):
    assert error(model.generate, prompt, max_new_tokens=2).startswith(message)


def test_forward_encode_rewind_arguments(model):
    assert (
        error(model.forward, [1], all_logits="no") == "all_logits must be True or False, got 'no'"
    )
    assert error(model.forward, [1], all_logits=1).startswith("all_logits must be True or False")
    assert model.forward([1], all_logits=np.bool_(False)).shape == (model.vocab_size,)
    assert error(model.forward, np.zeros((2, 2), np.int32)).startswith(
        "token_ids must be a flat list of integer token ids, got array([[0, 0], [0, 0]], dtype="
    )
    assert error(model.encode, 5) == "text must be a str, got int 5"
    assert error(model.encode, "a\ud800").startswith("text contains a lone surrogate '\\ud800'")
    assert error(model.encode, "hi", add_special_tokens="x").startswith(
        "add_special_tokens must be True or False"
    )
    assert error(model.rewind, HUGE).startswith(
        "cannot rewind to position an integer of 1329 bits: the cache holds 1 token(s)"
    )


def test_chat_arguments(model, make_model):
    user = [{"role": "user", "content": "hi"}]
    assert error(model.chat, user, add_generation_prompt="x").startswith(
        "add_generation_prompt must be True or False, got 'x'"
    )
    assert error(model.chat, [{"role": "user", "content": "a\ud800"}]).startswith(
        "messages[0]['content'] contains a lone surrogate '\\ud800' at index 1"
    )
    # A template variable is not a message field: the rendered text is checked too.
    with runtime.load(make_model(chat_template="{{ x }}{{ messages[0]['content'] }}")) as m:
        assert error(m.chat, user, template_kwargs={"x": "\udc80"}) == (
            "the chat prompt rendered from messages contains a lone surrogate '\\udc80' at "
            "index 0, which is not valid Unicode (text from bytes: decode them as UTF-8 first)"
        )


# --------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30])
def test_tiny_temperature_is_greedy(model, temperature):
    greedy = model.generate("Hello", max_new_tokens=10).token_ids
    for kwargs in ({}, {"top_k": 5}, {"top_p": 0.9}, {"top_k": 3, "top_p": 0.5}):
        r = model.generate("Hello", max_new_tokens=10, temperature=temperature, seed=1, **kwargs)
        assert r.token_ids == greedy


@settings(max_examples=150, deadline=None)
@given(
    temperature=st.one_of(st.floats(), st.floats(0, 1e-300), st.integers(-3, 3)),
    vocab=st.sampled_from([7, 300, 2000]),  # 2000: the blocked draw path
    seed=st.integers(0, 2**32 - 1),
)
def test_any_temperature_is_refused_or_samples_a_valid_token(temperature, vocab, seed):
    logits = np.random.default_rng(seed).normal(0, 5, vocab).astype(np.float32)
    try:
        sampler = Sampler(temperature, seed=seed)
    except SparsecError as exc:
        assert not (math.isfinite(temperature) and temperature >= 0)
        assert str(exc).startswith("temperature must be a finite number >= 0")
        return
    token = sampler(logits)
    assert 0 <= token < vocab
    if temperature < 1e-30:  # far below any logit gap: the greedy limit
        assert token == int(np.argmax(logits))


@settings(max_examples=100, deadline=None)
@given(
    top_p=st.one_of(st.none(), st.floats()),
    penalty=st.one_of(st.none(), st.floats()),
    top_k=st.one_of(st.none(), st.integers(-2, 10**30)),
)
def test_any_filter_is_refused_or_samples_a_valid_token(top_p, penalty, top_k):
    logits = np.random.default_rng(0).normal(0, 5, 300).astype(np.float32)
    try:
        sampler = Sampler(0.7, top_k=top_k, top_p=top_p, seed=0, repetition_penalty=penalty)
    except SparsecError as exc:
        assert str(exc).split(" ")[0] in ("top_p", "top_k", "repetition_penalty")
        return
    sampler.see(range(0, 300, 3))
    assert 0 <= sampler(sampler.penalize(logits)) < 300


# --------------------------------------------------------------------------- sparsec run


@pytest.fixture
def only_runtime_commands(monkeypatch):
    # Other stages' command modules are written in parallel and may not import yet.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("sparsec.runtime.command",))


@pytest.mark.parametrize(
    "option, message",
    [
        (["--threads", "0"], "threads must be an integer >= 1 and <= 1024"),
        (["--threads", "4294967297"], "threads must be an integer >= 1 and <= 1024"),
        (["--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 1"),
        (["--seed", "-1"], "seed must be an integer or None (an integer >= 0"),
        (["--temperature", "nan"], "temperature must be a finite number >= 0"),
        (["--temperature=-inf"], "temperature must be a finite number >= 0"),
        (["--top-k", "0"], "top_k must be an integer >= 1"),
        (["--top-p", "inf"], "top_p must be in (0, 1]"),
        (["--repetition-penalty", "0"], "repetition_penalty must be a finite number > 0"),
        (["--stop", ""], "stop must be a non-empty string or a list of them, got ['']"),
        (["--stop", "\udcff"], "stop[0] contains a lone surrogate '\\udcff'"),
    ],
)
def test_run_checks_options_before_loading(only_runtime_commands, capsys, option, message):
    # The model does not exist: the option's error shows the checks run before the load.
    assert cli.main(["run", "/nonexistent/model.so", "hi", *option]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sparsec run: error: {message}") and err.count("\n") == 1


def test_run_refuses_a_prompt_that_is_not_utf8(only_runtime_commands, capsys):
    # What Python makes of the argv bytes b"hi \xff" (surrogateescape).
    prompt = os.fsdecode(b"hi \xff")
    assert cli.main(["run", str(Path("/nonexistent/model.so")), prompt]) == 1
    assert capsys.readouterr().err == (
        "sparsec run: error: PROMPT contains a lone surrogate '\\udcff' at index 3, which is "
        "not valid Unicode (the argument is not UTF-8: pass UTF-8 text)\n"
    )
