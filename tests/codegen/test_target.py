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
    have = [f for f in target.AVX512.features if f not in ("avx512vnni", "avx512vbmi2")]
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


# --------------------------------------------------------------------------- Target


def test_host_target_is_the_avx512_isa_on_this_cpu():
    """avx512-amx where the CPU has AMX (Intel Sapphire Rapids+), else avx512 (Zen 4)."""
    t = target.host_target()
    amx = not target.missing_features(target.AVX512_AMX.features)
    assert t.isa is (target.AVX512_AMX if amx else target.AVX512)
    assert t.isa.lanes_f32 == 16 and t.isa.vector_bytes == 64
    assert t.cpu == target.default_target().cpu and t.cpu not in ("", "generic")
    assert target.host_target("avx512", "sapphirerapids").cpu == "sapphirerapids"
    assert t.describe() == {
        "triple": t.triple,
        "cpu": t.cpu,
        "isa": t.isa.name,
        "tuning": {
            "source": "built in",
            "sparse_expand": t.tuning.sparse_expand,
            "decode_group": t.tuning.decode_group,
            "wide_decode_group": t.tuning.wide_decode_group,
        },
    }


@pytest.mark.parametrize(
    "name, cpu, message",
    [
        (
            "avx3",
            None,
            "unknown --target 'avx3'; choose auto or avx512-amx, avx512, avx2-vnni, avx2",
        ),
        ("auto", "Zen 4", "--target-cpu 'Zen 4' is not an LLVM cpu name"),
        ("auto", "znver9", "--target-cpu 'znver9' is not an LLVM cpu name"),
    ],
)
def test_bad_target_is_named(name, cpu, message):
    with pytest.raises(SparsecError, match=message):
        target.host_target(name, cpu)


def test_the_target_cpu_schedules_the_code():
    """Same IR, two CPUs: the scheduling model is the target's, not the host's."""
    from sparsec.codegen.linear import emit_linear, pack_linear

    w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    module = ir.Module()
    emit_linear(module, "k", pack_linear(w, "dense_f32"), max_tokens=4)

    def asm(cpu):
        return target.emit_assembly(str(module), target=target.Target(target.AVX512, cpu))

    assert asm("znver4") != asm("sapphirerapids")
    assert asm("znver4") == asm("znver4")


def test_tuning_is_the_target_cpus(monkeypatch):
    """A CPU with a tuning row gets other code than one without (ablation: the row)."""
    from sparsec.codegen import tuning
    from sparsec.codegen.linear import emit_linear, pack_linear

    w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    w[np.abs(w) < 1.0] = 0.0
    packed = pack_linear(w, "bitmask_f32")

    def ir_for(cpu):
        module = ir.Module()
        emit_linear(module, "k", packed, max_tokens=4, target=target.Target(target.AVX512, cpu))
        return str(module)

    assert ir_for("testcpu") == ir_for("znver4")  # no row: DEFAULT for both
    row = tuning.Tuning(decode_group={**tuning.DEFAULT.decode_group, "bitmask_f32": 1})
    monkeypatch.setitem(tuning.TUNINGS, ("avx512", "testcpu"), row)
    assert target.Target(target.AVX512, "testcpu").tuning is row
    assert ir_for("testcpu") != ir_for("znver4")


def test_packing_follows_the_isa_and_emission_refuses_other_blocks():
    """The block rows are the ISA's lanes: a 256-bit ISA packs 8-row blocks, which an
    AVX-512 kernel refuses (it would read them as 16-row blocks)."""
    from sparsec.codegen.linear import emit_linear, pack_linear, unpack_weight

    narrow = target.Isa("test256", ("avx2",), 256, ("dense_f32",), "znver4")
    w = np.random.default_rng(1).standard_normal((20, 12)).astype(np.float32)
    packed = pack_linear(w, "dense_f32", narrow)
    assert packed.rows == 8 and packed.nblocks == 3
    assert np.array_equal(unpack_weight(packed), w)
    assert pack_linear(w, "dense_f32").nblocks == 2
    with pytest.raises(SparsecError, match="'bitmask_f32' has no test256 kernel"):
        pack_linear(w, "bitmask_f32", narrow)
    with pytest.raises(SparsecError, match="packed in 8-row blocks have no avx512 kernel"):
        emit_linear(ir.Module(), "k", packed, max_tokens=1, target=target.default_target())


def test_the_isa_is_pinned_whatever_the_target_cpu():
    """--target-cpu sapphirerapids tunes, but brings no AVX512-FP16 (not in the ISA): a
    half-precision add is widened to float32 instead of becoming vaddph."""
    half = ir.VectorType(ir.HalfType(), 32)
    m = ir.Module()
    fn = ir.Function(m, ir.FunctionType(ir.VoidType(), [half.as_pointer()] * 2), "add_half")
    b = ir.IRBuilder(fn.append_basic_block())
    x, y = fn.args
    b.store(b.fadd(b.load(x, align=2), b.load(y, align=2)), y, align=2)
    b.ret_void()
    spr = target.Target(target.AVX512, "sapphirerapids")
    assert "vaddph" not in target.emit_assembly(m, target=spr)
    assert "vcvtph2ps" in target.emit_assembly(m, target=spr)
    fp16 = target.Isa("fp16", (*target.AVX512.features, "avx512fp16"), 512, (), "znver4")
    assert "vaddph" in target.emit_assembly(m, target=target.Target(fp16, "sapphirerapids"))


def test_wide_layers_stream_their_own_decode_group(monkeypatch):
    """bitmask_i8 decode streams Tuning.wide_decode_group blocks from
    wide_decode_inputs inputs on (ablation: the wide group set to the narrow one)."""
    from sparsec.codegen import tuning
    from sparsec.codegen.linear import emit_linear, pack_linear

    def ir_for(in_features, row):
        monkeypatch.setitem(tuning.TUNINGS, ("avx512", "testcpu"), row)
        module = ir.Module()
        packed = pack_linear(np.zeros((64, in_features), np.float32), "bitmask_i8")
        tgt = target.Target(target.AVX512, "testcpu")
        emit_linear(module, "k", packed, max_tokens=1, target=tgt)
        return str(module).count("llvm.masked.expandload")

    base = tuning.DEFAULT
    assert tuning.decode_group(base, "bitmask_i8", 1024) == 2
    assert tuning.decode_group(base, "bitmask_i8", 576) == 1
    assert tuning.decode_group(base, "dense_i8", 4096) == base.decode_group["dense_i8"]
    narrow = tuning.Tuning(wide_decode_group={})
    # two streams' expand loads per step where one had them, only for the wide layer
    assert ir_for(1024, base) > ir_for(1024, narrow)
    assert ir_for(576, base) == ir_for(576, narrow)
