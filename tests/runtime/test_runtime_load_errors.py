"""Every check load() makes before native code runs, each triggered for real."""

from __future__ import annotations

import os
import subprocess

import numpy as np
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
        f"{libs['ok']} is not a sparsec model (no SPARSEC2 trailer); "
        "compile one with `sparsec compile`"
    )


def test_tiny_file(tmp_path):
    path = tmp_path / "tiny.so"
    path.write_bytes(b"x")
    assert "is not a sparsec model (no SPARSEC2 trailer)" in load_error(path)


def test_truncated(model_path, tmp_path):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.so"
    cut.write_bytes(data[:10000] + data[20000:])  # weights lost, trailer intact
    msg = load_error(cut)
    assert "is truncated or corrupt" in msg and f"the file has {len(data) - 10000} bytes" in msg


def test_manifest_byte_flip(model_path, tmp_path):
    data = bytearray(model_path.read_bytes())
    data[-72:-56] = b"\xff" * 16  # the end of the manifest JSON
    bad = tmp_path / "bad.so"
    bad.write_bytes(bytes(data))
    assert load_error(bad) == (
        f"{bad} has a corrupt manifest (its blake2b does not match the trailer: the file "
        "changed after compilation); recompile it with `sparsec compile` or copy it again"
    )


@pytest.mark.parametrize(
    "raw, detail",
    [
        (b"\xff{}", "invalid start byte"),
        (b"{not json", "Expecting property name"),
        (b'{"a": ' + b"9" * 5000 + b"}", "Exceeds the limit"),
        (b"[" * 200_000 + b"]" * 200_000, "maximum recursion depth"),
        (b"[1, 2]", "no magic 'sparsec-model'"),
    ],
)
def test_sealed_garbage_manifest(model_path, tmp_path, raw, detail):
    """A manifest that matches its seal but does not parse: one line, no traceback."""
    import hashlib
    import struct

    data = model_path.read_bytes()
    offset = struct.unpack("<QQ32s8s", data[-56:])[0]
    bad = tmp_path / "bad.so"
    sealed = hashlib.blake2b(raw, digest_size=32).digest()
    bad.write_bytes(
        data[:offset] + raw + struct.pack("<QQ32s8s", offset, len(raw), sealed, b"SPARSEC2")
    )
    msg = load_error(bad)
    assert msg.startswith(f"{bad} has a corrupt manifest (") and detail in msg
    assert msg.endswith("recompile it with `sparsec compile`")


@pytest.mark.parametrize(
    "edit, detail",
    [
        (lambda m: m.pop("max_context"), "field 'max_context' is missing"),
        (lambda m: m.__setitem__("magic", "other"), "no magic 'sparsec-model'"),
        (lambda m: m["weights"].__setitem__("offset", 100), "is not 4096-aligned"),
        (
            lambda m: m["weights"].__setitem__("size", 4096 + m["weights"]["size"]),
            "do not end where",
        ),
        (lambda m: m["weights"].__setitem__("size", 0), "'weights.size' is 0, expected a pos"),
        (lambda m: m["weights"]["blake2b"].append("0" * 64), "has 2 hashes, expected one per"),
        (lambda m: m["code"].__setitem__("blake2b", "xyz"), "hex blake2b-256 digest"),
        (lambda m: m["code"].__setitem__("size", 10), "is not the code's end (10) rounded"),
        (lambda m: m.__setitem__("precision", "int4"), "'precision' is 'int4', expected one"),
        (lambda m: m.__setitem__("embedding", ["rows"]), "'embedding' is ['rows'], expected a str"),
        (lambda m: m["kv_cache"].__setitem__("shape", [1, 2, 3, 4, 5]), "expected [L, 2, KVH"),
        (lambda m: m["kv_cache"].__setitem__("dtype", []), "'kv_cache.dtype' is [], expected"),
        (lambda m: m["kv_cache"].__setitem__("dtype", "bfloat16"), "'float32', 'float16'"),
        # an int8 cache's rows carry their scale: a float32-shaped one is refused
        (lambda m: m["kv_cache"].__setitem__("dtype", "int8"), "head_dim + 4 per 32 (int8"),
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
        m["abi_version"] = 4
        m["sparsec_version"] = "0.9.0"
        del m["layers"]  # a newer ABI may change fields: the version is checked first

    fake.rewrite_manifest(newer, edit)
    assert load_error(newer) == (
        f"{newer} uses model ABI version 4 but this sparsec 0.1.0 loads ABI version 3; "
        "load it with sparsec 0.9.0 (the version that compiled it) or recompile it with this one"
    )


def test_abi_v1_file(model_path, tmp_path):
    """A file from before the sealed trailer (SPARSEC1) gets the ABI message."""
    import struct

    data = model_path.read_bytes()
    offset, size, _, _ = struct.unpack("<QQ32s8s", data[-56:])
    old = tmp_path / "old.so"
    old.write_bytes(data[: offset + size] + struct.pack("<QQ8s", offset, size, b"SPARSEC1"))
    assert load_error(old) == (
        f"{old} uses model ABI version 1, written by an earlier sparsec, but this sparsec 0.1.0 "
        "loads ABI version 3; recompile it with `sparsec compile` or load it with the sparsec "
        "that compiled it"
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
        "(it was compiled for the avx512 target, cpu znver4); run it on a CPU that has them, "
        "or recompile it for this one: sparsec compile --target auto"
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
    path = make_model(
        target={"triple": "aarch64-unknown-linux-gnu", "cpu": "neoverse-v2", "isa": "sve"}
    )
    assert "was compiled for aarch64-unknown-linux-gnu but this host is" in load_error(path)


def test_dlopen_failure(tmp_path, weights):
    broken = tmp_path / "broken_elf"
    broken.write_bytes(b"\x7fELF" + b"\0" * 60)
    path = tmp_path / "m.so"
    write_artifact(broken, fake.pack(weights), fake.manifest(), path)
    msg = load_error(path)
    assert msg.startswith(f"cannot load the native code of {path} (")
    assert msg.endswith("recompile it with `sparsec compile` on this machine")


@pytest.mark.parametrize("where", ["start", "middle", "end", "padding"])
def test_code_byte_flip(model_path, tmp_path, where):
    """Any flipped byte of the ELF (or of the zero padding after it) is refused before
    dlopen: unchecked, a flip in code or relocations crashes or computes wrong logits."""
    data = bytearray(model_path.read_bytes())
    m = fake.read_manifest(data)
    code = m["code"]["size"]
    at = {"start": 5, "middle": code // 2, "end": code - 1, "padding": code}[where]
    if at >= m["weights"]["offset"]:
        pytest.skip("this ELF ends on a page boundary: no padding")
    data[at] ^= 0x40
    bad = tmp_path / "flipped.so"
    bad.write_bytes(bytes(data))
    assert load_error(bad) == (
        f"{bad} has corrupt code (blake2b mismatch: the file changed after compilation); "
        "recompile it with `sparsec compile` or copy it again"
    )


def _edit_context(m, context=32):
    m["max_context"] = context
    m["kv_cache"]["shape"][3] = context


@pytest.mark.parametrize(
    "lib, edit, weights_extra, detail",
    [
        ("ok", _edit_context, b"", "max_context = 32 but its code was built for 64"),
        ("int8_code", None, b"", "precision = fp32 but its code was built for int8"),
        (
            "ok",
            None,
            b"\0" * 64,
            f"weights_size = {fake.WEIGHTS_BYTES + 64} but its code was "
            f"built for {fake.WEIGHTS_BYTES}",
        ),
    ],
)
def test_code_and_manifest_disagree(libs, weights, tmp_path, lib, edit, weights_extra, detail):
    """Parts of different models glued into one consistently hashed file: the code's own
    build constants refuse it before any buffer is sized from the manifest."""
    path = tmp_path / "glued.so"
    manifest = fake.manifest()
    if edit:
        edit(manifest)
    write_artifact(libs[lib], fake.pack(weights) + weights_extra, manifest, path)
    assert load_error(path) == (
        f"{path}: its manifest says {detail}; the file was assembled from parts of "
        "different models: recompile it with `sparsec compile`"
    )


def test_reload_after_replace_runs_new_code(libs, weights, tmp_path):
    """dlopen of a path already loaded returns the old library; the runtime loads each
    artifact's own verified copy, so a replaced file runs its new code."""
    path = tmp_path / "m.so"
    fake.write_fake(path, libs["ok"], weights)
    with runtime.load(path) as first:
        fake.write_fake(path, libs["one_shot"], weights, max_tokens_per_call=fake.C)
        with runtime.load(path) as second:
            assert (first.max_tokens_per_call, second.max_tokens_per_call) == (fake.T, fake.C)
            ids = list(range(1, 41))
            np.testing.assert_array_equal(second.forward(ids), first.forward(ids))


def test_library_without_abi_symbols(tmp_path, weights):
    src = tmp_path / "other.c"
    src.write_text("int something_else(void) { return 1; }\n")
    lib = tmp_path / "other.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", lib, src], check=True)
    path = tmp_path / "m.so"
    write_artifact(lib, fake.pack(weights), fake.manifest(), path)
    assert load_error(path) == (
        f"{path} does not export sparsec_abi_version, sparsec_build_info, sparsec_create, "
        "sparsec_forward, sparsec_forward_rows, sparsec_destroy; it is not a sparsec ABI v3 "
        "model library: "
        "recompile it with `sparsec compile`"
    )


def test_native_abi_disagrees_with_manifest(make_model):
    path = make_model(lib="abi4")
    assert load_error(path) == (
        f"{path}: its native code implements ABI version 4 but its manifest says 3; "
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


def test_huge_page_copy_only_when_it_fits(model_path, monkeypatch, tmp_path):
    """By default the weights are copied to huge pages only if they fit in available
    memory (else the file is mapped, and load says so); huge_pages=True refuses."""
    _thp(monkeypatch, tmp_path, "always [madvise] never\n")
    monkeypatch.setattr(artifact_module, "available_memory", lambda: 100_000)
    with runtime.load(model_path) as m:
        assert m.weights_memory == "file mapping"
    msg = load_error(model_path, huge_pages=True)
    assert "GiB of weights do not fit in the 0.0 GiB of available memory" in msg
    monkeypatch.setattr(artifact_module, "available_memory", lambda: 1 << 40)
    with runtime.load(model_path) as m:
        assert m.weights_memory == "huge pages"


def test_close_and_collection_unload_the_library(model_path):
    """close() destroys the context and dlcloses the private copy of the code; so does
    garbage collection of an unclosed Model (its finalizer)."""
    import gc

    m = runtime.load(model_path)
    native = m._native
    m.close()
    assert native.ctx == 0 and native._library._lib is None
    m = runtime.load(model_path)
    native = m._native
    del m
    gc.collect()
    assert native.ctx == 0 and native._library._lib is None


def test_path_that_is_no_file_name():
    assert load_error("\ud800.so") == "cannot read '\\ud800.so': the path is not a valid file name"
    with pytest.raises(SparsecError, match="the path is not a valid file name"):
        artifact_module.read_artifact("a\0b.so")  # load refuses it earlier, by name


def test_manifest_kv_dtype_must_match_the_code(model_path, tmp_path):
    """A manifest that claims a float16 cache for float32 code would get a buffer half
    the size the code writes: the build constant refuses it."""
    bad = tmp_path / "kv16.so"
    bad.write_bytes(model_path.read_bytes())
    fake.rewrite_manifest(bad, lambda m: m["kv_cache"].__setitem__("dtype", "float16"))
    assert "kv_cache_dtype" in load_error(bad) and "float32" in load_error(bad)
