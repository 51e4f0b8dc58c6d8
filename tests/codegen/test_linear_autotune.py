"""choose_linear_format: forced families, host measurement and its on-disk cache."""

import json

import numpy as np
import pytest

from sparsec.codegen import autotune
from sparsec.codegen.linear import choose_linear_format
from sparsec.errors import SparsecError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    return tmp_path / autotune.CACHE_FILE


def _weight(sparsity, shape=(64, 128)):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0
    return w


def test_forced_families_measure_nothing(cache, monkeypatch):
    monkeypatch.setattr(autotune, "measure_linears", None)  # would fail if called
    assert choose_linear_format(_weight(0.5), "fp32", "dense") == "dense_f32"
    assert choose_linear_format(_weight(0.5), "int8", "bitmask") == "bitmask_i8"
    assert not cache.exists()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_auto_measures_then_hits_cache(cache, monkeypatch, precision):
    w = _weight(0.8)
    fmt = choose_linear_format(w, precision, "auto", reps=3)
    suffix = "f32" if precision == "fp32" else "i8"
    assert fmt in (f"dense_{suffix}", f"bitmask_{suffix}")
    entries = json.loads(cache.read_text())
    (entry,) = entries.values()
    assert entry["format"] == fmt
    assert set(entry["seconds"]) == {f"dense_{suffix}", f"bitmask_{suffix}"}
    assert entry["seconds"][fmt] == min(entry["seconds"].values())

    def no_measure(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(autotune, "measure_linears", no_measure)
    # same shape and sparsity (to 0.01), other values: a cache hit
    assert choose_linear_format(_weight(0.801), precision, "auto") == fmt
    with pytest.raises(AssertionError, match="cache miss"):
        choose_linear_format(_weight(0.5), precision, "auto")


def test_corrupt_cache_is_remeasured(cache):
    cache.write_text("{not json")
    fmt = choose_linear_format(_weight(0.9, (32, 64)), "int8", reps=2)
    entries = json.loads(cache.read_text())
    assert [e["format"] for e in entries.values()] == [fmt]


def test_bad_arguments(cache):
    with pytest.raises(SparsecError, match="precision"):
        choose_linear_format(_weight(0), "fp16")
    with pytest.raises(SparsecError, match="choice"):
        choose_linear_format(_weight(0), "fp32", "blocked")
