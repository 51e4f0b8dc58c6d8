"""Per-CPU tuning measured on the host (host_tuning.py): the register-source sparse
expand (``Tuning.sparse_expand``) and the decode groups it chooses between.

The kernels with either expand and every group value are checked against
``reference_linear`` (exact for int8), their code for the instruction form each expand
names (the ablation: the default emits the memory form), the value streams' slack
against a guard page, the choice rule with a fake timer (faster beyond the margin wins,
within it the table's value stays), the cache (one measurement per CPU model, a
damaged cache measured again), and whole models compiled with each expand against each
other and against what the manifest records.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import re

import numpy as np
import onnx_ir as ir
import pytest
from isa_helpers import host_target_or_skip
from llvmlite import ir as llvm_ir

from sparsec import runtime
from sparsec.codegen import host_tuning, target
from sparsec.codegen.compile import compile_model
from sparsec.codegen.linear import emit_linear, pack_linear, reference_linear
from sparsec.codegen.tuning import SPARSE_EXPANDS
from sparsec.errors import SparsecError
from sparsec.runtime.artifact import read_artifact
from sparsec.runtime.summary import format_summary, summarize
from sparsec.testing import build_contract_graph, make_tiny_llama, zero_smallest

SPARSE = ("bitmask_i8", "bitmask_f32")


def _target(expand: str, fmt: str | None = None) -> target.Target:
    """This host's avx512 target with ``expand`` for ``fmt`` (every sparse format: None)."""
    base = host_target_or_skip(target.AVX512)
    tuning = base.tuning
    for f in [fmt] if fmt else SPARSE:
        tuning = dataclasses.replace(tuning, sparse_expand={**tuning.sparse_expand, f: expand})
    return dataclasses.replace(base, measured=tuning)


def _weight(shape, sparsity, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0.0
    return w


@pytest.mark.parametrize("expand", SPARSE_EXPANDS)
@pytest.mark.parametrize("fmt", SPARSE)
@pytest.mark.parametrize(
    "shape, sparsity", [((576, 1536), 0.7), ((100, 70), 0.5), ((17, 260), 0.9)]
)
def test_expand_matches_reference(kernel_for, fmt, expand, shape, sparsity):
    w = _weight(shape, sparsity)
    packed = pack_linear(w, fmt)
    kernel = kernel_for(fmt, *shape, 8, _target(expand))
    rng = np.random.default_rng(1)
    for n, threads in ((1, 1), (1, 2), (5, 2)):
        x = rng.standard_normal((n, shape[1])).astype(np.float32)
        y = kernel(packed.data, x, np.zeros((n, shape[0]), np.float32), n, threads)
        ref = reference_linear(packed, x)
        tol = 0.0 if fmt == "bitmask_i8" else 1e-5
        assert np.abs(y - ref).max() <= tol * np.abs(ref).max(), (fmt, expand, n, threads)


GROUP_KNOBS = [k for k in host_tuning.KNOBS if k.field != "sparse_expand"]


@pytest.mark.parametrize("knob", GROUP_KNOBS, ids=lambda k: f"{k.field}-{k.fmt}")
def test_every_group_value_matches_reference(kernel_for, knob):
    """Each decode-group value the host may choose, on the layers it is timed on (plus a
    block count no group divides), one token on 1 and 2 threads."""
    base = host_target_or_skip(target.AVX512)
    rng = np.random.default_rng(4)
    for value in knob.values:
        tgt = dataclasses.replace(base, measured=host_tuning.with_value(base.tuning, knob, value))
        for shape in [*knob.shapes, (16 * 7 + 3, knob.shapes[0][1])]:
            packed = pack_linear(_weight(shape, 0.7), knob.fmt)
            kernel = kernel_for(knob.fmt, *shape, 2, tgt)
            x = rng.standard_normal((1, shape[1])).astype(np.float32)
            ref = reference_linear(packed, x)
            for threads in (1, 2):
                y = kernel(packed.data, x, np.zeros((1, shape[0]), np.float32), 1, threads)
                tol = 0.0 if knob.fmt == "bitmask_i8" else 1e-5
                assert np.abs(y - ref).max() <= tol * np.abs(ref).max(), (knob, value, shape)


def _assembly(fmt: str, tgt: target.Target) -> str:
    module = llvm_ir.Module()
    dummy = pack_linear(np.zeros((64, 256), np.float32), fmt)
    emit_linear(module, "lin", dummy, max_tokens=4, target=tgt)
    return target.emit_assembly(module, target=tgt)


@pytest.mark.parametrize(
    "fmt, instruction", [("bitmask_i8", "vpexpandb"), ("bitmask_f32", "vexpandps")]
)
def test_each_expand_emits_its_instruction_form(fmt, instruction):
    """register: the expand reads a register (after a plain load); memory (the default,
    the ablation): it reads the value stream itself."""
    forms = {}
    for expand in SPARSE_EXPANDS:
        asm = _assembly(fmt, _target(expand, fmt))
        lines = [ln.strip() for ln in asm.splitlines() if ln.strip().startswith(instruction)]
        assert lines, f"no {instruction} in the {expand} kernel"
        forms[expand] = {"memory" if "(" in ln.split(",")[0] else "register" for ln in lines}
    assert forms == {"memory": {"memory"}, "register": {"register"}}
    builtin = host_target_or_skip(target.AVX512)
    assert builtin.tuning.sparse_expand[fmt] == "memory"  # the table's default
    assert re.search(rf"{instruction}\s+\(", _assembly(fmt, builtin))


@pytest.mark.parametrize("fmt", SPARSE)
def test_register_expand_stays_inside_the_blob(kernel_for, fmt):
    """Each step loads a full vector from the value stream: the packed streams end with a
    vector of slack, so a blob that ends at a guard page is still read safely (every
    weight nonzero in the last rows, so the last load starts at the last values)."""
    shape = (40, 512)
    w = _weight(shape, 0.6)
    w[-8:] = 0.5  # dense last block: its last step reads the stream's last 64 bytes
    packed = pack_linear(w, fmt)
    ends = np.frombuffer(packed.data, np.int64, count=1, offset=packed.sections["table"] + 8 * 3)
    assert packed.data.nbytes - int(ends[-1]) >= 64, "no vector of slack after the streams"
    page = mmap.PAGESIZE
    size = -(-packed.data.nbytes // page) * page
    area = mmap.mmap(-1, size + page)
    guard = ctypes.c_void_p(ctypes.addressof(ctypes.c_char.from_buffer(area)) + size)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(guard, ctypes.c_size_t(page), 0) == 0  # PROT_NONE
    try:
        blob = np.frombuffer(area, np.uint8, count=size)[size - packed.data.nbytes :]
        blob[:] = packed.data
        kernel = kernel_for(fmt, *shape, 4, _target("register", fmt))
        x = np.random.default_rng(2).standard_normal((3, shape[1])).astype(np.float32)
        y = kernel(blob, x, np.zeros((3, shape[0]), np.float32), 3, 1)
        np.testing.assert_allclose(y, reference_linear(packed, x), rtol=1e-5, atol=1e-6)
    finally:
        libc.mprotect(guard, ctypes.c_size_t(page), 3)
        del blob
        area.close()


# ----------------------------------------------------------------------- the choice


def _fake_timer(speed: dict[str, float], calls: list | None = None):
    """Seconds per kernel: 1.0 times ``speed`` of the kernel's expand for its format."""

    def measure(kernels):
        if calls is not None:
            calls.append(len(kernels))
        return [speed[t.tuning.sparse_expand[p.fmt]] for p, t in kernels]

    return measure


@pytest.mark.parametrize(
    "register_speed, chosen",
    [(0.5, "register"), (0.9, "register"), (0.97, "memory"), (1.0, "memory"), (1.5, "memory")],
)
def test_a_value_must_win_by_the_margin(register_speed, chosen):
    base = host_target_or_skip(target.AVX512)
    assert host_tuning.MARGIN == 0.05
    tuning, seconds = host_tuning.measure_tuning(
        base, _fake_timer({"memory": 1.0, "register": register_speed})
    )
    assert tuning.sparse_expand == {"bitmask_i8": chosen, "bitmask_f32": chosen}
    assert set(seconds) == {f"{k.field}/{k.fmt}" for k in host_tuning.KNOBS}
    runs = 2 if chosen == "register" else 1  # a change is measured again to confirm it
    assert seconds["sparse_expand/bitmask_i8"]["register"] == [register_speed] * 2 * runs
    # the groups tie under this timer: the table's values stay, as every other field
    assert dataclasses.replace(tuning, sparse_expand=base.tuning.sparse_expand) == base.tuning


def test_a_change_needs_a_second_run_to_agree():
    """One round where another process slowed the table's value: not a change."""
    base = host_target_or_skip(target.AVX512)
    rounds = []

    def measure(kernels):
        rounds.append([t.tuning.sparse_expand[p.fmt] for p, t in kernels])
        slow_memory = len(rounds) == 1  # only the first round is disturbed
        memory = 1.5 if slow_memory else 1.0
        return [memory if e == "memory" else 1.0 for e in rounds[-1]]

    tuning, seconds = host_tuning.measure_tuning(base, measure)
    assert tuning.sparse_expand["bitmask_i8"] == "memory"
    assert rounds[1] == ["memory", "memory", "register", "register"]  # the confirming run
    assert seconds["sparse_expand/bitmask_i8"]["memory"] == [1.5, 1.5, 1.0, 1.0]


def test_a_decode_group_is_chosen_like_the_expand():
    """Four bitmask_i8 streams 20% faster at narrow layers: chosen; the wide layers'
    group (timed on other layers) and the other formats keep the table's."""
    base = host_target_or_skip(target.AVX512)

    def measure(kernels):
        def seconds(p, t):
            group = t.tuning.decode_group[p.fmt]
            narrow = p.in_features < t.tuning.wide_decode_inputs
            return 0.8 if (p.fmt, group, narrow) == ("bitmask_i8", 4, True) else 1.0

        return [seconds(p, t) for p, t in kernels]

    tuning, _ = host_tuning.measure_tuning(base, measure)
    assert tuning.decode_group == {**base.tuning.decode_group, "bitmask_i8": 4}
    assert tuning.wide_decode_group == base.tuning.wide_decode_group
    assert tuning.sparse_expand == base.tuning.sparse_expand


def test_avx2_has_nothing_to_measure():
    avx2 = target.Target(target.AVX2, "haswell")
    assert host_tuning.knobs_for(avx2) == ()
    assert host_tuning.host_tuned(avx2, measure=_fake_timer({})) is avx2


def test_measured_once_per_cpu_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    base = host_target_or_skip(target.AVX512)
    calls = []
    fast_register = _fake_timer({"memory": 1.0, "register": 0.5}, calls)
    first = host_tuning.host_tuned(base, quiet=True, measure=fast_register)
    assert first.tuning.sparse_expand["bitmask_i8"] == "register"
    assert first.describe()["tuning"]["source"] == "measured on the host"
    knobs = len(host_tuning.KNOBS) + 2  # a run per knob, a second for each change
    assert len(calls) == knobs
    again = host_tuning.host_tuned(base, quiet=True, measure=fast_register)
    assert again == first and len(calls) == knobs  # from the cache
    cache = tmp_path / host_tuning.CACHE_FILE
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["values"]["sparse_expand/bitmask_f32"] == "register"
    # a cache naming a value sparsec does not know, or not JSON at all: measured again
    for damaged in (cache.read_text().replace('"register"', '"sideways"'), "{not json"):
        cache.write_text(damaged)
        assert host_tuning.host_tuned(base, quiet=True, measure=fast_register) == first
    assert len(calls) == 3 * knobs
    # use_cache=False neither reads nor writes it
    cache.unlink()
    host_tuning.host_tuned(base, quiet=True, use_cache=False, measure=fast_register)
    assert not cache.exists() and len(calls) == 4 * knobs


def test_an_unwritable_cache_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(blocker / "cache"))
    base = host_target_or_skip(target.AVX512)
    with pytest.raises(
        SparsecError, match=r"cannot write the kernel timing cache .*SPARSEC_CACHE_DIR"
    ):
        host_tuning.host_tuned(base, quiet=True, measure=_fake_timer({"memory": 1, "register": 1}))


# ------------------------------------------------------------------- whole models


@pytest.fixture(scope="module")
def sparse_graph(tmp_path_factory):
    model, tokenizer = make_tiny_llama(seed=3)
    zero_smallest(model, 0.7)
    path = tmp_path_factory.mktemp("tuning") / "g.onnx"
    ir.save(build_contract_graph(model, tokenizer), path)
    return path


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_models_with_either_expand_compute_the_same_logits(sparse_graph, tmp_path, precision):
    """The expand moves the same bytes into the same lanes: logits are bit-identical, and
    the manifest (and `sparsec inspect`) records which one each model uses."""
    logits = {}
    for expand in SPARSE_EXPANDS:
        so = tmp_path / f"{expand}.so"
        manifest = compile_model(
            sparse_graph,
            so,
            precision=precision,
            kernels="bitmask",
            max_context=64,
            quiet=True,
            target=_target(expand),
        )
        tuning = manifest["target"]["tuning"]
        assert tuning["source"] == "measured on the host"
        assert tuning["sparse_expand"] == {"bitmask_f32": expand, "bitmask_i8": expand}
        shown = format_summary(summarize(read_artifact(so)))
        assert f"tuning measured on the host (sparse expand: bitmask_f32 {expand}" in shown
        logits[expand] = runtime.load(so, threads=2).forward(list(range(3, 40)))
    np.testing.assert_array_equal(logits["memory"], logits["register"])


def test_compile_measures_only_for_this_cpu(sparse_graph, tmp_path, monkeypatch):
    """tuning="host" measures (once) when the code is for this CPU; "builtin", another
    --target-cpu or --kernels dense never do, and say "built in"."""
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(
        host_tuning, "_time_kernels", _fake_timer({"memory": 1.0, "register": 0.5}, calls)
    )
    host = target.host_target("avx512")
    common = dict(precision="int8", max_context=64, quiet=True, kernels="bitmask")

    def tuning_of(name, **options):
        return compile_model(sparse_graph, tmp_path / name, **{**common, **options})["target"][
            "tuning"
        ]

    knobs = len(host_tuning.KNOBS) + 2  # a run per knob, a second for each change
    assert tuning_of("host.so", target=host)["sparse_expand"]["bitmask_i8"] == "register"
    assert len(calls) == knobs
    assert tuning_of("host2.so", target=host, tuning="host")["source"] == "measured on the host"
    assert len(calls) == knobs  # cached
    assert tuning_of("builtin.so", target=host, tuning="builtin") == {
        "source": "built in",
        "sparse_expand": {"bitmask_f32": "memory", "bitmask_i8": "memory"},
        "decode_group": host.tuning.decode_group,
        "wide_decode_group": host.tuning.wide_decode_group,
    }
    other_cpu = target.host_target("avx512", "znver4" if host.cpu != "znver4" else "icelake-server")
    assert tuning_of("other.so", target=other_cpu)["source"] == "built in"
    assert tuning_of("dense.so", target=host, kernels="dense")["source"] == "built in"
    assert len(calls) == knobs
    with pytest.raises(SparsecError, match="unknown tuning 'fast'; choose host or builtin"):
        tuning_of("bad.so", target=host, tuning="fast")
