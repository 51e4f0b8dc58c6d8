"""Which ISAs the codegen tests can run here, and which formats each offers."""

from __future__ import annotations

import pytest

from sparsec.codegen import target


def host_target_or_skip(isa: target.Isa) -> target.Target:
    """``isa`` on this host's CPU; skips (naming what is missing) where the CPU lacks it."""
    missing = target.missing_features(isa.features)
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}: cannot run {isa.name} kernels")
    return target.Target(isa, target.default_target().cpu)


def skip_unless_offered(isa: target.Isa, fmt: str) -> None:
    """Skip a format the ISA has no kernel for (test_linear checks that it is refused)."""
    if fmt not in isa.formats:
        pytest.skip(f"{isa.name} has no {fmt} kernel (not offered on that ISA)")
