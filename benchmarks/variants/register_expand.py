"""A linear-kernel variant for the kernel check's A/B (``--emitter``): every bitmask
kernel with ``Tuning.sparse_expand`` = "register" (a plain vector load of the value
stream, then the register form of ``vpexpandb``/``vexpandps``) instead of the table's
value, which ``sparsec compile --tuning host`` would choose on a CPU where it measures
faster (host_tuning.py).

    .venv/bin/python benchmarks/kernel_regression.py --check --only bitmask \\
        --emitter benchmarks/variants/register_expand.py:register_expand
"""

from __future__ import annotations

import dataclasses


def register_expand(module, name, packed, target):
    from sparsec.bench.kernel_suite import emit_kernel

    tuning = target.tuning
    expand = {fmt: "register" for fmt in tuning.sparse_expand}
    measured = dataclasses.replace(tuning, sparse_expand=expand)
    return emit_kernel(module, name, packed, dataclasses.replace(target, measured=measured))
