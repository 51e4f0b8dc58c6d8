"""Running a real ``sparsec`` process and judging how it ended."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fuzz.runner import CRASH, ERROR, HANG, OK, TRACEBACK, WRONG, Finding

# stderr lines that are not errors: stage progress, library log and warning lines.
_BENIGN = re.compile(
    r"(.* \.\.\.$)|(.*: (done in|failed after) [0-9.]+ s$)|(^[WI]\d{4} )|(.*[Ww]arning)"
    r"|(^\s*warnings\.warn)|(^\s*$)"
)
INTERRUPTED = {130, 143, -signal.SIGINT, -signal.SIGTERM}


@dataclass
class Ran:
    argv: list
    returncode: int | None
    stdout: bytes
    stderr: str
    seconds: float
    signalled: int | None = None  # the signal the case sent
    delay: float | None = None


def run(
    argv, cwd, timeout: float, signal_after: tuple[float, int] | None = None, stdin=None
) -> Ran:
    """Run ``argv``; with ``signal_after=(delay, sig)`` send ``sig`` after ``delay`` s.
    A process still running at ``timeout`` is killed and reported as a hang."""
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL if stdin is None else stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    sig = None
    try:
        if signal_after is not None:
            delay, sig = signal_after
            try:
                proc.wait(delay)
                sig = None  # it ended before the signal was due
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise Finding(
            HANG,
            f"{_show(argv)} still running after {timeout:.0f} s"
            + (f" (signal {sig} was sent)" if sig else "")
            + f"; stderr: {_tail(err.decode(errors='replace'))}",
        ) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return Ran(
        argv,
        proc.returncode,
        out,
        err.decode("utf-8", "replace"),
        time.monotonic() - start,
        sig,
        signal_after[0] if signal_after else None,
    )


def _show(argv) -> str:
    text = " ".join(str(a) if not isinstance(a, bytes) else repr(a) for a in argv[1:])
    return "sparsec " + (text if len(text) < 300 else text[:300] + "...")


def _tail(text: str, n: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else "..." + text[-n:]


def _interpreter_startup(err: str) -> bool:
    """A KeyboardInterrupt traceback with no frame in sparsec's own files (nor the
    console script's): it hit the interpreter's startup."""
    lines = err.strip().splitlines()
    frames = [line for line in lines if line.lstrip().startswith("File ")]
    ours = [f for f in frames if "/sparsec/" in f or "bin/sparsec" in f]
    return bool(lines) and lines[-1].strip() == "KeyboardInterrupt" and not ours


def judge(ran: Ran, allow_pipe: bool = False) -> tuple[str, str]:
    """(outcome, detail) of a finished process by the CLI's rules."""
    rc, err = ran.returncode, ran.stderr
    where = f"{_show(ran.argv)} -> exit {rc} after {ran.seconds:.1f} s"
    if ran.signalled:
        where += f" (signal {ran.signalled} at {ran.delay:.2f} s)"
    if "Traceback (most recent call last)" in err:
        if ran.signalled and _interpreter_startup(err):
            # The signal came while Python itself was starting (site, .pth imports),
            # before any sparsec code ran: no program can handle it there.
            return OK, f"{where}: interrupted during interpreter startup"
        return TRACEBACK, f"{where}: raw traceback: {_tail(err, 700)}"
    if rc == 0:
        return OK, where
    if ran.signalled and rc in INTERRUPTED:
        return OK, f"{where}: interrupted"
    if allow_pipe and rc == 141:
        return OK, f"{where}: broken pipe"
    if rc in (1, 2):
        lines = [line for line in err.splitlines() if not _BENIGN.match(line)]
        errors = [line for line in lines if ": error: " in line]
        if rc == 2 and "usage:" in err and errors:
            return ERROR, errors[-1][:500]
        if len(lines) == 1 and lines[0].startswith("sparsec") and errors:
            return ERROR, lines[0][:500]
        return TRACEBACK, f"{where}: not a one-line error: {_tail(err, 700)}"
    if rc is not None and rc < 0:
        return CRASH, f"{where}: killed by {signal.Signals(-rc).name}: {_tail(err)}"
    return CRASH, f"{where}: unexpected exit code: {_tail(err)}"


def temp_leftovers(folder: Path, before: set[str]) -> list[str]:
    """Files in ``folder`` that look like a writer's temporary files and were not there."""
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name not in before and (p.name.endswith(".tmp") or ".tmp" in p.name)
    )


def check_no_leftovers(folder: Path, before: set[str], what: str) -> None:
    left = temp_leftovers(folder, before)
    if left:
        raise Finding(WRONG, f"{what} left temporary files beside the output: {left[:5]}")


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


__all__ = ["ERROR", "OK", "Ran", "check_no_leftovers", "judge", "listing", "run"]
