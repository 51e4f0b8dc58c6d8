"""Can this host run a model's native code? Checked before dlopen, so never SIGILL.

The manifest lists the CPU features the generated code uses, spelled as in the
``flags`` line of /proc/cpuinfo (``avx512_vnni``). Names are compared normalized
(lower case, no ``_``, ``-`` or ``.``) so LLVM spellings (``avx512vnni``) match as well.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

from sparsec.errors import SparsecError

CPUINFO = Path("/proc/cpuinfo")

# platform.machine() spellings of each triple architecture.
_ARCH_ALIASES = {"x86_64": {"x86_64", "amd64", "x64"}, "aarch64": {"aarch64", "arm64"}}


def normalize_feature(name: str) -> str:
    # /proc/cpuinfo says "avx512_vnni", LLVM says "+avx512vnni"; "sse4_1" vs "sse4.1".
    return name.strip().lower().lstrip("+").replace("_", "").replace(".", "").replace("-", "")


def host_system() -> str:
    return platform.system()


def host_machine() -> str:
    return platform.machine().lower()


def host_cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """Normalized flags of the first processor in /proc/cpuinfo."""
    try:
        text = cpuinfo.read_text()
    except OSError as exc:
        raise SparsecError(
            f"cannot read {cpuinfo} to check CPU features ({exc.strerror or exc}); "
            "sparsec models run on Linux x86-64"
        ) from exc
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(normalize_feature(f) for f in value.split())
    raise SparsecError(f"{cpuinfo} has no 'flags' line; cannot check the CPU features")


def missing_cpu_features(required: list[str], cpuinfo: Path = CPUINFO) -> list[str]:
    """The required features (as spelled in the manifest) this CPU lacks."""
    have = host_cpu_flags(cpuinfo)
    return [f for f in required if normalize_feature(f) not in have]


def check_host(manifest: dict, name: str, cpuinfo: Path = CPUINFO) -> None:
    """Raise SparsecError unless this host's OS, architecture and CPU run ``name``."""
    system = host_system()
    if system != "Linux":
        raise SparsecError(
            f"{name} is a Linux shared library and this host runs {system or 'an unknown OS'}; "
            "run it on Linux"
        )
    triple = manifest["target"]["triple"]
    arch = triple.split("-", 1)[0].lower()
    machine = host_machine()
    if machine not in _ARCH_ALIASES.get(arch, {arch}):
        raise SparsecError(
            f"{name} was compiled for {triple} but this host is {machine}; "
            "run it on a matching machine or recompile it there"
        )
    missing = missing_cpu_features(manifest["cpu_features"], cpuinfo)
    if missing:
        target = manifest["target"]
        raise SparsecError(
            f"this CPU lacks features that {name} needs: {', '.join(missing)} (it was "
            f"compiled for the {target['isa']} target, cpu {target['cpu']}); run it on a CPU "
            "that has them, or recompile it for this one: sparsec compile --target auto"
        )
    if any(normalize_feature(f) == "amxtile" for f in manifest["cpu_features"]):
        enable_amx(name)


# Linux gives a process AMX tile state only on request (the state is 8 KB a thread):
# arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); without it the first tile
# instruction is SIGILL.
_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def enable_amx(user: str = "sparsec's AMX kernels") -> None:
    """Request AMX tile state for this process (all its threads) once; raise
    SparsecError naming ``user`` when Linux refuses (too old a kernel, or a policy)."""
    error = _request_amx()
    if error:
        raise SparsecError(
            f"Linux refused AMX to this process ({error}), which {user} uses; upgrade the "
            "kernel (5.16+) or recompile without AMX: sparsec compile --target avx512"
        )


@functools.cache
def _request_amx() -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0:
        return ""
    return f"arch_prctl(ARCH_REQ_XCOMP_PERM): {os.strerror(ctypes.get_errno())}"
