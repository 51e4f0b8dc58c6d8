"""The CI kernel regression check (benchmarks/kernel_regression.py): the committed
baselines pass, and a deliberately slowed kernel fails both the fingerprint and the
timing check with a report that names it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sparsec.bench import regression as reg

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_regression.py"
SLOWED = ("dense_f32_gate_up_1536x576_s00", "bitmask_i8_down_576x1536_s70")


@pytest.fixture(scope="module")
def kr():
    spec = importlib.util.spec_from_file_location("kernel_regression", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slowed_kernel(module, name, packed):
    """The real kernel, called twice by a wrapper of the same signature: same result,
    twice the work (noinline, so LLVM cannot merge the two calls)."""
    from llvmlite import ir

    inner = reg.emit_kernel(module, name + "_work", packed)
    inner.attributes.add("noinline")
    wrapper = ir.Function(module, inner.function_type, name)
    b = ir.IRBuilder(wrapper.append_basic_block("entry"))
    b.call(inner, wrapper.args)
    b.call(inner, wrapper.args)
    b.ret_void()
    return wrapper


def test_committed_baselines_pass(kr):
    """The check .ci/run runs: every fingerprint equal, every timing within tolerance."""
    assert kr.main(["--check"]) == 0


def test_slowed_kernel_fails_with_a_report_naming_it(kr):
    specs = [s for s in reg.kernel_set() if s.name in SLOWED]
    packs = reg.pack_all(specs)
    assert kr.check_fingerprints(specs, packs, subset=True, log=lambda _: None)

    fp_log: list[str] = []
    assert not kr.check_fingerprints(
        specs, packs, emitter=slowed_kernel, subset=True, log=fp_log.append
    )
    text = "\n".join(fp_log)
    # the wrapper calls the real kernel (the second call is a tail jump)
    assert "call 0 -> 1" in text and all(name in text for name in SLOWED)
    assert kr.UPDATE_COMMAND in text

    timing_log: list[str] = []
    assert not kr.check_timings(specs, packs, emitter=slowed_kernel, log=timing_log.append)
    failures = [line for line in timing_log if line.startswith("FAIL ")]
    for name in SLOWED:
        line = next(line for line in timing_log if f" {name}:" in line)
        # the report names the kernel, its baseline, the measurement and the spread
        assert line.startswith("FAIL") and "vs baseline" in line and "spread" in line
        assert "confirmations" in line  # re-measured before failing
    assert failures and all(name in failures[-1] for name in SLOWED)
