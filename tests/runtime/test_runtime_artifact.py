"""The artifact writer and reader: layout, filled fields, atomic output."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest
import runtime_fake as fake

from sparsec.codegen.artifact import write_artifact
from sparsec.errors import SparsecError
from sparsec.runtime.artifact import read_artifact


def test_layout_round_trip(libs, weights, tmp_path):
    out = tmp_path / "m.so"
    blob = fake.pack(weights)
    written = write_artifact(libs["ok"], blob, fake.manifest(), out)

    data = out.read_bytes()
    elf = libs["ok"].read_bytes()
    offset, size, magic = struct.unpack("<QQ8s", data[-24:])
    assert magic == b"SPARSEC1"
    assert data[: len(elf)] == elf
    w = written["weights"]
    assert w["offset"] % 4096 == 0 and len(elf) <= w["offset"] < len(elf) + 4096
    assert data[len(elf) : w["offset"]] == b"\0" * (w["offset"] - len(elf))
    assert data[w["offset"] : w["offset"] + w["size"]] == blob
    assert w["blake2b"] == hashlib.blake2b(blob).hexdigest()
    assert offset == w["offset"] + w["size"] and offset + size + 24 == len(data)

    manifest = json.loads(data[offset : offset + size].decode("utf-8"))
    assert manifest == written
    assert manifest["magic"] == "sparsec-model" and manifest["abi_version"] == 1
    expected = fake.manifest()
    assert {k: manifest[k] for k in expected} == expected
    artifact = read_artifact(out)
    assert artifact.manifest == written and artifact.file_size == len(data)


def test_array_weights_equal_bytes(libs, weights, tmp_path):
    stacked = np.concatenate([weights[k].ravel() for k in ("emb", "out", "wv", "pos_bias")])
    a = write_artifact(libs["ok"], fake.pack(weights), fake.manifest(), tmp_path / "a.so")
    b = write_artifact(libs["ok"], stacked, fake.manifest(), tmp_path / "b.so")
    assert a["weights"] == b["weights"]
    assert (tmp_path / "a.so").read_bytes() == (tmp_path / "b.so").read_bytes()


def test_writer_rejects_non_elf(tmp_path):
    not_elf = tmp_path / "x.o"
    not_elf.write_bytes(b"garbage")
    with pytest.raises(SparsecError, match="is not an ELF shared object"):
        write_artifact(not_elf, b"", fake.manifest(), tmp_path / "m.so")


def _dir_state(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_invalid_manifest_leaves_old_file(libs, tmp_path):
    out = tmp_path / "m.so"
    out.write_bytes(b"old model")
    before = _dir_state(tmp_path)
    bad = fake.manifest()
    del bad["max_context"]
    with pytest.raises(SparsecError, match="invalid manifest .field 'max_context' is missing"):
        write_artifact(libs["ok"], b"1234", bad, out)
    assert _dir_state(tmp_path) == before


def test_failed_write_removes_temp_and_keeps_old_file(libs, tmp_path, monkeypatch):
    out = tmp_path / "m.so"
    out.write_bytes(b"old model")
    before = _dir_state(tmp_path)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SparsecError, match="cannot write .*m.so: No space left on device"):
        write_artifact(libs["ok"], b"1234", fake.manifest(), out)
    assert _dir_state(tmp_path) == before

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_artifact(libs["ok"], b"1234", fake.manifest(), out)
    assert _dir_state(tmp_path) == before


def test_overwrite_replaces_atomically(libs, weights, tmp_path):
    out = tmp_path / "m.so"
    out.write_bytes(b"old model")
    write_artifact(libs["ok"], fake.pack(weights), fake.manifest(), out)
    assert read_artifact(out).manifest["weights"]["size"] == len(fake.pack(weights))
    assert [p.name for p in tmp_path.iterdir()] == ["m.so"]
    assert os.stat(out).st_mode & 0o100  # executable like a linker's output
