"""Target tests: CPU feature checks, AVX-512 code emission, linking and loading."""

import ctypes
import tempfile

import numpy as np
import pytest
from llvmlite import ir

from sparsec.codegen import target
from sparsec.errors import SparsecError

F32 = ir.FloatType()
V16 = ir.VectorType(F32, 16)


def _fma_module() -> ir.Module:
    """y[0:16] = a[0:16] * x[0:16] + y[0:16] with explicit <16 x float> vectors."""
    m = ir.Module()
    fn = ir.Function(m, ir.FunctionType(ir.VoidType(), [F32.as_pointer()] * 3), "fma16")
    b = ir.IRBuilder(fn.append_basic_block())
    a, x, y = (b.bitcast(arg, V16.as_pointer()) for arg in fn.args)
    fma = target.declare_function(m, "llvm.fma.v16f32", ir.FunctionType(V16, [V16] * 3))
    b.store(b.call(fma, [b.load(a, align=4), b.load(x, align=4), b.load(y, align=4)]), y, align=4)
    b.ret_void()
    return m


def test_host_flags_parse_and_normalize(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx512f avx512_vnni sse4_1\n"
    )
    flags = target.host_cpu_flags(cpuinfo)
    assert {"avx512f", "avx512vnni", "sse41"} <= flags
    assert target.host_cpu_model(cpuinfo) == "Test CPU"


def test_missing_feature_raises_naming_it():
    have = [f for f in target.LLVM_FEATURES if f not in ("avx512vnni", "avx512vbmi2")]
    with pytest.raises(SparsecError, match="avx512vnni, avx512vbmi2"):
        target.require_features(available=have)
    # cpuinfo spelling is accepted too
    target.require_features(["avx512_vnni"], available=["avx512vnni"])


def test_host_has_required_features():
    target.require_features()


def test_assembly_uses_zmm_and_fma():
    asm = target.emit_assembly(_fma_module())
    assert "zmm" in asm
    assert "vfmadd" in asm


def test_vector_width_attributes_added():
    text = target.optimized_ir(_fma_module())
    assert '"prefer-vector-width"="512"' in text
    assert '"min-legal-vector-width"="512"' in text


def test_build_and_call(tmp_path):
    lib = target.load_library(target.build_library(_fma_module(), out=tmp_path / "k.so"))
    a = np.arange(16, dtype=np.float32)
    x = np.full(16, 2.0, np.float32)
    y = np.ones(16, np.float32)
    ptr = ctypes.POINTER(ctypes.c_float)
    lib.fma16(a.ctypes.data_as(ptr), x.ctypes.data_as(ptr), y.ctypes.data_as(ptr))
    np.testing.assert_array_equal(y, a * 2 + 1)


def test_throwaway_library_leaves_no_files(tmp_path, monkeypatch):
    # autotuning builds dozens of libraries per compile: none may stay in the temp dir
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lib = target.build_and_load(_fma_module())
    a = np.arange(16, dtype=np.float32)
    y = np.zeros(16, np.float32)
    ptr = ctypes.POINTER(ctypes.c_float)
    lib.fma16(a.ctypes.data_as(ptr), a.ctypes.data_as(ptr), y.ctypes.data_as(ptr))
    np.testing.assert_array_equal(y, a * a)
    assert list(tmp_path.iterdir()) == []


def test_link_with_c_source(tmp_path):
    src = tmp_path / "helper.c"
    src.write_text("int sparsec_helper_answer(void) { return 42; }\n")
    out = target.link_shared([target.compile_ir(_fma_module())], [src], tmp_path / "lib.so")
    assert target.load_library(out).sparsec_helper_answer() == 42


def test_link_failure_reports_compiler_stderr(tmp_path):
    src = tmp_path / "broken.c"
    src.write_text("int broken( { \n")
    with pytest.raises(SparsecError, match="broken.c"):
        target.link_shared([], [src], tmp_path / "lib.so")
    assert not (tmp_path / "lib.so").exists()


def test_missing_compiler_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(SparsecError, match="C compiler"):
        target.link_shared([target.compile_ir(_fma_module())], [], tmp_path / "lib.so")


def test_linear_kernels_use_avx512_instructions():
    from sparsec.codegen.linear import emit_linear, pack_linear

    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    expected = {
        "dense_f32": ["vfmadd231ps", "zmm"],
        "bitmask_f32": ["vexpandps", "vfmadd231ps", "zmm"],
        "dense_i8": ["vpdpbusd", "zmm"],
        "bitmask_i8": ["vpexpandb", "vpdpbusd", "zmm"],
    }
    for fmt, mnemonics in expected.items():
        module = ir.Module()
        emit_linear(module, "k", pack_linear(w, fmt), max_tokens=4)
        asm = target.emit_assembly(module)
        for m in mnemonics:
            assert m in asm, f"{fmt}: no {m} in the generated code"
        assert "ymm" not in asm.replace("vzeroupper", ""), f"{fmt}: 256-bit code"
