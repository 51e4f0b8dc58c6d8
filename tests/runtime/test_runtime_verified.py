"""Deferred weight verification: a later load of the same unchanged file does not hash
the weights again; any change to the file makes the next load hash them again."""

from __future__ import annotations

import os
import time

import pytest
import runtime_fake as fake

from sparsec import cli, runtime
from sparsec.errors import SparsecError
from sparsec.runtime import artifact as artifact_module
from sparsec.runtime import verified


@pytest.fixture
def aged_model(libs, weights, tmp_path, monkeypatch):
    """A model.so whose times are older than verified.FRESH_NS, in a private record."""
    monkeypatch.setenv("SPARSEC_VERIFIED_DIR", str(tmp_path / "verified"))
    path = tmp_path / "m.so"
    fake.write_fake(path, libs["ok"], weights)
    _age(path)
    return path


def _age(path):
    # Old times make the record possible; the change time moves to "now" regardless
    # (it cannot be set), so the record waits for FRESH_NS to pass: shorten it.
    old = time.time() - 3600
    os.utime(path, (old, old))


@pytest.fixture(autouse=True)
def _no_fresh_wait(monkeypatch):
    monkeypatch.setattr(verified, "FRESH_NS", 0)


def _hash_count(monkeypatch) -> list:
    calls = []
    real = artifact_module.verify_weights

    def counting(artifact, weights):
        calls.append(artifact.path)
        return real(artifact, weights)

    monkeypatch.setattr(artifact_module, "verify_weights", counting)
    return calls


def test_second_load_of_unchanged_file_skips_the_hash(aged_model, monkeypatch):
    calls = _hash_count(monkeypatch)
    with runtime.load(aged_model) as m:
        assert m.weights_verified == "now"
    with runtime.load(aged_model) as m:
        assert m.weights_verified == "earlier"
    with runtime.load(aged_model, verify="always") as m:
        assert m.weights_verified == "now"
    with runtime.load(aged_model, verify=False) as m:
        assert m.weights_verified == "skipped"
    assert len(calls) == 2


def test_a_flip_in_place_after_verification_is_caught(aged_model):
    """Deferred, never skipped: the in-place write changes the file's change time."""
    with runtime.load(aged_model) as m:
        assert m.weights_verified == "now"
    data = bytearray(aged_model.read_bytes())
    data[fake.read_weights_offset(data) + 7] ^= 1
    with open(aged_model, "r+b") as f:  # same inode, same size
        f.write(data)
    with pytest.raises(SparsecError, match="corrupt weights"):
        runtime.load(aged_model)


def test_a_fresh_file_is_not_recorded(aged_model, monkeypatch):
    """File times tick coarsely: a file changed just now is verified at every load."""
    monkeypatch.setattr(verified, "FRESH_NS", 10**18)
    calls = _hash_count(monkeypatch)
    for _ in range(2):
        with runtime.load(aged_model) as m:
            assert m.weights_verified == "now"
    assert len(calls) == 2


def test_unwritable_record_only_means_verifying_again(aged_model, monkeypatch, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("SPARSEC_VERIFIED_DIR", str(blocker / "verified"))
    for _ in range(2):
        with runtime.load(aged_model) as m:
            assert m.weights_verified == "now"


def test_inspect_verify(aged_model, capsys):
    assert cli.main(["inspect", str(aged_model), "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (
        "verified: manifest, code and 1 weight chunk(s) match their hashes"
    )
    with runtime.load(aged_model) as m:  # inspect --verify recorded it
        assert m.weights_verified == "earlier"
    data = bytearray(aged_model.read_bytes())
    data[fake.read_weights_offset(data) + 7] ^= 1
    bad = aged_model.with_name("bad.so")
    bad.write_bytes(data)
    assert cli.main(["inspect", str(bad), "--verify"]) == 1
    assert "has corrupt weights" in capsys.readouterr().err
