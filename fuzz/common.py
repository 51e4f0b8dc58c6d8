"""What the case classes share: the run context, references, artifact anatomy, checks."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fuzz.runner import OVERWROTE, WRONG, Finding

# A fixed teacher-forced sequence: bos then byte tokens (all below every vocab here).
FIXED_IDS = [256, 40, 69, 76, 76, 79, 12, 0, 87, 79, 82, 76]
# Prompts whose greedy continuations are precomputed (token ids; bos first).
GREEDY_PROMPTS = [[256, 40, 69, 76, 76, 79], [256, 5], [256, 83, 71, 68, 0, 81, 84, 72, 66, 74]]
GREEDY_TOKENS = 24
LOGITS_ATOL = 1e-4


@dataclass
class Context:
    cache: Path
    tmp: Path
    python: str = sys.executable
    refs: dict = field(default_factory=dict)  # artifact name -> FIXED_IDS logits
    greedy: dict = field(default_factory=dict)  # artifact name -> [tokens per prompt]
    manifests: dict = field(default_factory=dict)  # artifact name -> manifest dict
    eos: dict = field(default_factory=dict)  # artifact name -> list of eos ids

    def artifact(self, name: str) -> Path:
        return self.cache / f"{name}.so"

    def sparsec_cmd(self) -> list[str]:
        script = Path(self.python).parent / "sparsec"
        if script.exists():
            return [str(script)]
        return [self.python, "-m", "sparsec.cli"]


def file_digest(path: str | os.PathLike) -> str | None:
    """sha256 of a file, a folder's files (sorted) or None when absent."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                h.update(p.read_bytes())
        return "dir:" + h.hexdigest()
    if not path.is_file():
        return "special"
    h.update(path.read_bytes())
    return h.hexdigest()


def check_unchanged(path, before: str | None, what: str) -> None:
    after = file_digest(path)
    if after != before:
        raise Finding(OVERWROTE, f"{what} {path} changed (sha256 {before} -> {after})")


def compare_logits(got, want, what: str, atol: float = LOGITS_ATOL, rtol: float = 1e-4) -> None:
    """Raise Finding(WRONG) unless ``got`` matches ``want`` (shape, non-finite places,
    values within atol + rtol * |want|)."""
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        raise Finding(WRONG, f"{what}: logits shape {got.shape}, expected {want.shape}")
    if got.dtype.kind != "f":
        raise Finding(WRONG, f"{what}: logits dtype {got.dtype}")
    gf, wf = np.isfinite(got), np.isfinite(want)
    if not np.array_equal(gf, wf):
        raise Finding(
            WRONG, f"{what}: non-finite logits at other places ({(~gf).sum()} vs {(~wf).sum()})"
        )
    if (got[~gf] != want[~wf]).any() and not (np.isnan(got[~gf]) & np.isnan(want[~wf])).all():
        raise Finding(WRONG, f"{what}: infinities differ")
    if gf.any():
        err = np.abs(got[gf].astype(np.float64) - want[wf])
        tol = atol + rtol * np.abs(want[wf])
        if (err > tol).any():
            raise Finding(WRONG, f"{what}: logits differ by up to {err.max():.3g} (atol {atol})")


# --------------------------------------------------------------------------- artifacts


def trailer_format() -> str:
    from sparsec.runtime import artifact

    return artifact.TRAILER_FORMAT


@dataclass
class Anatomy:
    """Where the parts of an artifact are (read from its trailer, generically)."""

    data: bytes
    trailer_fields: tuple
    trailer_size: int
    manifest_offset: int
    manifest_size: int
    manifest: dict
    name: str = ""

    @property
    def weights_offset(self) -> int:
        return self.manifest["weights"]["offset"]

    @property
    def weights_size(self) -> int:
        return self.manifest["weights"]["size"]

    @property
    def code_size(self) -> int:
        code = self.manifest.get("code")
        if isinstance(code, dict) and isinstance(code.get("size"), int):
            return code["size"]
        return len(self.data[: self.weights_offset].rstrip(b"\0"))

    @property
    def elf(self) -> bytes:
        return self.data[: self.code_size]

    @property
    def weights(self) -> bytes:
        return self.data[self.weights_offset : self.weights_offset + self.weights_size]

    def regions(self) -> dict[str, tuple[int, int]]:
        """Named byte ranges: ELF header/tables/sections, padding, weights, manifest, trailer."""
        out = elf_regions(self.elf)
        if self.weights_offset > self.code_size:
            out["padding"] = (self.code_size, self.weights_offset)
        out["weights"] = (self.weights_offset, self.weights_offset + self.weights_size)
        out["manifest"] = (self.manifest_offset, self.manifest_offset + self.manifest_size)
        out["trailer"] = (len(self.data) - self.trailer_size, len(self.data))
        return {k: v for k, v in out.items() if v[1] > v[0]}


def anatomy(data: bytes, name: str = "") -> Anatomy:
    fmt = trailer_format()
    size = struct.calcsize(fmt)
    fields = struct.unpack(fmt, data[-size:])
    offset, length = fields[0], fields[1]
    manifest = json.loads(data[offset : offset + length])
    return Anatomy(data, fields, size, offset, length, manifest, name)


def seal(prefix: bytes, raw: bytes, template: tuple, digest: bool = True) -> bytes:
    """``prefix`` + manifest ``raw`` + a trailer like ``template`` pointing at it; with
    ``digest`` every 32-byte field of the trailer becomes blake2b-256 of ``raw`` (the
    manifest seal of the current format), else it keeps the template's value."""
    fields = list(template)
    fields[0], fields[1] = len(prefix), len(raw)
    for i, value in enumerate(fields):
        if digest and i >= 2 and isinstance(value, bytes) and len(value) == 32:
            fields[i] = hashlib.blake2b(raw, digest_size=32).digest()
    return prefix + raw + struct.pack(trailer_format(), *fields)


_SHT_NOBITS = 8


def elf_regions(elf: bytes) -> dict[str, tuple[int, int]]:
    """ELF64 little-endian header, program/section header tables and sections."""
    out: dict[str, tuple[int, int]] = {}
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2:
        return {"elf": (0, len(elf))}
    out["elf_header"] = (0, 64)
    phoff, shoff = struct.unpack_from("<QQ", elf, 0x20)
    phentsize, phnum, shentsize, shnum, shstrndx = struct.unpack_from("<HHHHH", elf, 0x36)
    out["program_headers"] = (phoff, min(len(elf), phoff + phentsize * phnum))
    out["section_headers"] = (shoff, min(len(elf), shoff + shentsize * shnum))
    sections = []
    for i in range(shnum):
        base = shoff + i * shentsize
        if base + 64 > len(elf):
            break
        name, kind, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, base)
        sections.append((name, kind, offset, size))
    if 0 <= shstrndx < len(sections):
        _, _, str_off, str_size = sections[shstrndx]
        strtab = elf[str_off : str_off + str_size]
        for name, kind, offset, size in sections:
            if kind == _SHT_NOBITS or size == 0 or offset + size > len(elf):
                continue
            end = strtab.find(b"\0", name)
            label = strtab[name:end].decode("ascii", "replace") or "?"
            out[f"section{label}"] = (offset, offset + size)
    return out


def manifest_paths(obj, prefix=()) -> list[tuple]:
    """Every key path of a JSON value (lists by index), inner nodes included."""
    paths = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            paths.append((*prefix, k))
            paths.extend(manifest_paths(v, (*prefix, k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            paths.append((*prefix, i))
            paths.extend(manifest_paths(v, (*prefix, i)))
    return paths


def get_path(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def set_path(obj, path, value) -> None:
    get_path(obj, path[:-1])[path[-1]] = value


def del_path(obj, path) -> None:
    parent = get_path(obj, path[:-1])
    del parent[path[-1]]


def load_refs(ctx: Context) -> None:
    """Reference logits and greedy tokens of every cached artifact, computed by the
    product on the unmutated files (in a forked child: the parent stays thread-free)."""
    from fuzz import build

    refs_dir = ctx.tmp / "refs"
    refs_dir.mkdir(parents=True, exist_ok=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 1
        try:
            from sparsec import runtime

            for name in build.ARTIFACTS:
                with runtime.load(ctx.artifact(name)) as m:
                    np.save(refs_dir / f"{name}.npy", m.forward(FIXED_IDS))
                    greedy = []
                    for prompt in GREEDY_PROMPTS:
                        n = min(GREEDY_TOKENS, m.max_context - len(prompt))
                        greedy.append(m.generate(prompt, max_new_tokens=n).token_ids)
                    info = {
                        "greedy": greedy,
                        "manifest": m.manifest,
                        "eos": sorted(m.eos_token_ids),
                    }
                    (refs_dir / f"{name}.json").write_text(json.dumps(info))
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(w, repr(exc).encode()[:4000])
        os._exit(code)
    os.close(w)
    message = b""
    while chunk := os.read(r, 4096):
        message += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(
            "the unmutated fixtures do not load and run, so no case can be judged: "
            f"{message.decode(errors='replace') or os.waitstatus_to_exitcode(status)}"
        )
    for name in build.ARTIFACTS:
        ctx.refs[name] = np.load(refs_dir / f"{name}.npy")
        info = json.loads((refs_dir / f"{name}.json").read_text())
        ctx.greedy[name] = info["greedy"]
        ctx.manifests[name] = info["manifest"]
        ctx.eos[name] = info["eos"]
