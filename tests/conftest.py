"""Session fixtures: one tiny random Llama, its HF folder and its ONNX export."""

from __future__ import annotations

import os
import tempfile

import pytest

# Loads record verified artifacts (sparsec.runtime.verified): keep the tests' records,
# also those of CLI subprocesses, out of the user's cache.
os.environ["SPARSEC_VERIFIED_DIR"] = tempfile.mkdtemp(prefix="sparsec-verified-")


@pytest.fixture(scope="session")
def tiny_model():
    from sparsec.testing import make_tiny_llama

    return make_tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory):
    from sparsec.models import save_model

    model, tokenizer = tiny_model
    return save_model(model, tokenizer, tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory):
    """The tiny model exported once per test session (about 10 s)."""
    from sparsec.export import export_model

    model, tokenizer = tiny_model
    return export_model(
        model, tokenizer, tmp_path_factory.mktemp("onnx") / "tiny.onnx", source="tiny"
    )
