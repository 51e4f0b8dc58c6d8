"""CI regression check of the generated linear kernels (part of .ci/run via tests/bench).

    .venv/bin/python benchmarks/kernel_regression.py --check     # compare with baselines
    .venv/bin/python benchmarks/kernel_regression.py --update    # after an intended change
    .venv/bin/python benchmarks/kernel_regression.py --study 5   # false alarms in 5 checks

Kernels: SmolLM2-135M's linear shapes (576x576, 192x576, 1536x576, 576x1536) at 0, 50,
70 and 90% sparsity in every format (dense/bitmask x fp32/int8), the int8 quantize
kernels and the dense output layer (49152x576), emitted as ``sparsec compile`` emits
them (max 64 tokens per call), with fixed random weights.

1. Fingerprints (deterministic): instruction counts by class, stack spills/reloads and
   code bytes of every kernel, compiled for a fixed LLVM cpu (znver4), against
   baselines/kernel_fingerprints.json. Any difference fails and prints what changed,
   grouped by change.
2. Timings (statistical): decode time of each timed kernel (dense formats at sparsity 0,
   bitmask formats at every sparsity; 1 token, 1 thread, weights replicated to a 24 MB
   working set) as a ratio to the read-bandwidth probe reading the same number of bytes,
   15 alternating samples; ratio = fastest kernel sample / fastest probe sample. Against
   baselines/kernel_timings.json (each baseline ratio the median of 5 runs). A kernel
   fails when its ratio is more than the tolerance (25%) above the baseline in its
   measurement and in 2 re-measurements taken after the whole pass. ``--study N`` runs
   the check N times on unchanged kernels and records single-measurement spread and
   false alarms in the baseline's "study" list: the evidence for the tolerance.

Exit status: 0 when everything matches, 1 on a regression, with a report naming each
kernel, its baseline, the measurement and the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsec.bench import regression as reg  # noqa: E402

BASELINES = Path(__file__).resolve().parent / "baselines"
FINGERPRINTS = BASELINES / "kernel_fingerprints.json"
TIMINGS = BASELINES / "kernel_timings.json"
UPDATE_COMMAND = ".venv/bin/python benchmarks/kernel_regression.py --update"


def _environment() -> dict:
    import llvmlite

    from sparsec import __version__
    from sparsec.codegen.target import host_cpu_model

    return {
        "sparsec": __version__,
        "llvmlite": llvmlite.__version__,
        "host_cpu": host_cpu_model(),
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _timing_settings() -> dict:
    return {
        "threads": reg.TIMING_THREADS,
        "n_tokens": 1,
        "working_set_bytes": reg.WORKING_SET,
        "samples": reg.SAMPLES,
        "inner_reps": reg.INNER_REPS,
        "reference": "read-bandwidth probe over the same number of bytes, alternated",
    }


def check_fingerprints(
    specs, packs, emitter=reg.emit_kernel, baseline_path=FINGERPRINTS, log=print, subset=False
) -> bool:
    """True when every kernel's fingerprint equals the committed one. ``subset``: check
    only the kernels of ``specs`` (tests), not that every baseline kernel still exists."""
    from sparsec.bench.fingerprint import diff_fingerprints

    baseline = json.loads(baseline_path.read_text())
    current = reg.fingerprints(specs, packs, emitter, cpu=baseline["target_cpu"])
    expected = baseline["kernels"]
    if subset:
        expected = {k: v for k, v in expected.items() if k in current}
    diff = diff_fingerprints(expected, current)
    if diff:
        log(
            f"FAIL generated code changed ({len(diff)} distinct change(s); target cpu "
            f"{baseline['target_cpu']}, baseline made with llvmlite "
            f"{baseline['environment']['llvmlite']}):"
        )
        for line in diff:
            log("  " + line)
        log(f"If the change is intended, refresh the baselines: {UPDATE_COMMAND}")
        return False
    log(f"ok     fingerprints: {len(current)} kernels identical to the baseline")
    return True


def check_timings(
    specs, packs, emitter=reg.emit_kernel, baseline_path=TIMINGS, tolerance=None, log=print
) -> bool:
    baseline = json.loads(baseline_path.read_text())
    tol = baseline["tolerance"] if tolerance is None else tolerance
    timed = reg.timing_set(specs)
    missing = [s.name for s in timed if s.name not in baseline["kernels"]]
    if missing:
        log(f"FAIL no timing baseline for {', '.join(missing)}; run {UPDATE_COMMAND}")
        return False
    lib = reg.TimingLibrary(timed, packs, emitter)
    verdicts = reg.check_timings(lib, baseline["kernels"], timed, tol, log=log)
    failed = [v for v in verdicts if v.failed]
    changes = [v.change for v in verdicts]
    log(
        f"timings: {len(verdicts)} kernels, tolerance +{tol:.0%}, change vs baseline "
        f"median {statistics.median(changes):+.0%} (min {min(changes):+.0%}, max "
        f"{max(changes):+.0%}); baseline from {baseline['environment']['created']} on "
        f"{baseline['environment']['host_cpu']}"
    )
    if failed:
        log(
            f"FAIL {len(failed)} kernel(s) slower than baseline by more than {tol:.0%} "
            "in every measurement: " + ", ".join(v.name for v in failed)
        )
        return False
    return True


def update(specs, packs, tolerance: float, runs: int, keep_slower: bool = False) -> None:
    """Write both baselines; each timing baseline is the median of ``runs`` full
    measurements, so one noisy moment does not become the reference. ``keep_slower``:
    per kernel, keep the existing baseline when it is the slower one, so the baseline
    holds the slowest ordinary state of a shared machine seen so far (compute-bound
    kernels move 10-20% between such states; the memory-bound probe does not)."""
    env = _environment()
    fps = reg.fingerprints(specs, packs, cpu=reg.FINGERPRINT_CPU)
    reg.write_json(
        FINGERPRINTS, {"target_cpu": reg.FINGERPRINT_CPU, "environment": env, "kernels": fps}
    )
    print(f"wrote {FINGERPRINTS} ({len(fps)} kernels)")
    timed = reg.timing_set(specs)
    lib = reg.TimingLibrary(timed, packs)
    measured: dict[str, list] = {s.name: [] for s in timed}
    for r in range(runs):
        for spec in timed:
            measured[spec.name].append(lib.measure(spec))
        print(f"  timing run {r + 1}/{runs} done", flush=True)
    kernels = {}
    for name, ts in measured.items():
        ratios = [t.ratio for t in ts]
        mid = sorted(ts, key=lambda t: t.ratio)[len(ts) // 2]
        kernels[name] = {**mid.as_dict(), "run_ratios": [round(x, 4) for x in ratios]}
        print(
            f"  {name}: ratio {statistics.median(ratios):.3f} (runs {min(ratios):.3f}.."
            f"{max(ratios):.3f})"
        )
    old = json.loads(TIMINGS.read_text()) if TIMINGS.is_file() else {}
    if keep_slower:
        for name, entry in (old.get("kernels") or {}).items():
            if name in kernels and entry["ratio"] > kernels[name]["ratio"]:
                print(f"  {name}: keeping the slower baseline {entry['ratio']:.3f}")
                kernels[name] = entry
    reg.write_json(
        TIMINGS,
        {
            "tolerance": tolerance,
            "settings": {**_timing_settings(), "baseline_runs": runs},
            "environment": env,
            "study": old.get("study") or [],  # kept: it documents how the tolerance was chosen
            "kernels": kernels,
        },
    )
    print(f"wrote {TIMINGS} ({len(kernels)} kernels)")


def study(specs, packs, runs: int, tolerance: float | None) -> None:
    """Run the timing check ``runs`` times against the committed baseline (unchanged
    kernels, so every failure is a false alarm) and record how far single measurements
    move and how many kernels would have failed: the evidence for the tolerance."""
    data = json.loads(TIMINGS.read_text())
    tol = data["tolerance"] if tolerance is None else tolerance
    timed = reg.timing_set(specs)
    lib = reg.TimingLibrary(timed, packs)
    first: list[float] = []
    false_failures = 0
    flagged = 0
    for r in range(runs):
        verdicts = reg.check_timings(lib, data["kernels"], timed, tol, log=lambda _: None)
        changes = [v.timing.ratio / v.baseline["ratio"] - 1 for v in verdicts]
        first += changes
        flagged += sum(bool(v.timing.confirmations) for v in verdicts)
        failed = [v.name for v in verdicts if v.failed]
        false_failures += len(failed)
        print(
            f"run {r + 1}/{runs} (load {os.getloadavg()[0]:.1f}): first measurements vs "
            f"baseline median {statistics.median(changes):+.1%}, max {max(changes):+.1%}; "
            f"{sum(c > tol for c in changes)} over +{tol:.0%}, failed after confirmation: "
            f"{', '.join(failed) or 'none'}",
            flush=True,
        )
    first.sort()
    summary = {
        "runs": runs,
        "kernels": len(timed),
        "tolerance": tol,
        "first_measurement_change": {
            "median": round(statistics.median(first), 4),
            "p95": round(first[int(0.95 * (len(first) - 1))], 4),
            "p99": round(first[int(0.99 * (len(first) - 1))], 4),
            "max": round(first[-1], 4),
            "min": round(first[0], 4),
        },
        "first_measurements_over_tolerance": flagged,
        "false_failures_after_confirmation": false_failures,
        "estimator": f"fastest kernel / fastest probe of {reg.SAMPLES} samples, deferred "
        "confirmations",
        "load_average": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(summary))
    studies = data.get("study") or []
    data["study"] = (studies if isinstance(studies, list) else [studies]) + [summary]
    reg.write_json(TIMINGS, data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compare with the baselines")
    mode.add_argument("--update", action="store_true", help="re-measure and write baselines")
    mode.add_argument("--study", type=int, metavar="RUNS", help="repeat timings RUNS times")
    ap.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help=f"timing tolerance (default: the baseline's, {reg.DEFAULT_TOLERANCE})",
    )
    ap.add_argument("--skip-timings", action="store_true", help="fingerprints only")
    ap.add_argument("--runs", type=int, default=5, help="timing runs a baseline is the median of")
    ap.add_argument(
        "--keep-slower",
        action="store_true",
        help="with --update: per kernel, keep the existing baseline if it is slower",
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    specs = reg.kernel_set()
    packs = reg.pack_all(specs)
    if args.update:
        update(specs, packs, args.tolerance or reg.DEFAULT_TOLERANCE, args.runs, args.keep_slower)
        ok = True
    elif args.study:
        study(specs, packs, args.study, args.tolerance)
        ok = True
    else:
        ok = check_fingerprints(specs, packs)
        if not args.skip_timings:
            ok = check_timings(specs, packs, tolerance=args.tolerance) and ok
    print(f"kernel regression {'passed' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
