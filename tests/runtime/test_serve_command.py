"""`sparsec serve` as a user runs it: a subprocess on a free port that answers, a
bounded load test (200 requests from 16 clients: none lost or duplicated, memory flat),
Ctrl-C stops it cleanly, and bad options fail before anything is loaded."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from sparsec import cli

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (openai's client)")
pytest.importorskip("uvicorn", reason="sparsec serve needs the serve extra")

READY = re.compile(r"on http://127\.0\.0\.1:(\d+)/v1")


class Served:
    def __init__(self, model_path, *options):
        argv = [sys.executable, "-m", "sparsec.cli", "serve", str(model_path), "--port", "0"]
        self.proc = subprocess.Popen(
            [*argv, "--model-name", "m", *options],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.err = []
        deadline = time.time() + 60
        port = None
        while time.time() < deadline and port is None:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.err.append(line)
            match = READY.search(line)
            port = int(match.group(1)) if match else None
        assert port, "".join(self.err)
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(self.url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.05)

    def rss_kb(self) -> int:
        status = open(f"/proc/{self.proc.pid}/status").read()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30)


def test_serve_answers_and_stops_on_ctrl_c(model_path):
    s = Served(model_path, "--parallel", "2")
    try:
        body = {"model": "m", "prompt": "hello", "max_tokens": 5, "temperature": 0}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert "2 parallel" in s.err[0] and "KV caches" in s.err[0]
    finally:
        code = s.interrupt()
    assert code in (0, 130), "".join(s.err)
    assert "Traceback" not in "".join(s.err)


def test_load_test_loses_nothing_and_memory_stays_flat(model_path):
    """200 requests from 16 concurrent clients (loopback; stops by itself)."""
    s = Served(model_path, "--parallel", "4", "--max-queue", "64")
    total, clients = 200, 16
    counter = iter(range(total))
    lock = threading.Lock()
    answers: dict[int, str] = {}
    rss = {}

    def client():
        with httpx.Client(timeout=60) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"model": "m", "prompt": f"request {i}", "max_tokens": 8, "temperature": 0}
                r = http.post(s.url + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                with lock:
                    assert i not in answers
                    answers[i] = r.json()["choices"][0]["text"]
                    if len(answers) == 50:
                        rss["warm"] = s.rss_kb()

    try:
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        rss["end"] = s.rss_kb()
        health = httpx.get(s.url + "/health", timeout=10).json()
    finally:
        s.interrupt()
    assert sorted(answers) == list(range(total))
    # Same prompt, same greedy answer: nothing mixed up between streams.
    again = {i: answers[i] for i in range(0, total, 50)}
    assert all(answers[i] == again[i] for i in again)
    assert health["finished"] == total and health["active"] == 0 and health["waiting"] == 0
    assert rss["end"] <= rss["warm"] * 1.05, rss


def test_port_in_use_is_a_clear_error(model_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        code = cli.main(["serve", str(model_path), "--port", str(port)])
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--port", "70000"], "outside the allowed range (0..65535)"),
        (["--parallel", "0"], "outside the allowed range (1 or more)"),
        (["--max-queue", "-1"], "outside the allowed range (0 or more)"),
    ],
)
def test_bad_options(model_path, capsys, option, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", str(model_path), *option])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_parallel_beyond_the_model_is_refused(model_path, capsys):
    code = cli.main(["serve", str(model_path), "--port", "0", "--parallel", "9"])
    assert code == 1
    assert "parallel must be an integer from 1 to 8" in capsys.readouterr().err
