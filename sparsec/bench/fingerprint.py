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

import io
import re
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
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        elf = ELFFile(io.BytesIO(obj))
        if elf.elfclass != 64:
            raise ValueError("not an ELF64 object")
        tables = [s for s in elf.iter_sections() if isinstance(s, SymbolTableSection)]
    except ELFError as exc:
        raise ValueError(f"not an ELF64 object: {exc}") from exc
    return {
        sym.name: sym["st_size"]
        for table in tables
        if table["sh_type"] == "SHT_SYMTAB"
        for sym in table.iter_symbols()
        if sym["st_info"]["type"] == "STT_FUNC"
    }


def function_assembly(asm: str) -> dict[str, str]:
    """Function name -> its assembly text: from the end of the previous function (so its
    constant pools come with it) to its ``.size`` directive."""
    texts: dict[str, str] = {}
    chunk: list[str] = []
    name = None
    for line in asm.splitlines():
        chunk.append(line)
        if line and line[0] not in " \t":
            label = line.split("#", 1)[0].strip()
            if label.endswith(":") and not label.startswith("."):
                name = label[:-1]
        elif name and line.strip().startswith(".size") and line.split()[1] == f"{name},":
            texts[name] = "\n".join(chunk) + "\n"
            chunk, name = [], None
    return texts


_HASHED = re.compile(r"\b(spc_[a-z0-9_]+?)_[0-9a-f]{12}\b")
_LOCAL_LABEL = re.compile(r"\.(LBB|LCPI|Lfunc_end|Ltmp)\d+(_\d+)?\b")


def canonical_names(asm: str) -> dict[str, str]:
    """Stable names for a module's functions: ``spc_<op>_<parameter hash>`` (ops.shared_kernel)
    becomes ``spc_<op>_<n>`` in order of appearance, so a refactor that changes how an
    op's parameters are spelled, but not its code, keeps the name."""
    names: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for match in _HASHED.finditer(asm):
        full, op = match.group(0), match.group(1)
        if full not in names:
            counts[op] += 1
            names[full] = f"{op}_{counts[op]}"
    return names


def canonical_text(text: str, names: dict[str, str]) -> str:
    """``text`` with hashed function names replaced (``canonical_names``) and local labels
    stripped of the function's index in the module (``.LBB12_3`` -> ``.LBB_3``), so that
    adding a function elsewhere in the module does not change this one's text."""
    text = _HASHED.sub(lambda m: names.get(m.group(0), m.group(0)), text)
    return _LOCAL_LABEL.sub(lambda m: f".{m.group(1)}{m.group(2) or ''}", text)


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
