"""The CPU features a model needs are read from its machine code (isa_scan), recorded in
the manifest, and checked by the runtime before any native code runs."""

from __future__ import annotations

import ctypes
import subprocess

import onnx_ir as ir
import pytest
from llvmlite import ir as llvm_ir

from sparsec import runtime
from sparsec.codegen import isa_scan, target
from sparsec.codegen.compile import compile_model
from sparsec.errors import SparsecError
from sparsec.runtime import cpu
from sparsec.testing import build_contract_graph, make_tiny_llama, zero_smallest

I8, I32, F32 = llvm_ir.IntType(8), llvm_ir.IntType(32), llvm_ir.FloatType()


def _object(body) -> bytes:
    """An object with one function ``f`` built by ``body(module, builder, fn)``."""
    module = llvm_ir.Module()
    fn = llvm_ir.Function(
        module, llvm_ir.FunctionType(llvm_ir.VoidType(), [I8.as_pointer()] * 2), "f"
    )
    b = llvm_ir.IRBuilder(fn.append_basic_block())
    body(module, b, fn)
    b.ret_void()
    return target.compile_ir(module)


def _vector_load(b, ptr, ty):
    return b.load(b.bitcast(ptr, ty.as_pointer()), align=1)


def _store(b, value, ptr):
    b.store(value, b.bitcast(ptr, value.type.as_pointer()), align=1)


def vnni_dot(module, b, fn):
    v16 = llvm_ir.VectorType(I32, 16)
    dot = target.declare_function(
        module, "llvm.x86.avx512.vpdpbusd.512", llvm_ir.FunctionType(v16, [v16] * 3)
    )
    x = _vector_load(b, fn.args[0], v16)
    _store(b, b.call(dot, [x, x, x]), fn.args[1])


def byte_expand(module, b, fn):
    v64 = llvm_ir.VectorType(I8, 64)
    m64 = llvm_ir.VectorType(llvm_ir.IntType(1), 64)
    expand = target.declare_function(
        module,
        "llvm.masked.expandload.v64i8",
        llvm_ir.FunctionType(v64, [I8.as_pointer(), m64, v64]),
    )
    mask = b.bitcast(b.load(b.bitcast(fn.args[0], llvm_ir.IntType(64).as_pointer())), m64)
    _store(b, b.call(expand, [fn.args[1], mask, llvm_ir.Constant(v64, None)]), fn.args[0])


def float_fma(module, b, fn):
    v16 = llvm_ir.VectorType(F32, 16)
    fma = target.declare_function(module, "llvm.fma.v16f32", llvm_ir.FunctionType(v16, [v16] * 3))
    x = _vector_load(b, fn.args[0], v16)
    _store(b, b.call(fma, [x, x, x]), fn.args[1])


def test_each_instruction_family_names_its_flag():
    assert "avx512_vnni" in isa_scan.required_cpu_features(_object(vnni_dot))
    assert "avx512_vbmi2" in isa_scan.required_cpu_features(_object(byte_expand))
    fma = isa_scan.required_cpu_features(_object(float_fma))
    assert "avx512f" in fma
    # ablation: code without those instructions does not ask for them
    assert not {"avx512_vnni", "avx512_vbmi2", "avx512_bf16"} & set(fma)
    assert isa_scan.required_cpu_features(_object(lambda *_: None)) == []  # baseline x86-64


def test_every_mapped_flag_is_a_real_cpuinfo_spelling_on_this_host():
    # The runtime compares these names with /proc/cpuinfo; a misspelled mapping would
    # refuse every CPU. This host has all of the generated code's features.
    have = cpu.host_cpu_flags()
    used = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_vbmi2"}
    for flag in used & set(isa_scan.CPUINFO_FLAGS.values()):
        assert cpu.normalize_feature(flag) in have


def test_unknown_feature_and_undecodable_code_are_errors(tmp_path):
    # rdpid rax: RDPID, which no mapping covers
    obj = _c_object(tmp_path, 'void f(void) { __asm__(".byte 0xf3, 0x0f, 0xc7, 0xf8"); }')
    with pytest.raises(SparsecError, match="uses instructions of RDPID.*isa_scan.py"):
        isa_scan.required_cpu_features(obj)
    with pytest.raises(SparsecError, match="cannot decode the machine code at address"):
        isa_scan.feature_counts(b"\x06")  # push es: not an x86-64 instruction
    with pytest.raises(SparsecError, match="not a readable ELF file"):
        isa_scan.required_cpu_features(b"\x7fELF" + b"\0" * 60)


def _c_object(tmp_path, source: str) -> bytes:
    src = tmp_path / "f.c"
    src.write_text(source + "\n")
    subprocess.run([target.find_cc(), "-c", "-O1", "-o", tmp_path / "f.o", src], check=True)
    return (tmp_path / "f.o").read_bytes()


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The tiny model, 70% zeroed, compiled int8 (bitmask) and fp32 (dense)."""
    root = tmp_path_factory.mktemp("features")
    model, tokenizer = make_tiny_llama(seed=2)
    zero_smallest(model, 0.7)
    graph = root / "g.onnx"
    ir.save(build_contract_graph(model, tokenizer), graph)
    paths = {}
    for precision, kernels in (("int8", "bitmask"), ("fp32", "dense")):
        paths[precision] = root / f"{precision}.so"
        compile_model(
            graph,
            paths[precision],
            precision=precision,
            kernels=kernels,
            max_context=64,
            quiet=True,
        )
    return paths


def _manifest(path):
    from sparsec.runtime.artifact import read_artifact

    return read_artifact(path).manifest


def test_manifest_lists_what_the_code_uses(tiny_models):
    int8 = _manifest(tiny_models["int8"])["cpu_features"]
    fp32 = _manifest(tiny_models["fp32"])["cpu_features"]
    assert {"avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi2"} <= set(int8)
    assert "avx512_bf16" not in int8 and "avx512_bf16" not in fp32
    assert "avx512_vnni" not in fp32 and "avx512_vbmi2" not in fp32  # no int8, no expandb
    assert int8 == sorted(int8)


def _simulate_flags(monkeypatch, without: set[str]):
    have = cpu.host_cpu_flags()
    flags = frozenset(f for f in have if f not in {cpu.normalize_feature(w) for w in without})
    monkeypatch.setattr(cpu, "host_cpu_flags", lambda *_a, **_k: flags)


def test_int8_model_loads_without_bf16(tiny_models, monkeypatch):
    _simulate_flags(monkeypatch, {"avx512_bf16"})
    with runtime.load(tiny_models["int8"]) as m:
        assert len(m.generate([1, 2, 3], max_new_tokens=4).token_ids) == 4


def test_int8_model_refused_without_vnni_before_native_code(tiny_models, monkeypatch):
    _simulate_flags(monkeypatch, {"avx512_vnni"})

    def no_dlopen(*args, **kwargs):
        raise AssertionError("the model's native code was loaded")

    monkeypatch.setattr(ctypes, "CDLL", no_dlopen)
    path = tiny_models["int8"]
    with pytest.raises(SparsecError) as err:
        runtime.load(path)
    assert str(err.value).startswith(f"this CPU lacks features that {path} needs: avx512_vnni (")
    # ablation: the fp32 model uses no VNNI instruction, so the same CPU runs it
    monkeypatch.undo()
    _simulate_flags(monkeypatch, {"avx512_vnni"})
    with runtime.load(tiny_models["fp32"]) as m:
        assert len(m.generate([1, 2, 3], max_new_tokens=4).token_ids) == 4
