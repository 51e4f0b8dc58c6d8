"""The one validation layer of the runtime API and of `sparsec run`: types, ranges, NaN/inf.

Every check raises SparsecError with a one-line message naming the argument, the bad
value and the allowed range (or the fix), before any native code runs. Model, Sampler
and the CLI all call these functions, so the API and the command line accept exactly
the same values.
"""

from __future__ import annotations

import math
import numbers
import os
import re

import numpy as np

from sparsec.errors import SparsecError

# sparsec_create takes an int32 and may start n_threads - 1 workers; far more threads
# than any CPU has only thrash, and a huge count must not wrap around in the int32.
MAX_THREADS = 1024
# Repetition penalties beyond these bounds overflow float32 logits (x / 1e-300 = inf)
# and make no difference a model could show anyway: 100 already forbids every repeat.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0


def show(value) -> str:
    """A short one-line spelling of a bad value for an error message.

    repr escapes newlines and lone surrogates (so the CLI can print it); huge integers
    are described, as ``repr`` refuses ints of more than 4300 digits.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"{'-' if value < 0 else ''}an integer of {value.bit_length()} bits"
    text = re.sub(r"\n\s*", " ", repr(value))  # numpy arrays print one row a line
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def as_float(value) -> float | None:
    """``value`` as a finite float, or None when it is not a real number or not finite."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return None
    try:
        x = float(value)
    except (OverflowError, ValueError):  # e.g. 10**400, or a Fraction that large
        return None
    return x if math.isfinite(x) else None


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset / container CPU sets
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- load()


def check_path(path) -> str | os.PathLike:
    """The path of a model.so: a str or an os.PathLike naming a str."""
    name = os.fspath(path) if isinstance(path, os.PathLike) else path
    if isinstance(name, bytes):
        raise SparsecError(
            f"path must be a str or os.PathLike, got bytes {show(path)}; decode it with "
            "os.fsdecode(path)"
        )
    if not isinstance(name, str):
        raise SparsecError(
            f"path must be a str or os.PathLike (the compiled model.so), got "
            f"{type(path).__name__} {show(path)}"
        )
    if not name:
        raise SparsecError("path is empty; pass the path of a compiled model.so")
    if "\0" in name:
        raise SparsecError(f"path {show(name)} contains a NUL character; no file has that name")
    return path


def check_threads(threads) -> int | None:
    if threads is None:
        return None
    if not is_int(threads) or not 1 <= threads <= MAX_THREADS:
        raise SparsecError(
            f"threads must be an integer >= 1 and <= {MAX_THREADS} (or None = the model's "
            f"default_threads, at most the {available_cpus()} CPUs this process may use), "
            f"got {show(threads)}"
        )
    return int(threads)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise SparsecError(f"{name} must be True or False, got {show(value)}")
    return bool(value)


def check_optional_bool(value, name: str, none_means: str) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise SparsecError(
            f"{name} must be True, False or None (None = {none_means}), got {show(value)}"
        )
    return bool(value)


# --------------------------------------------------------------------------- text


def check_text(text, what: str, fix: str = "text from bytes: decode them as UTF-8 first") -> str:
    """A str that the tokenizer can take: valid Unicode, so no lone surrogates."""
    if not isinstance(text, str):
        raise SparsecError(f"{what} must be a str, got {type(text).__name__} {show(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SparsecError(
            f"{what} contains a lone surrogate {text[exc.start]!r} at index {exc.start}, which "
            f"is not valid Unicode ({fix})"
        ) from None
    return text


def check_stop(stop) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings (None = no stop string)."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop if isinstance(stop, (list, tuple)) else None
    if stops is None or not all(isinstance(s, str) and s for s in stops):
        raise SparsecError(f"stop must be a non-empty string or a list of them, got {show(stop)}")
    for i, s in enumerate(stops):
        # Generated text is always valid Unicode: such a stop string could never match.
        check_text(s, "stop" if isinstance(stop, str) else f"stop[{i}]")
    return tuple(stops)


# --------------------------------------------------------------------------- generate()


def check_max_new_tokens(max_new_tokens) -> int:
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise SparsecError(
            "max_new_tokens must be an integer >= 1 (prompt + max_new_tokens must fit the "
            f"model's max context), got {show(max_new_tokens)}"
        )
    return int(max_new_tokens)


def check_sampling(temperature, top_k, top_p, seed, repetition_penalty=None) -> None:
    """Raise SparsecError for sampling parameters outside their domain."""
    t = as_float(temperature)
    if t is None or t < 0:
        raise SparsecError(
            "temperature must be a finite number >= 0 (0 = greedy; any positive temperature "
            f"works, a tiny one samples like greedy), got {show(temperature)}"
        )
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise SparsecError(
            f"top_k must be an integer >= 1 (or None for all tokens), got {show(top_k)}"
        )
    if top_p is not None:
        p = as_float(top_p)
        if p is None or not 0 < p <= 1:
            raise SparsecError(f"top_p must be in (0, 1] (or None for 1), got {show(top_p)}")
    if seed is not None and (not is_int(seed) or seed < 0):
        raise SparsecError(
            "seed must be an integer or None (an integer >= 0 repeats a draw; None = a fresh "
            f"random seed), got {show(seed)}"
        )
    if repetition_penalty is not None:
        r = as_float(repetition_penalty)
        if r is None or not MIN_REPETITION_PENALTY <= r <= MAX_REPETITION_PENALTY:
            raise SparsecError(
                f"repetition_penalty must be a finite number > 0, from {MIN_REPETITION_PENALTY}"
                f" to {MAX_REPETITION_PENALTY:g} (1 or None = off; 1.1-1.3 discourages "
                f"repeats), got {show(repetition_penalty)}"
            )


def check_generate_options(
    max_new_tokens=128,
    temperature=0.0,
    top_k=None,
    top_p=None,
    seed=None,
    stop=None,
    stream=False,
    repetition_penalty=None,
) -> tuple[int, tuple[str, ...], bool]:
    """Check generate()'s options (not the prompt); returns max_new_tokens, the stop
    strings and stream, normalized. `sparsec run` calls this before loading the model."""
    check_sampling(temperature, top_k, top_p, seed, repetition_penalty)
    stops = check_stop(stop)
    n = check_max_new_tokens(max_new_tokens)
    return n, stops, check_bool(stream, "stream")
