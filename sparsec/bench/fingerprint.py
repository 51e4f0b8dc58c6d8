"""Fingerprints of generated machine code: what a kernel compiles to, in a few numbers.

A fingerprint counts a function's instructions by class (FMAs, VNNI dot products,
expand-loads, vector loads/stores, mask ops, prefetches, branches, scalar ops), its
stack traffic (register spills and reloads: any memory operand on ``%rsp``/``%rbp``
other than push/pop of callee-saved registers and address arithmetic) and its code
bytes (the symbol size in the object file). Equal fingerprints mean the code generator
made the same code up to register names and constants; a changed count is a readable
diff ("fma 72 -> 64, stack_loads 0 -> 6"). Deterministic: no timing, the same result on
any host for the same LLVM version and target cpu.
"""

from __future__ import annotations

import re
import struct
from collections import Counter

# Order = order of the diff and the JSON.
CLASSES = (
    "fma",
    "vnni",
    "expand",
    "vector_load",
    "vector_store",
    "vector_other",
    "mask",
    "prefetch",
    "branch",
    "call",
    "scalar",
)
_VECTOR_MOVES = re.compile(
    r"^v(movups|movaps|movdq[au]\d*|broadcast|pbroadcast|movss|movsd|movq|movd)"
)
_STACK = re.compile(r"\(%r[sb]p\)|\(%r[sb]p,")


def _classify(mnemonic: str, operands: str) -> str:
    # AT&T syntax: source operands first, destination last.
    if mnemonic.startswith(("vfmadd", "vfnmadd", "vfmsub", "vfnmsub")):
        return "fma"
    if mnemonic.startswith("vpdpbusd") or mnemonic.startswith("vpdpwssd"):
        return "vnni"
    if "expand" in mnemonic:
        return "expand"
    if mnemonic.startswith("prefetch"):
        return "prefetch"
    if mnemonic.startswith("j"):
        return "branch"
    if mnemonic.startswith("call"):
        return "call"
    if mnemonic.startswith("k"):
        return "mask"
    if mnemonic.startswith("v"):
        if _VECTOR_MOVES.match(mnemonic) and "(" in operands:
            dest = operands.rsplit(",", 1)[-1]
            return "vector_store" if "(" in dest else "vector_load"
        return "vector_other"
    return "scalar"


def _instructions(asm: str) -> dict[str, list[tuple[str, str]]]:
    """Function name -> [(mnemonic, operands)] from LLVM's AT&T assembly."""
    functions: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in asm.splitlines():
        if not line or line[0] not in " \t":
            label = line.split("#", 1)[0].strip()
            if label.endswith(":") and not label.startswith("."):
                current = functions.setdefault(label[:-1], [])
            elif label.startswith(".Lfunc_end"):
                current = None
            continue
        text = line.split("#", 1)[0].strip()
        if current is None or not text or text.startswith("."):
            continue
        parts = text.split(None, 1)
        if parts[0] in ("rep", "lock") and len(parts) > 1:
            parts = parts[1].split(None, 1)
        current.append((parts[0], parts[1].strip() if len(parts) > 1 else ""))
    return functions


def function_sizes(obj: bytes) -> dict[str, int]:
    """Symbol name -> size in bytes of every function symbol of an ELF64 object."""
    if obj[:4] != b"\x7fELF" or obj[4] != 2:
        raise ValueError("not an ELF64 object")
    shoff = struct.unpack_from("<Q", obj, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    sizes: dict[str, int] = {}
    for _name, sh_type, _f, _a, offset, size, link, _i, _al, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        strtab_offset = sections[link][4]
        for k in range(size // entsize):
            st_name, st_info, _o, _s, _v, st_size = struct.unpack_from(
                "<IBBHQQ", obj, offset + k * entsize
            )
            if st_info & 0xF != 2:  # STT_FUNC
                continue
            end = obj.index(b"\0", strtab_offset + st_name)
            sizes[obj[strtab_offset + st_name : end].decode()] = st_size
    return sizes


def fingerprint_module(asm: str, obj: bytes) -> dict[str, dict[str, int]]:
    """Fingerprint of every function defined in a module's assembly and object."""
    sizes = function_sizes(obj)
    out = {}
    for name, instrs in _instructions(asm).items():
        counts = Counter(_classify(m, ops) for m, ops in instrs)
        stack_loads = stack_stores = 0
        for mnemonic, ops in instrs:
            if mnemonic.startswith(("push", "pop", "lea")) or not _STACK.search(ops):
                continue
            dest = ops.rsplit(",", 1)[-1]
            if _STACK.search(dest) and mnemonic.startswith(("mov", "vmov")):
                stack_stores += 1
            else:
                stack_loads += 1
        fp = {c: counts.get(c, 0) for c in CLASSES}
        fp["instructions"] = len(instrs)
        fp["stack_stores"] = stack_stores
        fp["stack_loads"] = stack_loads
        fp["code_bytes"] = sizes.get(name, 0)
        out[name] = fp
    return out


def diff_fingerprints(baseline: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """Readable differences: one line per distinct change, naming the kernels it hits
    (kernels of one format usually change together)."""
    by_change: dict[str, list[str]] = {}
    for name in sorted(set(baseline) | set(current)):
        if name not in current:
            change = "in the baseline but no longer generated"
        elif name not in baseline:
            change = "new kernel, not in the baseline"
        else:
            old, new = baseline[name], current[name]
            diffs = [
                f"{k} {old.get(k)} -> {new.get(k)}"
                for k in dict.fromkeys([*old, *new])
                if old.get(k) != new.get(k)
            ]
            if not diffs:
                continue
            change = ", ".join(diffs)
        by_change.setdefault(change, []).append(name)
    lines = []
    for change, names in by_change.items():
        who = names[0] if len(names) == 1 else f"{len(names)} kernels ({', '.join(names)})"
        lines.append(f"{who}: {change}")
    return lines
