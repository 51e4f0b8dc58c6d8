"""The code generation target: host CPU checks, LLVM object emission, shared-library linking.

Every kernel sparsec emits is llvmlite IR written with explicit AVX-512 vector types
(``<16 x float>``, ``<64 x i8>``). This module turns such IR into machine code for a
fixed AVX-512 feature set, and links the objects (plus any helper C files) into the
one ``.so`` the runtime loads.

Why the feature string is spelled out: an empty cpu/features string makes LLVM
target baseline x86-64 and the vectors get legalized into SSE2 code without a single
zmm register. And why each function carries ``"prefer-vector-width"="512"``: several
Intel tunings prefer 256-bit vectors and would otherwise split our 512-bit operations.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from sparsec.errors import SparsecError
from sparsec.runtime.cpu import CPUINFO, host_cpu_flags, normalize_feature  # one reader for both

# LLVM feature names that the generated code may use, and that a host must have to
# compile (autotuning runs the kernels here): Zen 4, Intel Ice Lake / Sapphire Rapids or
# newer. What one model.so needs is read from its code (isa_scan), usually fewer.
# No BF16: no kernel uses it, and Ice Lake / Tiger Lake / Rocket Lake lack it.
LLVM_FEATURES: tuple[str, ...] = (
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
)
FEATURE_STRING = ",".join("+" + f for f in LLVM_FEATURES)

# Function attributes that keep LLVM on 512-bit registers (see module docstring).
VECTOR_WIDTH_ATTRIBUTES = '"prefer-vector-width"="512" "min-legal-vector-width"="512"'

# The same ISA for helper C sources (thread pool etc.), so intrinsics there may use it.
GCC_FEATURE_FLAGS: tuple[str, ...] = (
    *("-m" + f for f in LLVM_FEATURES),
    "-mprefer-vector-width=512",
)


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
    features: Iterable[str] = LLVM_FEATURES, available: Iterable[str] | None = None
) -> list[str]:
    """The features (LLVM or cpuinfo spelling) that the CPU does not have, in input order."""
    have = host_cpu_flags() if available is None else {normalize_feature(f) for f in available}
    return [f for f in features if normalize_feature(f) not in have]


def require_features(
    features: Iterable[str] = LLVM_FEATURES, available: Iterable[str] | None = None
) -> None:
    """Raise SparsecError naming every required CPU feature the host lacks.

    ``available`` overrides the host's flags (for tests and cross checks).
    """
    missing = missing_features(features, available)
    if missing:
        raise SparsecError(
            f"this CPU lacks the features sparsec kernels need: {', '.join(missing)}; "
            "run on an AVX-512 VNNI/VBMI2 CPU (AMD Zen 4, Intel Ice Lake or newer)"
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


def target_cpu() -> str:
    """The LLVM cpu name used for scheduling (SPARSEC_TARGET_CPU overrides the host's)."""
    override = os.environ.get("SPARSEC_TARGET_CPU")
    if override:
        return override
    name = _llvm().get_host_cpu_name()
    # "generic" would drop the tuning model; the features string carries the ISA anyway.
    return name if name and name != "generic" else "znver4"


@functools.cache
def _target_machine(cpu: str):
    llvm = _llvm()
    triple = llvm.get_process_triple()
    target = llvm.Target.from_triple(triple)
    return target.create_target_machine(
        cpu=cpu, features=FEATURE_STRING, opt=3, reloc="pic", codemodel="default"
    )


def target_machine():
    """The (cached) LLVM TargetMachine for AVX-512 code on the host triple."""
    return _target_machine(target_cpu())


def _add_vector_width_attributes(ir_text: str) -> str:
    """Append the 512-bit width attributes to every function definition in ``ir_text``."""

    def fix(match: re.Match) -> str:
        header = match.group(1)
        if "prefer-vector-width" in header:
            return match.group(0)
        return f"{header} {VECTOR_WIDTH_ATTRIBUTES}{match.group(2)}"

    # llvmlite prints "define ... (args) attrs" then "{" on the next line (or same line).
    return re.sub(r"^(define [^\n{]*?)(\s*\{)", fix, ir_text, flags=re.MULTILINE)


def _parse_optimized(module_or_text, optimize: bool):
    llvm = _llvm()
    tm = target_machine()
    text = _add_vector_width_attributes(str(module_or_text))
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


def optimized_ir(module_or_text) -> str:
    """The IR after the O3 pipeline (for inspecting what LLVM made of a kernel)."""
    return str(_parse_optimized(module_or_text, optimize=True))


def compile_ir(module_or_text, *, optimize: bool = True) -> bytes:
    """Compile an llvmlite ``ir.Module`` (or IR text) into an ELF object for this target."""
    mod = _parse_optimized(module_or_text, optimize)
    return target_machine().emit_object(mod)


def emit_assembly(module_or_text, *, optimize: bool = True) -> str:
    """The assembly of the module (CI fingerprints of generated code, zmm checks)."""
    mod = _parse_optimized(module_or_text, optimize)
    return target_machine().emit_assembly(mod)


def compile_ir_and_assembly(module_or_text) -> tuple[bytes, str]:
    """``compile_ir`` and ``emit_assembly`` of the module. Two O3 runs on purpose: code
    generation rewrites the IR it runs on, and an object emitted from the same optimized
    module, a clone of it or its printed text differs in code bytes (measured: 6530
    against 6546 for a dense 576x576 kernel) from what ``compile_ir`` puts in a model."""
    text = str(module_or_text)
    return compile_ir(text), emit_assembly(text)


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
) -> Path:
    """Link object files (bytes) and C sources into the shared library ``out``."""
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
            *GCC_FEATURE_FLAGS,
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
    ir_module, c_sources: Sequence[Path] = (), out: Path | str = "kernels.so"
) -> Path:
    """Compile ``ir_module`` and link it with ``c_sources`` into the .so ``out``."""
    return link_shared([compile_ir(ir_module)], c_sources, out)


def load_library(path: Path | str) -> ctypes.CDLL:
    """Load a built library with ctypes (tests and benchmarks)."""
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise SparsecError(f"cannot load the compiled library {path}: {exc}") from exc


def build_and_load(ir_module, c_sources: Sequence[Path] = ()) -> ctypes.CDLL:
    """Build a throwaway library (tests, autotuning, benchmarks) and load it.

    The file is deleted once loaded (the mapping outlives it), so the many libraries an
    autotuned compile builds leave nothing behind in the temp directory.
    """
    with tempfile.TemporaryDirectory(prefix="sparsec-build-") as tmp:
        return load_library(build_library(ir_module, c_sources, Path(tmp) / "kernels.so"))


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
