"""Engine (continuous batching) on the fake model: batched results equal single ones,
one native call per step for all running sequences, slots freed on finish and cancel,
a bounded queue, and the model held while the engine runs."""

from __future__ import annotations

import threading

import pytest
import runtime_fake as fake

from sparsec import runtime
from sparsec.errors import SparsecError
from sparsec.runtime.engine import DONE, TEXT, EngineClosed, QueueFull

PROMPTS = ["a", "hello there", "xyz" * 5, "the quick brown fox", "12", "!", "mixed CASE", "q"]


def _single(model, prompt, **kw):
    return model.generate(prompt, **kw)


@pytest.mark.parametrize("parallel", [1, 3, 8])
def test_batched_greedy_equals_single(model, parallel):
    kw = dict(max_new_tokens=12)
    want = [_single(model, p, **kw) for p in PROMPTS]
    with model.engine(parallel=parallel) as engine:
        got = engine.generate(PROMPTS, **kw)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.text == w.text and g.finish_reason == w.finish_reason


def test_sampling_with_seed_and_stops_equal_single(model):
    kws = [
        dict(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=s, stop=["e"]) for s in range(6)
    ]
    want = [_single(model, p, **kw) for p, kw in zip(PROMPTS, kws, strict=False)]
    with model.engine(parallel=4) as engine:
        requests = [engine.submit(p, **kw) for p, kw in zip(PROMPTS, kws, strict=False)]
        got = [r.result(timeout=30) for r in requests]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(model):
    long_prompt = list(range(3 * fake.T + 5))  # four chunks
    want = [_single(model, p, max_new_tokens=10) for p in (long_prompt, "ab")]
    with model.engine(parallel=2) as engine:
        got = engine.generate([long_prompt, "ab"], max_new_tokens=10)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_one_native_call_per_step_for_all_sequences(model):
    """8 sequences x 10 new tokens: 8 prefill calls and about 9 decode steps of 8 rows,
    where single requests make 8 + 72 calls."""
    calls = []  # (rows, all_logits) of every native call
    native = model._native
    inner = native.forward_rows

    def counting(ctx, tokens, n, positions, caches, logits, all_logits):
        calls.append((n, all_logits))
        return inner(ctx, tokens, n, positions, caches, logits, all_logits)

    prompts = [[1 + i, 2 + i] for i in range(8)]
    with model.engine(parallel=8) as engine:
        native.forward_rows = counting
        gate = threading.Event()
        # The first request's first piece holds the engine until all 8 are queued.
        first = engine.submit(prompts[0], max_new_tokens=10, listener=lambda k, v: gate.wait())
        rest = [engine.submit(p, max_new_tokens=10) for p in prompts[1:]]
        gate.set()
        results = [first.result(timeout=30)] + [r.result(timeout=30) for r in rest]
    native.forward_rows = inner
    assert all(len(r.token_ids) == 10 for r in results), [r.finish_reason for r in results]
    prefills = [n for n, all_logits in calls if not all_logits]
    steps = [n for n, all_logits in calls if all_logits]
    assert prefills == [2] * 8
    # 9 steps of 8 rows, give or take the first request running one step ahead.
    assert 9 <= len(steps) <= 11 and steps.count(8) >= 8, steps
    assert engine.native_calls == len(calls) and engine.decode_steps == len(steps)


def test_cancel_frees_the_slot(make_model):
    path = make_model(weights=fake.chain_weights({a: (a + 1) % 256 for a in range(fake.V)}))
    with runtime.load(path) as model, model.engine(parallel=1) as engine:
        started, go_on = threading.Event(), threading.Event()

        def listen(kind, value):
            if kind == TEXT:
                started.set()
                go_on.wait(30)  # hold the engine until a is cancelled

        a = engine.submit("a", max_new_tokens=60, listener=listen)
        b = engine.submit("b", max_new_tokens=5)
        assert started.wait(30)
        a.cancel()
        go_on.set()
        generation = a.result(timeout=30)
        assert generation.finish_reason == "cancelled" and len(generation.token_ids) < 60
        assert b.result(timeout=30).finish_reason == "length"
        assert engine.cancelled == 1 and engine.finished == 1


def test_full_queue_is_refused(model):
    gate = threading.Event()
    with model.engine(parallel=1, max_queue=1) as engine:
        a = engine.submit("a", max_new_tokens=3, listener=lambda k, v: gate.wait(30))
        # The engine thread is blocked delivering a's first piece: one may wait, no more.
        for _ in range(100):
            if engine.active == 1 and engine.waiting == 0:
                break
            threading.Event().wait(0.01)
        b = engine.submit("b", max_new_tokens=3)
        with pytest.raises(QueueFull, match=r"queue is full \(1 requests waiting for one of 1"):
            engine.submit("c", max_new_tokens=3)
        gate.set()
        assert b.result(timeout=30).finish_reason in ("length", "eos", "stop")
        assert a.done or a.result(timeout=30)


def test_the_model_is_held_while_the_engine_runs(model):
    engine = model.engine(parallel=2)
    with pytest.raises(SparsecError, match="busy with an Engine"):
        model.generate("a", max_new_tokens=2)
    engine.close()
    assert model.generate("a", max_new_tokens=2).token_ids
    with pytest.raises(EngineClosed, match="engine is closed"):
        engine.submit("a")


def test_closing_with_requests_in_flight(model):
    gate = threading.Event()
    engine = model.engine(parallel=1)
    a = engine.submit("a", max_new_tokens=50, listener=lambda k, v: gate.wait(30))
    b = engine.submit("b", max_new_tokens=5)
    closer = threading.Thread(target=engine.close)
    closer.start()
    gate.set()
    closer.join(30)
    assert not closer.is_alive()
    with pytest.raises(EngineClosed):
        b.result(timeout=30)
    assert a.done


def test_closing_the_model_closes_its_engine(model_path):
    m = runtime.load(model_path)
    engine = m.engine(parallel=2)
    m.close()
    with pytest.raises(EngineClosed):
        engine.submit("a")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(parallel=0), "parallel must be an integer from 1 to 8"),
        (dict(parallel=fake.T + 1), "parallel must be an integer from 1 to 8"),
        (dict(parallel=True), "parallel must be an integer"),
        (dict(max_queue=-1), "max_queue must be an integer >= 0"),
    ],
)
def test_bad_engine_arguments(model, kw, match):
    with pytest.raises(SparsecError, match=match):
        model.engine(**kw)


def test_bad_request_arguments_fail_at_submit(model):
    with model.engine(parallel=1) as engine:
        with pytest.raises(SparsecError, match="temperature"):
            engine.submit("a", temperature=-1)
        with pytest.raises(SparsecError, match="exceeds the max context"):
            engine.submit("a", max_new_tokens=fake.C)
        with pytest.raises(SparsecError, match="outside the vocabulary"):
            engine.submit([fake.V])
        assert engine.submit("a", max_new_tokens=2).result(timeout=30).token_ids


def test_iterated_pieces_join_to_the_text(model):
    with model.engine(parallel=2) as engine:
        request = engine.submit("hello", max_new_tokens=15)
        pieces = list(request)
        assert "".join(pieces) == request.result().text
    kinds = []
    with model.engine(parallel=2) as engine:
        r = engine.submit("hello", max_new_tokens=15, listener=lambda k, v: kinds.append(k))
        r.result(timeout=30)
    assert kinds[-1] == DONE and set(kinds[:-1]) <= {TEXT}


def test_ignore_eos_generates_exactly_max_new_tokens(make_model):
    """A model whose greedy next token is always eos: 1 token, or max_new with
    ignore_eos (ablation: without it the generation ends at the eos)."""
    path = make_model(weights=fake.chain_weights({a: fake.EOS for a in range(fake.V)}))
    with runtime.load(path) as m, m.engine(parallel=2) as engine:
        plain = engine.submit("a", max_new_tokens=7).result(timeout=30)
        forced = engine.submit("a", max_new_tokens=7, ignore_eos=True).result(timeout=30)
        with pytest.raises(SparsecError, match="ignore_eos"):
            engine.submit("a", ignore_eos="yes")
    assert plain.token_ids == [fake.EOS] and plain.finish_reason == "eos"
    assert len(forced.token_ids) == 7 and forced.finish_reason == "length"


def test_kv_caches_beyond_memory_are_refused_up_front(model, monkeypatch):
    """Checked before allocating (the engine touches every page, which overcommit would
    let the OOM killer answer)."""
    from sparsec import resources

    per_slot = model._kv_cache.nbytes
    monkeypatch.setattr(resources, "available_memory", lambda: 3 * per_slot)
    with model.engine(parallel=3) as engine:
        assert engine.cache_bytes == 3 * per_slot
    with pytest.raises(SparsecError, match=r"KV caches of 4 parallel sequences need .* lower"):
        model.engine(parallel=4)
    assert model.generate("a", max_new_tokens=2).token_ids  # nothing was left held
