"""Continuous batching: many generations advance together, one native call per step.

Decode is memory-bound: a step reads every weight once whatever the number of rows, so
N sequences decoded in one ``sparsec_forward_rows`` call cost little more than one.
``Engine`` owns N KV caches (slots) of the model's shape and one thread that loops:

1. admit waiting requests into free slots (first come, first served);
2. prefill: one chunk (up to ``max_tokens_per_call`` tokens) of every admitted prompt,
   one native call each (a prompt's logits are only needed for its last token);
3. decode: one native call for all running sequences, a row each (its last token at
   its position, its own cache), then sample every row and deliver its text.

Requests join and leave at step boundaries: a finished, cancelled or failed sequence
frees its slot before the next step. Prefill and decode alternate, so a long prompt
delays the running streams by one chunk per step, never by its whole prefill.

Each request is decoded by a ``Decoding`` (sampling, eos, stop strings, incremental
text) exactly as ``Model.generate`` does, so a batched greedy generation gives the same
tokens as the same request alone: rows do not interact in the kernels.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from sparsec.errors import SparsecError
from sparsec.runtime.arguments import check_bool, check_generate_options, show
from sparsec.runtime.decoding import Decoding
from sparsec.runtime.detokenize import StopStrings
from sparsec.runtime.generation import Generation, GenerationStats
from sparsec.runtime.native import forward_error
from sparsec.runtime.sampling import Sampler

# Event kinds a listener receives, in order: any number of TEXT, then one DONE (its
# value the Generation) or one ERROR (its value the exception).
TEXT, DONE, ERROR = "text", "done", "error"


class QueueFull(SparsecError):
    """submit() found the waiting queue at its limit (HTTP 429 in ``sparsec serve``)."""


class EngineClosed(SparsecError):
    """The engine was closed before or while the request ran."""


class Request:
    """One submitted generation.

    Iterate it for its text pieces (blocks until each arrives; joined, they equal the
    Generation's ``text``), or call ``result()`` for the Generation. ``cancel()`` frees its
    slot at the next step boundary (``finish_reason == "cancelled"``). With a
    ``listener`` given to ``submit`` the events go there instead (from the engine's
    thread) and the request cannot be iterated.
    """

    def __init__(self, request_id: int, prompt_ids: np.ndarray, listener):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self._events: queue.SimpleQueue | None = None
        if listener is None:
            self._events = queue.SimpleQueue()
            listener = self._queue_event
        self._listener: Callable[[str, object], None] = listener
        self._done = threading.Event()
        self._generation: Generation | None = None
        self._error: BaseException | None = None
        self.cancelled = False

    def _queue_event(self, kind: str, value) -> None:
        self._events.put((kind, value))

    def _deliver(self, kind: str, value) -> None:
        if kind == DONE:
            self._generation = value
        elif kind == ERROR:
            self._error = value
        try:
            self._listener(kind, value)
        finally:
            if kind != TEXT:
                self._done.set()

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step boundary."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[str]:
        if self._events is None:
            raise SparsecError("this request delivers to its listener; it cannot be iterated")
        while True:
            kind, value = self._events.get()
            if kind == TEXT:
                yield value
            elif kind == ERROR:
                raise value
            else:
                return

    def result(self, timeout: float | None = None) -> Generation:
        """The finished Generation (waits for it); raises what stopped the request."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._generation


class _Sequence:
    """A request holding a slot: where it is in its prompt and its generation."""

    def __init__(self, request: Request, decoding: Decoding, slot: int, submitted: float):
        self.request = request
        self.dec = decoding
        self.slot = slot
        self.position = 0  # tokens in its cache
        self.last = -1  # the token to feed at the next decode step
        self.submitted = submitted
        self.started = 0.0
        self.prefilled = 0.0
        self.first = 0.0
        self.steps = 0


class Engine:
    """Continuous batching over one loaded Model (see the module docstring).

    ``parallel``: KV-cache slots, i.e. sequences decoded per step (1 to the model's
    ``max_tokens_per_call``); memory ``parallel x`` the model's KV cache size
    (``engine.cache_bytes``). ``max_queue``: requests waiting for a slot before submit
    raises ``QueueFull``. The engine holds the model for its lifetime (its other calls
    are refused as busy) until ``close()``; closing the model closes its engine.
    """

    def __init__(self, model, parallel: int = 4, max_queue: int = 64):
        model._check_open()
        limit = model.max_tokens_per_call
        if (
            isinstance(parallel, bool)
            or not isinstance(parallel, int)
            or not (1 <= parallel <= limit)
        ):
            raise SparsecError(
                f"parallel must be an integer from 1 to {limit} (the model's "
                f"max_tokens_per_call: rows per native step), got {show(parallel)}"
            )
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise SparsecError(f"max_queue must be an integer >= 0, got {show(max_queue)}")
        from sparsec.runtime.model import aligned_zeros, kv_caches

        self.model = model
        self.parallel = parallel
        self.max_queue = max_queue
        self._caches = kv_caches(
            model,
            parallel,
            f"the KV caches of {parallel} parallel sequences need",
            "lower parallel (--parallel), or recompile with a smaller --max-context or "
            "--kv-cache float16 (or int8)",
        )
        # Touch every page now: a slot's first request would otherwise pay the page
        # faults of its whole cache (measured: the first 8-stream round 25% slower).
        self._caches.fill(0)
        self.cache_bytes = self._caches.nbytes
        self._cache_ptrs = [self._caches[i].ctypes.data for i in range(parallel)]
        self._tokens = aligned_zeros((limit,), np.int32)
        self._positions = aligned_zeros((limit,), np.int32)
        self._row_caches = aligned_zeros((limit,), np.uint64)
        self._logits = aligned_zeros((limit, model.vocab_size), np.float32)
        # The native call's pointer arguments, resolved once (as Model.generate does).
        self._row_pointers = [
            a.ctypes.data for a in (self._tokens, self._positions, self._row_caches, self._logits)
        ]
        self._free = list(range(parallel - 1, -1, -1))
        self._waiting: collections.deque[tuple[Request, Decoding, float]] = collections.deque()
        self._prefilling: list[_Sequence] = []
        self._running: list[_Sequence] = []
        self._cond = threading.Condition()
        self._closed = False
        self._failed: BaseException | None = None
        self._ids = itertools.count()
        self.native_calls = 0  # sparsec_forward_rows calls so far
        self.decode_steps = 0  # of which decode steps (one row per running sequence)
        self.finished = 0  # requests finished (eos, stop or length)
        self.cancelled = 0  # requests cancelled (by cancel(), e.g. a client that left)
        model._claim("an Engine")
        model._engine = self
        self._thread = threading.Thread(target=self._loop, name="sparsec-engine", daemon=True)
        model._busy = ("an Engine", self._thread)
        self._thread.start()

    # ------------------------------------------------------------------ public

    def submit(
        self,
        prompt,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop=None,
        repetition_penalty: float | None = None,
        listener: Callable[[str, object], None] | None = None,
        ignore_eos: bool = False,
    ) -> Request:
        """Queue one generation (arguments as ``Model.generate``); returns its Request at
        once. Raises QueueFull when ``max_queue`` requests already wait for a slot.
        ``ignore_eos``: generate exactly ``max_new_tokens`` (unless a stop string ends
        it), eos tokens included, as llama.cpp's and vLLM's option of that name
        (benchmarks need fixed-length generations)."""
        self._check_open()
        max_new, stop_strings, _ = check_generate_options(
            max_new_tokens, temperature, top_k, top_p, seed, stop, False, repetition_penalty
        )
        ids = self.model.prompt_ids(prompt, max_new)
        sampler = Sampler(temperature, top_k, top_p, seed, repetition_penalty)
        ignore_eos = check_bool(ignore_eos, "ignore_eos")
        m = self.model
        eos = frozenset() if ignore_eos else m.eos_token_ids
        dec = Decoding(m.tokenizer, eos, sampler, StopStrings(stop_strings), max_new, ids)
        request = Request(next(self._ids), ids, listener)
        with self._cond:
            self._check_open()
            # Requests that get a free slot at the next admission are not queued.
            if len(self._waiting) >= self.max_queue + len(self._free):
                raise QueueFull(
                    f"the queue is full ({self.max_queue} requests waiting for one of "
                    f"{self.parallel} slots); retry later"
                )
            self._waiting.append((request, dec, time.perf_counter()))
            self._cond.notify()
        return request

    def _check_open(self) -> None:
        if self._failed is not None:
            raise EngineClosed(f"the engine stopped on an error ({self._failed}); create a new one")
        if self._closed:
            raise EngineClosed("the engine is closed; create a new one")

    def generate(self, prompts, **kwargs) -> list[Generation]:
        """Generate for every prompt together; the Generations in the prompts' order."""
        requests = [self.submit(p, **kwargs) for p in prompts]
        return [r.result() for r in requests]

    @property
    def active(self) -> int:
        """Sequences holding a slot now."""
        return self.parallel - len(self._free)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Stop the loop; requests not finished get EngineClosed; the model is free again."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self.model._engine = None
        self.model._release_claim()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._closed or self._waiting or self._prefilling or self._running):
                        self._cond.wait()
                    if self._closed:
                        break
                    admitted = []
                    while self._waiting and self._free:
                        admitted.append((*self._waiting.popleft(), self._free.pop()))
                now = time.perf_counter()
                for request, dec, submitted, slot in admitted:
                    seq = _Sequence(request, dec, slot, submitted)
                    seq.started = now
                    self._prefilling.append(seq)
                self._drop_cancelled()
                for seq in list(self._prefilling):
                    self._prefill_chunk(seq)
                if self._running:
                    self._decode_step()
        except BaseException as exc:  # a bug or a native error: fail every request
            with self._cond:
                self._failed = exc
            self._fail_all(exc)
            raise
        self._fail_all(EngineClosed("the engine was closed before this request finished"))

    def _run_rows(self, n: int, all_logits: bool) -> None:
        native = self.model._native
        tokens, positions, caches, logits = self._row_pointers
        rc = native.forward_rows(native.ctx, tokens, n, positions, caches, logits, int(all_logits))
        self.native_calls += 1
        if rc:
            m = self.model
            raise SparsecError(
                f"{m.path}: "
                + forward_error(
                    rc, n, int(self._positions[0]), m.max_tokens_per_call, m.max_context
                )
            )

    def _prefill_chunk(self, seq: _Sequence) -> None:
        if self._closed:  # close() from a listener: the model is no longer ours
            return
        ids = seq.request.prompt_ids
        start = seq.position
        chunk = ids[start : start + len(self._tokens)]
        n = len(chunk)
        self._tokens[:n] = chunk
        self._positions[:n] = np.arange(start, start + n, dtype=np.int32)
        self._row_caches[:n] = self._cache_ptrs[seq.slot]
        self._run_rows(n, all_logits=False)
        seq.position += n
        if seq.position < len(ids):
            return
        seq.prefilled = time.perf_counter()
        self._prefilling.remove(seq)
        self._running.append(seq)
        self._advance(seq, self._logits[0])

    def _decode_step(self) -> None:
        if self._closed:
            return
        running = self._running
        for i, seq in enumerate(running):
            self._tokens[i] = seq.last
            self._positions[i] = seq.position
            self._row_caches[i] = self._cache_ptrs[seq.slot]
        self._run_rows(len(running), all_logits=True)
        self.decode_steps += 1
        for i, seq in enumerate(list(running)):
            seq.position += 1
            seq.steps += 1
            self._advance(seq, self._logits[i])

    def _advance(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Sample the sequence's next token and deliver its text; finish it when over."""
        token, piece = seq.dec.step(logits)
        if not seq.first:
            seq.first = time.perf_counter()
        if piece:
            seq.request._deliver(TEXT, piece)
        if seq.dec.finish:
            self._finish(seq)
        else:
            seq.last = token

    def _finish(self, seq: _Sequence, reason: str | None = None) -> None:
        dec = seq.dec
        if reason is None:
            rest = dec.rest()
            if rest:
                seq.request._deliver(TEXT, rest)
        end = time.perf_counter()
        first = seq.first or end
        stats = GenerationStats(
            prompt_tokens=len(seq.request.prompt_ids),
            prompt_seconds=(seq.prefilled or end) - seq.started,
            new_tokens=len(dec.new_ids),
            decode_steps=seq.steps,
            decode_seconds=end - first,
            time_to_first_token=first - seq.submitted,
            total_seconds=end - seq.submitted,
        )
        generation = Generation(
            text=dec.text,
            token_ids=list(dec.new_ids),
            prompt_token_ids=seq.request.prompt_ids.tolist(),
            finish_reason=reason or dec.finish,
            stats=stats,
        )
        self._release(seq)
        if reason == "cancelled":
            self.cancelled += 1
        else:
            self.finished += 1
        seq.request._deliver(DONE, generation)

    def _release(self, seq: _Sequence) -> None:
        for group in (self._prefilling, self._running):
            if seq in group:
                group.remove(seq)
        with self._cond:
            self._free.append(seq.slot)

    def _drop_cancelled(self) -> None:
        with self._cond:
            waiting = [w for w in self._waiting if w[0].cancelled]
            for w in waiting:
                self._waiting.remove(w)
        for request, _, submitted in waiting:
            self.cancelled += 1
            end = time.perf_counter()
            stats = GenerationStats(len(request.prompt_ids), 0.0, 0, 0, 0.0, 0.0, end - submitted)
            request._deliver(
                DONE, Generation("", [], request.prompt_ids.tolist(), "cancelled", stats)
            )
        for seq in [s for s in self._prefilling + self._running if s.request.cancelled]:
            self._finish(seq, reason="cancelled")

    def _fail_all(self, exc: BaseException) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for request, _, _ in waiting:
            request._deliver(ERROR, exc)
        for seq in self._prefilling + self._running:
            seq.request._deliver(ERROR, exc)
        self._prefilling.clear()
        self._running.clear()
