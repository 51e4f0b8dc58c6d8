"""Artifact cases: a damaged, edited or reassembled model.so, loaded and run.

Each case takes one of the cached artifacts, mutates it into ``model.so`` in the case's
folder and calls ``runtime.load`` + ``forward(FIXED_IDS)``. Verdict: ``ok`` only if the
logits equal the reference of the artifact whose weights and manifest the file carries
(for a bit flip in an unused byte: the unmutated one); a clean ``SparsecError`` at load
or forward is ``error``; other logits are ``wrong``; the file must not change
(``overwrote``). Regions are found generically from the trailer (``TRAILER_FORMAT`` of
``sparsec.runtime.artifact``) and the ELF section headers, so a format change keeps the
mutators meaningful.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fuzz.common import (
    FIXED_IDS,
    anatomy,
    compare_logits,
    del_path,
    file_digest,
    get_path,
    manifest_paths,
    seal,
    set_path,
)
from fuzz.runner import ERROR, OK, OVERWROTE, WRONG, Finding, clean_message

NAME = "artifact"
TIMEOUT = 30.0
SHARE = 0.22  # of the time budget
ESTIMATE = 0.1  # seconds a case, until measured
BASES = ["fp32", "int8", "fp32_bitmask48", "layers1"]
BASE_WEIGHTS = [6, 2, 1, 1]

KINDS = {
    # kind: weight
    "flip": 20,
    "overwrite": 10,
    "truncate": 6,
    "append": 4,
    "prepend": 1,
    "manifest_edit": 25,
    "manifest_semantic": 12,
    "manifest_text": 8,
    "glue": 7,
    "replace": 5,
    "path": 2,
}


def run(rng, ctx, workdir, rep):
    workdir = Path(workdir)
    base = rng.choices(BASES, BASE_WEIGHTS)[0]
    kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
    path = workdir / "model.so"
    data = ctx.artifact(base).read_bytes()
    if kind == "replace":
        return _replace_case(rng, ctx, workdir, rep, base)
    if kind == "path":
        return _path_case(rng, ctx, workdir, rep, base)
    desc, expected, data = MUTATORS[kind](rng, ctx, anatomy(data, base), workdir)
    if data is not None:
        path.write_bytes(data)
    rep.describe(kind, f"{base}: {desc}")
    before = file_digest(path)
    verdict = load_and_compare(ctx, path, expected)
    after = file_digest(path)
    if after != before:
        return OVERWROTE, f"loading changed the file (sha256 {before} -> {after})"
    return verdict


def load_and_compare(ctx, path, expected: str, what: str = "forward"):
    """(outcome, detail) of load + forward(FIXED_IDS) against ``expected``'s reference."""
    from sparsec import runtime
    from sparsec.errors import SparsecError

    try:
        model = runtime.load(path)
    except SparsecError as exc:
        return clean_message(exc)
    with model:
        try:
            got = model.forward(FIXED_IDS)
        except SparsecError as exc:
            return clean_message(exc)
        compare_logits(got, ctx.refs[expected], f"{what} of the loaded file")
    return OK, f"logits equal {expected}'s"


# --------------------------------------------------------------------------- bytes


def _pick_region(rng, anat):
    regions = anat.regions()
    name = rng.choice(sorted(regions))
    return name, regions[name]


def _flip(rng, ctx, anat, workdir):
    name, (start, end) = _pick_region(rng, anat)
    data = bytearray(anat.data)
    flips = []
    for _ in range(rng.choice([1, 1, 1, 2, 4, 8])):
        pos = rng.randrange(start, end)
        bit = rng.randrange(8)
        data[pos] ^= 1 << bit
        flips.append(f"{pos}:{bit}")
    return f"flip bits {', '.join(flips)} in {name} [{start}, {end})", anat.name, bytes(data)


def _overwrite(rng, ctx, anat, workdir):
    name, (start, end) = _pick_region(rng, anat)
    data = bytearray(anat.data)
    length = min(end - start, rng.choice([1, 2, 4, 8, 16, 64, 512]))
    pos = rng.randrange(start, end - length + 1)
    how = rng.choice(["random", "zeros", "ff", "copy"])
    if how == "random":
        chunk = bytes(rng.randrange(256) for _ in range(length))
    elif how == "zeros":
        chunk = b"\0" * length
    elif how == "ff":
        chunk = b"\xff" * length
    else:
        src = rng.randrange(0, len(data) - length + 1)
        chunk = bytes(data[src : src + length])
    data[pos : pos + length] = chunk
    return f"overwrite {length} bytes at {pos} in {name} with {how}", anat.name, bytes(data)


def _truncate(rng, ctx, anat, workdir):
    regions = anat.regions()
    options = [0, 1, 7, 8, anat.trailer_size - 1, anat.trailer_size, len(anat.data) - 1]
    name, (start, end) = _pick_region(rng, anat)
    options += [start, rng.randrange(start, end)]
    size = rng.choice(options)
    where = next((n for n, (s, e) in regions.items() if s <= size < e), "end")
    return f"truncate to {size} bytes (in {where})", anat.name, anat.data[:size]


def _append(rng, ctx, anat, workdir):
    how = rng.choice(["zeros", "random", "trailer", "artifact", "page"])
    if how == "zeros":
        extra = b"\0" * rng.choice([1, 8, 24, 56, 4096])
    elif how == "random":
        extra = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 100, 3000])))
    elif how == "trailer":
        extra = anat.data[-anat.trailer_size :]
    elif how == "artifact":
        extra = anat.data
    else:
        extra = b"\x7fELF" + b"\0" * 4092
    return f"append {len(extra)} bytes ({how})", anat.name, anat.data + extra


def _prepend(rng, ctx, anat, workdir):
    extra = rng.choice([b"\0", b"\0" * 4096, b"#!/bin/sh\n", b"\x7fELF"])
    return f"prepend {len(extra)} bytes", anat.name, extra + anat.data


# --------------------------------------------------------------------------- manifest


def _value_pool(rng, value):
    common = [None, True, False, 0, -1, 1, 2**31, 2**32 + 1, 2**63, 10**30, 1.5, "", "x", [], {}]
    if isinstance(value, bool):
        pool = [not value, 0, 1, "true"]
    elif isinstance(value, int):
        pool = [value + 1, value - 1, value * 2, value // 2, -value, float(value), str(value)]
    elif isinstance(value, float):
        pool = [float("nan"), float("inf"), -value, value * 1e6, str(value), 0.0]
    elif isinstance(value, str):
        pool = [value + "x", value[:-1], value.upper(), "\ud800", "a" * 100_000, 5, "fp16"]
        pool += ["int8", "fp32"]
    elif isinstance(value, list):
        pool = [value + value, value[:-1], [None], list(reversed(value)), "list"]
    elif isinstance(value, dict):
        pool = [{**value, "zzz_unknown": 1}, [], "dict"]
    else:
        pool = [0, "", {}]
    return rng.choice(common if rng.random() < 0.3 else pool)


def _edit_generic(rng, manifest):
    paths = [p for p in manifest_paths(manifest) if p[0] not in ("tokenizer",)]
    path = rng.choice(paths)
    if rng.random() < 0.2:
        del_path(manifest, path)
        return f"delete {_fmt(path)}"
    new = _value_pool(rng, get_path(manifest, path))
    set_path(manifest, path, new)
    return f"set {_fmt(path)} = {_short(new)}"


def _fmt(path) -> str:
    return ".".join(str(p) for p in path)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:60] + f"...({len(text)} chars)"


def _kv_shape(m):
    c = m["config"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return [c["num_hidden_layers"], 2, c["num_key_value_heads"], m["max_context"], head_dim]


def _semantic(rng, manifest):
    """Edits that keep the manifest self-consistent (kv_cache.shape follows), so only a
    check of the code's own build constants can catch them."""
    m, c = manifest, manifest["config"]
    choices = {
        "max_context_down": lambda: m.__setitem__("max_context", m["max_context"] // 2),
        "max_context_up": lambda: m.__setitem__("max_context", m["max_context"] * 2),
        "max_tokens_up": lambda: m.__setitem__("max_tokens_per_call", 4096),
        "max_tokens_down": lambda: m.__setitem__("max_tokens_per_call", 1),
        "vocab_down": lambda: c.__setitem__("vocab_size", 256),
        "vocab_up": lambda: c.__setitem__("vocab_size", c["vocab_size"] + 64),
        "layers_down": lambda: c.__setitem__("num_hidden_layers", c["num_hidden_layers"] - 1),
        "layers_up": lambda: c.__setitem__("num_hidden_layers", c["num_hidden_layers"] + 1),
        "kv_heads": lambda: c.__setitem__("num_key_value_heads", c["num_attention_heads"]),
        "precision": lambda: m.__setitem__(
            "precision", "int8" if m["precision"] == "fp32" else "fp32"
        ),
        "threads_huge": lambda: m.__setitem__("default_threads", 100_000),
        "eos_none": lambda: m["generation"].__setitem__("eos_token_id", None),
        "eos_out_of_vocab": lambda: m["generation"].__setitem__("eos_token_id", 10**6),
        "bos_out_of_vocab": lambda: m["generation"].__setitem__("bos_token_id", c["vocab_size"]),
        "rope_theta": lambda: (
            c["rope"].__setitem__("theta", 1.0) if isinstance(c.get("rope"), dict) else None
        ),
        "tokenizer_other": lambda: m.__setitem__("tokenizer", _other_tokenizer()),
        "chat_template_bad": lambda: m.__setitem__("chat_template", "{% for %}"),
        "unknown_field": lambda: m.__setitem__("zzz_future_field", {"a": [1, 2]}),
        "compile_seconds": lambda: m["compile"].__setitem__("seconds", 1e9),
        "sparsec_version": lambda: m.__setitem__("sparsec_version", "999.0"),
        "cpu_features_unknown": lambda: m["cpu_features"].append("avx1024_quantum"),
        "cpu_features_empty": lambda: m.__setitem__("cpu_features", []),
    }
    name = rng.choice(sorted(choices))
    choices[name]()
    if isinstance(m.get("kv_cache"), dict):
        try:
            m["kv_cache"]["shape"] = _kv_shape(m)
        except (KeyError, TypeError, ZeroDivisionError):
            pass
    return name


def _other_tokenizer() -> str:
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).to_str()


def _reseal(rng, anat, manifest, workdir, mode: str, touched: str):
    """(data or None, how): the edited manifest sealed into a file."""
    if mode == "writer" and not touched.startswith(("weights", "code")):
        from sparsec.codegen.artifact import write_artifact

        elf = Path(workdir) / "elf.bin"
        elf.write_bytes(anat.elf)
        out = Path(workdir) / "model.so"
        try:
            write_artifact(elf, anat.weights, manifest, out)
            return None, "write_artifact"
        except Exception as exc:  # noqa: BLE001 - the writer refused: seal it by hand
            mode = f"raw (write_artifact refused: {type(exc).__name__})"
    raw = json.dumps(manifest, ensure_ascii=False).encode("utf-8", "surrogatepass")
    prefix = anat.data[: anat.manifest_offset]
    return seal(prefix, raw, anat.trailer_fields, digest=mode != "stale"), mode


def _manifest_edit(rng, ctx, anat, workdir):
    manifest = json.loads(json.dumps(anat.manifest))
    edits = [_edit_generic(rng, manifest) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    mode = rng.choices(["writer", "raw", "stale"], [4, 4, 1])[0]
    data, how = _reseal(rng, anat, manifest, workdir, mode, edits[0].split(" ")[1])
    return f"{'; '.join(edits)} (sealed by {how})", anat.name, data


def _manifest_semantic(rng, ctx, anat, workdir):
    manifest = json.loads(json.dumps(anat.manifest))
    name = _semantic(rng, manifest)
    mode = rng.choices(["writer", "raw"], [3, 1])[0]
    data, how = _reseal(rng, anat, manifest, workdir, mode, name)
    return f"consistent edit {name} (sealed by {how})", anat.name, data


def _manifest_text(rng, ctx, anat, workdir):
    raw = anat.data[anat.manifest_offset : anat.manifest_offset + anat.manifest_size]
    text = raw.decode("utf-8")
    how = rng.choice(
        ["deep", "huge_int", "nan", "bom", "duplicate", "non_utf8", "empty", "null", "list"]
        + ["truncated", "trailing", "nul", "big"]
    )
    if how == "deep":
        n = rng.choice([1000, 100_000, 1_000_000])
        text = text[:-1] + ', "deep": ' + "[" * n + "]" * n + "}"
    elif how == "huge_int":
        text = text.replace('"max_context": ', '"max_context": ' + "9" * 5000, 1)
    elif how == "nan":
        text = text.replace('"max_context": ', '"max_context": NaN, "x": ', 1)
    elif how == "bom":
        text = "\ufeff" + text
    elif how == "duplicate":
        text = text[:-1] + ', "config": {"vocab_size": 1}}'
    elif how == "empty":
        text = ""
    elif how == "null":
        text = "null"
    elif how == "list":
        text = "[" + text + "]"
    elif how == "truncated":
        text = text[: rng.randrange(len(text))]
    elif how == "trailing":
        text = text + " garbage"
    elif how == "nul":
        text = text[:-1] + ', "x": "\u0000"}'
    elif how == "big":
        text = text[:-1] + ', "pad": "' + "a" * (8 << 20) + '"}'
    raw = text.encode("utf-8")
    if how == "non_utf8":
        raw = raw[:-1] + b', "x": "\xff\xfe"}'
    prefix = anat.data[: anat.manifest_offset]
    return f"manifest text: {how}", anat.name, seal(prefix, raw, anat.trailer_fields)


def _glue(rng, ctx, anat, workdir):
    from fuzz.common import anatomy as parse
    from sparsec.codegen.artifact import write_artifact

    names = ["fp32", "int8", "fp32_bitmask48", "layers1", "long"]
    code_from = rng.choice(names)
    rest_from = rng.choice(names)
    code = parse(ctx.artifact(code_from).read_bytes(), code_from)
    rest = parse(ctx.artifact(rest_from).read_bytes(), rest_from)
    elf = Path(workdir) / "elf.bin"
    elf.write_bytes(code.elf)
    manifest = json.loads(json.dumps(rest.manifest))
    write_artifact(elf, rest.weights, manifest, Path(workdir) / "model.so")
    return f"code of {code_from} + weights and manifest of {rest_from}", rest_from, None


MUTATORS = {
    "flip": _flip,
    "overwrite": _overwrite,
    "truncate": _truncate,
    "append": _append,
    "prepend": _prepend,
    "manifest_edit": _manifest_edit,
    "manifest_semantic": _manifest_semantic,
    "manifest_text": _manifest_text,
    "glue": _glue,
}


# --------------------------------------------------------------------------- files


def _replace_case(rng, ctx, workdir, rep, base):
    """Load a file, replace it at the same path by another artifact, load again: the
    second load must run the new file's code and weights, the first model its own."""
    from fuzz.runner import expect_clean
    from sparsec import runtime

    other = rng.choice(
        [n for n in ("fp32", "int8", "fp32_bitmask48", "layers1", "long") if n != base]
    )
    how = rng.choice(["os.replace, first open", "rewrite in place, first closed", "copy over"])
    path = workdir / "model.so"
    shutil.copyfile(ctx.artifact(base), path)
    rep.describe("replace", f"load {base}, then {how} with {other}, load again")
    first = expect_clean(runtime.load, path)
    compare_logits(first.forward(FIXED_IDS), ctx.refs[base], "first load")
    if how.startswith("os.replace"):
        tmp = workdir / "incoming.so"
        shutil.copyfile(ctx.artifact(other), tmp)
        os.replace(tmp, path)
    elif how.startswith("rewrite"):
        first.close()
        with open(path, "r+b") as f:  # same inode: truncate and write the new bytes
            f.truncate(0)
            f.write(ctx.artifact(other).read_bytes())
    else:
        first.close()
        shutil.copyfile(ctx.artifact(other), path)
    second = expect_clean(runtime.load, path)
    try:
        compare_logits(second.forward(FIXED_IDS), ctx.refs[other], "second load")
    except Finding as f:
        raise Finding(WRONG, f"after {how}: {f.detail}") from None
    if how.startswith("os.replace"):
        first.reset()
        compare_logits(first.forward(FIXED_IDS), ctx.refs[base], "first model after replace")
        first.close()
    second.close()
    return OK, "each load ran its own file"


def _path_case(rng, ctx, workdir, rep, base):
    how = rng.choice(
        ["directory", "fifo", "symlink", "symlink_loop", "unicode", "empty", "dev_zero"]
        + ["under_file", "long_name", "dangling"]
    )
    src = ctx.artifact(base)
    expected_ok = False
    if how == "directory":
        path = workdir / "dir.so"
        path.mkdir()
    elif how == "fifo":
        path = workdir / "fifo.so"
        os.mkfifo(path)
    elif how == "symlink":
        path = workdir / "link.so"
        path.symlink_to(src)
        expected_ok = True
    elif how == "symlink_loop":
        path = workdir / "loop.so"
        path.symlink_to(path)
    elif how == "unicode":
        path = workdir / "mödel ✓ 'x'.so"
        shutil.copyfile(src, path)
        expected_ok = True
    elif how == "empty":
        path = workdir / "empty.so"
        path.write_bytes(b"")
    elif how == "dev_zero":
        path = Path("/dev/zero")
    elif how == "under_file":
        (workdir / "file").write_bytes(b"x")
        path = workdir / "file" / "model.so"
    elif how == "long_name":
        path = workdir / ("m" * 300 + ".so")
    else:
        path = workdir / "dangling.so"
        path.symlink_to(workdir / "missing.so")
    rep.describe("path", f"load a {how} path")
    outcome, detail = load_and_compare(ctx, path, base)
    if outcome == ERROR and expected_ok:
        return WRONG, f"a valid artifact at a {how} path was rejected: {detail}"
    return outcome, detail
