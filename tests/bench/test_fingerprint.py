"""Machine-code fingerprints: instruction classes, stack traffic, symbol sizes, diffs; the
per-function assembly text the kernel check compares, under stable names."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from sparsec.bench.fingerprint import (
    canonical_names,
    canonical_text,
    diff_fingerprints,
    fingerprint_module,
    function_assembly,
    function_sizes,
)

ASM = """\
\t.text
\t.globl\tk0
k0:
\tpushq\t%rbx
\tsubq\t$64, %rsp
\tvmovups\t(%rdi), %zmm0
\tvfmadd231ps\t(%rsi){1to16}, %zmm0, %zmm1
\tvpdpbusd\t%zmm2, %zmm3, %zmm4
\tvexpandps\t(%rdx), %zmm5 {%k1}
\tvmovups\t%zmm1, (%rcx)
\tvmovups\t%zmm6, -64(%rsp)                # spill
\tvaddps\t-64(%rsp), %zmm1, %zmm1          # folded reload
\tmovq\t%rax, 8(%rsp)
\tleaq\t16(%rsp), %rax
\tkmovw\t%eax, %k1
\tprefetcht0\t2048(%rdi)
\tjne\t.LBB0_1
\tcallq\tfoo
\taddq\t$64, %rsp
\tpopq\t%rbx
\tretq
.Lfunc_end0:
\t.size\tk0, .Lfunc_end0-k0
"""


def test_instruction_classes_and_stack_traffic():
    fp = fingerprint_module(ASM, _empty_elf())["k0"]
    assert fp["fma"] == 1 and fp["vnni"] == 1 and fp["expand"] == 1
    assert fp["vector_load"] == 1 and fp["vector_store"] == 2  # incl. the spill
    assert fp["vector_other"] == 1 and fp["mask"] == 1 and fp["prefetch"] == 1
    assert fp["branch"] == 1 and fp["call"] == 1
    # push/pop of callee-saved registers and lea are not spills
    assert fp["stack_stores"] == 2 and fp["stack_loads"] == 1
    assert fp["instructions"] == 18
    assert fp["code_bytes"] == 0  # no such symbol in the object


def test_function_sizes_match_nm():
    from llvmlite import ir

    from sparsec.codegen import target

    module = ir.Module()
    for name, n in (("small", 1), ("large", 40)):
        fn = ir.Function(module, ir.FunctionType(ir.IntType(64), [ir.IntType(64)]), name)
        b = ir.IRBuilder(fn.append_basic_block())
        x = fn.args[0]
        for i in range(n):  # a chain LLVM cannot fold: x = x * (i + 3) ^ i
            x = b.xor(b.mul(x, ir.Constant(ir.IntType(64), i + 3)), ir.Constant(ir.IntType(64), i))
        b.ret(x)
    obj = target.compile_ir(module)
    sizes = function_sizes(obj)
    # binutils' nm (installed with the C compiler that links every model) is the reference
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.o"
        path.write_bytes(obj)
        out = subprocess.run(["nm", "-S", str(path)], capture_output=True, text=True).stdout
    expected = {
        parts[3]: int(parts[1], 16)
        for parts in (line.split() for line in out.splitlines())
        if len(parts) == 4 and parts[2] in "Tt"
    }
    assert sizes == expected
    assert sizes["large"] > sizes["small"] > 0


def test_diff_groups_identical_changes_and_names_kernels():
    base = {
        "a": {"fma": 4, "code_bytes": 100},
        "b": {"fma": 4, "code_bytes": 100},
        "c": {"fma": 1},
        "gone": {"fma": 1},
    }
    cur = {
        "a": {"fma": 2, "code_bytes": 100},
        "b": {"fma": 2, "code_bytes": 100},
        "c": {"fma": 1},
        "new": {"fma": 1},
    }
    lines = diff_fingerprints(base, cur)
    assert "2 kernels (a, b): fma 4 -> 2" in lines
    assert "gone: in the baseline but no longer generated" in lines
    assert "new: new kernel, not in the baseline" in lines
    assert len(lines) == 3
    assert diff_fingerprints(base, base) == []


def _empty_elf() -> bytes:
    """A minimal relocatable ELF64 with no symbols (for assembly-only fingerprints)."""
    from llvmlite import ir

    from sparsec.codegen import target

    return target.compile_ir(ir.Module())


MODULE = """\
\t.text
\t.section\t.rodata.cst4,"aM",@progbits,4
.LCPI3_0:
\t.long\t0x3727c5ac
\t.text
\t.globl\tspc_rmsnorm_0123456789ab
spc_rmsnorm_0123456789ab:
\tvbroadcastss\t.LCPI3_0(%rip), %zmm0
\tjne\t.LBB3_2
.LBB3_2:
\tretq
.Lfunc_end3:
\t.size\tspc_rmsnorm_0123456789ab, .Lfunc_end3-spc_rmsnorm_0123456789ab
\t.globl\tbody
body:
\tcallq\tspc_rmsnorm_0123456789ab
\tcallq\tspc_rmsnorm_ba9876543210
\tretq
.Lfunc_end4:
\t.size\tbody, .Lfunc_end4-body
\t.section\t".note.GNU-stack","",@progbits
"""


def test_function_assembly_keeps_each_functions_constants():
    texts = function_assembly(MODULE)
    assert list(texts) == ["spc_rmsnorm_0123456789ab", "body"]
    assert ".LCPI3_0:" in texts["spc_rmsnorm_0123456789ab"]  # its constant pool
    assert texts["body"].splitlines()[0] == "\t.globl\tbody"
    assert "GNU-stack" not in "".join(texts.values())  # the module tail is no function


def test_canonical_names_and_text_ignore_hashes_and_module_position():
    names = canonical_names(MODULE)
    assert names == {
        "spc_rmsnorm_0123456789ab": "spc_rmsnorm_1",
        "spc_rmsnorm_ba9876543210": "spc_rmsnorm_2",
    }
    texts = function_assembly(MODULE)
    body = canonical_text(texts["body"], names)
    assert "callq\tspc_rmsnorm_1\n\tcallq\tspc_rmsnorm_2" in body
    norm = canonical_text(texts["spc_rmsnorm_0123456789ab"], names)
    # the same function placed elsewhere in a module (other label indices) reads the same
    moved = canonical_text(
        texts["spc_rmsnorm_0123456789ab"].replace("3_", "7_").replace("end3", "end7"), names
    )
    assert norm == moved and ".LBB_2:" in norm and ".LCPI_0" in norm
    # ablation: without canonicalizing, the moved copy differs
    assert texts["spc_rmsnorm_0123456789ab"] != texts["spc_rmsnorm_0123456789ab"].replace(
        "3_", "7_"
    )
