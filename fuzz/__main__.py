"""``python -m fuzz``: run the fuzz suite (see the package docstring)."""

from __future__ import annotations

import os

# Before numpy loads: the warm parent must not start BLAS threads (it forks per case).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from fuzz import CLASSES, case_module  # noqa: E402
from fuzz.runner import FAILURES, OUTCOMES, Pool, Result, run_inline  # noqa: E402


def warm_imports(classes) -> None:
    """Import once in the parent what the cases use, so each fork starts warm."""
    import numpy  # noqa: F401
    import tokenizers  # noqa: F401

    import sparsec.codegen.artifact  # noqa: F401
    import sparsec.runtime  # noqa: F401
    import sparsec.runtime.model  # noqa: F401

    if "graph" in classes:
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401
        import onnxruntime  # noqa: F401

        import sparsec.codegen.compile  # noqa: F401
        import sparsec.codegen.emit  # noqa: F401
        import sparsec.codegen.program  # noqa: F401
        import sparsec.codegen.target  # noqa: F401
        import sparsec.passes  # noqa: F401
        import sparsec.passes.functions  # noqa: F401


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="wall-clock budget of the whole run, fixtures included (default 120, or no "
        "limit with --cases)",
    )
    p.add_argument("--classes", default=",".join(CLASSES), help="comma-separated case classes")
    p.add_argument("--cases", type=int, default=None, help="at most N cases per class")
    p.add_argument("--jobs", type=int, default=None, help="cases at once (default: CPUs)")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--cache", default=None, help="fixture cache folder (default build/fuzz-cache)")
    p.add_argument("--replay", default=None, metavar="CLASS:SEED:INDEX", help="run one case")
    p.add_argument(
        "--inline", action="store_true", help="with --replay: run in this process (tracebacks)"
    )
    p.add_argument("--quiet", action="store_true", help="no per-failure lines while running")
    p.add_argument(
        "--all-results", action="store_true", help="put every case in the report, not only failures"
    )
    return p.parse_args(argv)


def setup(cache_dir, quiet: bool):
    from fuzz.build import ensure_cache
    from fuzz.common import Context, load_refs

    cache = ensure_cache(cache_dir, quiet=quiet)
    tmp = Path(tempfile.mkdtemp(prefix="sparsec-fuzz-"))
    ctx = Context(cache=cache, tmp=tmp)
    load_refs(ctx)
    return ctx


class Stats:
    def __init__(self, classes):
        self.results: list[Result] = []
        self.by_class = {c: {o: 0 for o in OUTCOMES} for c in classes}
        self.seconds = {c: 0.0 for c in classes}
        self.kinds: dict = {c: {} for c in classes}

    def add(self, res: Result) -> None:
        self.results.append(res)
        self.by_class[res.cls][res.outcome] = self.by_class[res.cls].get(res.outcome, 0) + 1
        self.seconds[res.cls] += res.seconds
        kinds = self.kinds[res.cls].setdefault(res.kind, {})
        kinds[res.outcome] = kinds.get(res.outcome, 0) + 1

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.outcome in FAILURES]

    def summary(self, wall: float, seed: int) -> str:
        lines = [f"fuzz seed {seed}: {len(self.results)} cases in {wall:.0f} s"]
        head = f"{'class':<10}{'cases':>7}" + "".join(f"{o:>10}" for o in OUTCOMES)
        lines += [head + f"{'case s':>9}"]
        for cls, counts in self.by_class.items():
            n = sum(counts.values())
            mean = self.seconds[cls] / n if n else 0.0
            lines.append(
                f"{cls:<10}{n:>7}"
                + "".join(f"{counts.get(o, 0):>10}" for o in OUTCOMES)
                + f"{mean:>9.2f}"
            )
        failures = self.failures()
        lines.append(f"failures: {len(failures)}")
        shown: dict = {}
        for r in failures:
            key = (r.cls, r.kind, r.outcome)
            shown[key] = shown.get(key, 0) + 1
            if shown[key] <= 2:
                detail = " ".join(r.detail.split())[:300]
                lines.append(f"  {r.case_id} [{r.kind}] {r.outcome}: {r.desc[:200]}")
                lines.append(f"      -> {detail}")
        kinds = sorted({(c, k, o) for (c, k, o) in shown})
        if kinds:
            lines.append("failing kinds (class/kind/outcome: count):")
            lines += [f"  {c}/{k}/{o}: {shown[(c, k, o)]}" for c, k, o in kinds]
        return "\n".join(lines)

    def to_json(self, wall: float, seed: int, args) -> dict:
        return {
            "seed": seed,
            "wall_seconds": round(wall, 1),
            "budget_seconds": args.budget_seconds,
            "cases": len(self.results),
            "classes": {
                c: {
                    "counts": self.by_class[c],
                    "case_seconds": round(self.seconds[c], 1),
                    "kinds": self.kinds[c],
                }
                for c in self.by_class
            },
            "failures": [r.to_json() for r in self.failures()],
            **({"results": [r.to_json() for r in self.results]} if args.all_results else {}),
        }


def run_suite(args) -> int:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        print(f"unknown class(es) {', '.join(unknown)}; choose from {', '.join(CLASSES)}")
        return 2
    budget = args.budget_seconds
    if budget is None:
        budget = float("inf") if args.cases else 120.0
    start = time.monotonic()
    deadline = start + budget
    warm_imports(classes)
    ctx = setup(args.cache, args.quiet)
    modules = {c: case_module(c) for c in classes}
    stats = Stats(classes)
    charged = {c: 0.0 for c in classes}
    estimate = {c: modules[c].ESTIMATE for c in classes}
    in_flight: dict[str, float] = {}
    next_index = {c: 0 for c in classes}

    def on_done(res: Result) -> None:
        est = in_flight.pop(res.case_id, 0.0)
        charged[res.cls] += res.seconds - est
        n = sum(stats.by_class[res.cls].values()) + 1
        estimate[res.cls] += (res.seconds - estimate[res.cls]) / min(n, 20)
        stats.add(res)
        if res.outcome in FAILURES and not args.quiet:
            detail = " ".join(res.detail.split())[:200]
            print(f"FAIL {res.case_id} [{res.kind}] {res.outcome}: {detail}", flush=True)

    jobs = args.jobs or len(os.sched_getaffinity(0))
    pool = Pool(jobs, str(ctx.tmp / "cases"), on_done)
    last_progress = start
    try:
        while True:
            now = time.monotonic()
            open_classes = [
                c
                for c in classes
                if (args.cases is None or next_index[c] < args.cases)
                and (now < deadline or next_index[c] == 0)
            ]
            if not open_classes:
                break
            cls = min(open_classes, key=lambda c: (charged[c] / modules[c].SHARE, c))
            index = next_index[cls]
            next_index[cls] += 1
            res = Result(cls, args.seed, index)
            in_flight[res.case_id] = estimate[cls]
            charged[cls] += estimate[cls]
            pool.submit(modules[cls].run, ctx, res, modules[cls].TIMEOUT)
            if not args.quiet and now - last_progress > 30:
                last_progress = now
                done = len(stats.results)
                print(f"fuzz: {done} cases done, {now - start:.0f} s", file=sys.stderr, flush=True)
        pool.drain()
    except KeyboardInterrupt:
        for run in list(pool.running.values()):
            try:
                os.killpg(run.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pool.drain()
        print("fuzz: interrupted; partial report", file=sys.stderr)
    finally:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
    wall = time.monotonic() - start
    print(stats.summary(wall, args.seed), flush=True)
    if args.report:
        Path(args.report).write_text(json.dumps(stats.to_json(wall, args.seed, args), indent=1))
    return 1 if stats.failures() else 0


def replay(args) -> int:
    try:
        cls, seed, index = args.replay.split(":")
        seed, index = int(seed), int(index)
    except ValueError:
        print("--replay takes CLASS:SEED:INDEX, e.g. artifact:0:17")
        return 2
    if cls not in CLASSES:
        print(f"unknown class {cls}; choose from {', '.join(CLASSES)}")
        return 2
    warm_imports([cls])
    ctx = setup(args.cache, args.quiet)
    module = case_module(cls)
    res = Result(cls, seed, index)
    try:
        if args.inline:
            run_inline(module.run, ctx, res, str(ctx.tmp / "cases"))
        else:
            done: list[Result] = []
            pool = Pool(1, str(ctx.tmp / "cases"), done.append)
            pool.submit(module.run, ctx, res, module.TIMEOUT)
            pool.drain()
    finally:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
    print(json.dumps(res.to_json(), indent=1))
    return 1 if res.outcome in FAILURES else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replay:
        return replay(args)
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
