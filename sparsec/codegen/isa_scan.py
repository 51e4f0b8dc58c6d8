"""Which CPU features a compiled library's machine code needs, read from the code itself.

``sparsec compile`` records the result in the manifest's ``cpu_features``, and the
runtime refuses to load a model on a CPU that lacks any of them (before dlopen, so
never SIGILL). Reading the instructions, rather than copying the feature list LLVM
was allowed to use, keeps the list exact: an int8 model that has no BF16 instruction
loads on Ice Lake (no BF16), and an fp32 model that has no VNNI instruction loads on
Skylake-X. It also covers what the host CPU's name lets LLVM use beyond the feature
string (a ``sapphirerapids`` tuning may pick AVX512-FP16), and the C helpers.

Every executable section of the linked ELF is decoded with iced-x86, which knows the
CPUID feature of each instruction form (``vpexpandb`` -> AVX512_VBMI2, an EVEX ``xmm``
op -> AVX512VL). A feature that is neither baseline x86-64 nor mapped to its
/proc/cpuinfo flag below stops the compile: the runtime could not check it.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

from sparsec.errors import SparsecError

# iced-x86 CpuidFeature names that every x86-64 CPU runs. CET_IBT is ``endbr64``,
# which executes as a NOP on CPUs without CET; PAUSE is ``rep nop``.
BASELINE = frozenset(
    (
        "INTEL8086",
        "INTEL186",
        "INTEL286",
        "INTEL386",
        "INTEL486",
        "X64",
        "CPUID",
        "TSC",
        "CX8",
        "CMOV",
        "FPU",
        "FPU287",
        "FPU387",
        "FXSR",
        "MMX",
        "SSE",
        "SSE2",
        "SYSCALL",
        "SEP",
        "MULTIBYTENOP",
        "PAUSE",
        "CET_IBT",
    )
)

# iced-x86 CpuidFeature name -> the flag in /proc/cpuinfo that announces it.
CPUINFO_FLAGS = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "SSE4_1": "sse4_1",
    "SSE4_2": "sse4_2",
    "CMPXCHG16B": "cx16",
    "POPCNT": "popcnt",
    "LZCNT": "abm",
    "MOVBE": "movbe",
    "BMI1": "bmi1",
    "BMI2": "bmi2",
    "ADX": "adx",
    "F16C": "f16c",
    "FMA": "fma",
    "AVX": "avx",
    "AVX2": "avx2",
    "AVX_VNNI": "avx_vnni",
    "AES": "aes",
    "PCLMULQDQ": "pclmulqdq",
    "SHA": "sha_ni",
    "PREFETCHW": "3dnowprefetch",
    "CLFLUSHOPT": "clflushopt",
    "CLWB": "clwb",
    "RDTSCP": "rdtscp",
    "RDRAND": "rdrand",
    "RDSEED": "rdseed",
    "FSGSBASE": "fsgsbase",
    "XSAVE": "xsave",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512CD": "avx512cd",
    "AVX512DQ": "avx512dq",
    "AVX512VL": "avx512vl",
    "AVX512_IFMA": "avx512ifma",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VBMI2": "avx512_vbmi2",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BITALG": "avx512_bitalg",
    "AVX512_VPOPCNTDQ": "avx512_vpopcntdq",
    "AVX512_BF16": "avx512_bf16",
    "AVX512_FP16": "avx512_fp16",
    "AVX512_VP2INTERSECT": "avx512_vp2intersect",
    "GFNI": "gfni",
    "VAES": "vaes",
    "VPCLMULQDQ": "vpclmulqdq",
    "AMX_TILE": "amx_tile",
    "AMX_INT8": "amx_int8",
    "AMX_BF16": "amx_bf16",
}

SHF_EXECINSTR = 0x4


def _iced():
    try:
        import iced_x86
    except ImportError as exc:
        raise SparsecError(
            "reading the CPU features of compiled code needs iced-x86; install the compiler "
            "with: pip install 'sparsec[compiler]'"
        ) from exc
    return iced_x86


def _feature_names() -> dict[int, str]:
    cpuid = _iced().CpuidFeature
    return {v: k for k, v in vars(cpuid).items() if not k.startswith("_") and isinstance(v, int)}


def feature_counts(code: bytes, ip: int = 0) -> Counter[str]:
    """iced-x86 feature name -> number of instructions in ``code`` that need it."""
    iced = _iced()
    names = _feature_names()
    counts: Counter[str] = Counter()
    for instr in iced.Decoder(64, code, ip=ip):
        if instr.code == iced.Code.INVALID:
            raise SparsecError(
                f"cannot decode the machine code at address {instr.ip:#x}: not an x86-64 "
                "instruction (sparsec bug: generated code should always decode)"
            )
        counts.update(names[f] for f in instr.cpuid_features())
    return counts


def elf_feature_counts(elf: bytes | Path) -> Counter[str]:
    """Feature counts over every executable section of an ELF file or object."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    data = Path(elf).read_bytes() if isinstance(elf, Path) else elf
    try:
        sections = list(ELFFile(io.BytesIO(data)).iter_sections())
    except ELFError as exc:
        raise SparsecError(f"not a readable ELF file: {exc}") from exc
    counts: Counter[str] = Counter()
    for section in sections:
        if section["sh_flags"] & SHF_EXECINSTR and section["sh_type"] != "SHT_NOBITS":
            counts += feature_counts(section.data(), section["sh_addr"])
    return counts


def required_cpu_features(elf: bytes | Path) -> list[str]:
    """The /proc/cpuinfo flags the machine code of ``elf`` needs, sorted."""
    counts = elf_feature_counts(elf)
    unknown = sorted(f for f in counts if f not in BASELINE and f not in CPUINFO_FLAGS)
    if unknown:
        raise SparsecError(
            f"the compiled code uses instructions of {', '.join(unknown)}, which sparsec "
            "cannot check for when a model loads (sparsec bug: add the /proc/cpuinfo flag to "
            "sparsec/codegen/isa_scan.py)"
        )
    return sorted({CPUINFO_FLAGS[f] for f in counts if f in CPUINFO_FLAGS})
