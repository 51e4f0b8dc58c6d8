"""The benchmark report: a JSON document in the spirit of deepsparse.benchmark's (engine,
version, model hash, shapes, threads, CPU, results), and its text / markdown tables.

Schema ``sparsec.bench/1``::

    {"schema", "created", "command", "duration_seconds",
     "model": {source, config, variants: [{label, kind, requested_sparsity,
               measured_sparsity, weights_hash, perplexity?}]},
     "machine": {cpu, cpu_flags, logical_cpus, usable_cpus, memory_gb, os, python,
                 load_average: {before, after}},
     "settings": {prompt_tokens, new_tokens, reps, threads, max_context, protocol},
     "bandwidth": [{threads, bytes, gbps_median, gbps_min, gbps_max, samples}],
     "results": [{engine, version, system, variant, model_hash, precision,
                  weights_format, threads, input_shapes, status, reason?, artifact,
                  decode_tokens_per_second: {median, min, max, samples},
                  prefill_seconds: {median, min, max, samples},
                  prefill_tokens_per_second, tokens_match_reference,
                  roofline: {weight_bytes_per_token, kv_bytes_per_token,
                             bytes_per_token, gbps, ceiling_gbps, percent_of_ceiling}}]}

``status`` is ``ok`` or ``unavailable`` (with ``reason``): a comparator that cannot run
here is listed, never dropped.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SCHEMA = "sparsec.bench/1"


def _stats(values: list[float], digits: int = 4) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "samples": [round(v, digits) for v in values],
    }


def machine_info(load_before, load_after) -> dict:
    from sparsec.codegen.target import host_cpu_flags, host_cpu_model

    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        pages = 0
    return {
        "cpu": host_cpu_model(),
        "cpu_flags": sorted(f for f in host_cpu_flags() if f.startswith(("avx512", "amx"))),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gb": round(pages / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in load_after],
        },
    }


def _kv_bytes_per_token(cfg, kv_bytes: int, avg_context: float) -> int:
    # A decode step reads the keys and values of every cached position, in every layer.
    return int(2 * cfg.num_hidden_layers * cfg.kv_width * kv_bytes * avg_context)


def _reference_tokens(measured) -> dict:
    """Per variant, the tokens the comparison of agreement uses: PyTorch's, else sparsec
    fp32's, else the first system's (first round, first thread count)."""
    refs: dict = {}
    for pref in ("torch", "sparsec fp32", None):
        for m in measured:
            key = m.system.variant.weights_hash
            if key in refs or not m.samples:
                continue
            if pref is None or m.system.engine == pref or m.system.name == pref:
                refs[key] = (m.system.name, m.samples[0].tokens)
    return refs


def _agreement(tokens: list[int], ref: list[int]) -> int:
    n = 0
    for a, b in zip(tokens, ref, strict=False):
        if a != b:
            break
        n += 1
    return n


def build_report(
    opts,
    variants,
    prompt,
    max_context,
    measured,
    skipped,
    bandwidth,
    *,
    started,
    load_before,
    load_after,
) -> dict:
    cfg = variants[0].config
    avg_context = len(prompt) + opts.new_tokens / 2
    refs = _reference_tokens(measured)
    results = []
    for m in measured:
        s, v = m.system, m.system.variant
        decode = [x.decode_tokens_per_second for x in m.samples]
        prefill = [x.prefill_seconds for x in m.samples]
        weight_bytes = s.weight_bytes_per_token()
        kv = _kv_bytes_per_token(cfg, s.kv_bytes_per_value, avg_context)
        total = weight_bytes + kv
        gbps = total * statistics.median(decode) / 1e9
        ceiling = bandwidth[m.threads]["gbps_median"]
        ref_name, ref_tokens = refs.get(v.weights_hash, (None, None))
        agree = _agreement(m.samples[0].tokens, ref_tokens) if ref_tokens else None
        results.append(
            {
                "engine": s.engine,
                "version": s.version,
                "system": s.name,
                "variant": v.label,
                "model_hash": v.weights_hash,
                "precision": s.precision,
                "weights_format": s.weights_format,
                "threads": m.threads,
                "input_shapes": {"prefill": [1, len(prompt)], "decode": [1, 1]},
                "status": "ok",
                "artifact": s.artifact,
                "decode_tokens_per_second": _stats(decode, 2),
                "prefill_seconds": _stats(prefill, 4),
                "prefill_tokens_per_second": round(len(prompt) / statistics.median(prefill), 1),
                "tokens_match_reference": {
                    "reference": ref_name,
                    "matching_prefix": agree,
                    "of": opts.new_tokens,
                },
                "roofline": {
                    "weight_bytes_per_token": weight_bytes,
                    "kv_bytes_per_token": kv,
                    "bytes_per_token": total,
                    "gbps": round(gbps, 2),
                    "ceiling_gbps": ceiling,
                    "percent_of_ceiling": round(100 * gbps / ceiling, 1) if ceiling else None,
                },
            }
        )
    for sk in skipped:
        for threads in opts.threads:
            results.append(
                {
                    "engine": sk.engine,
                    "system": sk.name,
                    "variant": sk.variant.label,
                    "model_hash": sk.variant.weights_hash,
                    "threads": threads,
                    "status": "unavailable",
                    "reason": sk.reason,
                }
            )
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": opts.command,
        "duration_seconds": round(time.time() - started, 1),
        "model": {
            "source": str(opts.model),
            "config": cfg.to_dict(),
            "variants": [v.describe() for v in variants],
        },
        "machine": machine_info(load_before, load_after),
        "settings": {
            "prompt_tokens": len(prompt),
            "new_tokens": opts.new_tokens,
            "reps": opts.reps,
            "threads": opts.threads,
            "max_context": max_context,
            "kernels": opts.kernels,
            "protocol": (
                "greedy argmax (end-of-sequence never chosen), prefill = prompt forward + "
                "first token, decode tok/s = (new_tokens - 1) single-token steps / their "
                "seconds; systems interleaved round by round; median of reps with min/max; "
                f"KV bytes at the mean context {avg_context:g}"
            ),
        },
        "bandwidth": list(bandwidth.values()),
        "results": results,
    }


def write_json(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e7 else f"{n / 1e6:.1f} MB"


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["results"]:
        if r["status"] != "ok":
            continue  # listed under the table, once per reason
        d, p, roof = r["decode_tokens_per_second"], r["prefill_seconds"], r["roofline"]
        match = r["tokens_match_reference"]
        agree = (
            f"{match['matching_prefix']}/{match['of']}"
            if match["matching_prefix"] is not None
            else ""
        )
        rows.append(
            [
                r["system"],
                r["variant"],
                str(r["threads"]),
                f"{d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f})",
                f"{p['median'] * 1e3:.0f} ({p['min'] * 1e3:.0f}-{p['max'] * 1e3:.0f})",
                _mb(roof["bytes_per_token"]),
                f"{roof['gbps']:.1f}",
                f"{roof['percent_of_ceiling']:.0f}%",
                agree,
            ]
        )
    return rows


HEADER = [
    "system",
    "sparsity",
    "threads",
    "decode tok/s median (min-max)",
    "prefill ms (min-max)",
    "bytes/token",
    "GB/s",
    "% of read BW",
    "same tokens",
]


def unavailable_lines(report: dict) -> list[str]:
    """'unavailable: llama.cpp F32, llama.cpp Q8_0 (0%, 70%): reason', one per reason."""
    by_reason: dict[str, dict[str, list]] = {}
    for r in report["results"]:
        if r["status"] != "ok":
            entry = by_reason.setdefault(r["reason"], {"systems": [], "variants": []})
            for key, value in (("systems", r["system"]), ("variants", r["variant"])):
                if value not in entry[key]:
                    entry[key].append(value)
    return [
        f"unavailable: {', '.join(e['systems'])} ({', '.join(e['variants'])}): {reason}"
        for reason, e in by_reason.items()
    ]


def markdown_table(report: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines += ["", *unavailable_lines(report)] if unavailable_lines(report) else []
    return "\n".join(lines)


def text_summary(report: dict) -> str:
    rows = [HEADER, *table_rows(report)]
    widths = [max(len(row[i]) for row in rows[:]) for i in range(len(HEADER) - 1)]
    out = []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)]
        out.append("  ".join(cells) + "  " + row[-1])
    s = report["settings"]
    bw = ", ".join(
        f"{b['threads']} thread(s) {b['gbps_median']:.1f} GB/s "
        f"({b['gbps_min']:.1f}-{b['gbps_max']:.1f})"
        for b in report["bandwidth"]
    )
    load = report["machine"]["load_average"]
    out += unavailable_lines(report)
    out += [
        "",
        f"prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens, median of "
        f"{s['reps']} interleaved rounds; read bandwidth ({report['bandwidth'][0]['bytes'] >> 20}"
        f" MB probe): {bw}",
        f"CPU {report['machine']['cpu']}, load average {load['before'][0]:.2f} before, "
        f"{load['after'][0]:.2f} after; same tokens = greedy tokens equal to "
        "the reference's (PyTorch, else sparsec fp32) before the first difference",
    ]
    return "\n".join(out)


def print_summary(report: dict, file=sys.stdout) -> None:
    print(text_summary(report), file=file)
