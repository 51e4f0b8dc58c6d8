"""A loaded model: KV cache, tokenizer, prefill/decode loop and sampling around the native code.

``load()`` checks everything it can before native code runs (artifact, host CPU,
tokenizer, weights hash), then dlopens the library and creates one context. The
decode step is the hot path: one ctypes call into preallocated token and logits
buffers, then numpy sampling on the logits row; nothing else is allocated per token.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import time
import weakref

import numpy as np

from sparsec import resources
from sparsec.errors import SparsecError
from sparsec.runtime.arguments import (
    available_cpus,
    check_bool,
    check_generate_options,
    check_optional_bool,
    check_path,
    check_text,
    check_threads,
    show,
)
from sparsec.runtime.artifact import Artifact, load_weights, read_artifact
from sparsec.runtime.chat import render_chat
from sparsec.runtime.cpu import check_host
from sparsec.runtime.decoding import Decoding
from sparsec.runtime.detokenize import StopStrings
from sparsec.runtime.generation import Generation, GenerationStats, TextStream, run_to_end
from sparsec.runtime.native import NativeLibrary, NativeModel, forward_error
from sparsec.runtime.sampling import Sampler

BUFFER_ALIGNMENT = 64  # one AVX-512 register: generated code may use aligned loads


def resolve_threads(threads, manifest: dict) -> int:
    threads = check_threads(threads)
    if threads is None:
        return max(1, min(manifest["default_threads"], available_cpus()))
    return threads


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    try:
        raw = np.zeros(nbytes + BUFFER_ALIGNMENT, dtype=np.uint8)
    except MemoryError as exc:
        raise SparsecError(
            f"cannot allocate {nbytes / 2**30:.1f} GiB for a runtime buffer of shape {shape}; "
            "free memory, or recompile with a smaller --max-context"
        ) from exc
    skip = -raw.ctypes.data % BUFFER_ALIGNMENT
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def kv_caches(model, count: int, subject: str, fix: str) -> np.ndarray:
    """``count`` zeroed KV caches of ``model``'s shape and type ([count, *shape]),
    refused up front when they do not fit in available memory: their users touch every
    page, and an allocation larger than memory would be granted (overcommit) and then
    OOM-killed. The refusal reads "{subject} N GiB (dtype, context) but M GiB of memory
    is available; {fix}"."""
    kv = model.manifest["kv_cache"]
    need = count * int(np.prod(kv["shape"])) * np.dtype(kv["dtype"]).itemsize
    available = resources.available_memory()
    if available is not None and need > available:
        raise SparsecError(
            f"{subject} {need / 2**30:.1f} GiB ({kv['dtype']}, {model.max_context} tokens "
            f"each) but {available / 2**30:.1f} GiB of memory is available; {fix}"
        )
    return aligned_zeros((count, *kv["shape"]), kv["dtype"])


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
    verify: bool | str = True,
    huge_pages: bool | None = None,
) -> Model:
    """Load a compiled ``model.so``.

    ``threads``: worker threads of the native code (default: the manifest's
    ``default_threads``, at most the CPUs this process may use). ``verify``: check the
    blake2b hashes of the weights (about 2-3 s per GB on one core; chunks in parallel),
    unless an earlier load verified this same unchanged file (``"always"``: hash them
    regardless; False: skip; ``Model.weights_verified`` says which happened; the code
    and manifest are always checked). ``huge_pages``: hold the weights in
    a private copy on 2 MiB transparent huge pages (faster decode) rather than mapping
    the file (shared page cache, no private memory); None = when the kernel offers them.
    ``Model.weights_memory`` says which was used.
    """
    # Argument types and ranges first: one clear line rather than a TypeError from deep
    # inside, and before the slow part (reading and hashing the weights).
    check_path(path)
    check_threads(threads)
    if not (isinstance(verify, str) and verify == "always"):
        verify = check_bool(verify, "verify (True, False or 'always')")
    huge_pages = check_optional_bool(huge_pages, "huge_pages", "when the kernel offers them")
    artifact = read_artifact(path)
    name = str(path)
    check_host(artifact.manifest, name)
    n_threads = resolve_threads(threads, artifact.manifest)
    tokenizer = load_tokenizer(artifact.manifest, name)
    # The code (hash-checked, build constants against the manifest) before any buffer
    # is sized from the manifest; the weights (hash-checked) before any native call.
    library = NativeLibrary(artifact)
    try:
        weights, how, checked = load_weights(artifact, huge_pages=huge_pages, verify=verify)
        model = Model(artifact, weights, tokenizer, n_threads, weights_memory=how, library=library)
        model.weights_verified = checked  # "now", "earlier" (same unchanged file), "skipped"
        return model
    except BaseException:
        library.unload()
        raise


def _release(native: NativeModel, lock: threading.Lock, *buffers) -> None:
    # ``buffers`` (weights mmap, KV cache) are only held so they outlive the context.
    # At interpreter exit this runs while a daemon thread may still be inside forward:
    # then the context is left to the OS rather than destroyed under that thread.
    if lock.acquire(blocking=False):
        try:
            native.close()
        finally:
            lock.release()


class Model:
    """A model ready to run, one call at a time.

    Every call that uses the native code or the KV cache (generate, each step of a
    stream, forward, chat, rewind, reset) holds the model while it runs; a second call
    meanwhile, from any thread, is refused at once with SparsecError (never queued: the
    native thread pool is not re-entrant). A suspended stream does not hold the model:
    any later call may take the cache over, and the stream then raises at its next step.
    """

    def __init__(
        self,
        artifact: Artifact,
        weights: np.ndarray,
        tokenizer,
        n_threads: int,
        weights_memory: str = "file mapping",
        library: NativeLibrary | None = None,
    ):
        # Taken without blocking by each call that uses the native code or the cache.
        self._lock = threading.Lock()
        self._busy: tuple[str, threading.Thread] | None = None  # the call holding it
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
        self.weights_verified = "now"  # how load checked the weights' hashes (see load)

        self._kv_cache = aligned_zeros(tuple(m["kv_cache"]["shape"]), m["kv_cache"]["dtype"])
        self._logits = aligned_zeros((self.max_tokens_per_call, self.vocab_size), np.float32)
        self._tokens = aligned_zeros((self.max_tokens_per_call,), np.int32)
        self._logits_ptr = self._logits.ctypes.data
        self._tokens_ptr = self._tokens.ctypes.data
        self._position = 0
        self._owner: object | None = None  # the generation allowed to use the cache
        self._engine = None  # an Engine holding the model (runtime/engine.py)

        library = library or NativeLibrary(artifact)
        self._native = library.create(weights.ctypes.data, self._kv_cache.ctypes.data, n_threads)
        self._finalizer = weakref.finalize(
            self, _release, self._native, self._lock, weights, self._kv_cache
        )

    # ------------------------------------------------------------------ one call at a time

    @contextlib.contextmanager
    def _exclusive(self, what: str):
        """Hold the model for one call, or refuse it at once.

        Never blocks: the native code serves one call at a time (a second forward hangs
        in its thread pool or corrupts the cache), and a caller that waited on a lock
        could wait for a whole generation, or forever for a call of its own thread.
        """
        self._claim(what)
        try:
            yield
        finally:
            self._release_claim()

    def _claim(self, what: str) -> None:
        """Hold the model until ``_release_claim`` (a call, or an Engine for its
        lifetime); refused at once when it is held."""
        if not self._lock.acquire(blocking=False):
            raise self._busy_error(what)
        self._busy = (what, threading.current_thread())

    def _release_claim(self) -> None:
        self._busy = None
        self._lock.release()

    def _busy_error(self, what: str) -> SparsecError:
        busy = self._busy  # read once: the holder may return meanwhile
        if busy is None:
            holder = "another call"
        elif busy[1] is threading.current_thread():
            holder = f"{busy[0]} in this same thread (a call from inside a call)"
        else:
            holder = f"{busy[0]} in thread {busy[1].name!r}"
        return SparsecError(
            f"{what} refused: this Model is busy with {holder}; a Model runs one call at a "
            "time: wait for it to return, or load one Model per thread"
        )

    @contextlib.contextmanager
    def _stream_step(self):
        """Held around each step of a stream, not between steps (so an abandoned stream
        never locks the model out)."""
        with self._exclusive("next(stream)"):
            self._check_open()
            yield

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
            raise SparsecError(f"rewind position must be an int, got {show(position)}")
        with self._exclusive("rewind()"):
            self._check_open()
            if not 0 <= position <= self._position:
                raise SparsecError(
                    f"cannot rewind to position {show(position)}: the cache holds "
                    f"{self._position} token(s); use 0..{self._position}"
                )
            self._owner = None  # a stream in progress can no longer trust the cache
            self._position = int(position)

    def forward(self, token_ids, all_logits: bool = True) -> np.ndarray:
        """Run ``token_ids`` at positions ``position..``, append them to the cache.

        Returns a new float32 array: ``[len(token_ids), V]`` logits with ``all_logits``,
        else the last token's ``[V]``. Longer inputs run in chunks of max_tokens_per_call.
        """
        self._check_open()
        all_logits = check_bool(all_logits, "all_logits")
        ids = self._check_ids(token_ids, "token_ids")
        with self._exclusive("forward()"):
            self._check_open()
            if self._position + len(ids) > self.max_context:
                raise SparsecError(
                    f"forward of {len(ids)} tokens at position {self._position} exceeds the "
                    f"max context {self.max_context} of {self.path}; call reset() first"
                )
            self._owner = None  # a stream in progress can no longer trust the cache
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
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            if ids.ndim == 1 and ids.size == 0:
                raise SparsecError(f"{what} is empty; pass at least one token")
            raise SparsecError(
                f"{what} must be a flat list of integer token ids, got {show(token_ids)}"
            )
        if ids.size == 0:
            raise SparsecError(f"{what} is empty; pass at least one token")
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
        check_text(text, "text")
        add_special_tokens = check_bool(add_special_tokens, "add_special_tokens")
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
        max_new, stop_strings, stream = check_generate_options(
            max_new_tokens, temperature, top_k, top_p, seed, stop, stream, repetition_penalty
        )
        sampler = Sampler(temperature, top_k, top_p, seed, repetition_penalty)
        stops = StopStrings(stop_strings)
        ids = self.prompt_ids(prompt, max_new)
        with self._exclusive("generate()"):
            self._check_open()
            owner = object()
            self._owner = owner
            pieces = self._generate(owner, ids, max_new, sampler, stops)
            if not stream:
                return run_to_end(pieces)
        return TextStream(pieces, hold=self._stream_step)

    def prompt_ids(self, prompt, max_new_tokens: int) -> np.ndarray:
        """``prompt`` (text, encoded with the special tokens, or token ids) as checked
        int32 ids that leave room for ``max_new_tokens`` in the context."""
        if isinstance(prompt, str):
            if not prompt:
                raise SparsecError("the prompt is empty; pass some text or token ids")
            check_text(prompt, "the prompt")
            ids = self._check_ids(self.encode(prompt), "the encoded prompt")
        elif isinstance(prompt, (bytes, bytearray)):
            raise SparsecError(
                f"prompt must be a str or a list of token ids, got bytes {show(prompt)}; "
                "decode it first (e.g. prompt.decode('utf-8'))"
            )
        else:
            ids = self._check_ids(prompt, "prompt")
        total = len(ids) + max_new_tokens
        if total > self.max_context:
            raise SparsecError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({show(max_new_tokens)}) = "
                f"{show(total)} exceeds the max context {self.max_context} of {self.path}; "
                "shorten the prompt, lower max_new_tokens, or recompile with a larger "
                "--max-context"
            )
        return ids

    def engine(self, parallel: int = 4, max_queue: int = 64):
        """An Engine that batches many generations over this model (runtime/engine.py):
        ``parallel`` sequences decoded per native step, ``max_queue`` waiting."""
        from sparsec.runtime.engine import Engine

        return Engine(self, parallel=parallel, max_queue=max_queue)

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
        add_generation_prompt = check_bool(add_generation_prompt, "add_generation_prompt")
        variables = _check_template_kwargs(template_kwargs)
        unknown = sorted(set(generate_kwargs) - _generate_arguments())
        if unknown:
            raise SparsecError(
                f"chat() got unknown argument(s) {', '.join(unknown)}; template variables "
                f"go in template_kwargs, e.g. template_kwargs={{{unknown[0]!r}: ...}}"
            )
        check_generate_options(**generate_kwargs)  # before the template renders
        ids = self.chat_ids(messages, add_generation_prompt, variables)
        return self.generate(ids, **generate_kwargs)

    def chat_ids(self, messages, add_generation_prompt: bool = True, variables=None) -> list[int]:
        """``messages`` rendered with the model's chat template, as token ids."""
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
            **(variables or {}),
        )
        # A lone surrogate can come in through a message or a template variable.
        check_text(text, "the chat prompt rendered from messages")
        # The template spells out bos etc. itself, so no special tokens are added (as HF).
        return self.encode(text, add_special_tokens=False)

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.tokenizer.id_to_token(token_id) or ""

    def _generate(self, owner, prompt_ids: np.ndarray, max_new: int, sampler, stops):
        """Generator of safe-to-show text pieces; returns the Generation."""
        t0 = time.perf_counter()
        # A stream starts on its first next(): if another call took the cache meanwhile,
        # leave that call's position alone.
        if self._owner is not owner:
            raise _interrupted()
        self._position = 0
        self._prefill(prompt_ids, owner)
        t1 = time.perf_counter()
        logits = self._logits[0]  # the native code rewrites this row every step
        forward, ctx = self._native.forward, self._native.ctx
        tokens, tokens_ptr, logits_ptr = self._tokens, self._tokens_ptr, self._logits_ptr
        dec = Decoding(self.tokenizer, self.eos_token_ids, sampler, stops, max_new, prompt_ids)
        steps, t_first = 0, None
        while True:
            token, piece = dec.step(logits)
            if t_first is None:
                t_first = time.perf_counter()
            if piece:
                yield piece
            if dec.finish:
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
        rest = dec.rest()
        if rest:
            yield rest
        stats = GenerationStats(
            prompt_tokens=len(prompt_ids),
            prompt_seconds=t1 - t0,
            new_tokens=len(dec.new_ids),
            decode_steps=steps,
            decode_seconds=t2 - t_first,
            time_to_first_token=t_first - t0,
            total_seconds=time.perf_counter() - t0,
        )
        return Generation(
            text=dec.text,
            token_ids=dec.new_ids,
            prompt_token_ids=prompt_ids.tolist(),
            finish_reason=dec.finish,
            stats=stats,
        )

    def _prefill(self, ids: np.ndarray, owner) -> None:
        for start in range(0, len(ids), self.max_tokens_per_call):
            if self._owner is not owner:
                raise _interrupted()
            self._run(ids[start : start + self.max_tokens_per_call], all_logits=False)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Destroy the native context and release the weights and cache.

        A call running in another thread is waited for (its native code must not lose
        its memory under it); a stream is not: its next step raises.
        """
        engine = self._engine
        if engine is not None:
            engine.close()  # it holds the model until it stops
        busy = self._busy
        if busy is not None and busy[1] is threading.current_thread():
            # Waiting on the lock would wait on this very thread: forever.
            raise SparsecError(
                f"close() refused: called from inside {busy[0]} of this Model in the same "
                "thread; close it after that call returns"
            )
        with self._lock:
            self._owner = None
            # detach() hands back the finalizer's arguments (the context and the buffers
            # it uses), so they stay alive until the context is destroyed here.
            held = self._finalizer.detach()
            if held is not None:
                self._native.close()
            del held

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
