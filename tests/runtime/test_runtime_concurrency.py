"""One call at a time per Model: a second call from another thread is refused at once
(never hangs, never corrupts the cache), close() waits for a running call, and a
suspended stream does not hold the model.

A gate around the native forward holds one call inside native code for as long as a
test needs; every wait is bounded, and each test body runs under a watchdog, so a
regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import threading
import time

import pytest

from sparsec.errors import SparsecError

WATCHDOG_S = 10.0  # a whole test body; the fast path takes milliseconds
REFUSAL_S = 1.0  # a refused call must come back at least this fast
BUSY = "this Model is busy with"


def within(seconds: float, fn, *args):
    """fn(*args) in a daemon thread; its result, its exception, or a failure if it hangs."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed back to the test thread below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="watched")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {seconds} s: it hangs")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class Gate:
    """Stands in for the native forward: while armed, a call waits inside (as in a long
    native forward) until released. Counts overlapping calls and calls made after the
    context was destroyed (those never reach the real function: they would crash)."""

    def __init__(self, model):
        self.native = model._native
        self.real = model._native.forward
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.inside = self.overlaps = self.after_close = 0
        self.count = threading.Lock()
        self.hook = None  # called inside the forward once, in the calling thread

    def __call__(self, ctx, *args):
        with self.count:
            self.inside += 1
            self.overlaps += self.inside > 1
        try:
            if self.hook is not None:
                hook, self.hook = self.hook, None
                hook()
            if self.armed.is_set():
                self.entered.set()
                self.release.wait(WATCHDOG_S / 2)  # bounded even if a test fails first
            if not self.native.ctx:
                self.after_close += 1
                return 3
            return self.real(ctx, *args)
        finally:
            with self.count:
                self.inside -= 1


@pytest.fixture
def gate(model, monkeypatch):
    g = Gate(model)
    monkeypatch.setattr(model._native, "forward", g)
    yield g
    g.release.set()  # never leave a thread parked in the gate


def start(fn, *args, name="worker"):
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # checked by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=name)
    thread.start()
    return thread, box


def refused(call, *args, **kwargs) -> str:
    """The message of the SparsecError ``call`` must raise at once."""
    t0 = time.perf_counter()
    with pytest.raises(SparsecError) as info:
        within(REFUSAL_S * 2, lambda: call(*args, **kwargs))
    assert time.perf_counter() - t0 < REFUSAL_S
    return str(info.value)


def test_calls_are_refused_while_another_thread_is_in_native_code(model, gate):
    def body():
        expected = model.generate("Hello", max_new_tokens=6)
        gate.armed.set()
        worker, box = start(model.generate, "Hello", 6, name="gen-A")
        assert gate.entered.wait(WATCHDOG_S / 2)
        msg = refused(model.generate, "x", max_new_tokens=2)
        assert msg == (
            "generate() refused: this Model is busy with generate() in thread 'gen-A'; a "
            "Model runs one call at a time: wait for it to return, or load one Model per thread"
        )
        assert BUSY in refused(model.generate, "x", max_new_tokens=2, stream=True)
        assert BUSY in refused(model.forward, [1, 2])
        assert BUSY in refused(model.rewind, 0)
        assert BUSY in refused(model.reset)
        assert BUSY in refused(model.chat, [{"role": "user", "content": "hi"}], max_new_tokens=2)
        assert model.encode("hi")  # the tokenizer alone is not held
        gate.armed.clear()
        gate.release.set()
        worker.join(WATCHDOG_S / 2)
        assert "error" not in box, box.get("error")
        assert box["value"].token_ids == expected.token_ids  # nothing corrupted
        assert gate.overlaps == 0
        assert model.generate("Hello", max_new_tokens=6).token_ids == expected.token_ids

    within(WATCHDOG_S, body)


def test_a_stream_holds_the_model_only_while_it_computes(model, gate):
    def body():
        kwargs = dict(max_new_tokens=12, temperature=1.0, seed=3)
        expected = model.generate("Hello", **kwargs)
        stream = model.generate("Hello", stream=True, **kwargs)
        first = next(stream)  # prefill and the first token, ungated
        # Suspended, the stream holds nothing: another thread may use the model.
        gate.armed.set()
        worker, box = start(lambda: first + "".join(stream), name="reader")
        assert gate.entered.wait(WATCHDOG_S / 2)  # its next step is in native code now
        assert "next(stream) in thread 'reader'" in refused(model.forward, [1])
        # the same stream stepped from a second thread (not "generator already executing")
        assert refused(next, stream).startswith(f"next(stream) refused: {BUSY} next(stream)")
        gate.armed.clear()
        gate.release.set()
        worker.join(WATCHDOG_S / 2)
        assert "error" not in box, box.get("error")
        assert box["value"] == expected.text == stream.result.text
        assert gate.overlaps == 0

    within(WATCHDOG_S, body)


def test_a_suspended_stream_yields_the_model_to_another_thread(model):
    def body():
        stream = model.generate("Hello", max_new_tokens=20, stream=True)
        next(stream)
        worker, box = start(model.generate, "abc", 3)
        worker.join(WATCHDOG_S / 2)
        assert "error" not in box, box.get("error")
        assert box["value"].token_ids == model.generate("abc", max_new_tokens=3).token_ids
        with pytest.raises(SparsecError, match="this generation was interrupted"):
            list(stream)

    within(WATCHDOG_S, body)


def test_an_unstarted_stream_leaves_the_position_of_a_later_call(model):
    stream = model.generate("Hello", max_new_tokens=5, stream=True)
    model.reset()
    model.forward([1, 2, 3])
    with pytest.raises(SparsecError, match="this generation was interrupted"):
        next(stream)
    assert model.position == 3  # the stale stream did not reset the cache


def test_close_waits_for_the_running_call(model, gate):
    def body():
        expected = model.generate("Hello", max_new_tokens=6)
        gate.armed.set()
        worker, box = start(model.generate, "Hello", 6)
        assert gate.entered.wait(WATCHDOG_S / 2)
        closer, closed = start(model.close, name="closer")
        closer.join(0.2)
        assert closer.is_alive(), "close() returned while a forward was running"
        gate.armed.clear()
        gate.release.set()
        worker.join(WATCHDOG_S / 2)
        closer.join(WATCHDOG_S / 2)
        assert not closer.is_alive() and "error" not in closed
        assert "error" not in box, box.get("error")
        assert box["value"].token_ids == expected.token_ids
        assert gate.after_close == 0
        with pytest.raises(SparsecError, match="was closed; load it again"):
            model.forward([1])

    within(WATCHDOG_S, body)


def test_close_refuses_from_inside_a_call_instead_of_deadlocking(model, gate):
    seen = {}

    def inside():
        with pytest.raises(SparsecError) as info:
            model.close()
        seen["close"] = str(info.value)
        with pytest.raises(SparsecError) as info:
            model.generate("x", max_new_tokens=2)
        seen["generate"] = str(info.value)

    gate.hook = inside
    within(WATCHDOG_S, model.forward, [1, 2])
    assert seen["close"].startswith(
        "close() refused: called from inside forward() of this Model in the same thread"
    )
    assert "busy with forward() in this same thread" in seen["generate"]
    assert model.forward([3]).shape == (1, model.vocab_size)  # still open, still usable


def test_threads_hammering_one_model_get_results_or_refusals(model):
    prompts = ["Hello", "abc", "xyz", "The"]
    expected = {p: model.generate(p, max_new_tokens=8).token_ids for p in prompts}
    errors, done = [], []

    def hammer(prompt):
        for _ in range(40):
            try:
                r = model.generate(prompt, max_new_tokens=8)
            except SparsecError as exc:
                if BUSY not in str(exc):
                    errors.append(str(exc))
                continue
            if r.token_ids != expected[prompt]:
                errors.append(f"{prompt!r}: {r.token_ids} != {expected[prompt]}")
            done.append(prompt)

    def body():
        threads = [threading.Thread(target=hammer, args=(p,), daemon=True) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WATCHDOG_S / 2)
            assert not t.is_alive()

    within(WATCHDOG_S, body)
    assert errors == []
    assert done  # some calls got through
