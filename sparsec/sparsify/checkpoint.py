"""Crash-safe checkpoints and a Ctrl-C that waits for a safe point.

A checkpoint folder holds ``current/`` (``state.json`` + ``tensors.pt``). A new one is
written to ``next/`` and swapped in with renames, so a crash or an out-of-memory kill at
any moment leaves either the old or the new checkpoint complete, never a mix. A save that
fails (a full disk) removes its ``next/`` and keeps the last complete checkpoint.

A distributed distillation's checkpoint (``save_sharded``) also holds ``sharded/``, the
model and optimizer written by every rank with torch.distributed.checkpoint; rank 0
writes state.json and tensors.pt (the masks, the schedule) after it and swaps it in.

``GracefulInterrupt`` turns the first Ctrl-C into a flag that the long loops check
between layers or steps: they then save a checkpoint and stop. A second Ctrl-C
interrupts at once (the last checkpoint stays usable).

``write_errors`` turns the errors of a failed write (a full disk, a read-only file
system) into a one-line SparsecError naming the device and the path.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from sparsec.errors import SparsecError
from sparsec.interrupts import Terminated, request_stop

# The folders a checkpoint is made of: remove() deletes these, never anything else.
_PARTS = ("next", "current", "old")
# Inside one: the torch.distributed.checkpoint folder of a distributed distillation.
SHARDED = "sharded"


class Checkpoint:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _complete(self) -> Path | None:
        for name in ("current", "old"):  # "old" survives a crash between the two renames
            candidate = self.folder / name
            if (candidate / "state.json").exists() and (candidate / "tensors.pt").exists():
                return candidate
        return None

    def exists(self) -> bool:
        return self._complete() is not None

    def save(self, state: dict, tensors: dict) -> None:
        self._write_next(state, tensors, fresh=True)
        self._swap()

    def save_sharded(self, state: dict, tensors: dict, sharded: dict, ranks) -> None:
        """Collective over ``ranks``: each writes its shards of ``sharded`` (model and
        optimizer, torch.distributed.checkpoint) into ``next/sharded/``; then rank 0
        writes ``state`` (marked ``"sharded"``) and ``tensors`` beside them and swaps the
        whole in. Every rank returns once the new checkpoint is in place."""
        from sparsec.sparsify import fsdp

        nxt = self.folder / "next"
        if ranks.main:
            with write_errors(self.folder, self._kept):
                self.folder.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(nxt, ignore_errors=True)
                nxt.mkdir()
        ranks.barrier()
        try:
            with write_errors(nxt, self._kept):
                fsdp.save_sharded(sharded, nxt / SHARDED)  # fails on every rank if on one
            if ranks.main:
                self._write_next({**state, "sharded": ranks.world_size}, tensors, fresh=False)
                self._swap()
        except BaseException:
            if ranks.main:
                shutil.rmtree(nxt, ignore_errors=True)
            raise
        ranks.barrier()

    @property
    def _kept(self) -> str:
        return f"any earlier checkpoint in {self.folder} is kept for --resume"

    def _write_next(self, state: dict, tensors: dict, fresh: bool) -> None:
        nxt = self.folder / "next"
        try:
            with write_errors(self.folder, self._kept):
                if fresh:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    shutil.rmtree(nxt, ignore_errors=True)
                    nxt.mkdir()
                with open(nxt / "tensors.pt", "wb") as file:
                    torch_save(tensors, file)
                (nxt / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        except BaseException:
            shutil.rmtree(nxt, ignore_errors=True)  # never a half-written checkpoint
            raise

    def _swap(self) -> None:
        nxt, cur, old = (self.folder / n for n in _PARTS)
        shutil.rmtree(old, ignore_errors=True)
        if cur.exists():
            os.replace(cur, old)
        os.replace(nxt, cur)
        shutil.rmtree(old, ignore_errors=True)

    def load_state(self) -> dict:
        """The checkpoint's state.json, once tensors.pt looks whole too (cheap: --resume
        checks both before loading a model)."""
        found = self._found()
        path = found / "state.json"
        try:
            state = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._corrupt(path, f"not a JSON state: {e}") from e
        except OSError as e:
            raise self._corrupt(path, e.strerror or str(e)) from e
        if not (
            isinstance(state, dict)
            and isinstance(state.get("options"), dict)
            and isinstance(state.get("stage", ""), str)
        ):
            raise self._corrupt(path, "not the state a checkpoint records")
        if not zipfile.is_zipfile(found / "tensors.pt"):  # torch.save writes a zip
            raise self._corrupt(found / "tensors.pt", "not a complete PyTorch file (truncated?)")
        return state

    def load_tensors(self, required: tuple[str, ...] = ("model",)) -> dict:
        path = self._found() / "tensors.pt"
        if not zipfile.is_zipfile(path):  # torch.save writes a zip; truncation breaks it
            raise self._corrupt(path, "not a complete PyTorch file (truncated?)")
        try:
            # To the CPU: a checkpoint written on a GPU resumes on any --device (the run
            # moves what it needs to its device).
            tensors = torch.load(path, weights_only=False, map_location="cpu")
        except (
            RuntimeError,
            OSError,
            EOFError,
            ValueError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
        ) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise self._corrupt(path, reason) from e
        if not isinstance(tensors, dict) or not all(k in tensors for k in required):
            raise self._corrupt(path, "not the tensors a checkpoint records")
        return tensors

    def load(self) -> tuple[dict, dict]:
        """``(state, tensors)``; a distributed distillation's checkpoint has no "model" in
        its tensors (``sharded_folder`` holds it) and ``state["sharded"]``, the world size
        it was written with."""
        state = self.load_state()
        if not state.get("sharded"):
            return state, self.load_tensors()
        return state, self.load_tensors(required=("masks", "schedule"))

    def sharded_folder(self) -> Path:
        """The torch.distributed.checkpoint folder of a distributed distillation's
        checkpoint."""
        folder = self._found() / SHARDED
        if not (folder / ".metadata").is_file():
            raise self._corrupt(folder, "no .metadata: not a whole sharded checkpoint")
        return folder

    def _found(self) -> Path:
        found = self._complete()
        if found is None:
            raise SparsecError(f"no usable checkpoint in {self.folder}; run without --resume")
        return found

    def _corrupt(self, path: Path, reason: str) -> SparsecError:
        return SparsecError(
            f"the checkpoint in {self.folder} is corrupt ({path.name}: {reason}); delete "
            f"{self.folder} and run without --resume to start over"
        )

    def remove(self) -> None:
        """Delete the checkpoint's own folders, then the folder itself if nothing else is
        in it (a --checkpoint-dir may be a folder the user made)."""
        for name in _PARTS:
            shutil.rmtree(self.folder / name, ignore_errors=True)
        try:
            self.folder.rmdir()
        except OSError:  # not empty (or already gone): leave it
            pass


class GracefulInterrupt:
    """Within ``with``: the first SIGINT sets ``requested``; the second raises at once.

    ``terminate``: SIGTERM is handled the same way (under torchrun, where the agent
    passes a SIGTERM on to every rank and kills them 30 s later). ``escalate`` False: a
    second signal only repeats the request (under torchrun, which passes the terminal's
    Ctrl-C on, so every rank sees it twice). ``stop()`` is the exception that ends the
    run once the request was honoured.
    """

    def __init__(self, terminate: bool = False):
        self.requested = False
        self.signal: int | None = None
        self.escalate = True
        self._signals = (signal.SIGINT, signal.SIGTERM) if terminate else (signal.SIGINT,)
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.requested and self.escalate:
            if signum == signal.SIGTERM:
                request_stop(signum)
                raise Terminated
            raise KeyboardInterrupt
        self.requested = True
        self.signal = self.signal or signum

    def stop(self) -> KeyboardInterrupt:
        """Terminated after a SIGTERM (recorded, so the CLI exits 143), else
        KeyboardInterrupt, also on a rank that stops for another rank's signal."""
        if self.signal == signal.SIGTERM:
            request_stop(signal.SIGTERM)
            return Terminated()
        return KeyboardInterrupt()

    def alone(self) -> None:
        """From here one process works on alone (rank 0 after a torchrun job's shared
        stages): SIGTERM stops it at once again, and a stop already asked for stops it now
        (the last checkpoint stays)."""
        previous = self._previous.pop(signal.SIGTERM, None)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if self.requested:
            raise self.stop()

    def __enter__(self) -> GracefulInterrupt:
        for signum in self._signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)


class _RecordingWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch reports
    one (a full disk) as a RuntimeError ("unexpected pos") that does not say why."""

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def torch_save(obj, file) -> None:
    """``torch.save`` into an open binary ``file``; a failed write raises its OSError."""
    writer = _RecordingWriter(file)
    try:
        torch.save(obj, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise


# errno -> what failed, for write_errors' messages ({device} is filled in).
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on {device}",
    errno.EDQUOT: "disk quota exceeded on {device}",
    errno.EFBIG: "file too large for {device}",
    errno.EROFS: "{device} is a read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error on {device}",
}


@contextmanager
def write_errors(path: str | os.PathLike, kept: str = ""):
    """Within ``with``: a write that fails for lack of space or permission raises
    SparsecError ("no space left on /dev/sda1 (/data) writing PATH; ...") instead of the
    raw OSError (or safetensors' error). ``path``: what is being written; the caller
    removes what was half-written and says in ``kept`` what else survives."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise
        raise _write_error(e.errno, e.filename or path, kept) from e
    except SafetensorError as e:  # its I/O errors carry the errno in the text only
        match = re.search(r"os error (\d+)", str(e))
        if match is None or int(match[1]) not in _WRITE_ERRORS:
            raise
        raise _write_error(int(match[1]), path, kept) from e


def _write_error(code: int, path, kept: str) -> SparsecError:
    cause = _WRITE_ERRORS[code].format(device=device_of(path))
    free, advice = "", "write elsewhere"
    if code in (errno.ENOSPC, errno.EDQUOT):
        advice = "free some space or write elsewhere"
        try:
            free = f" ({shutil.disk_usage(_existing(path)).free / 2**20:.0f} MiB free)"
        except OSError:
            pass
    kept = f", and {kept}" if kept else ""
    return SparsecError(
        f"{cause} writing {path}{free}; nothing half-written was left{kept}: {advice}"
    )


def _existing(path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def device_of(path) -> str:
    """The device holding ``path`` and its mount point, as ``/dev/sda1 (/data)``."""
    mount = _existing(path)
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = None
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and fields[1].replace("\\040", " ") == str(mount):
                    device = fields[0]  # the last match is the mount on top
    except OSError:
        pass
    return f"{device} ({mount})" if device else str(mount)
