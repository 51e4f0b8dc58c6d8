"""Real chat templates of each supported family render exactly as transformers renders them.

The templates are the models' own (see chat_templates/README.md for where each comes
from). Every case compares ``sparsec.runtime.chat.render_chat`` with transformers'
``apply_chat_template(..., tokenize=False)``; the ablations remove one feature of the
environment and show that some family then renders differently or fails.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
import runtime_fake as fake

from sparsec import runtime
from sparsec.errors import SparsecError
from sparsec.runtime import chat
from sparsec.runtime.chat import render_chat

pytest.importorskip("transformers")

HERE = Path(__file__).parent / "chat_templates"

# fixture file -> (bos_token, eos_token) as the model's tokenizer has them ("" for none)
FAMILIES = {
    "meta-llama-Llama-3.1-8B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "Qwen-Qwen2.5-7B-Instruct.jinja": ("", "<|im_end|>"),
    "Qwen-Qwen3-0.6B.jinja": ("", "<|im_end|>"),
    "Qwen-Qwen3-8B.jinja": ("", "<|im_end|>"),
    "mistralai-Mistral-7B-Instruct-v0.2.jinja": ("<s>", "</s>"),
    "mistralai-Mistral-Large-Instruct-2407-v3.jinja": ("<s>", "</s>"),
    "microsoft-Phi-3-mini-4k-instruct.jinja": ("<s>", "<|endoftext|>"),
    "microsoft-Phi-3.5-mini-instruct.jinja": ("<s>", "<|endoftext|>"),
    "microsoft-Phi-4-mini-instruct.jinja": ("<|endoftext|>", "<|endoftext|>"),
}
LLAMA31, LLAMA32 = (
    "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "meta-llama-Llama-3.2-3B-Instruct.jinja",
)
QWEN25, QWEN3_06, QWEN3_8 = (
    "Qwen-Qwen2.5-7B-Instruct.jinja",
    "Qwen-Qwen3-0.6B.jinja",
    "Qwen-Qwen3-8B.jinja",
)
MISTRAL_V1 = "mistralai-Mistral-7B-Instruct-v0.2.jinja"
MISTRAL_V3 = "mistralai-Mistral-Large-Instruct-2407-v3.jinja"
PHI3, PHI35, PHI4 = (
    "microsoft-Phi-3-mini-4k-instruct.jinja",
    "microsoft-Phi-3.5-mini-instruct.jinja",
    "microsoft-Phi-4-mini-instruct.jinja",
)

SYSTEM = {"role": "system", "content": "You are terse. Réponds en français."}
CONVERSATIONS = {
    "system+user": [SYSTEM, {"role": "user", "content": "  Héllo, ж?  "}],
    "user": [{"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! \n"},
        {"role": "user", "content": 'Say "yes" <b>&</b>'},
    ],
    "ends with assistant": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ],
}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Wetter für <city> & Umgebung",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
FROZEN_NOW = datetime(2025, 3, 9, 12, 0, 0)


def template(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    """Both renderers' strftime_now read this clock, so Llama 3.2's date is deterministic."""
    import transformers.utils.chat_template_utils as hf_utils

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return FROZEN_NOW

    monkeypatch.setattr(chat, "datetime", Frozen)
    monkeypatch.setattr(hf_utils, "datetime", Frozen)
    yield
    chat._compile.cache_clear()  # templates compiled during an ablation must not be reused


@pytest.fixture(scope="module")
def hf_tokenizer():
    from sparsec.testing import make_byte_tokenizer

    return make_byte_tokenizer()


def hf_render(hf_tokenizer, name, messages, add_generation_prompt=True, **kwargs):
    bos, eos = FAMILIES[name]
    return hf_tokenizer.apply_chat_template(
        messages,
        chat_template=template(name),
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        bos_token=bos,
        eos_token=eos,
        **kwargs,
    )


def ours(name, messages, add_generation_prompt=True, **kwargs):
    bos, eos = FAMILIES[name]
    return render_chat(
        template(name),
        messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos,
        eos_token=eos,
        **kwargs,
    )


def without(monkeypatch, table: str, key: str, replacement=None):
    """Remove (or replace) one global or filter of sparsec's Jinja environment."""
    chat._compile.cache_clear()  # filters are bound when a template is compiled
    mapping = getattr(chat._environment(), table)
    if replacement is None:
        monkeypatch.delitem(mapping, key)
    else:
        monkeypatch.setitem(mapping, key, replacement)


# ----------------------------------------------------------------------------- parity


def test_every_fixture_is_tested():
    assert sorted(p.name for p in HERE.glob("*.jinja")) == sorted(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_family_renders_as_transformers(hf_tokenizer, name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    expected = hf_render(hf_tokenizer, name, messages, add_generation_prompt)
    got = ours(name, messages, add_generation_prompt)
    assert got == expected
    assert messages[-1]["content"].strip() in got


def test_llama32_dates_the_prompt_with_strftime_now(hf_tokenizer, monkeypatch):
    messages = CONVERSATIONS["user"]
    expected = hf_render(hf_tokenizer, LLAMA32, messages)
    assert ours(LLAMA32, messages) == expected
    assert "Today Date: 09 Mar 2025\n" in expected
    # Ablation: without strftime_now the template falls back to a fixed date.
    without(monkeypatch, "globals", "strftime_now")
    got = ours(LLAMA32, messages)
    assert "Today Date: 26 Jul 2024\n" in got and got != expected


@pytest.mark.parametrize("name", [LLAMA31, LLAMA32])
def test_llama_date_string_is_a_template_variable(hf_tokenizer, name):
    messages = CONVERSATIONS["system+user"]
    expected = hf_render(hf_tokenizer, name, messages, date_string="01 Jan 2030")
    assert "Today Date: 01 Jan 2030\n" in expected
    assert ours(name, messages, date_string="01 Jan 2030") == expected
    # Ablation: without the pass-through the template's own date is used.
    assert ours(name, messages) != expected


@pytest.mark.parametrize("name", [QWEN3_06, QWEN3_8])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen3_enable_thinking(hf_tokenizer, name, enable_thinking):
    messages = CONVERSATIONS["multi-turn"]
    expected = hf_render(hf_tokenizer, name, messages, enable_thinking=enable_thinking)
    got = ours(name, messages, enable_thinking=enable_thinking)
    assert got == expected
    empty_think = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert got.endswith(empty_think) == (not enable_thinking)
    if not enable_thinking:  # ablation: the variable must reach the template
        assert ours(name, messages) != expected


@pytest.mark.parametrize("name", [LLAMA31, LLAMA32, QWEN25, QWEN3_06, QWEN3_8, MISTRAL_V3])
def test_tools_render_as_transformers(hf_tokenizer, name, monkeypatch):
    from jinja2.filters import do_tojson

    messages = CONVERSATIONS["multi-turn"]
    expected = hf_render(hf_tokenizer, name, messages, tools=[TOOL])
    got = ours(name, messages, tools=[TOOL])
    assert got == expected
    assert "get_weather" in got and "Wetter für" in got
    # Ablation: Jinja's own tojson escapes <, > and & (and sorts keys): not the same prompt.
    without(monkeypatch, "filters", "tojson", do_tojson)
    assert ours(name, messages, tools=[TOOL]) != expected


def test_reasoning_under_any_name_reaches_qwen3(hf_tokenizer, monkeypatch):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning": "Two plus two."},
    ]
    expected = hf_render(hf_tokenizer, QWEN3_8, messages, add_generation_prompt=False)
    assert "<think>\nTwo plus two.\n</think>\n\n4" in expected
    assert ours(QWEN3_8, messages, add_generation_prompt=False) == expected
    # Ablation: without the alias the template sees no reasoning.
    monkeypatch.setattr(chat, "_alias_reasoning", lambda m: m)
    assert ours(QWEN3_8, messages, add_generation_prompt=False) != expected


def test_none_valued_keys_are_dropped(hf_tokenizer, monkeypatch):
    # OpenAI-style messages carry tool_calls=None; Llama 3.1 checks "'tool_calls' in message".
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "tool_calls": None},
        {"role": "user", "content": "Bye"},
    ]
    expected = hf_render(hf_tokenizer, LLAMA31, messages)
    assert ours(LLAMA31, messages) == expected
    assert messages[1]["tool_calls"] is None  # the caller's messages are untouched
    # Ablation: keeping the None sends the message down the tool-call branch, which fails.
    monkeypatch.setattr(chat, "_drop_none", lambda m: m)
    with pytest.raises(SparsecError, match="failed on these messages: TypeError"):
        ours(LLAMA31, messages)


def test_tools_and_documents_default_to_none(hf_tokenizer, monkeypatch):
    probe = "{{ tools is none }}/{{ documents is none }}"
    msgs = CONVERSATIONS["user"]
    expected = hf_tokenizer.apply_chat_template(msgs, chat_template=probe, tokenize=False)
    assert expected == "True/True"
    assert render_chat(probe, msgs) == expected
    monkeypatch.setattr(chat, "_DEFAULT_VARIABLES", {})
    assert render_chat(probe, msgs) == "False/False"


# ----------------------------------------------------------------------------- errors


def hf_error(hf_tokenizer, name, messages, **kwargs) -> str:
    with pytest.raises(Exception) as info:
        hf_render(hf_tokenizer, name, messages, **kwargs)
    return str(info.value)


def one_line_error(name, messages, **kwargs) -> str:
    with pytest.raises(SparsecError) as info:
        ours(name, messages, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


ALTERNATION = (
    "After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/..."
)
TWO_USERS = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}]


@pytest.mark.parametrize("name", [MISTRAL_V1, MISTRAL_V3])
def test_mistral_rejects_two_user_messages_in_a_row(hf_tokenizer, name, monkeypatch):
    assert hf_error(hf_tokenizer, name, TWO_USERS) == ALTERNATION
    message = one_line_error(name, TWO_USERS)
    assert message == f"the chat template rejected the messages: {ALTERNATION}"
    # Ablation: without raise_exception the user learns nothing about alternation.
    without(monkeypatch, "globals", "raise_exception")
    message = one_line_error(name, TWO_USERS)
    assert "'raise_exception' is undefined" in message and "alternate" not in message


@pytest.mark.parametrize(
    ("name", "messages", "reason"),
    [
        (
            MISTRAL_V1,
            [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}],
            "Only user and assistant roles are supported, with the exception of an initial "
            "optional system message!",
        ),
        (
            MISTRAL_V3,
            [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}],
            "Tool call IDs should be alphanumeric strings with length 9!",
        ),
        (
            LLAMA31,
            [
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "a", "arguments": {}}},
                        {"function": {"name": "b", "arguments": {}}},
                    ],
                },
            ],
            "This model only supports single tool-calls at once!",
        ),
    ],
)
def test_template_rejections_name_the_problem(hf_tokenizer, name, messages, reason):
    assert hf_error(hf_tokenizer, name, messages) == reason
    assert one_line_error(name, messages) == f"the chat template rejected the messages: {reason}"


def test_a_failing_template_expression_is_a_one_line_error(hf_tokenizer):
    # Phi-3.5 concatenates content as a string; list content (multimodal style) fails.
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert "can only concatenate str" in hf_error(hf_tokenizer, PHI35, messages)
    message = one_line_error(PHI35, messages)
    assert message.startswith("the model's chat template failed on these messages: TypeError: ")
    assert "can only concatenate str" in message


def test_syntax_errors_give_the_line():
    with pytest.raises(SparsecError) as info:
        render_chat("{{ bos_token }}\n{% for %}", CONVERSATIONS["user"])
    message = str(info.value)
    assert message.startswith("the model's chat template does not parse: ")
    assert message.endswith("(line 2)") and "\n" not in message


def test_namespace_refuses_underscore_names_like_transformers(hf_tokenizer, monkeypatch):
    from jinja2.utils import Namespace

    probe = "{% set ns = namespace(n=1) %}{% set ns._hidden = 2 %}{{ ns.n }}"
    msgs = CONVERSATIONS["user"]
    with pytest.raises(Exception, match="underscore-prefixed") as hf:
        hf_tokenizer.apply_chat_template(msgs, chat_template=probe, tokenize=False)
    with pytest.raises(SparsecError) as info:
        render_chat(probe, msgs)
    assert str(info.value).endswith(str(hf.value))
    # Ablation: Jinja's plain namespace accepts the name.
    without(monkeypatch, "globals", "namespace", Namespace)
    assert render_chat(probe, msgs) == "1"
    assert render_chat("{{ dict(a=1) }}{{ dict.fromkeys('b') }}", msgs) == "{'a': 1}{'b': None}"


# ----------------------------------------------------------------------------- Model.chat

SHORT_FAMILIES = [MISTRAL_V1, MISTRAL_V3, PHI3, PHI35, PHI4]  # fit the fake model's context


@pytest.mark.parametrize("name", SHORT_FAMILIES)
def test_model_chat_uses_the_family_template(make_model, hf_tokenizer, name):
    messages = [{"role": "user", "content": "hi"}]
    text = hf_tokenizer.apply_chat_template(
        messages, chat_template=template(name), add_generation_prompt=True, tokenize=False
    )  # the fake model's bos/eos are the byte tokenizer's <|bos|> / <|eos|>
    with runtime.load(make_model(chat_template=template(name))) as m:
        r = m.chat(messages, max_new_tokens=1)
    assert r.prompt_token_ids == fake.tokenizer().encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("name", [MISTRAL_V1, MISTRAL_V3])
def test_model_chat_reports_the_rejection(make_model, name):
    with runtime.load(make_model(chat_template=template(name))) as m:
        with pytest.raises(SparsecError, match="conversation roles must alternate"):
            m.chat(TWO_USERS)
