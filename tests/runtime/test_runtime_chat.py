"""Chat templates render as in Hugging Face, and chat() generates from them."""

from __future__ import annotations

import pytest
import runtime_fake as fake

from sparsec import runtime
from sparsec.errors import SparsecError
from sparsec.runtime.chat import render_chat

# Uses what real templates use: loop controls, tojson, raise_exception, namespace.
RICH_TEMPLATE = (
    "{%- set ns = namespace(n=0) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('bad role ' + m['role']) }}"
    "{%- endif -%}"
    "{%- if m['role'] == 'system' %}{% continue %}{% endif -%}"
    "{%- set ns.n = ns.n + 1 -%}"
    "<|im_start|>{{ m['role'] }} {{ ns.n }}\n{{ m['content'] | tojson }}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
    "{{ eos_token }}"
)
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": 'héllo "there"'},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "ж?"},
]


@pytest.mark.parametrize("template", [fake.CHAT_TEMPLATE, RICH_TEMPLATE])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(template, add_generation_prompt):
    from sparsec.testing import make_byte_tokenizer

    hf = make_byte_tokenizer()
    expected = hf.apply_chat_template(
        MESSAGES,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )
    ours = render_chat(
        template,
        MESSAGES,
        add_generation_prompt=add_generation_prompt,
        bos_token=hf.bos_token,
        eos_token=hf.eos_token,
    )
    assert ours == expected


def test_chat_generates_from_the_rendered_prompt(model, weights):
    tok = fake.tokenizer()
    r = model.chat([{"role": "user", "content": "hi"}], max_new_tokens=5)
    text = "<|bos|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert r.prompt_token_ids == tok.encode(text, add_special_tokens=False).ids
    assert r.prompt_token_ids.count(fake.BOS) == 1  # from the template, not added again
    assert r.token_ids == fake.Reference(weights).greedy(r.prompt_token_ids, 5)
    stream = model.chat([{"role": "user", "content": "hi"}], max_new_tokens=5, stream=True)
    assert "".join(stream) == r.text


def test_chat_errors(model, make_model):
    with pytest.raises(SparsecError, match="messages must be a non-empty list"):
        model.chat([])
    with pytest.raises(
        SparsecError, match=r"messages\[0\] must be a dict with 'role' and 'content'"
    ):
        model.chat([{"role": "user"}])
    with runtime.load(make_model(chat_template=None)) as m:
        with pytest.raises(SparsecError, match="has no chat template; use generate"):
            m.chat([{"role": "user", "content": "hi"}])
    with runtime.load(make_model(chat_template=RICH_TEMPLATE)) as m:
        with pytest.raises(
            SparsecError, match="the chat template rejected the messages: bad role tool"
        ):
            m.chat([{"role": "tool", "content": "x"}])
    with runtime.load(make_model(chat_template="{% for %}")) as m:
        with pytest.raises(SparsecError, match="the model's chat template does not parse"):
            m.chat([{"role": "user", "content": "hi"}])
