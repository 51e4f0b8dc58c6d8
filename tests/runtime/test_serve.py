"""`sparsec serve` over the fake model, through the official ``openai`` client and raw
HTTP: chat and completions, streamed and not; concurrent requests give their single
answers; disconnects free slots; a full queue, bad requests and a missing key get
OpenAI error objects."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading

import httpx
import pytest
import runtime_fake as fake

from sparsec import runtime

openai = pytest.importorskip("openai", reason="the serve tests need the openai client")
uvicorn = pytest.importorskip("uvicorn", reason="sparsec serve needs the serve extra")

from sparsec.serve.app import build_app  # noqa: E402

NAME = "fake-model"
KEY = "sk-test-key"


class Running:
    """A server on a free loopback port in a thread, over its own engine."""

    def __init__(self, model, parallel=4, max_queue=16, api_key=None):
        self.engine = model.engine(parallel=parallel, max_queue=max_queue)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(build_app(self.engine, NAME, api_key), log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            threading.Event().wait(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.close()


@pytest.fixture
def served(model):
    s = Running(model)
    yield s
    s.stop()


def _single(model_path, prompt_ids, max_new, **kw):
    with runtime.load(model_path) as m:
        return m.generate(prompt_ids, max_new_tokens=max_new, **kw)


def test_completion_streamed_equals_whole(served, model_path):
    client = served.client()
    whole = client.completions.create(model=NAME, prompt="hello", max_tokens=12, temperature=0)
    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=NAME, prompt="hello", max_tokens=12, temperature=0, stream=True
        )
    ]
    assert "".join(pieces) == whole.choices[0].text
    want = _single(model_path, "hello", 12)
    assert whole.choices[0].text == want.text
    assert whole.usage.prompt_tokens == len(want.prompt_token_ids)
    assert whole.usage.completion_tokens == len(want.token_ids)
    assert whole.choices[0].finish_reason == (
        "length" if want.finish_reason == "length" else "stop"
    )
    assert whole.model == NAME and whole.object == "text_completion"


def test_chat_streamed_equals_whole(served):
    client = served.client()
    messages = [{"role": "user", "content": "Say something"}]
    whole = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0
    )
    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_eight_concurrent_requests_equal_their_single_answers(served, model_path):
    prompts = [f"prompt number {i}" for i in range(8)]
    client = served.client()

    def ask(prompt):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, prompts))
    served.stop()  # the model is free again: compare with single generations
    with runtime.load(model_path) as m:
        want = [m.generate(p, max_new_tokens=16).text for p in prompts]
    assert got == want


def test_seeded_sampling_is_reproducible(served):
    client = served.client()
    kw = dict(model=NAME, prompt="abc", max_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    c = client.completions.create(**{**kw, "seed": 8}).choices[0].text
    assert a == b and a != c


def _slow_steps(engine, seconds):
    """Make every native call of ``engine`` take ``seconds`` longer (a long generation)."""
    inner = engine._run_rows

    def slow(n, all_logits):
        threading.Event().wait(seconds)
        inner(n, all_logits)

    engine._run_rows = slow


@pytest.fixture
def endless(make_model):
    """A model whose greedy text never ends before max_tokens (no eos, no stop)."""
    path = make_model(weights=fake.chain_weights({a: (a + 1) % 256 for a in range(fake.V)}))
    with runtime.load(path) as m:
        yield m


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(endless, stream):
    s = Running(endless, parallel=1)
    _slow_steps(s.engine, 0.02)  # 60 tokens: over a second
    try:
        body = {"model": NAME, "prompt": "a", "max_tokens": fake.C - 4, "stream": stream}
        body["temperature"] = 0
        if stream:
            with httpx.Client(timeout=30) as http:
                with http.stream("POST", s.url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())  # one chunk, then hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/completions", json=body, timeout=0.2)
        for _ in range(300):
            if s.engine.cancelled:
                break
            threading.Event().wait(0.01)
        assert s.engine.cancelled == 1 and s.engine.finished == 0
        # The only slot is free again: the next request is served.
        r = s.client(timeout=30).completions.create(model=NAME, prompt="b", max_tokens=3)
        assert r.choices[0].finish_reason in ("length", "stop")
    finally:
        s.stop()


def test_full_queue_answers_429(model):
    gate = threading.Event()
    s = Running(model, parallel=1, max_queue=0)
    try:
        # Hold the engine thread inside a listener so the one slot stays taken.
        blocker = s.engine.submit("a", max_new_tokens=3, listener=lambda k, v: gate.wait(30))
        for _ in range(200):
            if s.engine.active == 1 and s.engine.waiting == 0:
                break
            threading.Event().wait(0.01)
        r = httpx.post(s.url + "/v1/completions", json={"model": NAME, "prompt": "b"}, timeout=30)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            s.client().completions.create(model=NAME, prompt="c", max_tokens=2)
    finally:
        gate.set()
        blocker.result(timeout=30)
        s.stop()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "other", "prompt": "a"}, 404, "model"),
        ({"model": NAME, "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": NAME, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": NAME, "prompt": "a" * (fake.C + 5)}, 400, "prompt"),
        ({"model": NAME, "prompt": "a", "max_tokens": fake.C}, 400, "max_tokens"),
        ({"model": NAME, "prompt": ""}, 400, "prompt"),
        ({"model": NAME, "prompt": [fake.V + 3]}, 400, None),
        ({"model": NAME, "prompt": "a", "temperature": -0.5}, 400, "temperature"),
        ({"model": NAME, "prompt": "a", "temperature": "hot"}, 400, "temperature"),
        ({"model": NAME, "prompt": "a", "top_p": 0}, 400, "top_p"),
        ({"model": NAME, "prompt": "a", "n": 2}, 400, "n"),
        ({"model": NAME, "prompt": "a", "logprobs": 3}, 400, "logprobs"),
        ({"model": NAME, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": NAME, "prompt": "a", "stream": "yes"}, 400, "stream"),
        ({"model": NAME, "prompt": ["a", "b"]}, 400, "prompt"),
    ],
)
def test_bad_completion_requests(served, body, status, param):
    r = httpx.post(served.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and "Traceback" not in r.text


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": NAME}, 400),
        ({"model": NAME, "messages": []}, 400),
        ({"model": NAME, "messages": [{"content": "hi"}]}, 400),
        ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400),
        ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ],
)
def test_bad_chat_requests(served, body, status):
    r = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status and r.json()["error"]["param"] == "messages"


def test_malformed_http(served):
    r = httpx.post(served.url + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/v1/completions", content=b"[1, 2]", timeout=30)
    assert r.status_code == 400
    r = httpx.get(served.url + "/v1/completions", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(served.url + "/v2/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_bad_requests_leave_the_server_serving(served):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        served.client().completions.create(model=NAME, prompt="a", max_tokens=fake.C * 2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        served.client().completions.create(model="gpt-4", prompt="a")
    r = served.client().completions.create(model=NAME, prompt="a", max_tokens=2)
    assert r.choices[0].text is not None


def test_api_key_is_enforced(model):
    s = Running(model, api_key=KEY)
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(key="wrong").completions.create(model=NAME, prompt="a", max_tokens=2)
        r = httpx.get(s.url + "/v1/models", timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = s.client(key=KEY)
        assert [m.id for m in ok.models.list()] == [NAME]
        assert ok.completions.create(model=NAME, prompt="a", max_tokens=2).usage
        assert httpx.get(s.url + "/health", timeout=30).json()["status"] == "ok"
    finally:
        s.stop()


def test_models_and_health(served):
    assert [m.id for m in served.client().models.list()] == [NAME]
    health = httpx.get(served.url + "/health", timeout=30).json()
    assert health == {
        "status": "ok", "model": NAME, "parallel": 4, "active": 0, "waiting": 0, "finished": 0,
        "cancelled": 0,
    }  # fmt: skip


def test_sse_wire_format(served):
    body = {"model": NAME, "prompt": "hi", "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all(e["object"] == "text_completion" for e in events)


def test_ignore_eos_extension(served):
    body = {"model": NAME, "prompt": "a", "max_tokens": 9, "ignore_eos": True}
    r = httpx.post(served.url + "/v1/completions", json=body, timeout=30).json()
    assert r["usage"]["completion_tokens"] == 9 and r["choices"][0]["finish_reason"] == "length"
    r = httpx.post(served.url + "/v1/completions", json={**body, "ignore_eos": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos"
