"""Export from a Hugging Face checkpoint without loading it (issue 22): the graph is
traced from a skeleton whose parameters were never filled, and every weight is read
from the safetensors (bf16, fp16 or fp32, sharded or not) only when the graph is
saved, one tensor at a time; logits equal PyTorch's on the same checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsec.errors import SparsecError
from sparsec.export import export_graph, export_model, verify_export
from sparsec.hf_checkpoint import Checkpoint
from sparsec.models import load_model, open_skeleton
from sparsec.onnx_io import save_atomic
from sparsec.testing import make_tiny_llama


def _checkpoint(folder, dtype=torch.bfloat16, shard="60KB", **overrides):
    model, tokenizer = make_tiny_llama(**overrides)
    model.to(dtype).save_pretrained(folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "dtype,tied",
    [
        (torch.bfloat16, True),
        (torch.bfloat16, False),
        (torch.float16, True),
        (torch.float32, False),
    ],
)
def test_checkpoint_export_equals_pytorch(tmp_path, dtype, tied):
    folder = _checkpoint(tmp_path / "ckpt", dtype, tie_word_embeddings=tied)
    skeleton, tokenizer, checkpoint, generation = open_skeleton(folder)
    stored = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    assert checkpoint.dtypes == {stored}
    out = export_model(
        skeleton,
        tokenizer,
        tmp_path / "m.onnx",
        checkpoint=checkpoint,
        generation_config=generation,
    )
    reference, _ = load_model(folder, quiet=True)  # the same checkpoint, float32
    check = verify_export(out, reference, greedy_prompt=[256, 40, 41, 42], greedy_tokens=12)
    assert check.prefill_max_abs < 1e-5 and check.decode_max_abs < 1e-5, check
    assert check.greedy_match, check


def test_weights_are_read_when_saved_once_each(tmp_path, monkeypatch):
    """Export reads no weight; the save reads each one once and holds at most one at a
    time. Ablation: a checkpoint that hands out loaded tensors reads all of them at
    export time."""
    folder = _checkpoint(tmp_path / "ckpt")
    skeleton, tokenizer, checkpoint, generation = open_skeleton(folder)
    reads, live, peak = [], set(), [0]
    reads_with_layout = False
    original = Checkpoint.array

    def counting(self, name, *, transpose=False):
        array = original(self, name, transpose=transpose)
        reads.append((name, transpose) if reads_with_layout else name)
        live.add(id(array))
        peak[0] = max(peak[0], len(live))
        import weakref

        weakref.finalize(array, live.discard, id(array))
        return array

    monkeypatch.setattr(Checkpoint, "array", counting)
    graph = export_graph(skeleton, tokenizer, checkpoint=checkpoint, generation_config=generation)
    # onnxscript's constant folding looks at the small norm vectors; no matrix is read.
    assert not [n for n in reads if len(checkpoint.tensors[n].shape) > 1], reads
    reads.clear()
    reads_with_layout = True
    save_atomic(graph, tmp_path / "m.onnx", external=True)
    matrices = {n for n, t in checkpoint.tensors.items() if len(t.shape) > 1}
    assert len(reads) == len(set(reads))  # nothing read twice in one layout
    assert {n for n, _ in reads} >= matrices  # every matrix read when saved
    # Tied: the embedding is read as itself (Gather) and transposed (the LM head).
    assert ("model.embed_tokens.weight", True) in reads
    assert peak[0] == 1  # one tensor alive at a time
    reads_with_layout = False

    def eager(self, name, *, transpose=False):
        import onnx_ir as ir

        return ir.Tensor(counting(self, name, transpose=transpose))

    reads.clear()
    monkeypatch.setattr(Checkpoint, "lazy", eager)
    export_graph(skeleton, tokenizer, checkpoint=checkpoint, generation_config=generation)
    assert [n for n in reads if len(checkpoint.tensors[n].shape) > 1]  # what lazy avoids


def test_tied_names_with_different_values_are_refused(tmp_path):
    folder = _checkpoint(tmp_path / "ckpt", shard="10GB", tie_word_embeddings=False)
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(config))
    skeleton, tokenizer, checkpoint, generation = open_skeleton(folder)
    with pytest.raises(SparsecError, match="ties model.embed_tokens.weight and lm_head.weight"):
        export_graph(skeleton, tokenizer, checkpoint=checkpoint, generation_config=generation)


def test_damaged_checkpoints_are_named(tmp_path):
    folder = _checkpoint(tmp_path / "ckpt")
    index = folder / "model.safetensors.index.json"
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[0].unlink()
    with pytest.raises(SparsecError, match=f"names {shards[0].name}, which is not in"):
        Checkpoint(folder)
    index.write_text("{not json")
    with pytest.raises(SparsecError, match="is not a safetensors index"):
        Checkpoint(folder)
    index.unlink()
    with pytest.raises(SparsecError, match="has no model.safetensors"):
        Checkpoint(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(SparsecError, match="cannot read .*model.safetensors"):
        Checkpoint(folder)


def test_int8_checkpoint_tensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    folder = _checkpoint(tmp_path / "ckpt", shard="10GB")
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4, dtype=torch.int8)},
              str(folder / "model.safetensors"))  # fmt: skip
    with pytest.raises(SparsecError, match="is I8; sparsec reads F32, BF16, F16"):
        Checkpoint(folder)


def test_mismatched_shape_is_refused(tmp_path):
    folder = _checkpoint(tmp_path / "ckpt", shard="10GB")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    skeleton, tokenizer, checkpoint, generation = open_skeleton(folder)
    with pytest.raises(SparsecError, match="config.json makes it"):
        export_graph(skeleton, tokenizer, checkpoint=checkpoint, generation_config=generation)


def test_checkpoint_array_converts_and_transposes(tmp_path):
    folder = _checkpoint(tmp_path / "ckpt", shard="10GB")
    checkpoint = Checkpoint(folder)
    reference, _ = load_model(folder, quiet=True)
    want = reference.model.layers[0].mlp.down_proj.weight.detach().numpy()
    name = "model.layers.0.mlp.down_proj.weight"
    got = checkpoint.array(name)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    got_t = checkpoint.array(name, transpose=True)
    assert got_t.flags.c_contiguous and np.array_equal(got_t, want.T)


def test_the_pytorch_check_is_refused_up_front_when_memory_is_short(tmp_path, monkeypatch, capsys):
    """`sparsec export` of a checkpoint reads one weight at a time, but its check runs the
    model in PyTorch and onnxruntime at once: refused before any work when that cannot
    fit, naming --no-verify; with --no-verify the export runs."""
    from sparsec import resources
    from sparsec.cli import main

    folder = _checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(resources, "available_memory", lambda: 1 << 20)
    out = tmp_path / "m.onnx"
    assert main(["export", str(folder), "-o", str(out)]) == 1
    assert not out.exists()
    assert "pass --no-verify" in capsys.readouterr().err
    assert main(["export", str(folder), "-o", str(out), "--no-verify"]) == 0
    assert out.exists()


def test_an_export_the_disk_cannot_hold_is_refused_up_front(tmp_path, monkeypatch, capsys):
    from sparsec import resources
    from sparsec.cli import main

    folder = _checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(resources, "_free", lambda f: (tmp_path, 1000))
    out = tmp_path / "m.onnx"
    assert main(["export", str(folder), "-o", str(out), "--no-verify"]) == 1
    assert "the export needs about" in capsys.readouterr().err and not out.exists()
