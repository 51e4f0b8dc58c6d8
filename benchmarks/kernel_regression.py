"""CI regression check of the generated kernels: an A/B against the baseline commit.

    .venv/bin/python benchmarks/kernel_regression.py --check      # what .ci/run runs
    .venv/bin/python benchmarks/kernel_regression.py --update     # after an intended change
    .venv/bin/python benchmarks/kernel_regression.py --study 5    # false alarms in 5 passes

The baseline is a commit, recorded in baselines/kernel_baseline.json. ``--check``
extracts it into a temporary folder and builds the kernel suite there and in the working
tree, each version with its own code in its own process (sparsec/bench/kernel_replay.py),
then compares on this CPU, in this run (sparsec/bench/regression.py):

1. Code: every function the suite emits (SmolLM2-135M's linear kernels in every format
   and sparsity, and every function of a 4-layer SmolLM2-shaped model compiled fp32 and
   int8, dense and bitmask: embedding, norms, RoPE/KV write, attention, SwiGLU,
   quantize, linears, forward body), as assembly for a fixed LLVM cpu (znver4). Any
   difference from the baseline commit fails and is written as a diff to
   out/kernel_regression/code.diff; the fingerprints in baselines/kernel_fingerprints.json
   (instruction counts by class, spills, code bytes) must match as well.
2. Time: each timed item (every bitmask kernel, every dense kernel at 0%, each model's
   decode step on 1 and 2 threads and a 64-token prefill chunk) is measured 15 times per
   side, the sides alternating; ratio = working-tree fastest / baseline fastest. An item
   fails when the ratio is above 1 + tolerance in its measurement and in 3
   re-measurements after the whole pass. Both sides run on the same CPU at the same time,
   so a check made on another CPU than the baseline's is as fair as one made on the same.

After an intended kernel change: commit it, run ``--update`` (records HEAD as the
baseline commit and rewrites the fingerprints), and commit benchmarks/baselines/.

Exit status: 0 when everything matches, 1 on a regression or a code change, 2 on a
usage error; the report names each changed function and slower item.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparsec.bench import regression as reg  # noqa: E402
from sparsec.errors import SparsecError  # noqa: E402

BASELINES = REPO / "benchmarks" / "baselines"
BASELINE = BASELINES / "kernel_baseline.json"
FINGERPRINTS = BASELINES / "kernel_fingerprints.json"
OUT = REPO / "out" / "kernel_regression"
UPDATE_COMMAND = ".venv/bin/python benchmarks/kernel_regression.py --update"
DEFAULT_TOLERANCE = 0.10
# What the baseline commit must contain for --update: the code the suite is built from.
CODE_PATHS = ["sparsec", "pyproject.toml"]


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


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _read_baseline(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SparsecError(
            f"cannot read the kernel baseline {path} ({exc}); record one with {UPDATE_COMMAND}"
        ) from exc
    missing = [k for k in ("commit", "server", "tolerance", "environment") if k not in data]
    if missing:
        raise SparsecError(
            f"the kernel baseline {path} has no {', '.join(missing)}; record it again with "
            f"{UPDATE_COMMAND}"
        )
    return data


def check_fingerprints(current: dict, path: Path = FINGERPRINTS, subset: bool = False, log=print):
    """True when every function's fingerprint equals the committed one. ``subset``: check
    only the functions of ``current`` (a --only run), not that every baseline one exists."""
    from sparsec.bench.fingerprint import diff_fingerprints

    baseline = json.loads(path.read_text())
    expected = baseline["functions"]
    if subset:
        expected = {k: v for k, v in expected.items() if k in current}
    diff = diff_fingerprints(expected, current)
    if diff:
        log(
            f"FAIL   fingerprints: {len(diff)} distinct change(s) against {path.name} "
            f"(cpu {baseline['target_cpu']}, llvmlite {baseline['environment']['llvmlite']}):"
        )
        for line in diff:
            log("         " + line)
        return False
    log(f"ok     fingerprints: {len(current)} functions equal to {path.name}")
    return True


def run_check(args, baseline: dict, log=print) -> bool:
    """The A/B check; True when nothing regressed."""
    commit = reg.resolve_commit(REPO, args.baseline or baseline["commit"])
    tolerance = baseline["tolerance"] if args.tolerance is None else args.tolerance
    from sparsec.codegen.target import host_cpu_model

    log(
        f"kernel check: working tree against baseline commit {commit[:12]} "
        f"(recorded on {baseline['environment']['host_cpu']}); this CPU: {host_cpu_model()}"
    )
    side_args = ["--only", args.only] if args.only else []
    if args.skip_timings:
        side_args.append("--no-timing")
    work_args = ["--emitter", args.emitter] if args.emitter else []
    args.out.mkdir(parents=True, exist_ok=True)
    log("building the suite on both sides (each in its own process)...")
    with reg.sides(REPO, commit, baseline["server"], args.out, side_args, work_args) as (b, w):
        return _compare(args, b, w, tolerance, log)


def _compare(args, base, work, tolerance: float, log) -> bool:
    if not work.functions["fingerprints"]:
        raise SparsecError(f"--only {args.only!r} matches no kernel or model variant of the suite")
    ok = check_fingerprints(
        work.functions["fingerprints"], subset=bool(args.only or args.emitter), log=log
    )
    diff_path = args.out / "code.diff"
    changed = reg.diff_code(base, work, diff_path)
    if changed:
        shown = ", ".join(changed[:12]) + (
            f" and {len(changed) - 12} more" if len(changed) > 12 else ""
        )
        log(
            f"FAIL   code: {len(changed)} of {len(work.functions['fingerprints'])} functions "
            f"differ from the baseline commit: {shown}; diff in {diff_path}"
        )
        ok = False
    else:
        log(
            f"ok     code: {len(work.functions['fingerprints'])} functions identical to the "
            f"baseline commit (assembly in {args.out}/*/code.s)"
        )
    if args.skip_timings:
        return ok
    items, problems = reg.comparable_items(base, work)
    for line in problems:
        log(f"FAIL   {line}")
    if problems:
        log(
            f"       the suite changed: commit it and record the new baseline with {UPDATE_COMMAND}"
        )
        ok = False
    if not items:
        log("timings: no timed item in this selection")
        return ok
    verdicts = reg.check_timings(base, work, items, tolerance, log=log)
    failed = [v for v in verdicts if v.failed]
    s = reg.summarize([v.timing.ratio - 1 for v in verdicts])
    log(
        f"timings: {len(verdicts)} items, tolerance +{tolerance:.0%}, working tree vs baseline "
        f"median {s['median']:+.1%} (min {s['min']:+.1%}, max {s['max']:+.1%})"
    )
    if failed:
        log(
            f"FAIL   {len(failed)} item(s) slower than the baseline commit by more than "
            f"{tolerance:.0%} in every measurement: " + ", ".join(v.timing.name for v in failed)
        )
        ok = False
    return ok


def update(args) -> None:
    """Record HEAD as the baseline commit and write its fingerprints."""
    from sparsec.bench.kernel_suite import FINGERPRINT_CPU, Suite

    dirty = reg.changed_paths(REPO, CODE_PATHS)
    if dirty:
        raise SparsecError(
            "--update records HEAD as the baseline commit, but the working tree differs from "
            f"it in {', '.join(dirty[:5])}{' ...' if len(dirty) > 5 else ''}: commit the "
            "change first"
        )
    commit = reg.git(REPO, "rev-parse", "HEAD")
    suite = Suite(log=print)
    try:
        suite.build(timing=False)
    finally:
        suite.close()
    env = _environment()
    _write_json(
        FINGERPRINTS,
        {
            "target_cpu": FINGERPRINT_CPU,
            "environment": env,
            "functions": dict(sorted(suite.fingerprints.items())),
        },
    )
    print(f"wrote {FINGERPRINTS} ({len(suite.fingerprints)} functions)")
    old = json.loads(BASELINE.read_text()) if BASELINE.is_file() else {}
    tolerance = args.tolerance or old.get("tolerance") or DEFAULT_TOLERANCE
    _write_json(
        BASELINE,
        {
            "commit": commit,
            "server": reg.SERVER,
            "tolerance": tolerance,
            "settings": {
                "samples_per_side": reg.SAMPLES,
                "reps_per_sample_below_10ms": reg.REPS,
                "confirmations": reg.CONFIRMATIONS,
                "estimator": "working-tree fastest / baseline fastest of alternating samples",
            },
            "environment": env,
            "study": old.get("study") or [],  # kept: the evidence for the tolerance
        },
    )
    print(
        f"recorded baseline commit {commit[:12]} in {BASELINE}; commit benchmarks/baselines/ "
        "so that CI checks against it"
    )


def study(args, baseline: dict) -> None:
    """Time unchanged kernels ``args.study`` times (every failure is a false alarm) and
    record how far single measurements move: the evidence for the tolerance."""
    commit = reg.resolve_commit(REPO, baseline["commit"])
    tolerance = baseline["tolerance"] if args.tolerance is None else args.tolerance
    side_args = ["--only", args.only] if args.only else []
    by_item: dict[str, list[float]] = {}  # first-measurement changes per item
    flagged = false_failures = 0
    with reg.sides(REPO, commit, baseline["server"], args.out, side_args) as (base, work):
        changed = reg.diff_code(base, work, args.out / "code.diff")
        if changed:
            raise SparsecError(
                f"--study needs the baseline's kernels unchanged; {len(changed)} functions "
                f"differ (see {args.out / 'code.diff'})"
            )
        items, _ = reg.comparable_items(base, work)
        if not items:
            raise SparsecError("--study: no timed item in this selection")
        for r in range(args.study):
            verdicts = reg.check_timings(base, work, items, tolerance, log=lambda _: None)
            changes = [v.timing.ratio - 1 for v in verdicts]
            for v, c in zip(verdicts, changes, strict=True):
                by_item.setdefault(v.timing.name, []).append(c)
            flagged += sum(bool(v.timing.confirmations) for v in verdicts)
            failed = [v.timing.name for v in verdicts if v.failed]
            false_failures += len(failed)
            s = reg.summarize(changes)
            print(
                f"pass {r + 1}/{args.study} (load {os.getloadavg()[0]:.1f}): median "
                f"{s['median']:+.1%}, max {s['max']:+.1%}, min {s['min']:+.1%}; "
                f"{sum(c > tolerance for c in changes)} over +{tolerance:.0%}; failed after "
                f"re-measuring: {', '.join(failed) or 'none'}",
                flush=True,
            )
    from sparsec.codegen.target import host_cpu_model

    summary = {
        "passes": args.study,
        "items": len(items),
        "tolerance": tolerance,
        "first_measurement_change": reg.summarize([c for cs in by_item.values() for c in cs]),
        "first_measurements_over_tolerance": flagged,
        "largest_first_measurements": {
            name: round(max(changes), 4)
            for name, changes in sorted(by_item.items(), key=lambda kv: -max(kv[1]))[:5]
        },
        "false_failures_after_confirmation": false_failures,
        "host_cpu": host_cpu_model(),
        "load_average": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.note:
        summary["note"] = args.note
    print(json.dumps(summary))
    data = json.loads(BASELINE.read_text())
    data["study"] = (data.get("study") or []) + [summary]
    _write_json(BASELINE, data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="See the module docstring (benchmarks/kernel_regression.py) and the README.",
    )
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="A/B against the baseline commit")
    mode.add_argument(
        "--update",
        action="store_true",
        help="record HEAD (committed, clean) as the baseline commit and write its fingerprints",
    )
    mode.add_argument(
        "--study", type=int, metavar="PASSES", help="time unchanged kernels PASSES times"
    )
    ap.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help=f"allowed slowdown, 0.10 = 10%% (default: the baseline file's, else "
        f"{DEFAULT_TOLERANCE})",
    )
    ap.add_argument("--skip-timings", action="store_true", help="code and fingerprints only")
    ap.add_argument(
        "--only",
        metavar="REGEX",
        default=None,
        help="only the linear kernels / model variants whose name matches (default: all)",
    )
    ap.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="compare against this commit instead of the recorded one (e.g. main)",
    )
    ap.add_argument(
        "--emitter",
        metavar="FILE:FUNC",
        default=None,
        help="emit the working tree's linear kernels with FUNC(module, name, packed, target) from "
        "FILE.py: try a kernel variant against the baseline (default: sparsec's)",
    )
    ap.add_argument(
        "--out", type=Path, default=OUT, help=f"where assembly, diff and logs go (default {OUT})"
    )
    ap.add_argument("--note", default=None, help="with --study: a note stored with the result")
    args = ap.parse_args(argv)
    if args.tolerance is not None and not 0 < args.tolerance < 10:
        ap.error(f"--tolerance {args.tolerance} is outside (0, 10)")
    if args.study is not None and args.study < 1:
        ap.error("--study needs at least 1 pass")
    if args.emitter is not None:
        path, _, func = args.emitter.rpartition(":")
        if not path or not func or not Path(path).is_file():
            ap.error(f"--emitter {args.emitter!r}: expected an existing FILE.py:FUNCTION")
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as exc:
            ap.error(f"--only {args.only!r} is not a regular expression: {exc}")
    t0 = time.perf_counter()
    try:
        if args.update:
            update(args)
            return 0
        baseline = _read_baseline(BASELINE)
        if args.study:
            study(args, baseline)
            return 0
        ok = run_check(args, baseline)
    except SparsecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"kernel regression {'passed' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
