"""Chat templates: render ``messages`` with the model's Jinja template, as Hugging Face does.

Same environment as ``transformers`` (sandboxed, ``trim_blocks``, ``lstrip_blocks``,
loop controls, a ``tojson`` that keeps non-ASCII, ``raise_exception`` and
``strftime_now``), so a template behaves here as in ``apply_chat_template``. jinja2
is imported only when a chat is rendered: plain generation does not need it.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

from sparsec.errors import MissingDependencyError, SparsecError


@functools.cache
def _environment():
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
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

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError

    try:
        return _environment().from_string(template)
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
                f"messages[{i}] must be a dict with 'role' and 'content', got {msg!r}"
            )
    return list(messages)


def render_chat(
    template: str,
    messages,
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """The prompt text for ``messages`` (special tokens are spelled out in it)."""
    from jinja2 import TemplateError

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=check_messages(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except TemplateError as exc:
        raise SparsecError(f"the model's chat template failed on these messages: {exc}") from exc
