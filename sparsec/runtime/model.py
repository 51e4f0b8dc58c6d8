"""A loaded model: KV cache, tokenizer, prefill/decode loop and sampling around the native code.

``load()`` checks everything it can before native code runs (artifact, host CPU,
tokenizer, weights hash), then dlopens the library and creates one context. The
decode step is the hot path: one ctypes call into preallocated token and logits
buffers, then numpy sampling on the logits row; nothing else is allocated per token.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
import time
import weakref

import numpy as np

from sparsec.errors import SparsecError
from sparsec.runtime.artifact import Artifact, load_weights, read_artifact
from sparsec.runtime.chat import render_chat
from sparsec.runtime.cpu import check_host
from sparsec.runtime.detokenize import IncrementalDetokenizer, StopStrings, normalize_stop
from sparsec.runtime.generation import Generation, GenerationStats, TextStream, run_to_end
from sparsec.runtime.native import NativeModel, forward_error
from sparsec.runtime.sampling import Sampler

BUFFER_ALIGNMENT = 64  # one AVX-512 register: generated code may use aligned loads


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset / container CPU sets
    except AttributeError:
        return os.cpu_count() or 1


def resolve_threads(threads, manifest: dict) -> int:
    if threads is None:
        return max(1, min(manifest["default_threads"], available_cpus()))
    if not isinstance(threads, numbers.Integral) or isinstance(threads, bool) or threads < 1:
        raise SparsecError(f"threads must be an integer >= 1 (or None), got {threads!r}")
    return int(threads)


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + BUFFER_ALIGNMENT, dtype=np.uint8)
    skip = -raw.ctypes.data % BUFFER_ALIGNMENT
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def load_tokenizer(manifest: dict, name: str):
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(manifest["tokenizer"])
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise SparsecError(
            f"{name} has a corrupt manifest (its tokenizer does not parse: {exc}); "
            "recompile it with `sparsec compile`"
        ) from exc
    # A tokenizer.json may carry truncation/padding settings: never cut a prompt silently.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def load(
    path: str | os.PathLike,
    threads: int | None = None,
    verify: bool = True,
    huge_pages: bool | None = None,
) -> Model:
    """Load a compiled ``model.so``.

    ``threads``: worker threads of the native code (default: the manifest's
    ``default_threads``, at most the CPUs this process may use). ``verify``: check the
    blake2b hash of the weights (about 1 s per GB). ``huge_pages``: hold the weights in
    a private copy on 2 MiB transparent huge pages (faster decode) rather than mapping
    the file (shared page cache, no private memory); None = when the kernel offers them.
    ``Model.weights_memory`` says which was used.
    """
    artifact = read_artifact(path)
    name = str(path)
    check_host(artifact.manifest, name)
    n_threads = resolve_threads(threads, artifact.manifest)
    tokenizer = load_tokenizer(artifact.manifest, name)
    weights, how = load_weights(artifact, huge_pages=huge_pages, verify=verify)
    return Model(artifact, weights, tokenizer, n_threads, weights_memory=how)


def _release(native: NativeModel, *buffers) -> None:
    # ``buffers`` (weights mmap, KV cache) are only held so they outlive the context.
    native.close()


class Model:
    """A model ready to run. Not thread-safe: one generation at a time per Model."""

    def __init__(
        self,
        artifact: Artifact,
        weights: np.ndarray,
        tokenizer,
        n_threads: int,
        weights_memory: str = "file mapping",
    ):
        m = artifact.manifest
        self.path = artifact.path
        self.manifest = m
        self.config = artifact.config
        self.tokenizer = tokenizer
        self.threads = n_threads
        self.max_context: int = m["max_context"]
        self.max_tokens_per_call: int = m["max_tokens_per_call"]
        self.vocab_size: int = self.config.vocab_size
        gen = m["generation"]
        eos = gen["eos_token_id"]
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        # Generation stops on any of these; the first is the tokenizer's own eos (export
        # stores it before generation_config's), the one a chat template calls eos_token.
        self.eos_token_ids = frozenset(eos)
        self.eos_token_id: int | None = eos[0] if eos else None
        self.bos_token_id: int | None = gen["bos_token_id"]
        self.weights_memory = weights_memory  # "file mapping" or "huge pages" (see load)

        self._kv_cache = aligned_zeros(tuple(m["kv_cache"]["shape"]), np.float32)
        self._logits = aligned_zeros((self.max_tokens_per_call, self.vocab_size), np.float32)
        self._tokens = aligned_zeros((self.max_tokens_per_call,), np.int32)
        self._logits_ptr = self._logits.ctypes.data
        self._tokens_ptr = self._tokens.ctypes.data
        self._position = 0
        self._owner: object | None = None  # the generation allowed to use the cache

        self._native = NativeModel(
            self.path, m["abi_version"], weights.ctypes.data, self._kv_cache.ctypes.data, n_threads
        )
        self._finalizer = weakref.finalize(self, _release, self._native, weights, self._kv_cache)

    # ------------------------------------------------------------------ low level

    @property
    def position(self) -> int:
        """Number of tokens in the KV cache (the position of the next token)."""
        return self._position

    def reset(self) -> None:
        """Empty the KV cache. (Slots past the position are never read, so no memset.)"""
        self.rewind(0)

    def rewind(self, position: int) -> None:
        """Forget the cached tokens from ``position`` on; the next forward runs there.

        The tokens before it stay cached, so a generation can go on from an earlier
        point (regenerate an answer, roll back a draft) without recomputing the prefix,
        and a benchmark can time the step at one context length again and again.
        """
        self._check_open()
        if isinstance(position, bool) or not isinstance(position, int | np.integer):
            raise SparsecError(f"rewind position must be an int, got {position!r}")
        if not 0 <= position <= self._position:
            raise SparsecError(
                f"cannot rewind to position {position}: the cache holds {self._position} "
                f"token(s); use 0..{self._position}"
            )
        self._owner = None  # a stream in progress can no longer trust the cache
        self._position = int(position)

    def forward(self, token_ids, all_logits: bool = True) -> np.ndarray:
        """Run ``token_ids`` at positions ``position..``, append them to the cache.

        Returns a new float32 array: ``[len(token_ids), V]`` logits with ``all_logits``,
        else the last token's ``[V]``. Longer inputs run in chunks of max_tokens_per_call.
        """
        self._check_open()
        self._owner = None  # a stream in progress can no longer trust the cache
        ids = self._check_ids(token_ids, "token_ids")
        if self._position + len(ids) > self.max_context:
            raise SparsecError(
                f"forward of {len(ids)} tokens at position {self._position} exceeds the max "
                f"context {self.max_context} of {self.path}; call reset() first"
            )
        out = np.empty((len(ids), self.vocab_size), np.float32) if all_logits else None
        for start in range(0, len(ids), self.max_tokens_per_call):
            chunk = ids[start : start + self.max_tokens_per_call]
            self._run(chunk, all_logits)
            if all_logits:
                out[start : start + len(chunk)] = self._logits[: len(chunk)]
        return out if all_logits else self._logits[0].copy()

    def _run(self, chunk: np.ndarray, all_logits: bool) -> None:
        n = len(chunk)
        self._tokens[:n] = chunk
        rc = self._native.forward(
            self._native.ctx, self._tokens_ptr, n, self._position, self._logits_ptr, int(all_logits)
        )
        if rc:
            raise SparsecError(
                f"{self.path}: "
                + forward_error(rc, n, self._position, self.max_tokens_per_call, self.max_context)
            )
        self._position += n

    def _check_ids(self, token_ids, what: str) -> np.ndarray:
        try:
            ids = np.asarray(token_ids)
        except (TypeError, ValueError) as exc:
            raise SparsecError(f"{what} must be a list of token ids: {exc}") from exc
        if ids.size == 0:
            raise SparsecError(f"{what} is empty; pass at least one token")
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise SparsecError(f"{what} must be a flat list of integer token ids")
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise SparsecError(
                f"{what}[{i}] = {int(ids[i])} is outside the vocabulary [0, {self.vocab_size})"
            )
        return ids.astype(np.int32)

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise SparsecError(f"{self.path} was closed; load it again")

    # ------------------------------------------------------------------ generation

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def generate(
        self,
        prompt,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop=None,
        stream: bool = False,
        repetition_penalty: float | None = None,
    ) -> Generation | TextStream:
        """Generate up to ``max_new_tokens`` after ``prompt`` (text or token ids).

        Text is encoded with the tokenizer's special tokens (e.g. bos); a list of ids is
        used as is. Stops at an eos token, at the first ``stop`` string (the text is cut
        before it) or after ``max_new_tokens``. Every call starts from an empty cache.
        With ``stream=True`` returns a TextStream of text pieces (its ``.result`` is the
        Generation once exhausted); arguments are checked before it is returned.
        ``repetition_penalty`` (> 1 discourages repeats) scales down the logits of tokens
        already in the prompt or the output, as Hugging Face's argument of that name.
        """
        self._check_open()
        sampler = Sampler(temperature, top_k, top_p, seed, repetition_penalty)
        stops = StopStrings(normalize_stop(stop))
        if (
            not isinstance(max_new_tokens, numbers.Integral)
            or isinstance(max_new_tokens, bool)
            or max_new_tokens < 1
        ):
            raise SparsecError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(prompt, str):
            if not prompt:
                raise SparsecError("the prompt is empty; pass some text or token ids")
            ids = self._check_ids(self.encode(prompt), "the encoded prompt")
        else:
            ids = self._check_ids(prompt, "prompt")
        total = len(ids) + max_new_tokens
        if total > self.max_context:
            raise SparsecError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                f"exceeds the max context {self.max_context} of {self.path}; shorten the "
                "prompt, lower max_new_tokens, or recompile with a larger --max-context"
            )
        owner = object()
        self._owner = owner
        pieces = self._generate(owner, ids, int(max_new_tokens), sampler, stops)
        return TextStream(pieces) if stream else run_to_end(pieces)

    def chat(
        self,
        messages,
        add_generation_prompt: bool = True,
        *,
        template_kwargs: dict | None = None,
        **generate_kwargs,
    ):
        """generate() on ``messages`` rendered with the model's chat template.

        ``template_kwargs`` are extra template variables, as the extra keyword arguments
        of Hugging Face's ``apply_chat_template``: e.g. ``{"enable_thinking": False}``
        (Qwen3), ``{"date_string": "26 Jul 2024"}`` (Llama 3.x) or ``{"tools": [...]}``.
        The other keyword arguments go to generate() (max_new_tokens, stop, stream...).
        """
        self._check_open()
        variables = _check_template_kwargs(template_kwargs)
        unknown = sorted(set(generate_kwargs) - _generate_arguments())
        if unknown:
            raise SparsecError(
                f"chat() got unknown argument(s) {', '.join(unknown)}; template variables "
                f"go in template_kwargs, e.g. template_kwargs={{{unknown[0]!r}: ...}}"
            )
        template = self.manifest["chat_template"]
        if not template:
            raise SparsecError(
                f"{self.path} has no chat template; use generate() with a plain prompt"
            )
        text = render_chat(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id),
            eos_token=self._token_text(self.eos_token_id),
            **variables,
        )
        # The template spells out bos etc. itself, so no special tokens are added (as HF).
        return self.generate(self.encode(text, add_special_tokens=False), **generate_kwargs)

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.tokenizer.id_to_token(token_id) or ""

    def _generate(self, owner, prompt_ids: np.ndarray, max_new: int, sampler, stops):
        """Generator of safe-to-show text pieces; returns the Generation."""
        t0 = time.perf_counter()
        self._position = 0
        self._prefill(prompt_ids, owner)
        t1 = time.perf_counter()
        logits = self._logits[0]  # the native code rewrites this row every step
        forward, ctx = self._native.forward, self._native.ctx
        tokens, tokens_ptr, logits_ptr = self._tokens, self._tokens_ptr, self._logits_ptr
        eos = self.eos_token_ids
        detok = IncrementalDetokenizer(self.tokenizer)
        new_ids: list[int] = []
        text, emitted, finish, steps = "", 0, "length", 0
        t_first = None
        sampler.see(prompt_ids)
        while True:
            token = sampler(logits)
            sampler.see(token)
            new_ids.append(token)
            if t_first is None:
                t_first = time.perf_counter()
            if token in eos:
                finish = "eos"
                break
            piece = detok.add(token)
            if piece:
                start = len(text)
                text += piece
                cut = stops.find(text, start)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    break
                safe = len(text) - stops.holdback(text)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            if len(new_ids) >= max_new:
                break
            if self._owner is not owner:
                raise _interrupted()
            tokens[0] = token
            rc = forward(ctx, tokens_ptr, 1, self._position, logits_ptr, 0)
            if rc:
                raise SparsecError(
                    f"{self.path}: "
                    + forward_error(
                        rc, 1, self._position, self.max_tokens_per_call, self.max_context
                    )
                )
            self._position += 1
            steps += 1
        t2 = time.perf_counter()
        if finish != "stop":
            start = len(text)
            text += detok.flush()
            cut = stops.find(text, start)
            if cut is not None:
                text, finish = text[:cut], "stop"
        if len(text) > emitted:
            yield text[emitted:]
        stats = GenerationStats(
            prompt_tokens=len(prompt_ids),
            prompt_seconds=t1 - t0,
            new_tokens=len(new_ids),
            decode_steps=steps,
            decode_seconds=t2 - t_first,
            time_to_first_token=t_first - t0,
            total_seconds=time.perf_counter() - t0,
        )
        return Generation(
            text=text,
            token_ids=new_ids,
            prompt_token_ids=prompt_ids.tolist(),
            finish_reason=finish,
            stats=stats,
        )

    def _prefill(self, ids: np.ndarray, owner) -> None:
        for start in range(0, len(ids), self.max_tokens_per_call):
            if self._owner is not owner:
                raise _interrupted()
            self._run(ids[start : start + self.max_tokens_per_call], all_logits=False)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Destroy the native context and release the weights and cache."""
        self._owner = None
        self._finalizer()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<sparsec Model {self.path} ({self.manifest['precision']}, "
            f"{self.max_context} ctx, {self.threads} threads)>"
        )


# Template variables chat() sets itself.
_RESERVED_TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "bos_token", "eos_token")


def _check_template_kwargs(template_kwargs) -> dict:
    if template_kwargs is None:
        return {}
    if not isinstance(template_kwargs, dict):
        raise SparsecError(
            "template_kwargs must be a dict of template variables (e.g. "
            f"{{'enable_thinking': False}}), got {type(template_kwargs).__name__}"
        )
    for name in template_kwargs:
        if not isinstance(name, str) or not name.isidentifier():
            raise SparsecError(f"template_kwargs key {name!r} is not a valid variable name")
        if name in _RESERVED_TEMPLATE_VARIABLES:
            raise SparsecError(
                f"template_kwargs cannot set {name!r}: chat() sets it (reserved: "
                f"{', '.join(_RESERVED_TEMPLATE_VARIABLES)})"
            )
    return dict(template_kwargs)


@functools.cache
def _generate_arguments() -> frozenset[str]:
    """The keyword arguments chat() may pass on to generate()."""
    return frozenset(inspect.signature(Model.generate).parameters) - {"self", "prompt"}


def _interrupted() -> SparsecError:
    return SparsecError(
        "this generation was interrupted: another generate/forward/reset call on the same "
        "model reused its KV cache; finish one stream before starting the next"
    )
