"""``--device``: where sparsify computes (the model's forwards, SparseGPT's Hessians and
solves, distillation). ``auto`` takes CUDA when PyTorch sees a GPU, else the CPU.

Only the spelling is checked without torch (``check_device``, for the option checks that
run before any work); ``resolve_device`` asks torch whether the device exists.
"""

from __future__ import annotations

import re

from sparsec.errors import SparsecError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(spec: str) -> None:
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        raise SparsecError(f"--device {spec!r} is not a device; use {DEVICE_CHOICES}")


def resolve_device(spec: str):
    """``torch.device`` for ``--device spec``; CUDA asked for and absent is a SparsecError.

    A bare ``cuda`` (and ``auto``) has no index: the GPU is picked by
    ``distributed.process_group``, cuda:0 in one process, cuda:LOCAL_RANK under torchrun.
    """
    import torch

    check_device(spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
        raise SparsecError(
            f"--device {spec}: PyTorch {torch.__version__} sees no CUDA device ({build}); "
            "use --device cpu (or auto), or install a CUDA build of torch on a GPU machine"
        )
    if spec in ("auto", "cuda"):
        return torch.device("cuda")
    index = int(spec.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise SparsecError(
            f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)
