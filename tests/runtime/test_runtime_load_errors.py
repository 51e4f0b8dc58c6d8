"""Every check load() makes before native code runs, each triggered for real."""

from __future__ import annotations

import os
import subprocess

import pytest
import runtime_fake as fake

from sparsec import runtime
from sparsec.codegen.artifact import write_artifact
from sparsec.errors import SparsecError
from sparsec.runtime import artifact as artifact_module
from sparsec.runtime import cpu


def load_error(path, **kwargs) -> str:
    with pytest.raises(SparsecError) as info:
        runtime.load(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    msg = load_error(tmp_path / "nope.so")
    assert msg == f"{tmp_path / 'nope.so'} does not exist; pass the path of a compiled model.so"


def test_directory(tmp_path):
    assert "is not a file" in load_error(tmp_path)


def test_unreadable(model_path, monkeypatch):
    # Tests run as root, where chmod 000 does not stop reads: fail open() instead.
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(artifact_module, "open", denied, raising=False)
    assert load_error(model_path) == f"cannot read {model_path}: Permission denied"


def test_plain_shared_object(libs):
    msg = load_error(libs["ok"])
    assert msg == (
        f"{libs['ok']} is not a sparsec model (no SPARSEC1 trailer); "
        "compile one with `sparsec compile`"
    )


def test_tiny_file(tmp_path):
    path = tmp_path / "tiny.so"
    path.write_bytes(b"x")
    assert "is not a sparsec model (no SPARSEC1 trailer)" in load_error(path)


def test_truncated(model_path, tmp_path):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.so"
    cut.write_bytes(data[:10000] + data[20000:])  # weights lost, trailer intact
    msg = load_error(cut)
    assert "is truncated or corrupt" in msg and f"the file has {len(data) - 10000} bytes" in msg


def test_corrupt_manifest_json(model_path, tmp_path):
    data = bytearray(model_path.read_bytes())
    data[-40:-24] = b"\xff" * 16  # the end of the manifest JSON
    bad = tmp_path / "bad.so"
    bad.write_bytes(bytes(data))
    msg = load_error(bad)
    assert msg.startswith(f"{bad} has a corrupt manifest (")
    assert msg.endswith("recompile it with `sparsec compile`")


@pytest.mark.parametrize(
    "edit, detail",
    [
        (lambda m: m.pop("max_context"), "field 'max_context' is missing"),
        (lambda m: m.__setitem__("magic", "other"), "no magic 'sparsec-model'"),
        (lambda m: m["weights"].__setitem__("offset", 100), "is not 4096-aligned"),
        (lambda m: m["weights"].__setitem__("size", 10**9), "overlap the manifest"),
        (lambda m: m["kv_cache"].__setitem__("shape", [1, 2, 3, 4, 5]), "expected [L, 2, KVH"),
        (lambda m: m["config"].__setitem__("vocab_size", "260"), "'vocab_size' is '260'"),
        (lambda m: m.__setitem__("tokenizer", "{not json"), "its tokenizer does not parse"),
    ],
)
def test_bad_manifest_fields(model_path, tmp_path, edit, detail):
    bad = tmp_path / "bad.so"
    bad.write_bytes(model_path.read_bytes())
    fake.rewrite_manifest(bad, edit)
    msg = load_error(bad)
    assert "has a corrupt manifest" in msg and detail in msg


def test_abi_version_mismatch(model_path, tmp_path):
    newer = tmp_path / "newer.so"
    newer.write_bytes(model_path.read_bytes())

    def edit(m):
        m["abi_version"] = 2
        m["sparsec_version"] = "0.9.0"
        del m["layers"]  # a newer ABI may change fields: the version is checked first

    fake.rewrite_manifest(newer, edit)
    assert load_error(newer) == (
        f"{newer} uses model ABI version 2 but this sparsec 0.1.0 loads ABI version 1; "
        "load it with sparsec 0.9.0 (the version that compiled it) or recompile it with this one"
    )


@pytest.mark.parametrize("huge_pages", [None, False])  # copied to huge pages / mapped
def test_weights_hash_mismatch(model_path, tmp_path, huge_pages):
    data = bytearray(model_path.read_bytes())
    offset = fake.read_weights_offset(data)
    data[offset + 123] ^= 0x01
    bad = tmp_path / "flipped.so"
    bad.write_bytes(bytes(data))
    msg = load_error(bad, huge_pages=huge_pages)
    assert msg.startswith(f"{bad} has corrupt weights (blake2b mismatch")
    assert "verify=False skips this check" in msg
    with runtime.load(bad, verify=False, huge_pages=huge_pages) as m:  # the only obstacle
        assert m.generate([1, 2], max_new_tokens=2).finish_reason == "length"


def _thp(monkeypatch, tmp_path, text):
    path = tmp_path / "thp_enabled"
    if text is not None:
        path.write_text(text)
    monkeypatch.setattr(artifact_module, "THP_ENABLED", path)


@pytest.mark.parametrize("text", ["always madvise [never]\n", None])
def test_huge_pages_required_but_off(model_path, monkeypatch, tmp_path, text):
    _thp(monkeypatch, tmp_path, text)
    state = "never" if text else "unavailable"
    msg = load_error(model_path, huge_pages=True)
    assert msg.startswith(f"huge pages were requested for {model_path}, but transparent huge")
    assert f"pages are {state} on this system" in msg and "huge_pages=False" in msg
    with runtime.load(model_path) as m:  # the default falls back to the file, and says so
        assert m.weights_memory == "file mapping"


def test_weights_memory_modes_agree(model_path, monkeypatch, tmp_path):
    _thp(monkeypatch, tmp_path, "always [madvise] never\n")
    outputs = {}
    for huge_pages, expected in (
        (None, "huge pages"),
        (True, "huge pages"),
        (False, "file mapping"),
    ):
        with runtime.load(model_path, huge_pages=huge_pages) as m:
            assert m.weights_memory == expected
            outputs[huge_pages] = m.generate([1, 2, 3], max_new_tokens=6).token_ids
    assert outputs[None] == outputs[True] == outputs[False]


def test_missing_cpu_features(make_model):
    path = make_model(cpu_features=["avx512f", "avx512_imaginary", "sse2", "made_up_flag"])
    msg = load_error(path)
    assert msg == (
        f"this CPU lacks features that {path} needs: avx512_imaginary, made_up_flag "
        "(it was compiled for znver4); run it on a CPU that has them"
    )


def test_feature_spellings_match(make_model):
    flags = sorted(cpu.host_cpu_flags())[:3]
    llvm_style = [f.replace("_", "") for f in flags]
    with runtime.load(make_model(cpu_features=llvm_style)) as m:
        assert m.manifest["cpu_features"] == llvm_style


def test_non_linux_host(model_path, monkeypatch):
    monkeypatch.setattr(cpu, "host_system", lambda: "Darwin")
    assert load_error(model_path) == (
        f"{model_path} is a Linux shared library and this host runs Darwin; run it on Linux"
    )


def test_other_architecture(make_model):
    path = make_model(target={"triple": "aarch64-unknown-linux-gnu", "cpu": "neoverse-v2"})
    assert "was compiled for aarch64-unknown-linux-gnu but this host is" in load_error(path)


def test_dlopen_failure(tmp_path, weights):
    broken = tmp_path / "broken_elf"
    broken.write_bytes(b"\x7fELF" + b"\0" * 60)
    path = tmp_path / "m.so"
    write_artifact(broken, fake.pack(weights), fake.manifest(), path)
    msg = load_error(path)
    assert msg.startswith(f"cannot load the native code of {path} (")
    assert msg.endswith("recompile it with `sparsec compile`")


def test_library_without_abi_symbols(tmp_path, weights):
    src = tmp_path / "other.c"
    src.write_text("int something_else(void) { return 1; }\n")
    lib = tmp_path / "other.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", lib, src], check=True)
    path = tmp_path / "m.so"
    write_artifact(lib, fake.pack(weights), fake.manifest(), path)
    assert load_error(path) == (
        f"{path} does not export sparsec_abi_version, sparsec_create, sparsec_forward, "
        "sparsec_destroy; it is not a sparsec model library: recompile it with `sparsec compile`"
    )


def test_native_abi_disagrees_with_manifest(make_model):
    path = make_model(lib="abi2")
    assert load_error(path) == (
        f"{path}: its native code implements ABI version 2 but its manifest says 1; "
        "the file is inconsistent: recompile it with `sparsec compile`"
    )


def test_create_failure(make_model):
    path = make_model(lib="create_fails")
    assert "sparsec_create failed with 3 thread(s)" in load_error(path, threads=3)


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", True])
def test_bad_threads(model_path, threads):
    assert load_error(model_path, threads=threads).startswith("threads must be an integer >= 1")


def test_default_threads(model_path, make_model):
    with runtime.load(make_model(default_threads=1000)) as m:
        assert m.threads == len(os.sched_getaffinity(0))
    with runtime.load(model_path, threads=1) as m:
        assert m.threads == 1
