"""The avx512-amx target: multi-token int8 tiles on AMX (codegen/amx.py).

AMX's int32 sums are the same products as vpdpbusd's, so its kernels and models must
equal the avx512 ones bit for bit; kernels against numpy are in test_linear.py (the
``isa`` fixture runs them for avx512-amx too). Running needs a CPU with AMX (Intel
Sapphire Rapids or newer): those tests skip elsewhere, naming the missing features;
the machine-code checks run everywhere."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from isa_helpers import host_target_or_skip
from llvmlite import ir as llvm_ir

from sparsec import runtime
from sparsec.codegen import amx, target, tuning
from sparsec.codegen.compile import compile_model
from sparsec.codegen.linear import emit_linear, pack_linear
from sparsec.errors import SparsecError
from sparsec.runtime import cpu
from sparsec.runtime.artifact import read_artifact
from sparsec.testing import build_contract_graph, make_tiny_llama, zero_smallest

INT8 = ("dense_i8", "bitmask_i8")
# in_features: 40 (10 k-steps: a tail window only), 70 (one 64-column window + tail),
# 576 (9 whole windows), 200 rows: 13 blocks over 1-3 threads, the last one padded.
SHAPES = [(200, 40), (40, 70), (64, 576)]
TOKENS = [2, 5, 16, 17, 40]  # vector tiles (< amx_min_tokens); one AMX tile, + 1, several


@pytest.mark.parametrize("min_tokens", [None, 2], ids=["default", "amx_from_2"])
@pytest.mark.parametrize("fmt", INT8)
@pytest.mark.parametrize("shape", SHAPES)
def test_amx_tiles_equal_the_vnni_kernel_bit_for_bit(
    fmt, shape, min_tokens, kernel_for, monkeypatch
):
    """amx_from_2: every multi-token call on AMX, so partial one-call tiles (2, 5
    tokens) run too."""
    amx = host_target_or_skip(target.AVX512_AMX)
    if min_tokens is not None:
        row = dataclasses.replace(amx.tuning, amx_min_tokens=min_tokens)
        monkeypatch.setitem(tuning.TUNINGS, ("avx512-amx", amx.cpu), row)
    vnni = target.Target(target.AVX512, amx.cpu)
    out_f, in_f = shape
    kernels = [kernel_for(fmt, out_f, in_f, max(TOKENS), tgt) for tgt in (amx, vnni)]
    rng = np.random.default_rng(hash((fmt, shape)) % 2**32)
    for sparsity in (0.0, 0.7):
        w = rng.standard_normal(shape).astype(np.float32)
        w[rng.random(shape) < sparsity] = 0.0
        packed = pack_linear(w, fmt, target.AVX512_AMX)
        for n in TOKENS:
            x = rng.standard_normal((n, in_f)).astype(np.float32)
            for nthreads in (1, 3):
                y_amx, y_vnni = (
                    k(packed.data, x, np.full((n, out_f), np.nan, np.float32), n, nthreads)
                    for k in kernels
                )
                assert np.array_equal(y_amx, y_vnni), (fmt, shape, sparsity, n, nthreads)


def _instructions(fmt: str, isa: target.Isa, shape=(64, 576)) -> dict[str, int]:
    module = llvm_ir.Module()
    packed = pack_linear(np.zeros(shape, np.float32), fmt, isa)
    emit_linear(module, "lin", packed, max_tokens=64, target=target.Target(isa, "sapphirerapids"))
    asm = target.emit_assembly(module, target=target.Target(isa, "sapphirerapids"))
    return {op: len([ln for ln in asm.splitlines() if ln.split()[:1] == [op]]) for op in OPS}


OPS = ("tdpbusd", "tileloadd", "ldtilecfg", "tilerelease", "vpdpbusd")


@pytest.mark.parametrize("fmt", INT8)
def test_multi_token_int8_work_is_amx_tiles_and_decode_stays_vnni(fmt):
    """Machine code (no AMX CPU needed): the avx512-amx kernel multiplies calls of
    amx_min_tokens or more with tdpbusd (each tile function configures and releases the
    tiles) and keeps vpdpbusd for decode and small calls; the avx512 kernel (the
    ablation) has no tile instruction."""
    amx, plain = _instructions(fmt, target.AVX512_AMX), _instructions(fmt, target.AVX512)
    assert amx["tdpbusd"] >= 1 and amx["tileloadd"] >= 2 and amx["vpdpbusd"] >= 1
    assert amx["ldtilecfg"] >= 1 and amx["tilerelease"] == amx["ldtilecfg"]
    assert plain["vpdpbusd"] >= 1 and not any(plain[op] for op in OPS if op != "vpdpbusd")


def test_layers_too_wide_for_the_stack_buffer_keep_the_vector_tiles():
    widest = 4 * (amx.MAX_BLOCK_BYTES // amx.TILE_BYTES)  # in_features of one 512 KiB block
    assert _instructions("bitmask_i8", target.AVX512_AMX, (16, widest))["tdpbusd"] >= 1
    assert _instructions("bitmask_i8", target.AVX512_AMX, (16, widest + 4))["tdpbusd"] == 0


def test_float_kernels_have_no_tiles():
    for fmt in ("dense_f32", "bitmask_f32"):
        assert _instructions(fmt, target.AVX512_AMX)["tdpbusd"] == 0


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The 70%-zeroed tiny model compiled int8 for avx512-amx and avx512 (bitmask and
    dense kernels both: autotune's choice per layer)."""
    amx = host_target_or_skip(target.AVX512_AMX)
    root = tmp_path_factory.mktemp("amx")
    model, tokenizer = make_tiny_llama(seed=5)
    zero_smallest(model, 0.7)
    ir.save(build_contract_graph(model, tokenizer), root / "g.onnx")
    paths = {}
    for tgt in (amx, target.Target(target.AVX512, amx.cpu)):
        paths[tgt.isa.name] = root / f"{tgt.isa.name}.so"
        compile_model(
            root / "g.onnx",
            paths[tgt.isa.name],
            precision="int8",
            max_context=96,
            quiet=True,
            target=tgt,
        )
    return paths


def test_an_amx_model_equals_the_avx512_one_and_records_amx(tiny_models):
    manifest = read_artifact(tiny_models["avx512-amx"]).manifest
    assert manifest["target"]["isa"] == "avx512-amx"
    assert {"amx_tile", "amx_int8"} <= set(manifest["cpu_features"])
    plain = read_artifact(tiny_models["avx512"]).manifest
    assert not any(f.startswith("amx") for f in plain["cpu_features"])
    prompt = np.random.default_rng(0).integers(0, 256, 37).tolist()  # 37 = 16 + 16 + 5
    results = []
    for isa in ("avx512-amx", "avx512"):
        with runtime.load(tiny_models[isa], threads=2) as m:
            logits = m.forward(prompt)  # prefill: multi-token tiles
            tokens = m.generate(prompt, max_new_tokens=12).token_ids
            with m.engine(parallel=4) as engine:  # batched decode: 4 rows a step
                batched = engine.generate(
                    [prompt[:9], prompt[:20], prompt, prompt[3:]], max_new_tokens=8
                )
            results.append((logits, tokens, [r.token_ids for r in batched]))
    (la, ta, ba), (lp, tp, bp) = results
    assert np.array_equal(la, lp) and ta == tp and ba == bp


def test_an_amx_model_is_refused_on_a_cpu_without_amx(tiny_models, monkeypatch):
    flags = {f for f in cpu.host_cpu_flags() if not f.startswith("amx")}
    monkeypatch.setattr(cpu, "host_cpu_flags", lambda cpuinfo=cpu.CPUINFO: frozenset(flags))
    path = tiny_models["avx512-amx"]
    with pytest.raises(SparsecError, match=f"this CPU lacks features that {path} needs: amx"):
        runtime.load(path)


def test_linux_refusing_amx_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(cpu, "_request_amx", lambda: "arch_prctl(ARCH_REQ_XCOMP_PERM): denied")
    manifest = {
        "target": {
            "triple": "x86_64-unknown-linux-gnu",
            "cpu": "sapphirerapids",
            "isa": "avx512-amx",
        },
        "cpu_features": [],
    }
    cpu.check_host(manifest, "m.so")  # no AMX instruction in the code: not requested
    manifest["cpu_features"] = ["amx_tile"]
    monkeypatch.setattr(cpu, "missing_cpu_features", lambda required, cpuinfo=None: [])
    with pytest.raises(SparsecError) as err:
        cpu.check_host(manifest, "m.so")
    assert str(err.value) == (
        "Linux refused AMX to this process (arch_prctl(ARCH_REQ_XCOMP_PERM): denied), which "
        "m.so uses; upgrade the kernel (5.16+) or recompile without AMX: sparsec compile "
        "--target avx512"
    )
