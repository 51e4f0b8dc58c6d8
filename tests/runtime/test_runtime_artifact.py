"""The artifact writer and reader: layout, filled fields, atomic output."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct

import numpy as np
import pytest
import runtime_fake as fake

from sparsec import interrupts
from sparsec.codegen.artifact import write_artifact
from sparsec.errors import SparsecError
from sparsec.runtime.artifact import read_artifact


def test_layout_round_trip(libs, weights, tmp_path):
    out = tmp_path / "m.so"
    blob = fake.pack(weights)
    written = write_artifact(libs["ok"], blob, fake.manifest(), out)

    data = out.read_bytes()
    elf = libs["ok"].read_bytes()
    offset, size, sealed, magic = struct.unpack("<QQ32s8s", data[-56:])
    assert magic == b"SPARSEC2"
    assert data[: len(elf)] == elf
    assert written["code"] == {"size": len(elf), "blake2b": _b2(elf)}
    w = written["weights"]
    assert w["offset"] % 4096 == 0 and len(elf) <= w["offset"] < len(elf) + 4096
    assert data[len(elf) : w["offset"]] == b"\0" * (w["offset"] - len(elf))
    assert data[w["offset"] : w["offset"] + w["size"]] == blob
    assert w["chunk_bytes"] == 64 << 20 and w["blake2b"] == [_b2(blob)]
    assert offset == w["offset"] + w["size"] and offset + size + 56 == len(data)
    assert sealed.hex() == _b2(data[offset : offset + size])

    manifest = json.loads(data[offset : offset + size].decode("utf-8"))
    assert manifest == written
    assert manifest["magic"] == "sparsec-model" and manifest["abi_version"] == 3
    expected = fake.manifest()
    assert {k: manifest[k] for k in expected} == expected
    artifact = read_artifact(out)
    assert artifact.manifest == written and artifact.file_size == len(data)


def _b2(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=32).hexdigest()


def test_weights_hashed_per_chunk(libs, weights, tmp_path, monkeypatch):
    """Each chunk has its own hash (a multi-GB file can be checked piece by piece), and a
    flipped byte is reported with its chunk's byte range."""
    from sparsec import runtime
    from sparsec.codegen import artifact as writer

    monkeypatch.setattr(writer, "WEIGHTS_CHUNK", 4096 * 16)
    blob = fake.pack(weights)  # 540812 bytes: 9 chunks of 65536, the last partial
    out = tmp_path / "m.so"
    m = write_artifact(libs["ok"], blob, fake.manifest(), out)
    chunks = [blob[i : i + 65536] for i in range(0, len(blob), 65536)]
    assert len(chunks) == 9 and m["weights"]["blake2b"] == [_b2(c) for c in chunks]
    data = bytearray(out.read_bytes())
    data[m["weights"]["offset"] + 3 * 65536 + 5] ^= 1
    out.write_bytes(data)
    with pytest.raises(
        SparsecError, match="corrupt weights .blake2b mismatch in bytes 196608..262144"
    ):
        runtime.load(out, huge_pages=False)


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
    with pytest.raises(SparsecError, match="no space left writing .*m.so .needs about 1 MB.; free"):
        write_artifact(libs["ok"], b"1234", fake.manifest(), out)
    assert _dir_state(tmp_path) == before

    def denied(fd):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "fsync", denied)
    with pytest.raises(SparsecError, match="cannot write .*m.so: Permission denied"):
        write_artifact(libs["ok"], b"1234", fake.manifest(), out)
    assert _dir_state(tmp_path) == before

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_artifact(libs["ok"], b"1234", fake.manifest(), out)
    assert _dir_state(tmp_path) == before

    # An interrupt a library swallowed (recorded by the CLI's handler): still no rename.
    monkeypatch.undo()
    interrupts.request_stop(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_artifact(libs["ok"], fake.pack(fake.random_weights()), fake.manifest(), out)
    finally:
        interrupts.clear_stop()
    assert _dir_state(tmp_path) == before


def test_overwrite_replaces_atomically(libs, weights, tmp_path):
    out = tmp_path / "m.so"
    out.write_bytes(b"old model")
    write_artifact(libs["ok"], fake.pack(weights), fake.manifest(), out)
    assert read_artifact(out).manifest["weights"]["size"] == len(fake.pack(weights))
    assert [p.name for p in tmp_path.iterdir()] == ["m.so"]
    assert os.stat(out).st_mode & 0o100  # executable like a linker's output
