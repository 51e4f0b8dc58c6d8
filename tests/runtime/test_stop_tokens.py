"""Stop tokens and template variables: generation ends on any listed eos id, chat()
renders ``eos_token`` as the first listed id (the tokenizer's own eos) and passes
``template_kwargs`` to the chat template."""

from __future__ import annotations

import pytest
import runtime_fake as fake

from sparsec import runtime
from sparsec.errors import SparsecError

IM_START, IM_END = 258, 259  # the fake tokenizer's <|im_start|> and <|im_end|>
USER_HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok():
    return fake.tokenizer()


def chain(tok, text: str, end: int) -> dict[int, int]:
    """Successor table: after <|bos|> the greedy continuation spells ``text``, then ``end``."""
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) == len(set(ids))
    successor = dict(zip(ids[:-1], ids[1:], strict=True))
    successor[fake.BOS] = ids[0]
    successor[ids[-1]] = end
    return successor


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("end", [fake.EOS, IM_START, IM_END])
def test_generation_stops_on_any_listed_eos(make_model, tok, end):
    # Llama 3.1 Instruct lists [<|end_of_text|>, <|eom_id|>, <|eot_id|>]: each one ends.
    generation = {"bos_token_id": fake.BOS, "eos_token_id": [fake.EOS, IM_START, IM_END]}
    path = make_model(weights=fake.chain_weights(chain(tok, "abc", end)), generation=generation)
    with runtime.load(path) as m:
        r = m.generate("a", max_new_tokens=20)
        assert r.finish_reason == "eos" and r.token_ids[-1] == end
        assert r.text == "bc" and len(r.token_ids) == 3
        assert "".join(m.generate("a", max_new_tokens=20, stream=True)) == "bc"


def test_a_token_not_listed_does_not_stop(make_model, tok):
    generation = {"bos_token_id": fake.BOS, "eos_token_id": [fake.EOS, IM_START]}
    path = make_model(weights=fake.chain_weights(chain(tok, "abc", IM_END)), generation=generation)
    with runtime.load(path) as m:
        r = m.generate("a", max_new_tokens=6)
    assert r.finish_reason == "length" and r.token_ids[2] == IM_END


@pytest.mark.parametrize(
    "stored, ids, first",
    [
        (fake.EOS, {fake.EOS}, fake.EOS),  # artifacts from before lists: a single int
        ([IM_END, fake.EOS], {IM_END, fake.EOS}, IM_END),
        (None, set(), None),
    ],
)
def test_eos_ids_read_from_the_manifest(make_model, stored, ids, first):
    generation = {"bos_token_id": fake.BOS, "eos_token_id": stored}
    with runtime.load(make_model(generation=generation)) as m:
        assert m.eos_token_ids == ids and m.eos_token_id == first


# --------------------------------------------------------------------------- eos_token

EOS_TEMPLATE = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"


@pytest.mark.parametrize(
    "stored, rendered",
    [
        # The first id, not the smallest (257 = <|eos|> < 259 = <|im_end|>).
        ([IM_END, fake.EOS], "<|im_end|>"),
        ([fake.EOS, IM_END], "<|eos|>"),
        (fake.EOS, "<|eos|>"),  # a single int, as older artifacts store it
        (None, ""),
    ],
)
def test_chat_renders_eos_token_as_the_first_listed_id(make_model, tok, stored, rendered):
    generation = {"bos_token_id": fake.BOS, "eos_token_id": stored}
    with runtime.load(make_model(chat_template=EOS_TEMPLATE, generation=generation)) as m:
        r = m.chat(USER_HI, max_new_tokens=1)
    expected = tok.encode(f"<|bos|>hi{rendered}", add_special_tokens=False).ids
    assert r.prompt_token_ids == expected


def test_exported_generation_assets_drive_the_runtime(make_model, tok):
    """tokenizer_assets + a Phi-3-like generation_config (the turn ends with a token that
    is not the tokenizer's eos): eos_token is the tokenizer's, and the turn end stops."""
    from transformers import GenerationConfig

    from sparsec.models import tokenizer_assets
    from sparsec.testing import make_byte_tokenizer

    assets = tokenizer_assets(make_byte_tokenizer(), GenerationConfig(eos_token_id=[IM_END]))
    assert assets["generation"] == {"bos_token_id": fake.BOS, "eos_token_id": [fake.EOS, IM_END]}
    path = make_model(
        weights=fake.chain_weights(chain(tok, "abc", IM_END)),
        chat_template="{{ eos_token }}{{ messages[0]['content'] }}",
        generation=assets["generation"],
    )
    with runtime.load(path) as m:
        r = m.chat([{"role": "user", "content": "a"}], max_new_tokens=20)
    assert r.prompt_token_ids == tok.encode("<|eos|>a", add_special_tokens=False).ids
    assert r.finish_reason == "eos" and r.text == "bc" and r.token_ids[-1] == IM_END


# --------------------------------------------------------------------------- template_kwargs

VARIABLES_TEMPLATE = (
    "{{ bos_token }}"
    "{% if enable_thinking is defined and not enable_thinking %}<nothink>{% endif %}"
    "[{{ date_string | default('no date') }}]"
    "{% if tools %}{{ tools | length }} tool(s){% endif %}"
    "{% for m in messages %}{{ m['content'] }}{% endfor %}"
)


@pytest.mark.parametrize(
    "template_kwargs, text",
    [
        (None, "[no date]hi"),
        ({}, "[no date]hi"),
        ({"enable_thinking": False}, "<nothink>[no date]hi"),
        ({"enable_thinking": True, "date_string": "26 Jul 2024"}, "[26 Jul 2024]hi"),
        ({"tools": [{"type": "function"}]}, "[no date]1 tool(s)hi"),
    ],
)
def test_chat_passes_template_kwargs(make_model, tok, template_kwargs, text):
    with runtime.load(make_model(chat_template=VARIABLES_TEMPLATE)) as m:
        r = m.chat(USER_HI, template_kwargs=template_kwargs, max_new_tokens=2)
        stream = m.chat(USER_HI, template_kwargs=template_kwargs, max_new_tokens=2, stream=True)
        assert "".join(stream) == r.text
    assert r.prompt_token_ids == tok.encode("<|bos|>" + text, add_special_tokens=False).ids
    assert len(r.token_ids) == 2  # the generate() arguments still reach generate()


def test_template_kwargs_render_as_transformers():
    from sparsec.runtime.chat import render_chat
    from sparsec.testing import make_byte_tokenizer

    hf = make_byte_tokenizer()
    variables = {"enable_thinking": False, "date_string": "26 Jul 2024"}
    expected = hf.apply_chat_template(
        USER_HI, chat_template=VARIABLES_TEMPLATE, tokenize=False, **variables
    )
    assert render_chat(VARIABLES_TEMPLATE, USER_HI, bos_token=hf.bos_token, **variables) == (
        expected
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"template_kwargs": [("enable_thinking", False)]}, "template_kwargs must be a dict"),
        ({"template_kwargs": "enable_thinking=False"}, "template_kwargs must be a dict"),
        ({"template_kwargs": {"messages": []}}, "template_kwargs cannot set 'messages'"),
        ({"template_kwargs": {"eos_token": "x"}}, "template_kwargs cannot set 'eos_token'"),
        ({"template_kwargs": {"bos_token": "x"}}, "template_kwargs cannot set 'bos_token'"),
        (
            {"template_kwargs": {"add_generation_prompt": False}},
            "template_kwargs cannot set 'add_generation_prompt'",
        ),
        ({"template_kwargs": {1: True}}, "template_kwargs key 1 is not a valid variable name"),
        ({"enable_thinking": False}, "unknown argument.*enable_thinking.*template_kwargs"),
    ],
)
def test_template_kwargs_errors(model, kwargs, message):
    with pytest.raises(SparsecError, match=message) as info:
        model.chat(USER_HI, **kwargs)
    assert "\n" not in str(info.value)
