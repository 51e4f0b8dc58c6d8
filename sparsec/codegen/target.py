"""The code generation target: the ISA and CPU code is made for, host CPU checks, LLVM
object emission, shared-library linking.

``Target`` is the one place that knows the ISA: its LLVM triple, cpu and features,
vector width, rows per packed block, the linear-kernel formats it supports, and the
per-CPU tuning of its kernels (``tuning.py``). Emission, packing, compiling and linking
take a ``Target``; ``host_target()`` is the one this machine runs (``sparsec compile
--target``/``--target-cpu`` choose another).

Every kernel sparsec emits is llvmlite IR written with explicit vector types
(``<16 x float>``, ``<64 x i8>``) of the target's width. Why the feature string is
spelled out: an empty cpu/features string makes LLVM target baseline x86-64 and the
vectors get legalized into SSE2 code without a single zmm register. And why each
function carries ``"prefer-vector-width"``: several Intel tunings prefer 256-bit vectors
and would otherwise split our 512-bit operations.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sparsec.codegen.tuning import HOST_MEASURED_FIELDS, Tuning, tuning_for
from sparsec.errors import SparsecError
from sparsec.runtime.cpu import (  # one reader for both
    CPUINFO,
    enable_amx,
    host_cpu_flags,
    normalize_feature,
)


@dataclass(frozen=True)
class Isa:
    """An instruction set sparsec emits code for (capability flags of one renderer)."""

    name: str
    # LLVM feature names the generated code may use, and that a host must have to compile
    # (autotuning runs the kernels here). What one model.so needs is read from its code
    # (isa_scan), usually fewer.
    features: tuple[str, ...]
    vector_bits: int
    formats: tuple[str, ...]  # the linear-kernel formats (linear_pack.py) it has kernels for
    scheduling_cpu: str  # LLVM cpu for scheduling when the host's is unknown ("generic")
    # The LLVM cpu whose ISA the features extend. The target's own cpu only tunes
    # (function attribute "tune-cpu"): a cpu name brings its whole ISA with it
    # (sapphirerapids: AVX512-FP16, AMX), which the code must not use.
    base_cpu: str = "x86-64-v4"
    # How the bitmask formats put a block's nonzeros back in their lanes: "expand"
    # (vexpandps / vpexpandb loads, AVX-512) or "shuffle" (a table indexed by the mask
    # bits drives vpermps / vpshufb; the value streams get a vector of slack because
    # each step loads full vectors from the stream).
    sparse_decode: str = "expand"
    # The int8 dot product of four byte pairs per int32 lane: "vnni" (vpdpbusd, u8
    # activations + 128 times s8 weights; the packed bias undoes the offset) or
    # "maddubs" (AVX2: vpsignb + vpmaddubsw + vpmaddwd on signed activations, which
    # cannot saturate since both factors stay within +-127).
    int8_dot: str = "vnni"
    # Multi-token int8 tiles (prefill, batched decode): "vector" (the int8_dot per token)
    # or "amx" (Intel AMX tdpbusd tiles, codegen/amx.py; decode keeps the vector kernel).
    tile_dot: str = "vector"

    @property
    def vector_bytes(self) -> int:
        return self.vector_bits // 8

    @property
    def lanes_f32(self) -> int:
        """float32 (or int32) lanes of one vector: the output rows of a packed block."""
        return self.vector_bits // 32

    @property
    def feature_string(self) -> str:
        return ",".join("+" + f for f in self.features)

    @property
    def bitmask_i8_unit(self) -> int:
        """Bytes per mask bit of bitmask int8: 1 (each weight byte) with vpexpandb; 2
        (each byte pair of one row, vpmaddubsw's unit) for the shuffle decode, which then
        needs one 16-byte table row per mask byte and half vector."""
        return 2 if self.sparse_decode == "shuffle" else 1

    @property
    def act_offset(self) -> int:
        """Added to quantized activations (and to row padding): vpdpbusd multiplies
        unsigned activation bytes, vpmaddubsw's sign trick wants them signed."""
        return 128 if self.int8_dot == "vnni" else 0

    @property
    def vnni_intrinsic(self) -> str:
        """LLVM's vpdpbusd at this width (AVX-VNNI shares the AVX-512 intrinsic names)."""
        return f"llvm.x86.avx512.vpdpbusd.{self.vector_bits}"

    @property
    def vector_width_attributes(self) -> str:
        """Function attributes that keep LLVM on full-width registers (module docstring)."""
        return (
            f'"prefer-vector-width"="{self.vector_bits}" '
            f'"min-legal-vector-width"="{self.vector_bits}"'
        )

    @property
    def gcc_flags(self) -> tuple[str, ...]:
        """The same ISA for helper C sources (thread pool etc.), so they may use it too."""
        return (*("-m" + f for f in self.features), f"-mprefer-vector-width={self.vector_bits}")


# Zen 4, Intel Ice Lake / Sapphire Rapids or newer. No BF16: no kernel uses it, and Ice
# Lake / Tiger Lake / Rocket Lake lack it.
AVX512 = Isa(
    name="avx512",
    features=(
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512cd",
        "avx512vnni",
        "avx512vbmi",
        "avx512vbmi2",
        "fma",
        "avx2",
        "bmi2",
        "popcnt",
    ),
    vector_bits=512,
    formats=("dense_f32", "bitmask_f32", "dense_i8", "bitmask_i8"),
    scheduling_cpu="znver4",
)

# Intel Sapphire Rapids and newer (Xeon 4th gen+, Granite Rapids): AVX-512 plus AMX
# tiles for multi-token int8 work. The same packed layouts and single-token kernels as
# avx512; not on AMD (Zen 4/5 have no AMX).
AVX512_AMX = dataclasses.replace(
    AVX512,
    name="avx512-amx",
    features=(*AVX512.features, "amx-tile", "amx-int8"),
    scheduling_cpu="sapphirerapids",
    tile_dot="amx",
)

# Intel Haswell and newer without AVX-512 (Core 4th-11th gen, most laptops), AMD Zen 1-3:
# 8 float lanes, no expand loads (bitmask decode by table + vpermps / vpshufb; int8
# masks cover byte pairs: docs/experiments/avx2-bitmask-int8.md), int8 through
# vpmaddubsw.
AVX2 = Isa(
    name="avx2",
    features=("avx2", "fma", "f16c", "bmi2", "popcnt", "movbe"),
    vector_bits=256,
    formats=AVX512.formats,
    scheduling_cpu="znver3",
    base_cpu="x86-64-v3",
    sparse_decode="shuffle",
    int8_dot="maddubs",
)
# AVX2 plus the VEX-encoded vpdpbusd of AVX-VNNI: Intel Core 12th gen (Alder Lake) and
# newer, Core Ultra, AMD Zen 5. (Zen 4 has VNNI only as AVX-512: it runs avx512.)
AVX2_VNNI = dataclasses.replace(
    AVX2,
    name="avx2-vnni",
    features=(*AVX2.features, "avxvnni"),
    scheduling_cpu="alderlake",
    int8_dot="vnni",
)
# Best first: ``--target auto`` takes the first one the host runs.
ISAS: dict[str, Isa] = {isa.name: isa for isa in (AVX512_AMX, AVX512, AVX2_VNNI, AVX2)}


@dataclass(frozen=True)
class Target:
    """An ISA on one CPU model: what the code uses, and whose tuning it gets."""

    isa: Isa
    cpu: str  # LLVM cpu name: the scheduling model and the tuning key
    triple: str = "x86_64-unknown-linux-gnu"
    # A tuning measured on the host (host_tuning.py) instead of the table's row for
    # (isa, cpu); compared, not hashed (its dicts are not hashable).
    measured: Tuning | None = dataclasses.field(default=None, hash=False)

    @property
    def tuning(self) -> Tuning:
        return self.measured or tuning_for(self.isa.name, self.cpu)

    def describe(self) -> dict:
        """The manifest's ``target`` field."""
        tuning = {"source": "measured on the host" if self.measured else "built in"}
        tuning |= {name: dict(getattr(self.tuning, name)) for name in HOST_MEASURED_FIELDS}
        return {"triple": self.triple, "cpu": self.cpu, "isa": self.isa.name, "tuning": tuning}


def _read_cpuinfo(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise SparsecError(
            f"cannot read {path} to detect CPU features ({exc}); sparsec needs Linux on x86-64"
        ) from exc


def host_cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU model name (part of the kernel-timing cache key)."""
    for line in _read_cpuinfo(cpuinfo).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown-cpu"


def missing_features(
    features: Iterable[str] = AVX512.features, available: Iterable[str] | None = None
) -> list[str]:
    """The features (LLVM or cpuinfo spelling) that the CPU does not have, in input order."""
    have = host_cpu_flags() if available is None else {normalize_feature(f) for f in available}
    return [f for f in features if normalize_feature(f) not in have]


def require_features(
    features: Iterable[str] = AVX512.features, available: Iterable[str] | None = None
) -> None:
    """Raise SparsecError naming every required CPU feature the host lacks.

    ``available`` overrides the host's flags (for tests and cross checks).
    """
    missing = missing_features(features, available)
    if missing:
        raise SparsecError(
            f"this CPU lacks the features sparsec kernels need: {', '.join(missing)}; "
            "choose a --target it runs (sparsec compile --target auto picks the best), or "
            "compile on a CPU that has them"
        )


# --------------------------------------------------------------------------- LLVM


@functools.cache
def _llvm():
    """llvmlite.binding, initialized once. (llvm.initialize() is deprecated in 0.50.)"""
    try:
        import llvmlite.binding as llvm
    except ImportError as exc:
        raise SparsecError(
            "code generation needs llvmlite; install it with: pip install 'sparsec[compiler]'"
        ) from exc
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()
    return llvm


def _host_cpu_name(isa: Isa) -> str:
    name = _llvm().get_host_cpu_name()
    # "generic" would drop the tuning model; the features string carries the ISA anyway.
    return name if name and name != "generic" else isa.scheduling_cpu


def host_target(name: str = "auto", cpu: str | None = None, *, check_host: bool = True) -> Target:
    """The target ``sparsec compile --target NAME --target-cpu CPU`` builds for.

    ``auto``: the best ISA this host runs (``ISAS`` order). ``cpu`` None: this host's CPU.
    ``check_host``: refuse an ISA this host lacks (compiling autotunes by running the
    kernels here, so today every compile needs it).
    """
    if name != "auto" and name not in ISAS:
        raise SparsecError(f"unknown --target {name!r}; choose auto or {', '.join(ISAS)}")
    isa = best_isa() if name == "auto" else ISAS[name]
    if check_host:
        try:
            require_features(isa.features)
        except SparsecError as exc:
            raise SparsecError(f"--target {isa.name}: {exc}") from None
    if cpu is not None and not (re.fullmatch(r"[a-z][a-z0-9_.-]*", cpu) and _llvm_knows(cpu)):
        raise SparsecError(
            f"--target-cpu {cpu!r} is not an LLVM cpu name (e.g. znver4, sapphirerapids)"
        )
    return Target(isa, cpu or _host_cpu_name(isa))


def is_host(tgt: Target) -> bool:
    """Whether ``tgt`` is this host's CPU and ISA (its tuning can be measured here)."""
    return tgt.cpu == _host_cpu_name(tgt.isa) and not missing_features(tgt.isa.features)


def best_isa(available: Iterable[str] | None = None) -> Isa:
    """The first ISA of ``ISAS`` whose features the host (or ``available``) has."""
    for isa in ISAS.values():
        if not missing_features(isa.features, available):
            return isa
    require_features(ISAS["avx2"].features, available)  # raises, naming what is missing
    raise AssertionError("unreachable")


@functools.cache
def _llvm_knows(cpu: str) -> bool:
    """Whether LLVM has a model of ``cpu``. LLVM only warns on stderr about an unknown
    one ("is not a recognized processor") and carries on untuned, so the warning is
    caught from a throwaway compile, made as the code is: a known base cpu and the
    probed one as "tune-cpu" (an unknown machine cpu makes LLVM abort the process)."""
    llvm = _llvm()
    module = llvm.parse_assembly(
        f'define void @f() #0 {{\n  ret void\n}}\nattributes #0 = {{ "tune-cpu"="{cpu}" }}\n'
    )
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    try:
        os.dup2(write_end, 2)
        triple = llvm.get_process_triple()
        machine = llvm.Target.from_triple(triple).create_target_machine(cpu=AVX512.base_cpu)
        machine.emit_assembly(module)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write_end)
    with os.fdopen(read_end, "rb") as warnings:
        return b"not a recognized processor" not in warnings.read()


@functools.cache
def default_target() -> Target:
    """This host's CPU with the AVX-512 ISA, unchecked: for tests, autotuning and tools
    that build throwaway kernels here."""
    return Target(AVX512, _host_cpu_name(AVX512))


@functools.cache
def target_machine(target: Target | None = None):
    """The (cached) LLVM TargetMachine of ``target`` (default: ``default_target()``)."""
    target = target or default_target()
    llvm = _llvm()
    isa = target.isa
    return llvm.Target.from_triple(target.triple).create_target_machine(
        cpu=isa.base_cpu, features=isa.feature_string, opt=3, reloc="pic", codemodel="default"
    )


def _add_function_attributes(ir_text: str, target: Target) -> str:
    """Append the ISA's width attributes and the target cpu's tuning to every function
    definition in ``ir_text``."""
    attributes = f'{target.isa.vector_width_attributes} "tune-cpu"="{target.cpu}"'

    def fix(match: re.Match) -> str:
        header = match.group(1)
        if "prefer-vector-width" in header:
            return match.group(0)
        return f"{header} {attributes}{match.group(2)}"

    # llvmlite prints "define ... (args) attrs" then "{" on the next line (or same line).
    return re.sub(r"^(define [^\n{]*?)(\s*\{)", fix, ir_text, flags=re.MULTILINE)


def _parse_optimized(module_or_text, optimize: bool, target: Target):
    llvm = _llvm()
    tm = target_machine(target)
    text = _add_function_attributes(str(module_or_text), target)
    try:
        mod = llvm.parse_assembly(text)
        mod.verify()
    except RuntimeError as exc:
        # Emitted IR that does not verify is a sparsec bug, but say where it is.
        raise SparsecError(f"generated LLVM IR is invalid (sparsec bug): {exc}") from exc
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    if optimize:
        pto = llvm.create_pipeline_tuning_options(speed_level=3)
        pto.loop_vectorization = True
        pto.slp_vectorization = True
        pto.loop_unrolling = True
        pb = llvm.create_pass_builder(tm, pto)
        mpm = pb.getModulePassManager()
        mpm.run(mod, pb)
    return mod


def optimized_ir(module_or_text, target: Target | None = None) -> str:
    """The IR after the O3 pipeline (for inspecting what LLVM made of a kernel)."""
    return str(_parse_optimized(module_or_text, True, target or default_target()))


def compile_ir(module_or_text, *, optimize: bool = True, target: Target | None = None) -> bytes:
    """Compile an llvmlite ``ir.Module`` (or IR text) into an ELF object for ``target``."""
    target = target or default_target()
    mod = _parse_optimized(module_or_text, optimize, target)
    return target_machine(target).emit_object(mod)


def emit_assembly(module_or_text, *, optimize: bool = True, target: Target | None = None) -> str:
    """The assembly of the module (CI fingerprints of generated code, zmm checks)."""
    target = target or default_target()
    mod = _parse_optimized(module_or_text, optimize, target)
    return target_machine(target).emit_assembly(mod)


def compile_ir_and_assembly(module_or_text, target: Target | None = None) -> tuple[bytes, str]:
    """``compile_ir`` and ``emit_assembly`` of the module. Two O3 runs on purpose: code
    generation rewrites the IR it runs on, and an object emitted from the same optimized
    module, a clone of it or its printed text differs in code bytes (measured: 6530
    against 6546 for a dense 576x576 kernel) from what ``compile_ir`` puts in a model."""
    text = str(module_or_text)
    return compile_ir(text, target=target), emit_assembly(text, target=target)


# --------------------------------------------------------------------------- linking


def find_cc() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SparsecError(
            "no C compiler found to link the model library (cc/gcc not on PATH); "
            "install one, e.g. apt-get install gcc, or set CC"
        )
    return cc


def link_shared(
    objects: Sequence[bytes],
    c_sources: Sequence[Path] = (),
    out: Path | str = "model.so",
    extra_flags: Sequence[str] = (),
    target: Target | None = None,
) -> Path:
    """Link object files (bytes) and C sources into the shared library ``out``."""
    target = target or default_target()
    out = Path(out)
    cc = find_cc()
    with tempfile.TemporaryDirectory(prefix="sparsec-link-") as tmp:
        obj_paths = []
        for i, obj in enumerate(objects):
            p = Path(tmp) / f"kernels{i}.o"
            p.write_bytes(obj)
            obj_paths.append(str(p))
        for src in c_sources:
            if not Path(src).is_file():
                raise SparsecError(f"C source {src} does not exist (cannot link {out})")
        # Link into the temp dir and move, so a failed or concurrent build never leaves
        # a half-written library at ``out``.
        tmp_out = Path(tmp) / out.name
        cmd = [
            cc,
            "-shared",
            "-O2",
            "-pthread",
            "-fPIC",
            *target.isa.gcc_flags,
            *[str(s) for s in c_sources],
            *obj_paths,
            "-o",
            str(tmp_out),
            *extra_flags,
            "-lm",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise SparsecError(f"cannot run the C compiler {cc!r}: {exc}") from exc
        if proc.returncode != 0:
            raise SparsecError(
                f"linking {out} failed ({' '.join(cmd[:1])} exited {proc.returncode}): "
                + proc.stderr.strip().replace("\n", " | ")
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp_out), out)
    return out


def build_library(
    ir_module,
    c_sources: Sequence[Path] = (),
    out: Path | str = "kernels.so",
    target: Target | None = None,
) -> Path:
    """Compile ``ir_module`` and link it with ``c_sources`` into the .so ``out``."""
    return link_shared([compile_ir(ir_module, target=target)], c_sources, out, target=target)


def load_library(path: Path | str) -> ctypes.CDLL:
    """Load a built library with ctypes (tests and benchmarks); on an AMX host the
    process gets AMX state first (the library may hold AMX kernels)."""
    if "amxtile" in host_cpu_flags():
        enable_amx(str(path))
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise SparsecError(f"cannot load the compiled library {path}: {exc}") from exc


def build_and_load(
    ir_module, c_sources: Sequence[Path] = (), target: Target | None = None
) -> ctypes.CDLL:
    """Build a throwaway library (tests, autotuning, benchmarks) and load it.

    The file is deleted once loaded (the mapping outlives it), so the many libraries an
    autotuned compile builds leave nothing behind in the temp directory.
    """
    with tempfile.TemporaryDirectory(prefix="sparsec-build-") as tmp:
        return load_library(build_library(ir_module, c_sources, Path(tmp) / "kernels.so", target))


def declare_function(module, name: str, fnty):
    """Get or declare the function ``name`` (LLVM intrinsics like "llvm.fma.v16f32").

    llvmlite's ``Module.declare_intrinsic`` cannot name vector overloads, so kernels
    declare intrinsics by their full mangled name through this helper.
    """
    from llvmlite import ir

    existing = module.globals.get(name)
    if existing is not None:
        return existing
    return ir.Function(module, fnty, name)
