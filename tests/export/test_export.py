"""The exporter: graph contract, metadata, and parity with PyTorch under onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from sparsec import contract
from sparsec.errors import SparsecError
from sparsec.export import (
    _cache_wrapper,
    _example_inputs,
    _feeds,
    _ort_session,
    export_model,
    verify_export,
)


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_io_names_shapes_and_dynamic_dims(tiny_onnx, tiny_model):
    model, _ = tiny_model
    n_layers = model.config.num_hidden_layers
    proto = onnx.load(tiny_onnx)
    inputs = {i.name: _dims(i) for i in proto.graph.input}
    outputs = {o.name: _dims(o) for o in proto.graph.output}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len(inputs) == 3 + 2 * n_layers and len(outputs) == 1 + 2 * n_layers
    assert inputs["input_ids"] == ["batch", "seq"]
    assert inputs["attention_mask"][0] == "batch" and isinstance(inputs["attention_mask"][1], str)
    assert inputs[contract.past_key(0)] == ["batch", 2, "past", 16]
    assert outputs["logits"][2] == model.config.vocab_size
    assert contract.present_value(n_layers - 1) in outputs


def test_metadata_carries_config_and_tokenizer(tiny_onnx, tiny_model):
    model, tokenizer = tiny_model
    meta = {p.key: p.value for p in onnx.load(tiny_onnx).metadata_props}
    assert meta[contract.META_FORMAT] == "exported"
    cfg = contract.ModelConfig.from_json(meta[contract.META_CONFIG])
    assert cfg == contract.ModelConfig.from_hf(model.config)
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 16
    assert cfg.rope.theta == pytest.approx(model.config.rope_parameters["rope_theta"])
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(meta[contract.META_TOKENIZER])
    assert tok.encode("hello").ids == tokenizer("hello").input_ids
    assert json.loads(meta[contract.META_GENERATION])["eos_token_id"] == tokenizer.eos_token_id
    assert "im_start" in meta[contract.META_CHAT_TEMPLATE]


@pytest.mark.parametrize("batch,seq,past", [(1, 9, 0), (2, 4, 3), (3, 1, 11)])
def test_logits_and_cache_match_pytorch(tiny_onnx, tiny_model, batch, seq, past):
    model, _ = tiny_model
    ids, mask, pos, kv = _example_inputs(model.config, batch, seq, past, seed=batch + seq)
    with torch.no_grad():
        ref = [t.numpy() for t in _cache_wrapper(model)(ids, mask, pos, *kv)]
    got = _ort_session(tiny_onnx).run(None, _feeds(ids, mask, pos, kv))
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4)


def test_greedy_continuation_matches_hf_generate(tiny_onnx, tiny_model):
    model, tokenizer = tiny_model
    check = verify_export(
        tiny_onnx, model, greedy_prompt=tokenizer("Once upon").input_ids, greedy_tokens=24
    )
    assert check.greedy_match, check
    assert check.prefill_max_abs < 1e-4 and check.decode_max_abs < 1e-4


def test_unwritable_output_is_a_clear_error(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    with pytest.raises(SparsecError, match="does not exist"):
        export_model(model, tokenizer, tmp_path / "missing" / "m.onnx")
    (tmp_path / "adir").mkdir()
    with pytest.raises(SparsecError, match="is a folder"):
        export_model(model, tokenizer, tmp_path / "adir")


def test_failed_export_leaves_nothing_behind(tiny_model, tmp_path, monkeypatch):
    model, tokenizer = tiny_model

    def broken(*args, **kwargs):
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(SparsecError, match="simulated exporter crash"):
        export_model(model, tokenizer, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
