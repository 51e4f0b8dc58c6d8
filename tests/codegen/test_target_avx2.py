"""The 256-bit targets end to end: what the artifact's code may use, and which CPUs the
runtime lets run it (simulated AVX2-only CPU flags). Numbers against PyTorch are in
test_compile_e2e.py (AVX2_CASES); kernels against numpy in test_linear.py."""

from __future__ import annotations

import re

import onnx_ir as ir
import pytest
from isa_helpers import host_target_or_skip

from sparsec import runtime
from sparsec.codegen import isa_scan
from sparsec.codegen.compile import compile_model
from sparsec.codegen.target import ISAS, best_isa
from sparsec.errors import SparsecError
from sparsec.runtime import cpu
from sparsec.runtime.artifact import read_artifact, read_code
from sparsec.testing import build_contract_graph, make_tiny_llama, zero_smallest

# An AMD Zen 3 or Intel Core 11th gen laptop: AVX2 and FMA, no AVX-512, no AVX-VNNI
# (flag prefixes as cpu.normalize_feature spells them).
NOT_ON_AVX2_CPUS = ("avx512", "avxvnni", "amx")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The 70%-zeroed tiny model compiled int8 and fp32 for each ISA (bitmask kernels)."""
    root = tmp_path_factory.mktemp("avx2")
    model, tokenizer = make_tiny_llama(seed=3)
    zero_smallest(model, 0.7)
    graph = root / "g.onnx"
    ir.save(build_contract_graph(model, tokenizer), graph)
    paths = {}
    for isa in ISAS:
        tgt = host_target_or_skip(ISAS[isa])
        for precision in ("fp32", "int8"):
            path = paths[isa, precision] = root / f"{isa}-{precision}.so"
            compile_model(graph, path, precision=precision, max_context=64, quiet=True, target=tgt)
    return paths


@pytest.mark.parametrize("isa", ["avx2", "avx2-vnni"])
def test_avx2_ir_is_written_at_256_bits(models, isa, tmp_path):
    """LLVM would split 512-bit vectors or scalarise expand loads on AVX2, silently
    slowly: the emitted IR of the whole model has neither (checked before LLVM)."""
    from sparsec.codegen.compile import emit_model

    model, tokenizer = make_tiny_llama(seed=3)
    zero_smallest(model, 0.7)
    ir.save(build_contract_graph(model, tokenizer), tmp_path / "g.onnx")
    texts = {}
    for name in (isa, "avx512"):
        tgt = host_target_or_skip(ISAS[name])
        for precision in ("fp32", "int8"):
            # builtin: the table's memory-source expand, whatever this host measures
            em = emit_model(
                tmp_path / "g.onnx",
                precision=precision,
                kernels="bitmask",
                quiet=True,
                target=tgt,
                tuning="builtin",
            )
            texts[name, precision] = str(em.emitted.module)
    for precision in ("fp32", "int8"):
        # shufflevector's constant lane lists (<32 x i32> <i32 0, ...>) are not data
        text = re.sub(r"<\d+ x i32> <i32 [^>]*>", "", texts[isa, precision])
        assert "x float>" in text  # vectors there are
        assert not re.search(r"<(16|32|64) x (float|i32|i1)>|<64 x i8>|expandload", text)
        # ablation: the AVX-512 IR of the same model has them
        assert re.search(r"<16 x float>", texts["avx512", precision])
    assert "expandload" in texts["avx512", "int8"]


def _feature_counts(path):
    return isa_scan.elf_feature_counts(read_code(read_artifact(path)))


@pytest.mark.parametrize("isa", ["avx2", "avx2-vnni"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_avx2_code_has_no_avx512_instruction(models, isa, precision):
    """The whole .so (kernels, thread pool, driver) disassembled: no EVEX instruction."""
    used = _feature_counts(models[isa, precision])
    assert not [f for f in used if f.startswith("AVX512")]
    assert used["AVX2"] > 0 and used["FMA"] > 0
    assert ("AVX_VNNI" in used) == (isa == "avx2-vnni" and precision == "int8")
    manifest = read_artifact(models[isa, precision]).manifest
    assert manifest["target"]["isa"] == isa
    needs = {cpu.normalize_feature(f) for f in manifest["cpu_features"]}
    allowed = {"avxvnni"} if isa == "avx2-vnni" else set()
    assert not [f for f in needs - allowed if f.startswith(NOT_ON_AVX2_CPUS)]
    # ablation: the AVX-512 build of the same model is full of EVEX code
    assert _feature_counts(models["avx512", precision])["AVX512F"] > 100


def _avx2_only_cpu(monkeypatch):
    flags = frozenset(f for f in cpu.host_cpu_flags() if not f.startswith(NOT_ON_AVX2_CPUS))
    monkeypatch.setattr(cpu, "host_cpu_flags", lambda *_a, **_k: flags)
    return flags


def test_avx2_only_cpu_runs_the_avx2_model_and_refuses_the_avx512_one(models, monkeypatch):
    with runtime.load(models["avx2", "int8"]) as m:
        expected = m.generate([1, 2, 3, 4], max_new_tokens=8).token_ids
    flags = _avx2_only_cpu(monkeypatch)
    assert best_isa(flags).name == "avx2"
    with runtime.load(models["avx2", "int8"]) as m:
        assert m.generate([1, 2, 3, 4], max_new_tokens=8).token_ids == expected
    path = models["avx512", "int8"]
    with pytest.raises(SparsecError) as err:
        runtime.load(path)
    message = str(err.value)
    assert message.startswith(f"this CPU lacks features that {path} needs: avx512")
    assert "compiled for the avx512 target" in message
    assert message.endswith("recompile it for this one: sparsec compile --target auto")
    with pytest.raises(SparsecError, match="avx_vnni"):  # Zen 3 has no AVX-VNNI
        runtime.load(models["avx2-vnni", "int8"])
    with runtime.load(models["avx2-vnni", "fp32"]) as m:  # no vpdpbusd in fp32 code
        assert len(m.generate([1, 2, 3], max_new_tokens=2).token_ids) == 2


def test_target_auto_picks_the_best_isa_the_cpu_has():
    all_flags = cpu.host_cpu_flags()
    no512 = {f for f in all_flags if not f.startswith("avx512")}
    assert best_isa(no512 | {"avxvnni"}).name == "avx2-vnni"
    assert best_isa(no512 - {"avxvnni"}).name == "avx2"
    with pytest.raises(SparsecError, match="lacks the features sparsec kernels need: avx2"):
        best_isa({"sse2", "fma"})
