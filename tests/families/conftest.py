"""Fixtures of the model-family tests: each family's tiny model exported and optimized
once per session (dense and 70% magnitude-zeroed), then compiled per precision."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Built:
    model: object  # the transformers model (the reference)
    tokenizer: object
    exported: Path
    optimized: Path
    report: object  # the OptimizeReport


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(family, sparsity) -> Built."""
    from sparsec.export import export_model
    from sparsec.passes import optimize_file
    from sparsec.testing import make_tiny_family, zero_smallest

    cache: dict = {}

    def get(family: str, sparsity: float = 0.7) -> Built:
        key = (family, sparsity)
        if key not in cache:
            model, tokenizer = make_tiny_family(family, seed=1)
            if sparsity:
                zero_smallest(model, sparsity)
            folder = tmp_path_factory.mktemp(f"{family}-{sparsity}")
            exported = export_model(model, tokenizer, folder / "m.onnx", source=family)
            optimized = folder / "m.opt.onnx"
            report = optimize_file(exported, optimized)
            cache[key] = Built(model, tokenizer, exported, optimized, report)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def compiled(built, tmp_path_factory):
    """(family, precision, kernels, sparsity) -> (runtime model, Built)."""
    from sparsec import runtime
    from sparsec.codegen.compile import compile_model

    cache: dict = {}

    def get(family: str, precision: str, kernels: str = "bitmask", sparsity: float = 0.7):
        key = (family, precision, kernels, sparsity)
        if key not in cache:
            b = built(family, sparsity)
            so = tmp_path_factory.mktemp("so") / f"{family}-{precision}-{kernels}.so"
            compile_model(
                b.optimized, so, precision=precision, kernels=kernels, max_context=128, quiet=True
            )
            cache[key] = (runtime.load(so, threads=2), b)
        return cache[key]

    return get
