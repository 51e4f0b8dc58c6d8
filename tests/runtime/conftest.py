"""Fixtures for runtime tests: the fake model library (compiled once) and artifacts of it."""

from __future__ import annotations

import pytest
import runtime_fake as fake


@pytest.fixture(scope="session")
def libs(tmp_path_factory):
    """The fake model built normally, reporting ABI 3, with a failing create, with
    max_tokens_per_call = capacity, and reporting int8 code."""
    out = tmp_path_factory.mktemp("fake_libs")
    return {
        "ok": fake.build_fake(out),
        "abi4": fake.build_fake(out, FAKE_ABI=4),
        "create_fails": fake.build_fake(out, FAKE_CREATE_FAILS=True),
        "one_shot": fake.build_fake(out, T=fake.C),  # takes a whole context per call
        "int8_code": fake.build_fake(out, FAKE_PRECISION=1),
    }


@pytest.fixture(scope="session")
def weights():
    return fake.random_weights(seed=0)


@pytest.fixture(scope="session")
def model_path(libs, weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "model.so"
    fake.write_fake(path, libs["ok"], weights)
    return path


@pytest.fixture
def model(model_path):
    from sparsec import runtime

    with runtime.load(model_path) as m:
        yield m


@pytest.fixture
def make_model(libs, tmp_path):
    """make_model(weights=None, lib="ok", **manifest_overrides) -> path of a new model.so."""
    count = iter(range(1000))

    def make(weights=None, lib="ok", **overrides):
        path = tmp_path / f"model{next(count)}.so"
        fake.write_fake(path, libs[lib], weights, **overrides)
        return path

    return make
