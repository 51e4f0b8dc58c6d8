"""The CI kernel check (benchmarks/kernel_regression.py): an A/B of the working tree's
kernels against the baseline commit's, each built in its own process and timed
alternately on this CPU.

The committed baseline passes; a planted slow kernel (the real kernel called twice)
fails the code, fingerprint and timing checks with a report naming it; a baseline
recorded on another CPU changes nothing; a baseline commit that cannot be built or
found is a one-line error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sparsec.bench import regression as reg

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "kernel_regression.py"
SLOWED = ("dense_f32_gate_up_1536x576_s00", "bitmask_i8_down_576x1536_s70")
ONLY = "^(" + "|".join(SLOWED) + ")$"
EMITTER = f"{Path(__file__).with_name('slowed_kernel.py')}:slowed_kernel"


@pytest.fixture(scope="module")
def kr():
    spec = importlib.util.spec_from_file_location("kernel_regression", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(kr, capsys, *args) -> tuple[int, str]:
    code = kr.main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_committed_baseline_passes(kr, capsys, tmp_path):
    """What .ci/run checks: every function's code and fingerprint equal to the baseline
    commit's, every timed item within tolerance of it."""
    code, log = run(kr, capsys, "--check", "--out", str(tmp_path))
    assert code == 0, log
    assert "ok     code: " in log and "kernel regression passed" in log
    # every kind of function a model compile emits is tracked
    fps = json.loads((tmp_path / "working-tree" / "functions.json").read_text())["fingerprints"]
    for op in ("attention", "rope_kv_write", "rmsnorm", "swiglu_act", "embedding", "quantize"):
        assert any(f.startswith("model_i8_bitmask/spc_" + op) for f in fps), op
    assert "model_f32_dense/sparsec_forward_body" in fps


def test_planted_slow_kernel_fails(kr, capsys, tmp_path):
    code, log = run(
        kr, capsys, "--check", "--only", ONLY, "--emitter", EMITTER, "--out", str(tmp_path)
    )
    assert code == 1, log
    # code: the diff names both kernels, and the report says where it is
    assert "FAIL   code: " in log and all(n in log for n in SLOWED)
    diff = (tmp_path / "code.diff").read_text()
    assert all(f"working-tree/{n}" in diff for n in SLOWED) and "call" in diff
    # fingerprints: the wrapper calls the real kernel (the second call is a tail jump)
    assert "call 0 -> 1" in log
    # time: both slower in the measurement and in every re-measurement
    for name in SLOWED:
        line = next(x for x in log.splitlines() if x.startswith("FAIL ") and f" {name}: " in x)
        assert "re-measured" in line and "per-sample ratio" in line
    last = next(x for x in log.splitlines() if "item(s) slower than the baseline" in x)
    assert all(n in last for n in SLOWED)


def test_cpu_of_the_baseline_is_not_part_of_the_verdict(kr, capsys, tmp_path, monkeypatch):
    data = json.loads(kr.BASELINE.read_text())
    data["environment"]["host_cpu"] = "AMD EPYC 9R14 96-Core Processor"
    other = tmp_path / "kernel_baseline.json"
    other.write_text(json.dumps(data))
    monkeypatch.setattr(kr, "BASELINE", other)
    code, log = run(kr, capsys, "--check", "--only", ONLY, "--out", str(tmp_path / "out"))
    assert code == 0, log
    assert "recorded on AMD EPYC 9R14" in log and "2 items" in log


def test_baseline_commit_without_the_suite_is_a_clear_error(kr, capsys, tmp_path):
    root = reg.git(REPO, "rev-list", "--max-parents=0", "HEAD").split()[-1]
    code, log = run(
        kr, capsys, "--check", "--only", ONLY, "--baseline", root, "--out", str(tmp_path)
    )
    assert code == 1
    assert "error: the baseline commit has no sparsec/bench/kernel_replay.py" in log


def test_missing_baseline_commit_is_a_clear_error(kr, capsys, tmp_path):
    code, log = run(kr, capsys, "--check", "--baseline", "0" * 40, "--out", str(tmp_path))
    assert code == 1
    assert f"the baseline commit {'0' * 40} is not in the repository" in log
    assert "git fetch" in log


@pytest.mark.parametrize(
    "args,message",
    [
        (["--check", "--only", "("], "--only '(' is not a regular expression"),
        (["--check", "--emitter", "/nonexistent.py:f"], "expected an existing FILE.py:FUNCTION"),
        (["--check", "--tolerance", "0"], "--tolerance 0.0 is outside (0, 10)"),
        (["--study", "0"], "--study needs at least 1 pass"),
    ],
)
def test_usage_errors(kr, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        kr.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_only_that_matches_nothing_is_a_clear_error(kr, capsys, tmp_path):
    code, log = run(kr, capsys, "--check", "--only", "^no_such_kernel$", "--out", str(tmp_path))
    assert code == 1
    assert "error: --only '^no_such_kernel$' matches no kernel or model variant" in log


# --------------------------------------------------------------------------- verdicts


def _timing(base, work, confirmations=()):
    return reg.ABTiming("k", 1000, list(base), list(work), list(confirmations))


def test_an_item_fails_only_when_every_measurement_is_over_tolerance():
    slow = _timing([1.0, 1.1], [1.3, 1.2])  # fastest 1.2 over fastest 1.0: +20%
    assert reg.Verdict(slow, 0.10).failed
    assert not reg.Verdict(slow, 0.25).failed
    cleared = _timing([1.0, 1.1], [1.3, 1.2], confirmations=[1.25, 1.04])
    assert not reg.Verdict(cleared, 0.10).failed  # one re-measurement within tolerance
    confirmed = _timing([1.0], [1.2], confirmations=[1.3, 1.15])
    assert reg.Verdict(confirmed, 0.10).failed
    assert reg.Verdict(confirmed, 0.10).change == pytest.approx(0.15)


def test_items_that_cannot_be_compared_are_named():
    class FakeSide:
        def __init__(self, items):
            self.functions = {"items": items}

    a = FakeSide(
        {
            "same": {"key": "x", "bytes": 1},
            "gone": {"key": "g", "bytes": 1},
            "moved": {"key": "p1", "bytes": 1},
        }
    )
    b = FakeSide(
        {
            "same": {"key": "x", "bytes": 2},
            "new": {"key": "n", "bytes": 1},
            "moved": {"key": "p2", "bytes": 1},
        }
    )
    same, problems = reg.comparable_items(a, b)
    assert same == {"same": 2}
    assert problems == [
        "gone: timed at the baseline commit, no longer in the suite",
        "moved: measures something else than at the baseline commit",
        "new: new timed item, not at the baseline commit",
    ]


def test_changed_paths_sees_edits_and_new_files(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("a = 1\n")
    for args in (["init", "-q"], ["add", "-A"]):
        reg.git(repo, *args)
    reg.git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert reg.changed_paths(repo, ["pkg"]) == []
    (repo / "pkg" / "a.py").write_text("a = 2\n")
    (repo / "pkg" / "b.py").write_text("b = 1\n")
    assert sorted(reg.changed_paths(repo, ["pkg"])) == ["pkg/a.py", "pkg/b.py"]
