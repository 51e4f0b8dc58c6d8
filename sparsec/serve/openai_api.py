"""The OpenAI API's request and response objects, without any HTTP.

``parse_completion`` and ``parse_chat`` turn a request body (already JSON-decoded) into
a ``Job``: the prompt (text, token ids or chat messages) and the Engine's keyword
arguments. A body that the API would refuse raises ``ApiError`` naming the parameter,
with the HTTP status and OpenAI's error ``type``/``code``. The response builders make
the objects the ``openai`` client parses (non-streamed, and the chunks of a stream).

Supported: ``model``, ``prompt`` (a string, or one list of token ids) / ``messages``
(role and content, a string or text parts), ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop`` (a string or
up to 4), ``n`` (1 only), ``stream``, ``stream_options.include_usage``, ``user``
(ignored), and ``ignore_eos`` (llama.cpp's and vLLM's extension: exactly max_tokens).
Refused with 400 when set to anything but their neutral value:
``logprobs``, ``top_logprobs``, ``echo``, ``suffix``, ``best_of``, ``logit_bias``,
``presence_penalty``, ``frequency_penalty``, ``tools``, ``response_format``.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field

OPENAI_DEFAULT_TEMPERATURE = 1.0  # the API's default; 0 is greedy here as in OpenAI
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the legacy completions endpoint's default
MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """An error the client gets as ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class Job:
    """What one request asks of the engine."""

    kind: str  # "completion" | "chat"
    prompt: str | list[int] | None  # completions
    messages: list[dict] | None  # chat, as the chat template takes them
    max_tokens: int | None  # None: the rest of the context
    stream: bool
    include_usage: bool
    engine_kwargs: dict = field(default_factory=dict)  # temperature, top_p, seed, stop


# ----------------------------------------------------------------------------- parsing


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer=False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if not ok or not math.isfinite(value) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise bad(f"{name} must be {kind} from {lo:g} to {hi:g}, got {value!r}", name)
    return int(value) if integer else float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {value!r}", name)
    return value


def _refuse_unsupported(body: dict, neutral: dict) -> None:
    for name, ok in neutral.items():
        if name in body and body[name] not in ok:
            raise bad(
                f"{name} is not supported by this server (sparsec); leave it out",
                name,
                "unsupported",
            )


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not 1 <= len(stop) <= MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad(
            f"stop must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them", "stop"
        )
    return stop


def _common(body: dict, max_tokens_names: tuple[str, ...], default_max) -> dict:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if body.get("n") not in (None, 1):
        # One choice per request: batching serves many requests, not many choices.
        raise bad(f"n must be 1 (send several requests instead), got {body['n']!r}", "n")
    max_tokens = default_max
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _number(body, name, None, 1, 2**31 - 1, integer=True)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad("stream_options must be an object", "stream_options")
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage must be true or false", "stream_options")
    kwargs = {
        "temperature": _number(body, "temperature", OPENAI_DEFAULT_TEMPERATURE, 0, 2),
        "top_p": _number(body, "top_p", None, 0, 1),
        "stop": _stop(body),
    }
    if kwargs["top_p"] == 0:
        raise bad("top_p must be greater than 0", "top_p")
    seed = body.get("seed")
    if seed is not None:
        # OpenAI takes any int64; the sampler's RNG wants a non-negative seed.
        seed = _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True) % 2**64
    kwargs["seed"] = seed
    kwargs["ignore_eos"] = _flag(body, "ignore_eos")
    return dict(
        max_tokens=max_tokens,
        stream=_flag(body, "stream"),
        include_usage=include_usage,
        engine_kwargs=kwargs,
    )


_NEUTRAL = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


def parse_completion(body: dict) -> Job:
    """A ``POST /v1/completions`` body."""
    common = _common(body, ("max_tokens",), COMPLETIONS_DEFAULT_MAX_TOKENS)
    _refuse_unsupported(body, _NEUTRAL)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    ok = (isinstance(prompt, str) and prompt) or (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    )
    if not ok:
        raise bad(
            "prompt must be a non-empty string or one non-empty list of token ids (send "
            "several prompts as separate requests: they are batched on the server)",
            "prompt",
        )
    return Job("completion", prompt, None, **common)


def parse_chat(body: dict) -> Job:
    """A ``POST /v1/chat/completions`` body."""
    common = _common(body, ("max_tokens", "max_completion_tokens"), None)
    _refuse_unsupported(body, _NEUTRAL)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(f"messages[{i}].content: only text parts are supported", "messages")
                if not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content: a text part needs a string text", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or text parts", "messages")
        plain.append({"role": message["role"], "content": content})
    return Job("chat", None, plain, **common)


# ----------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(job: Job, rid: str, model: str, generation) -> dict:
    """The whole (non-streamed) response for a finished Generation."""
    finish = FINISH_REASONS[generation.finish_reason]
    if job.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": generation.text},
            "logprobs": None,
            "finish_reason": finish,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": generation.text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    body = _envelope(rid, obj, model, choice)
    body["usage"] = usage(len(generation.prompt_token_ids), len(generation.token_ids))
    return body


def _envelope(rid: str, obj: str, model: str, choice: dict) -> dict:
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def chunk(job: Job, rid: str, model: str, *, text=None, finish=None, first=False) -> dict:
    """One chunk of a stream: a text piece, or the final one with its finish reason."""
    if job.kind == "chat":
        delta = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return _envelope(rid, obj, model, choice)


def usage_chunk(job: Job, rid: str, model: str, generation) -> dict:
    """The last chunk of a stream with ``include_usage``: no choices, the usage."""
    body = chunk(job, rid, model)
    body["choices"] = []
    body["usage"] = usage(len(generation.prompt_token_ids), len(generation.token_ids))
    return body
