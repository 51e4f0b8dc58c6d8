"""The README's serving table: aggregate and per-stream decode throughput of batched decode
on SmolLM2-135M int8 70% at 2 threads, against llama.cpp's own llama-server with
continuous batching on the same (70% magnitude-zeroed) weights, Q8_0 and Q4_0.

    .venv/bin/python benchmarks/serve.py --llama-server /path/to/llama-server   # ~10 min

1. Engine (Python API, no HTTP): 1, 4, 8, 16 concurrent requests, greedy, exactly
   --new-tokens each (ignore_eos), distinct prompts (no prefix reuse anywhere).
2. HTTP: ``sparsec serve`` and ``llama-server`` (Q8_0, Q4_0) as subprocesses, each with
   16 slots and 2 threads, all started first and measured in interleaved rounds; the
   load generator (one thread per stream, streaming /v1/completions) runs in this
   process on the same 2 cores.
3. Memory: 200 requests from 16 concurrent clients against ``sparsec serve``; the
   server's RSS after warm-up (the first 32) and at the end.

Aggregate = all streams' new tokens / wall time from the first submit to the last
token; per-stream = a stream's new tokens after its first / its decode time; TTFT from
submit (queue and prefill included). llama-server is built from the llama.cpp sources
vendored in the llama-cpp-python sdist (README "Serving"). Writes out/bench/serve.json
and out/bench/serve.md. Reports, does not gate: exit 0 whether or not targets are met.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path("out/bench")
CONTEXT = 512  # per slot, both servers
SLOTS = 16


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def prompts(tokenizer, n: int) -> list[list[int]]:
    from sparsec.bench.runner import DEFAULT_PROMPT

    return [tokenizer(f"Story {i}. {DEFAULT_PROMPT}").input_ids[:48] for i in range(n)]


# ----------------------------------------------------------------------------- engine


def _row(r: dict) -> str:
    return (
        f"{r['aggregate']:.0f} tok/s aggregate, {r['per_stream']:.0f} per stream, "
        f"TTFT {r['ttft'] * 1e3:.0f} ms"
    )


def engine_round(engine, batch: list[list[int]], new_tokens: int) -> dict:
    t0 = time.perf_counter()
    reqs = [
        engine.submit(p, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True) for p in batch
    ]
    gens = [r.result() for r in reqs]
    wall = time.perf_counter() - t0
    assert all(len(g.token_ids) == new_tokens for g in gens)
    return {
        "aggregate": len(batch) * new_tokens / wall,
        "per_stream": statistics.mean(g.stats.decode_tokens_per_second for g in gens),
        "ttft": statistics.mean(g.stats.time_to_first_token for g in gens),
    }


def measure_engine(so: Path, batch_prompts, streams, new_tokens, reps) -> dict:
    from sparsec import runtime

    out = {}
    with runtime.load(so, threads=2) as m, m.engine(parallel=SLOTS) as engine:
        engine_round(engine, batch_prompts[:2], 16)  # warm-up
        for n in streams:
            rounds = [engine_round(engine, batch_prompts[:n], new_tokens) for _ in range(reps)]
            best = max(rounds, key=lambda r: r["aggregate"])
            out[n] = best
            print(f"engine {n:2d} streams: {_row(best)}")
    return out


# ----------------------------------------------------------------------------- HTTP


def _stream_one(client, url: str, prompt: list[int], new_tokens: int, start=None) -> dict:
    """One streamed completion on ``client`` (an open httpx.Client); waits on the
    ``start`` barrier first, so a round's requests leave together."""
    body = {
        "model": "m",
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if (
                first is None
                and line.startswith("data: {")
                and '"text":""' not in line.replace(" ", "")
            ):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"start": t0, "first": first, "end": end}


def http_round(url, batch, new_tokens) -> dict:
    """``len(batch)`` concurrent streams from threads with connections opened (and a
    warm-up request made) before the clock starts: the round times the server, not
    thread start-up or TCP connects."""
    import httpx

    clients = [httpx.Client(timeout=600) for _ in batch]
    try:
        for c in clients:
            c.get(url + "/health")  # opens the keep-alive connection
        start = threading.Barrier(len(batch))
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            futures = [
                pool.submit(_stream_one, c, url, p, new_tokens, start)
                for c, p in zip(clients, batch, strict=True)
            ]
            rows = [f.result() for f in futures]
    finally:
        for c in clients:
            c.close()
    t0 = min(r["start"] for r in rows)
    wall = max(r["end"] for r in rows) - t0
    return {
        "aggregate": len(batch) * new_tokens / wall,
        "per_stream": statistics.mean((new_tokens - 1) / (r["end"] - r["first"]) for r in rows),
        "ttft": statistics.mean(r["first"] - r["start"] for r in rows),
    }


class ServerProcess:
    def __init__(self, argv: list[str], ready: re.Pattern, name: str, env=None):
        self.name = name
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.log: list[str] = []
        self.port = None
        deadline = time.time() + 300
        for line in self.proc.stdout:
            self.log.append(line)
            match = ready.search(line)
            if match:
                self.port = int(match.group(1))
                break
            if time.time() > deadline:
                break
        if self.port is None:
            self.stop()
            raise RuntimeError(f"{name} did not start:\n" + "".join(self.log[-20:]))
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_healthy()

    def _drain(self):
        for line in self.proc.stdout:
            self.log.append(line)

    def _wait_healthy(self):
        import httpx

        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} never became healthy")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure_http(servers: dict, batch_prompts, streams, new_tokens, reps) -> dict:
    """Rounds interleaved across the servers (all running, the idle ones asleep), so the
    VM's drifting memory bandwidth hits every server alike; best round of each."""
    for server in servers.values():
        http_round(server.url, batch_prompts[:2], 16)  # warm-up
    out = {name: {} for name in servers}
    for n in streams:
        rounds = {name: [] for name in servers}
        for _ in range(reps):
            for name, server in servers.items():
                rounds[name].append(http_round(server.url, batch_prompts[:n], new_tokens))
        for name in servers:
            out[name][str(n)] = max(rounds[name], key=lambda r: r["aggregate"])
            print(f"{name} {n:2d} streams: {_row(out[name][str(n)])}")
    return out


def sparsec_server(so: Path) -> ServerProcess:
    exe = Path(sys.executable).parent / "sparsec"
    argv = [str(exe), "serve", str(so), "--port", "0", "--parallel", str(SLOTS), "--threads", "2"]
    argv += ["--model-name", "m", "--max-queue", "256"]
    return ServerProcess(argv, re.compile(r"on http://[^:]+:(\d+)/v1"), "sparsec serve")


def llama_server(binary: Path, gguf: Path, port: int) -> ServerProcess:
    argv = [str(binary), "-m", str(gguf), "-t", "2", "-tb", "2", "-c", str(CONTEXT * SLOTS)]
    argv += ["-np", str(SLOTS), "-cb", "--host", "127.0.0.1", "--port", str(port), "-a", "m"]
    argv += ["--no-webui"]
    ready = re.compile(rf"(?:listening|server is listening).*:({port})")
    return ServerProcess(argv, ready, f"llama-server {gguf.stem.split('-')[-1].upper()}")


def load_test(server: ServerProcess, batch_prompts, total=200, clients=16, new_tokens=32):
    """``total`` requests from ``clients`` concurrent clients; RSS after warm-up and end."""
    done = []
    lock = threading.Lock()
    counter = iter(range(total))
    rss = {}

    def client():
        import httpx

        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                _stream_one(http, server.url, batch_prompts[i % len(batch_prompts)], new_tokens)
                with lock:
                    done.append(i)
                    if len(done) == 32:
                        rss["warm"] = server.rss_mb()

    rss["start"] = server.rss_mb()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss["end"] = server.rss_mb()
    ok = sorted(done) == list(range(total))
    print(f"load test: {len(done)}/{total} requests in {time.perf_counter() - t0:.1f} s, "
          f"none lost or duplicated: {ok}; RSS {rss['start']:.0f} -> {rss['warm']:.0f} "
          f"(warm) -> {rss['end']:.0f} MB")  # fmt: skip
    return {"requests": total, "clients": clients, "completed": len(done), "exact": ok, **rss}


# ----------------------------------------------------------------------------- report


def write_report(result: dict) -> None:
    streams = result["streams"]
    lines = [
        f"SmolLM2-135M int8 70% (magnitude), KV cache {result['kv_cache']}, "
        f"{result['threads']} threads, "
        f"{result['new_tokens']} new tokens per stream, {result['cpu']}; read-bandwidth "
        f"probe {result['probe_gbps']:.1f} GB/s",
        "",
        "| system | " + " | ".join(f"{n} streams" for n in streams) + " | 8 vs 1 |",
        "| --- | " + " | ".join("---" for _ in streams) + " | --- |",
    ]
    for name, rows in result["systems"].items():
        cells = [
            f"{rows[str(n)]['aggregate']:.0f} ({rows[str(n)]['per_stream']:.0f}/stream, "
            f"TTFT {rows[str(n)]['ttft'] * 1e3:.0f} ms)"
            for n in streams
        ]
        ratio = rows["8"]["aggregate"] / rows["1"]["aggregate"] if "8" in rows else float("nan")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    lines.append("")
    for name, value in result["targets"].items():
        lines.append(f"- {name}: {value}")
    if "load_test" in result:
        lt = result["load_test"]
        lines.append(
            f"- load test: {lt['completed']}/{lt['requests']} requests from {lt['clients']} "
            f"clients, exact: {lt['exact']}; server RSS {lt['start']:.0f} MB at start, "
            f"{lt['warm']:.0f} MB after 32 requests, {lt['end']:.0f} MB at the end"
        )
    (OUT / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", type=Path, default=None, help="llama-server binary")
    p.add_argument("--streams", default="1,4,8,16")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-http", action="store_true", help="the Engine only")
    p.add_argument(
        "--kv-cache",
        default="float32,float16,int8",
        help="sparsec's KV cache types for the Engine rows, comma-separated; HTTP and the "
        "load test use the first (default float32,float16,int8)",
    )
    args = p.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]

    from sparsec.bench.bandwidth import ReadBandwidthProbe
    from sparsec.bench.variants import gguf_file, load_variants, sparsec_library

    OUT.mkdir(parents=True, exist_ok=True)
    v = load_variants("smollm2-135m", [0.7], OUT)[0]
    kv_caches = args.kv_cache.split(",")
    libraries = {kv: sparsec_library(v, "int8", "auto", CONTEXT, kv_cache=kv) for kv in kv_caches}
    so = libraries[kv_caches[0]]
    batch = prompts(v.tokenizer, max(streams + [16]))
    probe = ReadBandwidthProbe().measure(nthreads=2)
    result = {
        "cpu": cpu_name(),
        "threads": 2,
        "new_tokens": args.new_tokens,
        "streams": streams,
        "probe_gbps": probe.median,
        "kv_cache": kv_caches[0],
        "artifact": str(so),
        "systems": {},
        "targets": {},
    }
    for kv, library in libraries.items():
        engine = measure_engine(library, batch, streams, args.new_tokens, args.reps)
        name = "sparsec Engine (no HTTP)" + ("" if kv == kv_caches[0] else f", KV {kv}")
        result["systems"][name] = {str(k): x for k, x in engine.items()}
    if not args.no_http:
        servers = {}
        try:
            servers["sparsec serve (HTTP)"] = sparsec_server(so)
            if args.llama_server:
                for i, gtype in enumerate(("q8_0", "q4_0")):
                    servers[f"llama-server {gtype.upper()} (HTTP)"] = llama_server(
                        args.llama_server, gguf_file(v, gtype), 18480 + i
                    )
            rows = measure_http(servers, batch, streams, args.new_tokens, args.reps)
            result["systems"].update(rows)
            result["load_test"] = load_test(servers["sparsec serve (HTTP)"], batch)
        finally:
            for server in servers.values():
                server.stop()
    sys_rows = result["systems"]
    e = sys_rows["sparsec Engine (no HTTP)"]
    if "8" in e and "1" in e:
        ratio = e["8"]["aggregate"] / e["1"]["aggregate"]
        result["targets"]["Engine 8 streams >= 4x its 1-stream aggregate"] = (
            f"{ratio:.2f}x ({'met' if ratio >= 4 else 'NOT met'})"
        )
    http = sys_rows.get("sparsec serve (HTTP)")
    for gtype in ("Q8_0", "Q4_0"):
        ref = sys_rows.get(f"llama-server {gtype} (HTTP)")
        if http and ref and "8" in http:
            ratio = http["8"]["aggregate"] / ref["8"]["aggregate"]
            result["targets"][f"serve 8 streams >= 3x llama-server {gtype} at 8 streams"] = (
                f"{ratio:.2f}x ({'met' if ratio >= 3 else 'NOT met'})"
            )
    (OUT / "serve.json").write_text(json.dumps(result, indent=2))
    write_report(result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
