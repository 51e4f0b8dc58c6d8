"""The A/B kernel regression check: the working tree's kernels against the baseline commit's.

``benchmarks/kernel_regression.py`` is the command; this module holds its parts. The
baseline is a commit (recorded by ``--update`` in ``benchmarks/baselines/``), not a
table of times: the check extracts that commit into a temporary folder and starts one
``kernel_replay`` process there and one in the working tree, so each version builds the
suite (``kernel_suite``) with its own code, in a process of its own. Then, on this CPU,
in this run:

- Code: every function's assembly for the fixed LLVM cpu, working tree against
  baseline commit; any difference is shown as a diff (a pure refactor shows none).
  The committed fingerprints (instruction counts by class, spills, code bytes) are the
  readable summary in the repository and are checked as well.
- Time: each timed item is run ``SAMPLES`` times on each side, the sides alternating
  (ABBA...), and the ratio is working-tree fastest / baseline fastest. Both sides see the
  same CPU, frequency and neighbours, so the ratio holds on any machine; the CPU is not
  part of the verdict. An item fails when its ratio is above 1 + tolerance in its
  measurement and in ``CONFIRMATIONS`` re-measurements taken after the whole pass.
"""

from __future__ import annotations

import difflib
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sparsec.errors import SparsecError

SAMPLES = 15  # alternating measurements per side and item
CONFIRMATIONS = 3  # re-measurements of an item over tolerance before it fails
FAST_ITEM_SECONDS = 0.01  # items faster than this run REPS times per measurement
REPS = 3
BUILD_TIMEOUT = 20 * 60  # seconds for a side to build its suite
REQUEST_TIMEOUT = 5 * 60
SERVER = ["-m", "sparsec.bench.kernel_replay"]  # how this version starts its side

Log = Callable[[str], None]


# --------------------------------------------------------------------------- git


def git(repo: Path, *args: str) -> str:
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise SparsecError(f"the kernel check needs git: {exc}") from exc
    if proc.returncode != 0:
        raise SparsecError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.rstrip("\n")


def resolve_commit(repo: Path, rev: str) -> str:
    """The full id of commit ``rev``, or a one-line error saying how to get it."""
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except SparsecError:
        raise SparsecError(
            f"the baseline commit {rev} is not in the repository at {repo} (a shallow or "
            f"partial clone?): fetch it (git fetch --unshallow, or git fetch origin {rev}) "
            "or record a new baseline with --update"
        ) from None


def extract(repo: Path, commit: str, dest: Path) -> Path:
    """The files of ``commit`` written to ``dest`` (git archive: the repository itself is
    left untouched, also when the check is interrupted)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(
        ["git", "-C", str(repo), "archive", "--format=tar", commit], stdout=subprocess.PIPE
    )
    untar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=False)
    archive.stdout.close()
    if archive.wait() != 0 or untar.returncode != 0:
        raise SparsecError(f"could not extract commit {commit} into {dest}")
    return dest


def changed_paths(repo: Path, paths: list[str]) -> list[str]:
    """Files under ``paths`` that differ from HEAD (staged, unstaged or untracked)."""
    out = git(repo, "status", "--porcelain", "--untracked-files=all", "--", *paths)
    return [line[3:] for line in out.splitlines() if line.strip()]


# --------------------------------------------------------------------------- sides


class Side:
    """One code version's ``kernel_replay`` process (see that module for the protocol)."""

    def __init__(
        self,
        label: str,
        root: Path,
        out: Path,
        server: list[str],
        extra_args: list[str] = (),
    ):
        self.label = label
        self.root = root
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("functions.json", "code.s"):
            (out / stale).unlink(missing_ok=True)
        self.log_path = out / "build.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
        env.pop("SPARSEC_TARGET_CPU", None)  # older sides read it; each builds for this host
        cmd = [sys.executable, *server, "--out", str(out), *extra_args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.functions: dict = {}

    def _fail(self, what: str) -> SparsecError:
        self.close()
        tail = self.log_path.read_text().strip().splitlines()[-15:]
        log = "\n".join("    " + line for line in tail)
        return SparsecError(f"the {self.label} side {what}; last lines of {self.log_path}:\n{log}")

    def receive(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise self._fail(f"did not answer within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise self._fail(f"exited (status {self.proc.wait()})")
        try:
            msg = json.loads(line)
        except ValueError:
            raise self._fail(f"answered {line[:80]!r}, not a protocol line") from None
        if "error" in msg:
            raise self._fail(f"failed: {msg['error']}")
        return msg

    def wait_ready(self) -> None:
        from sparsec.bench.kernel_replay import PROTOCOL

        msg = self.receive(BUILD_TIMEOUT)
        if msg.get("ready") != PROTOCOL:
            raise self._fail(f"speaks protocol {msg.get('ready')}, this check {PROTOCOL}")
        package = Path(msg.get("package", "")).resolve()
        if not package.is_relative_to(self.root.resolve()):
            # e.g. an installed sparsec shadowing a checkout that has none
            raise self._fail(f"imported sparsec from {package}, not from {self.root}")
        self.functions = json.loads((self.out / "functions.json").read_text())

    def send(self, request: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._fail("closed its input") from None

    def request(self, request: dict) -> dict:
        self.send(request)
        return self.receive(REQUEST_TIMEOUT)

    def time(self, item: str, reps: int) -> float:
        return float(self.request({"op": "time", "item": item, "reps": reps})["seconds"])

    def close(self) -> None:
        """Ask a ready side to quit (it cleans up its temporary models); stop one that
        is still building, since it reads no requests until it is ready."""
        if self.proc.poll() is None:
            try:
                if self.functions:
                    self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    self.proc.stdin.close()
                    self.proc.wait(timeout=30)
                else:
                    self.proc.terminate()
                    self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_pair(
    repo: Path,
    baseline_root: Path,
    baseline_server: list[str],
    out: Path,
    args: list[str],
    work_args: list[str] = (),
) -> tuple[Side, Side]:
    """Both sides, building in parallel; returns (baseline, working tree) once ready."""
    if baseline_server[:1] == ["-m"]:
        module = baseline_root / (baseline_server[1].replace(".", "/") + ".py")
        if not module.is_file():
            raise SparsecError(
                f"the baseline commit has no {module.relative_to(baseline_root)}: it predates "
                "the A/B kernel check; compare against a later commit"
            )
    base = Side("baseline", baseline_root, out / "baseline", baseline_server, args)
    try:
        work = Side("working-tree", repo, out / "working-tree", SERVER, [*args, *work_args])
    except BaseException:
        base.close()
        raise
    try:
        base.wait_ready()
        work.wait_ready()
    except BaseException:
        base.close()
        work.close()
        raise
    return base, work


# --------------------------------------------------------------------------- code


def diff_code(base: Side, work: Side, out: Path) -> list[str]:
    """Names of the functions whose assembly differs (or exists on one side only); the
    unified diff goes to ``out``."""
    from sparsec.bench.kernel_replay import read_code

    a, b = read_code(base.out / "code.s"), read_code(work.out / "code.s")
    changed = []
    chunks = []
    for name in sorted(set(a) | set(b)):
        if a.get(name) == b.get(name):
            continue
        changed.append(name)
        chunks += difflib.unified_diff(
            a.get(name, "").splitlines(keepends=True),
            b.get(name, "").splitlines(keepends=True),
            f"baseline/{name}",
            f"working-tree/{name}",
            n=2,
        )
    out.write_text("".join(chunks))
    return changed


# --------------------------------------------------------------------------- timing


@dataclass
class ABTiming:
    """One item measured on both sides: per sample, the fastest run's seconds per call."""

    name: str
    nbytes: int
    base: list[float] = field(default_factory=list)
    work: list[float] = field(default_factory=list)
    confirmations: list[float] = field(default_factory=list)  # ratios of re-measurements

    @property
    def ratio(self) -> float:
        """Working tree over baseline, each side's fastest sample (noise only adds time)."""
        return min(self.work) / min(self.base)

    @property
    def sample_ratios(self) -> list[float]:
        return [w / b for w, b in zip(self.work, self.base, strict=True)]


def measure(base: Side, work: Side, name: str, nbytes: int, samples: int = SAMPLES) -> ABTiming:
    """Warm both sides up, then ``samples`` alternating measurements (A B, B A, ...)."""
    for side in (base, work):
        side.send({"op": "prepare", "item": name})
    for side in (base, work):
        side.receive(REQUEST_TIMEOUT)
    first = max(side.time(name, 1) for side in (base, work))
    reps = REPS if first < FAST_ITEM_SECONDS else 1
    t = ABTiming(name, nbytes)
    for i in range(samples):
        for side in (base, work) if i % 2 == 0 else (work, base):
            (t.base if side is base else t.work).append(side.time(name, reps))
    return t


@dataclass
class Verdict:
    timing: ABTiming
    tolerance: float

    @property
    def change(self) -> float:
        """Best measured ratio minus 1 (+0.30 = the working tree is 30% slower)."""
        return min([self.timing.ratio, *self.timing.confirmations]) - 1

    @property
    def failed(self) -> bool:
        return self.change > self.tolerance

    def line(self) -> str:
        t = self.timing
        r = t.sample_ratios
        status = "FAIL" if self.failed else ("faster" if self.change < -self.tolerance else "ok")
        confirm = (
            " (re-measured " + ", ".join(f"{c - 1:+.0%}" for c in t.confirmations) + ")"
            if t.confirmations
            else ""
        )
        work_s = min(t.work)
        speed = f", {t.nbytes / work_s / 1e9:.1f} GB/s" if t.nbytes else ""
        return (
            f"{status:6} {t.name}: {_us(min(t.base))} -> {_us(work_s)} "
            f"{t.ratio - 1:+.1%}{confirm}; per-sample ratio {min(r):.3f}..{max(r):.3f} "
            f"over {len(r)} samples{speed}"
        )


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-2 else f"{seconds * 1e3:.2f} ms"


def check_timings(
    base: Side,
    work: Side,
    items: dict[str, int],
    tolerance: float,
    confirmations: int = CONFIRMATIONS,
    log: Log = print,
) -> list[Verdict]:
    """Measure every item (name -> bytes per call), then re-measure the ones over
    tolerance, up to ``confirmations`` more passes. Re-measuring after the whole pass,
    not right away, puts seconds between the measurements, so one burst of load on the
    machine cannot fail an item on its own."""
    verdicts = [Verdict(measure(base, work, n, b), tolerance) for n, b in items.items()]
    for _ in range(confirmations):
        for v in [v for v in verdicts if v.failed]:
            again = measure(base, work, v.timing.name, v.timing.nbytes)
            v.timing.confirmations.append(again.ratio)
    for v in verdicts:
        log(v.line())
    return verdicts


def comparable_items(base: Side, work: Side) -> tuple[dict[str, int], list[str]]:
    """Items both sides time with the same definition (name -> bytes), and a line for
    each one that cannot be compared."""
    a, b = base.functions["items"], work.functions["items"]
    same, problems = {}, []
    for name in sorted(set(a) | set(b)):
        if name not in a:
            problems.append(f"{name}: new timed item, not at the baseline commit")
        elif name not in b:
            problems.append(f"{name}: timed at the baseline commit, no longer in the suite")
        elif a[name]["key"] != b[name]["key"]:
            problems.append(f"{name}: measures something else than at the baseline commit")
        else:
            same[name] = b[name]["bytes"]
    return same, problems


def summarize(changes: list[float]) -> dict:
    """Median, p95, p99 and extremes of ratio changes (``ratio - 1``); empty -> {}."""
    if not changes:
        return {}
    c = sorted(changes)
    return {
        "median": round(statistics.median(c), 4),
        "p95": round(c[int(0.95 * (len(c) - 1))], 4),
        "p99": round(c[int(0.99 * (len(c) - 1))], 4),
        "max": round(c[-1], 4),
        "min": round(c[0], 4),
    }


@contextmanager
def sides(
    repo: Path,
    commit: str,
    server: list[str],
    out: Path,
    args: list[str],
    work_args: list[str] = (),
) -> Iterator[tuple[Side, Side]]:
    """(baseline, working tree) sides, ready: ``commit`` extracted into a temporary
    folder, both suites built in parallel; everything stopped and removed on exit."""
    with tempfile.TemporaryDirectory(prefix=f"sparsec-baseline-{commit[:10]}-") as tmp:
        extract(repo, commit, Path(tmp))
        base, work = start_pair(repo, Path(tmp), server, out, args, work_args)
        try:
            yield base, work
        finally:
            base.close()
            work.close()
