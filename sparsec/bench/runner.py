"""Run the benchmark: every system on every variant, interleaved, with the roofline.

Per thread count: load every system, warm each one up once, then ``reps`` rounds; each
round measures the read-bandwidth probe and then every system once, in an order that
rotates between rounds so no system always runs right after a given other one. The
result of a system is the median of its rounds with min and max.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sparsec.bench.systems.base import Sample, System, Unavailable
from sparsec.errors import SparsecError

DEFAULT_PROMPT = (
    "The history of computing is a story of machines that became smaller, faster and "
    "cheaper with every decade. Early computers filled entire rooms and consumed enormous "
    "amounts of power, yet they could perform only a few thousand operations per second. "
    "Today a phone in your pocket"
)
WARMUP_TOKENS = 8


@dataclass
class BenchOptions:
    model: str
    sparsities: list
    precisions: list[str]
    compare: list[str]
    llama_types: list[str]
    threads: list[int]
    new_tokens: int = 128
    reps: int = 3
    prompt: str = DEFAULT_PROMPT
    kernels: str = "auto"
    targets: list[str] = field(default_factory=lambda: ["auto"])
    cache_dir: Path = Path("out/bench")
    probe_bytes: int = 256 << 20
    max_context: int | None = None
    command: str = ""
    json_out: Path | None = None  # rewritten after each thread count


@dataclass
class Measured:
    system: System
    threads: int
    samples: list[Sample] = field(default_factory=list)


@dataclass
class Skipped:
    name: str
    variant: object
    engine: str
    reason: str


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _max_context(opts: BenchOptions, prompt_len: int, model_max: int) -> int:
    need = prompt_len + opts.new_tokens
    capacity = opts.max_context or min(model_max, max(512, -(-need // 64) * 64))
    if need > capacity or capacity > model_max:
        raise SparsecError(
            f"prompt ({prompt_len} tokens) + --new-tokens {opts.new_tokens} = {need} does not "
            f"fit the context ({capacity}, model maximum {model_max}); shorten them"
        )
    return capacity


def build_systems(opts: BenchOptions, variants, max_context: int):
    """(systems, skipped): what will be measured, and what cannot run here and why."""
    from sparsec.bench.systems.sparsec_system import SparsecSystem

    systems: list[System] = []
    skipped: list[Skipped] = []

    def add(make, name: str, engine: str, v) -> None:
        try:
            s = make()
            log(f"preparing {s.name} on {v.label} weights ...")
            s.prepare()
            systems.append(s)
        except Unavailable as exc:
            skipped.append(Skipped(name, v, engine, str(exc)))
            log(f"  unavailable: {name}: {exc}")

    for v in variants:
        for target in opts.targets:
            for precision in opts.precisions:
                s = SparsecSystem(v, precision, opts.kernels, max_context, target)
                log(f"preparing {s.name} on {v.label} weights (compile, cached) ...")
                s.prepare()
                systems.append(s)
        if "torch" in opts.compare:
            from sparsec.bench.systems.torch_eager import TorchEagerSystem

            add(lambda v=v: TorchEagerSystem(v), "torch eager fp32", "torch", v)
        if "onnxruntime" in opts.compare:
            from sparsec.bench.systems.onnxruntime_system import OnnxRuntimeSystem

            for precision in opts.precisions:
                label = "fp32" if precision == "fp32" else "dynamic int8"
                add(
                    lambda v=v, p=precision: OnnxRuntimeSystem(v, p),
                    f"onnxruntime {label}",
                    "onnxruntime",
                    v,
                )
        if "llama.cpp" in opts.compare:
            from sparsec.bench.systems.llamacpp import LlamaCppSystem

            for gtype in opts.llama_types:
                add(
                    lambda v=v, g=gtype: LlamaCppSystem(v, g, max_context),
                    f"llama.cpp {gtype.upper()}",
                    "llama.cpp",
                    v,
                )
    return systems, skipped


def run_bench(opts: BenchOptions) -> dict:
    """Measure everything ``opts`` asks for; returns the report (see report.py)."""
    from sparsec.bench import report, variants
    from sparsec.bench.bandwidth import ReadBandwidthProbe

    started = time.time()
    load_before = os.getloadavg()
    opts.cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"loading {opts.model} and making the variants ({', '.join(map(str, opts.sparsities))})")
    vs = variants.load_variants(opts.model, opts.sparsities, opts.cache_dir)
    tok = vs[0].tokenizer
    prompt = tok(opts.prompt).input_ids
    model_max = vs[0].config.max_position_embeddings
    if len(prompt) + opts.new_tokens > model_max:
        prompt = prompt[: max(1, model_max - opts.new_tokens)]
    max_context = _max_context(opts, len(prompt), model_max)
    systems, skipped = build_systems(opts, vs, max_context)
    probe = ReadBandwidthProbe()
    measured: list[Measured] = []
    bandwidth = {}
    for threads in opts.threads:
        group = [Measured(s, threads) for s in systems]
        for m in group:
            m.system.set_threads(threads)
            m.system.run(prompt, WARMUP_TOKENS)  # page in weights, JIT/arena warm-up
        probe.measure(threads, opts.probe_bytes, reps=1)
        bw_samples = []
        for r in range(opts.reps):
            bw_samples.append(probe.measure(threads, opts.probe_bytes, reps=3))
            order = group[r % len(group) :] + group[: r % len(group)]
            for m in order:
                sample = m.system.run(prompt, opts.new_tokens)
                m.samples.append(sample)
                log(
                    f"threads {threads} round {r + 1}/{opts.reps} {m.system.name:<26} "
                    f"{m.system.variant.label:>5}: decode {sample.decode_tokens_per_second:7.1f} "
                    f"tok/s, prefill {sample.prefill_seconds * 1e3:7.1f} ms"
                )
        gbps = [b.median for b in bw_samples]
        bandwidth[threads] = {
            "threads": threads,
            "bytes": opts.probe_bytes,
            "gbps_median": round(statistics.median(gbps), 2),
            "gbps_min": round(min(gbps), 2),
            "gbps_max": round(max(gbps), 2),
            "samples": [round(g, 2) for g in gbps],
        }
        measured += group
        result = report.build_report(
            opts,
            vs,
            prompt,
            max_context,
            measured,
            skipped,
            bandwidth,
            started=started,
            load_before=load_before,
            load_after=os.getloadavg(),
        )
        if opts.json_out:  # partial results survive an interrupted long run
            report.write_json(result, opts.json_out)
    for s in systems:
        s.close()
    return result
