"""Crash-safe checkpoints and a Ctrl-C that waits for a safe point.

A checkpoint folder holds ``current/`` (``state.json`` + ``tensors.pt``). A new one is
written to ``next/`` and swapped in with renames, so a crash or an out-of-memory kill at
any moment leaves either the old or the new checkpoint complete, never a mix.

``GracefulInterrupt`` turns the first Ctrl-C into a flag that the long loops check
between layers or steps: they then save a checkpoint and stop. A second Ctrl-C
interrupts at once (the last checkpoint stays usable).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch

from sparsec.errors import SparsecError


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
        self.folder.mkdir(parents=True, exist_ok=True)
        nxt, cur, old = (self.folder / n for n in ("next", "current", "old"))
        shutil.rmtree(nxt, ignore_errors=True)
        nxt.mkdir()
        torch.save(tensors, nxt / "tensors.pt")
        (nxt / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if cur.exists():
            os.replace(cur, old)
        os.replace(nxt, cur)
        shutil.rmtree(old, ignore_errors=True)

    def load(self) -> tuple[dict, dict]:
        found = self._complete()
        if found is None:
            raise SparsecError(f"no usable checkpoint in {self.folder}; run without --resume")
        state = json.loads((found / "state.json").read_text())
        tensors = torch.load(found / "tensors.pt", weights_only=False)
        return state, tensors

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class GracefulInterrupt:
    """Within ``with``: the first SIGINT sets ``requested``; the second raises at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> GracefulInterrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
