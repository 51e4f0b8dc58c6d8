"""A linear-kernel variant for the kernel check's A/B (``--emitter``): sparse int8
weights expanded from a register instead of from memory.

``llvm.masked.expandload.v64i8`` becomes ``vpexpandb zmm{k}, [mem]``, which a
micro-benchmark on AMD Zen 4 measured at 1.45 ns a vector against 0.73 ns for a load
then a register ``vpexpandb`` (the sparse-kernels issue). Here the step's nonzero bytes
are fetched with a masked load (``bzhi(-1, popcount)`` lanes, so nothing past the
stream is touched) and expanded with ``llvm.x86.avx512.mask.expand``. Everything else
is sparsec's kernel.

    .venv/bin/python benchmarks/kernel_regression.py --check --only bitmask_i8 \\
        --emitter benchmarks/variants/register_expand.py:register_expand
"""

from __future__ import annotations


def register_expand(module, name, packed, target):
    from sparsec.bench.kernel_suite import emit_kernel
    from sparsec.codegen import linear_kernel
    from sparsec.codegen.irbuild import I32, I64, const, intrinsic

    original = linear_kernel._Format.weight

    def weight(self, state, k):
        if not (self.sparse and self.int8 and self.isa.sparse_decode == "expand"):
            return original(self, state, k)  # (AVX2 has no vpexpandb: its own decode)
        b = self.b
        mask = b.load(b.gep(state["masks"], [k], inbounds=True), align=2)
        vptr = state["values"].get()
        self.prefetch(vptr)
        count = intrinsic(b, "llvm.ctpop.i64", mask.type, [mask])
        lanes = intrinsic(b, "llvm.x86.bmi.bzhi.64", I64, [const(I64, -1), count])
        values = intrinsic(
            b,
            "llvm.masked.load.v64i8.p0",
            self.v.i8,
            [
                b.bitcast(vptr, self.v.i8.as_pointer()),
                const(I32, 1),
                b.bitcast(lanes, self.v.mask_i8),
                const(self.v.i8, 0),
            ],
        )
        vec = intrinsic(
            b,
            "llvm.x86.avx512.mask.expand.v64i8",
            self.v.i8,
            [values, const(self.v.i8, 0), b.bitcast(mask, self.v.mask_i8)],
        )
        state["values"].set(b.gep(vptr, [count], inbounds=True))
        return vec

    linear_kernel._Format.weight = weight
    try:
        return emit_kernel(module, name, packed, target)
    finally:
        linear_kernel._Format.weight = original
