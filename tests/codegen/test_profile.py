"""``sparsec compile --profile`` and ``sparsec profile``: per-op cycle counters in the
compiled step, read back as microseconds per op, on the tiny Llama. Ablations: a model
compiled without --profile has no counters (and is refused with the fix), and its
logits equal the profiled model's (the counters change no result)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

from sparsec import runtime
from sparsec.codegen.compile import compile_model
from sparsec.errors import SparsecError
from sparsec.runtime.profile import format_profile, group_name, profile
from sparsec.testing import build_contract_graph, make_tiny_llama, zero_smallest


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(profiled, plain) int8 70% builds of the same graph."""
    torch_model, tokenizer = make_tiny_llama(seed=3)
    zero_smallest(torch_model, 0.7)
    root = tmp_path_factory.mktemp("profile")
    graph = root / "g.onnx"
    ir.save(build_contract_graph(torch_model, tokenizer), graph)
    out = []
    for flag in (True, False):
        so = root / f"m{int(flag)}.so"
        options = dict(precision="int8", kernels="bitmask", max_context=128, max_tokens=16)
        manifest = compile_model(graph, so, quiet=True, profile=flag, **options)
        out.append((so, manifest))
    return out


def test_every_op_is_counted(models):
    (so, manifest), _ = models
    ops = manifest["profile"]["ops"]
    assert ops[0] == {"op": "embed"} and ops[-1]["op"] == "linear"
    assert sum(o["op"] == "attention" for o in ops) == manifest["config"]["num_hidden_layers"]
    with runtime.load(so, threads=2) as m:
        prof = profile(m, rows=4, position=20, steps=20)
    assert [(t.op, t.name) for t in prof.ops] == [(o["op"], o.get("name", "")) for o in ops]
    assert all(t.seconds > 0 for t in prof.ops)
    # The ops' medians add up to about the median step (less the pool's dispatch); a
    # loaded machine's interrupted steps count in neither.
    total = sum(t.seconds for t in prof.ops)
    assert 0.3 * prof.step_seconds < total < 2 * prof.step_seconds
    grouped = dict(prof.grouped())
    assert {"attention", "linear q_proj+k_proj+v_proj", "linear lm_head"} <= set(grouped)
    assert sum(grouped.values()) == pytest.approx(total)
    table = format_profile(prof, str(so))
    assert "4 rows (one per sequence) at position 20" in table and "attention" in table


def test_counters_change_no_result(models):
    """The profiled step computes what the plain one does, bit for bit."""
    (profiled, _), (plain, _) = models
    ids = list(range(5, 17))
    logits = []
    for so in (profiled, plain):
        with runtime.load(so, threads=2) as m:
            logits.append(m.forward(ids))
    np.testing.assert_array_equal(logits[0], logits[1])


def test_prefill_profile_keeps_the_model_cache(models):
    (so, _), _ = models
    with runtime.load(so, threads=2) as m:
        before = m.forward([3, 4, 5])
        m.reset()
        prof = profile(m, rows=16, position=100, prefill=True, steps=5)
        m.reset()
        after = m.forward([3, 4, 5])
    assert prof.prefill and prof.rows == 16
    np.testing.assert_array_equal(before, after)


def test_refused_without_profile_and_bad_arguments(models):
    (so, _), (plain, _) = models
    with runtime.load(plain, threads=1) as m:
        with pytest.raises(SparsecError, match="compiled without --profile.*--profile"):
            profile(m)
    with runtime.load(so, threads=1) as m:
        for kwargs, message in [
            ({"rows": 17}, "rows must be an integer from 1 to 16"),
            ({"rows": 0}, "rows must be"),
            ({"position": 128}, "position must be an integer from 0 to 127"),
            ({"rows": 16, "prefill": True, "position": 113}, "position must be .* 0 to 112"),
            ({"steps": 0}, "steps must be"),
            ({"prefill": "yes"}, "prefill must be True or False"),
        ]:
            with pytest.raises(SparsecError, match=message):
                profile(m, **kwargs)


def test_caches_that_do_not_fit_are_refused(models, monkeypatch):
    """The profile's own KV caches are checked against available memory first."""
    (so, _), _ = models
    from sparsec import resources

    monkeypatch.setattr(resources, "available_memory", lambda: 1024)
    with runtime.load(so, threads=1) as m:
        with pytest.raises(SparsecError, match="profiling 16 sequences needs .* fewer --rows"):
            profile(m, rows=16)
        assert m.forward([1, 2]).shape[0] == 2  # refused before holding the model


def test_group_name():
    fused = "model.layers.3.self_attn.q_proj+model.layers.3.self_attn.k_proj"
    assert group_name("linear", fused) == "linear q_proj+k_proj"
    assert group_name("linear", "lm_head") == "linear lm_head"
    assert group_name("attention", "3") == "attention"


def test_cli(models, tmp_path):
    (so, _), (plain, _) = models
    out = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "sparsec", "profile", str(so), "--rows", "2", "--steps", "5"]
    done = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 rows (one per sequence) at position 0" in done.stdout and "us/step" in done.stdout
    report = json.loads(out.read_text())
    assert report["rows"] == 2 and len(report["ops"]) > 10
    refused = subprocess.run(
        [sys.executable, "-m", "sparsec", "profile", str(plain)], capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "recompile it with `sparsec compile --profile`" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_cli_json_that_is_the_model_is_refused_before_the_run(models):
    (so, _), _ = models
    before = so.read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "sparsec", "profile", str(so), "--json", str(so)],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "--json" in done.stderr and "is also an input" in done.stderr
    assert "Traceback" not in done.stderr and "us/step" not in done.stdout
    assert so.read_bytes() == before
