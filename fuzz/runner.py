"""Isolation and classification: every case runs in a forked child of a warm parent.

The parent imports numpy and sparsec once and never starts a thread of its own (no
model is loaded, no onnxruntime session is made here), so ``os.fork()`` is safe and
costs milliseconds. A child gets its case as ``(class, seed, index)``, builds it from a
``random.Random`` seeded by that string, and reports on a pipe, one JSON line at a
time: first what it is about to do (``kind``, ``desc``), then the outcome. The parent
classifies what it sees:

- the child's verdict: ``ok``, ``error`` (a clean ``SparsecError``: one line, not
  empty), ``traceback`` (any other exception escaped the product, or a multi-line or
  empty message), ``wrong`` (a result differs from the reference), ``overwrote`` (an
  input or a previous output changed);
- a child killed by a signal: ``crash`` (the signal is recorded);
- a child that does not answer within the class's timeout: ``hang`` (its process group
  is killed with SIGKILL, so subprocesses it started go too);
- a child that exits without a verdict: ``crash``.

Cases that start real commands (the CLI and sparsify classes) decide their verdict
from the subprocess's exit code, stderr and files, inside the child.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

OK = "ok"
ERROR = "error"  # a clean, one-line SparsecError (or CLI exit 1/2 with one error line)
CRASH = "crash"
HANG = "hang"
TRACEBACK = "traceback"
WRONG = "wrong"
OVERWROTE = "overwrote"
HARNESS = "harness"  # the case could not be built: a bug of the fuzz suite, not sparsec
OUTCOMES = (OK, ERROR, CRASH, HANG, TRACEBACK, WRONG, OVERWROTE, HARNESS)
FAILURES = frozenset({CRASH, HANG, TRACEBACK, WRONG, OVERWROTE, HARNESS})

DETAIL_CHARS = 1500
CHILD_MEMORY = 8 << 30  # address-space limit of a case (a runaway allocation fails there)


class Finding(Exception):  # noqa: N818 (a verdict, not an error of the harness)
    """Raised inside a case to give its verdict (``wrong``, ``overwrote``, ``crash``...)."""

    def __init__(self, outcome: str, detail: str):
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


class Skip(Exception):  # noqa: N818
    """The case cannot be built here (a missing tool); counted as ok with a note."""


def rng_for(cls: str, seed: int, index: int) -> random.Random:
    """The case's own generator: string seeds are hashed with SHA-512, stable everywhere."""
    return random.Random(f"{cls}:{seed}:{index}")


def clean_message(exc: BaseException) -> tuple[str, str]:
    """(outcome, detail) for an exception that escaped product code."""
    from sparsec.errors import SparsecError

    if isinstance(exc, Finding):
        return exc.outcome, exc.detail
    if isinstance(exc, SparsecError):
        msg = str(exc)
        if not msg.strip():
            return TRACEBACK, f"SparsecError with an empty message ({type(exc).__name__})"
        if "\n" in msg or "\r" in msg:
            return TRACEBACK, f"multi-line SparsecError: {msg[:DETAIL_CHARS]!r}"
        return ERROR, msg
    return TRACEBACK, short_traceback(exc)


def short_traceback(exc: BaseException) -> str:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(lines)
    if len(text) > DETAIL_CHARS:
        text = "..." + text[-DETAIL_CHARS:]
    return text


def expect_clean(fn, *args, **kwargs):
    """Call product code; a clean SparsecError becomes ``Finding(ERROR)``, anything
    else that escapes a ``Finding(TRACEBACK)``; returns the result otherwise."""
    from sparsec.errors import SparsecError

    try:
        return fn(*args, **kwargs)
    except SparsecError as exc:
        outcome, detail = clean_message(exc)
        raise Finding(outcome, detail) from exc


@dataclass
class Result:
    cls: str
    seed: int
    index: int
    kind: str = "?"
    desc: str = ""
    outcome: str = CRASH
    detail: str = ""
    seconds: float = 0.0
    stderr_tail: str = ""

    @property
    def case_id(self) -> str:
        return f"{self.cls}:{self.seed}:{self.index}"

    def to_json(self) -> dict:
        return {
            "case": self.case_id,
            "kind": self.kind,
            "desc": self.desc,
            "outcome": self.outcome,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
            "stderr_tail": self.stderr_tail,
        }


class Reporter:
    """What a case says about itself, written as JSON lines on the result pipe."""

    def __init__(self, fd: int):
        self.fd = fd
        self.described = False

    def describe(self, kind: str, desc: str) -> None:
        self.described = True
        self._send({"kind": kind, "desc": desc[:DETAIL_CHARS]})

    def _send(self, obj: dict) -> None:
        data = (json.dumps(obj, default=repr) + "\n").encode("utf-8", "backslashreplace")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]


@dataclass
class _Running:
    result: Result
    pid: int
    fd: int
    deadline: float
    start: float
    workdir: str
    buffer: bytes = b""
    verdict: dict | None = None
    extra: dict = field(default_factory=dict)


def _child(case_fn, ctx, result: Result, workdir: str, write_fd: int) -> None:
    """The forked child: run the case, send the verdict, leave without cleanup."""
    code = 0
    try:
        os.setpgrp()  # the parent kills the whole group on a hang
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
        except (ImportError, ValueError, OSError):
            pass
        log = os.open(os.path.join(workdir, "child.log"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        reporter = Reporter(write_fd)
        rng = rng_for(result.cls, result.seed, result.index)
        try:
            outcome, detail = case_fn(rng, ctx, workdir, reporter)
        except BaseException as exc:  # noqa: BLE001 - the harness classifies everything
            if reporter.described or isinstance(exc, Finding):
                outcome, detail = clean_message(exc)
            else:  # failed while building the case, before any product call was made
                outcome, detail = HARNESS, short_traceback(exc)
        reporter._send({"outcome": outcome, "detail": str(detail)[:DETAIL_CHARS]})
    except BaseException:  # noqa: BLE001 - never return into the parent's code
        code = 3
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
        os._exit(code)


def _tail(path: str, chars: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Pool:
    """Up to ``jobs`` forked cases at once; ``submit`` blocks while the pool is full."""

    def __init__(self, jobs: int, tmp_root: str, on_done):
        self.jobs = max(1, jobs)
        self.tmp_root = tmp_root
        self.on_done = on_done
        self.running: dict[int, _Running] = {}

    def submit(self, case_fn, ctx, result: Result, timeout: float) -> None:
        while len(self.running) >= self.jobs:
            self._poll()
        workdir = os.path.join(self.tmp_root, f"{result.cls}-{result.index}")
        shutil.rmtree(workdir, ignore_errors=True)
        os.makedirs(workdir)
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(case_fn, ctx, result, workdir, write_fd)
        os.close(write_fd)
        now = time.monotonic()
        self.running[read_fd] = _Running(result, pid, read_fd, now + timeout, now, workdir)

    def drain(self) -> None:
        while self.running:
            self._poll()

    def _poll(self) -> None:
        now = time.monotonic()
        wait = max(0.0, min(r.deadline for r in self.running.values()) - now)
        ready, _, _ = select.select(list(self.running), [], [], min(wait, 0.5))
        for fd in ready:
            run = self.running[fd]
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            if chunk:
                run.buffer += chunk
                self._parse(run)
            else:
                self._finish(run, timed_out=False)
        now = time.monotonic()
        for run in [r for r in self.running.values() if r.deadline <= now]:
            self._finish(run, timed_out=True)

    @staticmethod
    def _parse(run: _Running) -> None:
        *lines, run.buffer = run.buffer.split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "kind" in msg:
                run.result.kind = msg["kind"]
                run.result.desc = msg.get("desc", "")
            if "outcome" in msg:
                run.verdict = msg

    def _finish(self, run: _Running, timed_out: bool) -> None:
        res = run.result
        if timed_out:
            try:
                os.killpg(run.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.kill(run.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(run.pid, 0)
        # Whatever the child's own subprocesses left running goes with its group.
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            rest = os.read(run.fd, 1 << 20)
            while rest:
                run.buffer += rest
                rest = os.read(run.fd, 1 << 20)
        except OSError:
            pass
        run.buffer += b"\n"
        self._parse(run)
        os.close(run.fd)
        del self.running[run.fd]
        res.seconds = time.monotonic() - run.start
        if timed_out and run.verdict is None:
            res.outcome, res.detail = HANG, f"no answer within {run.deadline - run.start:.0f} s"
        elif os.WIFSIGNALED(status) and run.verdict is None:
            sig = os.WTERMSIG(status)
            res.outcome, res.detail = CRASH, f"killed by {signal.Signals(sig).name}"
        elif run.verdict is None:
            res.outcome = CRASH
            res.detail = f"exited with {os.waitstatus_to_exitcode(status)} and no verdict"
        else:
            res.outcome = run.verdict["outcome"]
            res.detail = run.verdict.get("detail", "")
        if res.outcome in FAILURES or res.outcome not in OUTCOMES:
            res.stderr_tail = _tail(os.path.join(run.workdir, "child.log"))
        shutil.rmtree(run.workdir, ignore_errors=True)
        self.on_done(res)


def run_inline(case_fn, ctx, result: Result, tmp_root: str) -> Result:
    """Run one case in this process (``--replay --inline``): exceptions show in full."""

    class _Printer:
        described = False

        def describe(self, kind, desc):
            result.kind, result.desc = kind, desc
            print(f"{result.case_id} [{kind}] {desc}", flush=True)

    workdir = os.path.join(tmp_root, f"{result.cls}-{result.index}")
    os.makedirs(workdir, exist_ok=True)
    start = time.monotonic()
    rng = rng_for(result.cls, result.seed, result.index)
    try:
        result.outcome, result.detail = case_fn(rng, ctx, workdir, _Printer())
    except Finding as exc:
        result.outcome, result.detail = exc.outcome, exc.detail
    result.seconds = time.monotonic() - start
    return result
