"""SparseGPT calibration sharded over the ranks of a ``torchrun`` job.

``torchrun --nproc-per-node N -m sparsec sparsify ...`` starts N processes with
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
``process_group`` joins them with torch.distributed's ``env://`` rendezvous (gloo on
the CPU, NCCL on CUDA, each rank on its LOCAL_RANK's GPU). A process started without
that environment (or with WORLD_SIZE 1) gets ``Ranks()``, a world of one, and runs
exactly as it did before: no process group, no collective.

What is sharded: the calibration sequences. Each rank runs the layer walk on its share
(whole chunks of the walk, so every chunk's forward is the one a single process runs)
and sums ``x xᵀ`` of its tokens in float64; ``sum_hessian`` all-reduces that sum and the
token count, and every rank then solves SparseGPT on the same Hessian. Every rank solving
(rather than rank 0 solving and broadcasting weights) costs no wall time, since the
others would only wait, and sends one ``[in, in]`` Hessian per Linear group instead of
the weights of every Linear of it; the ranks stay identical because the solve is
deterministic on identical inputs (same code, same device type). OWL's per-column
statistics are summed the same way.

After the walk the ranks distill together, the student and teacher sharded with FSDP2
and each rank on its share of every batch (fsdp.py); ``all_sum``, ``any_of`` and
``batch_share`` are what that needs here. What is not (yet): smoothing and the
evaluations after distillation run on rank 0 alone; checkpoints of a sharded walk (each
rank holds only its share of the activations).

Failures: collectives time out after ``SPARSEC_DIST_TIMEOUT`` seconds (default 600: the
ranks do the same work between two collectives, so a wait that long means a rank is stuck);
a rank that dies closes its connections, and the others' next collective fails at once
with a one-line SparsecError (torchrun also stops the remaining ranks when one fails).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from sparsec.errors import SparsecError

TIMEOUT_ENV = "SPARSEC_DIST_TIMEOUT"
# What torchrun sets for each rank (env:// reads MASTER_*, RANK and WORLD_SIZE).
TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)
DEFAULT_TIMEOUT_S = 600.0


@dataclass
class Ranks:
    """This process's place in the job; ``Ranks()`` is a single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, evaluates, checkpoints and writes the output."""
        return self.rank == 0

    def shard(self, calibration: torch.Tensor, chunk: int) -> torch.Tensor:
        """This rank's calibration sequences: every ``world_size``-th chunk of ``chunk``
        sequences, starting at chunk ``rank``. Whole chunks, so that the walk (which runs
        ``chunk`` sequences a forward) computes every chunk exactly as one process would;
        round robin keeps a short last chunk last on its rank."""
        if not self.distributed:
            return calibration
        starts = list(range(0, calibration.shape[0], chunk))
        if len(starts) < self.world_size:
            raise SparsecError(
                f"--calibration-samples {calibration.shape[0]} makes {len(starts)} chunk(s) "
                f"of {chunk} sequences for {self.world_size} ranks; each rank needs one: "
                f"pass --calibration-samples {chunk * self.world_size} or more"
            )
        mine = starts[self.rank :: self.world_size]
        return torch.cat([calibration[s : s + chunk] for s in mine])

    def sum_hessian(self, xtx: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
        """``(Σ xtx, Σ tokens)`` over the ranks, in place in ``xtx`` (float64)."""
        count = torch.tensor([tokens], dtype=torch.float64, device=xtx.device)
        with _collective(self):
            # Two calls, not one packed buffer: a copy of a 14k x 14k Hessian costs more
            # than a second collective.
            dist.all_reduce(xtx, op=dist.ReduceOp.SUM)
            dist.all_reduce(count, op=dist.ReduceOp.SUM)
        return xtx, int(count.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on one (a Ctrl-C seen by any rank)."""
        return self.any_of(flag)[0]

    def any_of(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag True on every rank when it is True on one, in one collective."""
        if not self.distributed:
            return flags
        value = torch.tensor([int(f) for f in flags], device=self.device)
        with _collective(self):
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in value.tolist())

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (float64, on ``values``' device)."""
        if not self.distributed:
            return values.double()
        summed = values.to(self.device, torch.float64)  # a copy: NCCL needs the GPU's
        with _collective(self):
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(values.device)

    def barrier(self) -> None:
        if self.distributed:
            with _collective(self):
                dist.barrier()

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise SparsecError(batch_error(batch_size, self.world_size))

    def batch_share(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's rows of a global batch: rows ``rank * b/N`` to ``(rank + 1) * b/N``."""
        if not self.distributed:
            return tensors
        rows = tensors[0].shape[0] // self.world_size
        return tuple(t[self.rank * rows : (self.rank + 1) * rows] for t in tensors)


def batch_error(batch_size: int, world_size: int) -> str:
    fits = -(-batch_size // world_size) * world_size
    return (
        f"--batch-size {batch_size} does not split over the {world_size} ranks of this "
        f"torchrun job (each rank trains on an equal share of every batch): pass a "
        f"multiple of {world_size}, such as --batch-size {fits}"
    )


# Set when a collective failed. gloo may then still hold a thread blocked on the lost
# peer; the interpreter's normal exit destroys it unjoined and C++ aborts the process
# ("terminate called without an active exception", exit -6) after the one-line error.
_broken = False


def exit_status(code: int) -> int:
    """The process's last act under torchrun: after a failed collective, leave with
    ``code`` at once (streams flushed) instead of through the interpreter's teardown."""
    if _broken:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


@contextlib.contextmanager
def _collective(ranks: Ranks) -> Iterator[None]:
    global _broken
    try:
        yield
    except RuntimeError as e:  # DistBackendError, gloo's closed connection, a timeout
        _broken = True
        raise SparsecError(
            f"rank {ranks.rank} of {ranks.world_size}: a collective with the other ranks "
            f"failed ({_reason(e)}); another rank stopped or failed (see its message)"
        ) from e


def _reason(e: BaseException) -> str:
    """The first sentence of a torch.distributed error, without gloo's source location
    ("[.../pair.cc:553] Connection closed by peer [127.0.0.1]:8914. This is typically...")."""
    text = str(e).strip()
    text = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "")
    return text.split(". ")[0].rstrip(".") or type(e).__name__


def launched() -> bool:
    """Started by torchrun (or another launcher setting its variables) with 2+ ranks."""
    return world_size() > 1


def world_size() -> int:
    """The job's ranks as torchrun's WORLD_SIZE says (1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise SparsecError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds above 0")
    return timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """The job's ranks for the ``with`` body: the process group is joined on entry and
    destroyed on exit, also after an error (so no rank is left holding it)."""
    if dist.is_available() and dist.is_initialized():  # a caller's own group: kept
        yield Ranks(dist.get_rank(), dist.get_world_size(), _rank_device(device))
        return
    if not launched():
        yield Ranks(device=_rank_device(device))
        return
    if not dist.is_available():
        raise SparsecError("this PyTorch build has no torch.distributed; run one process")
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    device = _rank_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(
            backend,
            init_method="env://",
            timeout=timeout(),
            **({"device_id": device} if backend == "nccl" else {}),
        )
    except (ValueError, RuntimeError) as e:  # a missing MASTER_ADDR, a rendezvous timeout
        raise SparsecError(
            f"rank {rank} of {world}: torch.distributed could not start ({_reason(e)}); run "
            "under torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        ) from e
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def _rank_device(device: torch.device) -> torch.device:
    """CUDA with its index: ``cuda:N`` as asked; a bare ``cuda`` is cuda:0 in one process
    and this rank's own GPU, ``cuda:LOCAL_RANK``, under torchrun."""
    if device.type != "cuda":
        return device
    local_rank, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1)
    count = torch.cuda.device_count()
    if local_world > 1 and device.index is not None:
        raise SparsecError(
            f"--device cuda:{device.index}: under torchrun each of the {local_world} ranks "
            "on a node uses its own GPU, cuda:LOCAL_RANK; pass --device cuda (or auto)"
        )
    index = device.index if device.index is not None else local_rank if local_world > 1 else 0
    if index >= count:
        raise SparsecError(
            f"rank with LOCAL_RANK {local_rank}: this node has {count} CUDA device(s); "
            f"run at most --nproc-per-node {count}"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise SparsecError(f"environment variable {name}={raw!r} is not an integer") from e
