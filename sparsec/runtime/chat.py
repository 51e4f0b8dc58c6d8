"""Chat templates: render ``messages`` with the model's Jinja template, as Hugging Face does.

Same environment as ``transformers`` (sandboxed, ``trim_blocks``, ``lstrip_blocks``,
loop controls, a ``tojson`` that keeps non-ASCII, ``raise_exception``, ``strftime_now``,
and its hardened ``namespace`` and ``dict``), and the same inputs as its
``apply_chat_template``: message keys whose value is None are dropped, a message's
reasoning given as ``reasoning`` or ``thinking`` is also passed as ``reasoning_content``,
``tools`` and ``documents`` default to None, and extra keyword arguments (Qwen3's
``enable_thinking``, Llama 3's ``date_string``, ``tools``...) become template variables.
So a template renders here as in ``apply_chat_template(..., tokenize=False)``. jinja2
is imported only when a chat is rendered: plain generation does not need it.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

from sparsec.errors import MissingDependencyError, SparsecError
from sparsec.runtime.arguments import check_text, show

# What transformers' render_jinja_template gives every template, unless the caller overrides it.
_DEFAULT_VARIABLES = {"tools": None, "documents": None}
# Names a message's reasoning may come under; templates (Qwen3) read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@functools.cache
def _environment():
    try:
        from jinja2.exceptions import SecurityError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.utils import Namespace
    except ImportError as exc:
        raise MissingDependencyError(
            "chat templates need jinja2; install it with: pip install jinja2"
        ) from exc

    def raise_exception(message):
        raise SparsecError(f"the chat template rejected the messages: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        """``dict(...)`` and ``dict.fromkeys(...)`` without the type itself (as transformers)."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                "Chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"but got {name!r}. Please rename the attribute."
            )

    class TemplateNamespace(Namespace):
        """A namespace that refuses underscore names, as transformers' (no CPython internals)."""

        def __init__(*args, **kwargs):  # Jinja's signature trick: namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check_name(name)
            Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        return _environment().from_string(template)
    except TemplateSyntaxError as exc:
        raise SparsecError(
            f"the model's chat template does not parse: {exc.message} (line {exc.lineno})"
        ) from exc
    except TemplateError as exc:
        raise SparsecError(f"the model's chat template does not parse: {exc}") from exc


def check_messages(messages) -> list[dict]:
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)) or not messages:
        raise SparsecError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} dicts"
        )
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise SparsecError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {show(msg)}"
            )
        for key, value in msg.items():
            if isinstance(value, str):
                # The tokenizer cannot take a lone surrogate: name the field holding one.
                check_text(value, f"messages[{i}][{key!r}]")
    return list(messages)


def _drop_none(message: dict) -> dict:
    """Without the keys whose value is None, as apply_chat_template (OpenAI-style
    ``content=None`` / ``tool_calls=None`` would otherwise take the wrong branch)."""
    return {k: v for k, v in message.items() if v is not None}


def _alias_reasoning(message: dict) -> dict:
    """Reasoning under any of its names is also ``reasoning_content`` (and ``thinking``)."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def template_messages(messages) -> list[dict]:
    """``messages`` checked and as the template sees them (fresh dicts; inputs untouched)."""
    return [_alias_reasoning(_drop_none(m)) for m in check_messages(messages)]


def render_chat(
    template: str,
    messages,
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **template_kwargs,
) -> str:
    """The prompt text for ``messages`` (special tokens are spelled out in it).

    ``template_kwargs`` are extra template variables, as the extra keyword arguments of
    ``apply_chat_template``: e.g. ``enable_thinking=False`` (Qwen3),
    ``date_string="26 Jul 2024"`` (Llama 3.x) or ``tools=[...]`` (JSON schemas).
    Raises SparsecError with a one-line reason when the template rejects the messages
    (its ``raise_exception``) or fails on them.
    """
    from jinja2 import TemplateError

    compiled = _compile(template)
    variables = {
        **_DEFAULT_VARIABLES,
        **template_kwargs,
        "messages": template_messages(messages),
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token,
        "eos_token": eos_token,
    }
    try:
        return compiled.render(**variables)
    except SparsecError:
        raise
    except TemplateError as exc:
        raise SparsecError(f"the model's chat template failed on these messages: {exc}") from exc
    except Exception as exc:  # the template's own expression failed, e.g. str + list content
        raise SparsecError(
            f"the model's chat template failed on these messages: {type(exc).__name__}: {exc}"
        ) from exc
