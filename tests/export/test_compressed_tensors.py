"""compressed-tensors checkpoints (sparsec/compressed.py): what `sparsify --format
compressed-tensors` writes loads in transformers with the plain folder's logits and
exports to the plain folder's graph; llm-compressor's sparse outputs export; schemes
sparsec cannot represent and damaged folders fail with one line."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsec.cli import main
from sparsec.compressed import CompressedCheckpoint, read_info
from sparsec.errors import SparsecError
from sparsec.export import open_source
from sparsec.models import load_model, save_model
from sparsec.onnx_io import save_atomic
from sparsec.sparsify.quant import quantize_weights_, write_quantization_json
from sparsec.testing import make_tiny_llama, zero_smallest

DATA = Path(__file__).parent / "data"
N_LINEARS = 14  # 2 layers x q, k, v, o, gate, up, down
IDS = torch.tensor([[5, 9, 2, 7, 100, 200, 33, 44]])


def _linears(model):
    return {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    }


def _write_ct(model, tokenizer, folder: Path, scales=None) -> Path:
    from sparsec.compressed import save_compressed

    folder.mkdir()
    save_compressed(model, tokenizer, folder, sparse_linears=_linears(model), scales=scales)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The 50%-sparse tiny model as the four outputs of sparsify: plain and
    compressed-tensors, float32 and --int8."""
    base = tmp_path_factory.mktemp("ct")
    model, tokenizer = make_tiny_llama(seed=3)
    zero_smallest(model, 0.5)
    out = {"plain": save_model(model, tokenizer, base / "plain")}
    out["ct"] = _write_ct(model, tokenizer, base / "ct")
    scales = quantize_weights_(_linears(model))
    out["plain8"] = save_model(model, tokenizer, base / "plain8")
    write_quantization_json(out["plain8"], scales)
    out["ct8"] = _write_ct(model, tokenizer, base / "ct8", scales)
    return out


def _hf(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model, model.eval()(IDS).logits


def test_written_format(folders):
    config = json.loads((folders["ct8"] / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["symmetric"]
    acts = group["input_activations"]
    assert (acts["strategy"], acts["dynamic"], acts["symmetric"]) == ("token", True, True)
    assert config["ignore"] == ["lm_head"]
    sparsity = config["sparsity_config"]
    assert sparsity["format"] == "dense" and sparsity["sparsity_structure"] == "unstructured"
    assert 0.5 <= sparsity["global_sparsity"] < 0.52
    tensors = load_file(folders["ct8"] / "model.safetensors")
    q = tensors["model.layers.0.mlp.down_proj.weight"]
    assert q.dtype == torch.int8 and tensors["model.layers.0.mlp.down_proj.weight_scale"].shape == (
        64,
        1,
    )
    assert (folders["ct8"] / "tokenizer.json").is_file()
    assert not (folders["ct8"] / "quantization.json").exists()
    # float32: the sparsity alone, no config group, the weights as the plain folder's
    fp = json.loads((folders["ct"] / "config.json").read_text())["quantization_config"]
    assert fp["config_groups"] == {} and fp["sparsity_config"]["format"] == "dense"


@pytest.mark.parametrize("kind", ["ct", "ct8"])
def test_transformers_loads_it_with_the_plain_logits(folders, kind, tmp_path):
    plain, expected = _hf(folders["plain" + kind[2:]])
    from transformers import CompressedTensorsConfig

    # dequantize=True: the int8 weights back to float32 at load, bit for bit q * scale
    model, logits = _hf(folders[kind], quantization_config=CompressedTensorsConfig(dequantize=True))
    assert torch.equal(logits, expected)
    # the default load keeps compressed-tensors' W8A8 modules; their weights, once
    # decompressed by the first forward, are the plain folder's
    model, _ = _hf(folders[kind])
    if kind == "ct8":
        q_proj = model.model.layers[0].self_attn.q_proj
        assert q_proj.quantization_scheme.input_activations.strategy == "token"
    got = model.state_dict()  # with compressed-tensors' scales beside the weights
    for name, a in plain.state_dict().items():
        assert torch.equal(a, got[name]), name
    if kind == "ct8":
        # ablation: without the quantization_config transformers reads the int8 codes as
        # the weights themselves
        folder = tmp_path / "noconfig"
        shutil.copytree(folders[kind], folder)
        config = json.loads((folder / "config.json").read_text())
        del config["quantization_config"]
        (folder / "config.json").write_text(json.dumps(config))
        try:
            _, wrong = _hf(folder)
        except Exception:  # transformers refuses int8 weights for float parameters
            return
        assert not torch.allclose(wrong, expected, atol=1e-3)


def _initializers(path) -> dict:
    return {k: v.const_value.numpy() for k, v in ir.load(path).graph.initializers.items()}


def _export(folder, out, **kwargs) -> Path:
    save_atomic(open_source(folder, quiet=True, **kwargs).graph(str(folder)), out)
    return out


def test_int8_export_equals_the_plain_int8_export(folders, tmp_path):
    plain = _initializers(_export(folders["plain8"], tmp_path / "plain8.onnx"))
    ct_path = _export(folders["ct8"], tmp_path / "ct8.onnx")
    ct = _initializers(ct_path)
    assert sorted(ct) == sorted(plain)
    for name in plain:
        assert ct[name].dtype == plain[name].dtype and np.array_equal(ct[name], plain[name]), name
    graph = ir.load(ct_path)
    assert Counter(n.op_type for n in graph.graph)["DequantizeLinear"] == N_LINEARS
    assert graph.metadata_props["sparsec.quantization"] == "w8a8"
    # ablation: read without its quantization, the same folder is a float model
    src = open_source(folders["ct8"], quiet=True, ignore_quantization=True)
    assert src.quantization is None and isinstance(src.checkpoint, CompressedCheckpoint)


def test_float_folder_reads_lazily_as_the_plain_folder(folders):
    src = open_source(folders["ct"], quiet=True)
    assert isinstance(src.checkpoint, CompressedCheckpoint) and src.quantization is None
    model, _ = load_model(folders["plain"], quiet=True)
    for name, param in model.named_parameters():
        if name in src.checkpoint.tensors:
            assert np.array_equal(src.checkpoint.array(name), param.detach().numpy()), name
    # the int8 folder read lazily as floats (export --ignore-quantization): q * scale
    int8 = open_source(folders["ct8"], quiet=True, ignore_quantization=True).checkpoint
    model8, _ = load_model(folders["plain8"], quiet=True)
    w = model8.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert np.array_equal(int8.array("model.layers.1.mlp.down_proj.weight"), w)
    assert np.array_equal(int8.array("model.layers.1.mlp.down_proj.weight", transpose=True), w.T)


def test_size_at_70_percent_int8(tmp_path):
    """Linears 27x the embedding (SmolLM2's are 4x): int8 is what shrinks the folder;
    the zeros are stored as zeros."""
    model, tokenizer = make_tiny_llama(
        seed=1, hidden_size=256, intermediate_size=1024, num_attention_heads=8
    )
    zero_smallest(model, 0.7)
    plain = save_model(model, tokenizer, tmp_path / "fp32")
    ct_fp32 = _write_ct(model, tokenizer, tmp_path / "ct_fp32")
    scales = quantize_weights_(_linears(model))
    ct8 = _write_ct(model, tokenizer, tmp_path / "ct8", scales)

    def size(folder):
        return (folder / "model.safetensors").stat().st_size

    assert size(ct8) / size(plain) < 0.45  # measured 0.28 (SmolLM2-135M: 0.41)
    # ablation: without --int8 the compressed-tensors folder is as big as the plain one
    assert size(ct_fp32) / size(plain) > 0.99


def _sparsegpt_folder(model, tokenizer, folder: Path, bitmask: bool) -> Path:
    """A folder as llm-compressor saves a SparseGPTModifier result: dense weights with a
    compressed-tensors sparsity_config (``format: dense``), or (before compressed-tensors
    0.15, its default for sparse models) weights in the sparse-bitmask layout."""
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_CONFIG_NAME,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
    )
    from compressed_tensors.config import BitmaskConfig, DenseSparsityConfig
    from compressed_tensors.utils import pack_bitmasks

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config_class = BitmaskConfig if bitmask else DenseSparsityConfig
    sparsity = config_class(global_sparsity=0.5, targets=["Linear"], ignore=["lm_head"])
    if bitmask:  # compressed-tensors 0.14's BitmaskCompressor layout (its tests' fixture)
        state = load_file(folder / "model.safetensors")
        for name in _linears(model):
            w = state.pop(f"{name}.weight")
            mask = w != 0
            counts = mask.sum(dim=-1)
            state[f"{name}.shape"] = torch.tensor(w.shape)
            state[f"{name}.compressed"] = w[mask]
            state[f"{name}.bitmask"] = pack_bitmasks(mask)
            state[f"{name}.row_offsets"] = torch.cumsum(counts, 0) - counts
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config[QUANTIZATION_CONFIG_NAME] = {
        QUANTIZATION_METHOD_NAME: "compressed-tensors",
        COMPRESSION_VERSION_NAME: "0.14.0",
        SPARSITY_CONFIG_NAME: sparsity.model_dump(),
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_legacy_bitmask_layout_of_compressed_tensors_013():
    """A tensor compressed by compressed-tensors 0.13's own BitmaskCompressor (the fixture
    was made with it): decompressed to its dense values."""
    folder = DATA / "ct013-bitmask"
    checkpoint = CompressedCheckpoint(folder, read_info(folder))
    name = "model.layers.0.mlp.up_proj.weight"
    assert checkpoint.tensors[name].shape == (6, 20)
    assert np.array_equal(checkpoint.array(name), checkpoint.array("expected.up_proj"))


def test_llm_compressor_sparsegpt_outputs_export(folders, tmp_path):
    model, tokenizer = load_model(folders["plain"], quiet=True)
    bitmask = _sparsegpt_folder(model, tokenizer, tmp_path / "bitmask", bitmask=True)
    assert "model.layers.0.mlp.up_proj.weight" not in load_file(bitmask / "model.safetensors")
    exported = _initializers(_export(bitmask, tmp_path / "bitmask.onnx"))
    # every weight of the plain model is in the graph, as the contract's [in, out] (equal
    # values: a bitmask keeps no -0.0)
    weights = [w.detach().numpy().T for w in (m.weight for m in _linears(model).values())]
    for w in [*weights, model.model.embed_tokens.weight.detach().numpy()]:
        assert any(a.shape == w.shape and np.array_equal(a, w) for a in exported.values())
    dense = _sparsegpt_folder(model, tokenizer, tmp_path / "dense", bitmask=False)
    loaded, _ = load_model(dense, quiet=True)
    for (name, a), (_, b) in zip(
        sorted(model.state_dict().items()), sorted(loaded.state_dict().items()), strict=True
    ):
        assert torch.equal(a, b), name
    # ablation: transformers alone cannot read the bitmask layout any more
    from transformers import AutoModelForCausalLM

    # (it initializes the missing weights at random)
    other = AutoModelForCausalLM.from_pretrained(bitmask, dtype=torch.float32)
    w = other.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w, model.model.layers[0].mlp.up_proj.weight)


def _with_quantization(folders, tmp_path, scheme: dict) -> Path:
    folder = tmp_path / "scheme"
    shutil.copytree(folders["ct8"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"].update(scheme)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _args(**kw):
    base = dict(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
    return {**base, **kw}


TOKEN = _args(strategy="token", dynamic=True)


@pytest.mark.parametrize(
    "scheme, words",
    [
        (
            {"weights": _args(num_bits=4, strategy="group", group_size=128)},
            "weights int4 group(128) symmetric static",
        ),
        ({"weights": _args(symmetric=False)}, "weights int8 channel asymmetric static"),
        (
            {"input_activations": _args(strategy="tensor")},
            "activations int8 tensor symmetric static",
        ),
        ({"weights": _args(type="float")}, "weights float8 channel symmetric static"),
        ({"input_activations": None}, "activations none"),
    ],
)
def test_unsupported_scheme_is_refused_naming_it(folders, tmp_path, scheme, words):
    folder = _with_quantization(folders, tmp_path, scheme)
    with pytest.raises(SparsecError, match="scheme 'group_0'") as info:
        open_source(folder, quiet=True)
    message = str(info.value)
    assert words in message and "\n" not in message
    # ablation: the W8A8 scheme itself is read
    assert read_info(_with_quantization(folders, tmp_path / "ok", {"input_activations": TOKEN}))


def _damage(folders, tmp_path, how: str) -> Path:
    kind = "ct" if how == "bitmask under dense" else "ct8"
    folder = tmp_path / "damaged"
    shutil.copytree(folders[kind], folder)
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif how in ("no scale", "asymmetric"):
        state = load_file(weights)
        if how == "no scale":
            del state["model.layers.1.mlp.up_proj.weight_scale"]
        else:
            state["model.layers.1.mlp.up_proj.weight_zero_point"] = torch.zeros(128, 1)
        save_file(state, weights, metadata={"format": "pt"})
    elif how == "bitmask under dense":
        state = load_file(weights)
        w = state.pop("model.layers.0.mlp.up_proj.weight")
        state["model.layers.0.mlp.up_proj.compressed"] = w[w != 0]
        save_file(state, weights, metadata={"format": "pt"})
    elif how == "wrong shape":
        config = json.loads((folder / "config.json").read_text())
        config["intermediate_size"] = 96
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "sparsity format":
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["sparsity_config"]["format"] = "sparse-24-bitmask"
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "cannot read .*model.safetensors"),
        ("no scale", "tensor 'model.layers.1.mlp.up_proj.weight' is I8 without a weight_scale"),
        ("asymmetric", "weight_zero_point belongs to a static or asymmetric quantization"),
        ("bitmask under dense", "is bitmask-compressed, but config.json's sparsity_config"),
        ("wrong shape", "mlp.*, but config.json makes it \\[(96, 64|64, 96)\\]"),
        ("sparsity format", "sparsity format 'sparse-24-bitmask' is not supported"),
    ],
)
def test_damaged_folder_is_one_line_and_writes_nothing(folders, tmp_path, capsys, how, message):
    folder = _damage(folders, tmp_path, how)
    out = tmp_path / "x.onnx"
    assert main(["export", str(folder), "-o", str(out), "--no-verify"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert err.startswith("sparsec export: error:"), err
    assert re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))


def test_sparsify_format_option(tmp_path, capsys):
    """`sparsec sparsify --int8 --format compressed-tensors` writes the checkpoint whose
    model reads back as the default (hf) output's, with the tokenizer and the report."""
    from sparsec.cli import build_parser

    model, tokenizer = make_tiny_llama(seed=0)
    source = save_model(model, tokenizer, tmp_path / "tiny")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)

    def sparsify(*extra) -> Path:
        out = tmp_path / f"out{len(extra)}"
        args = [
            *("sparsify", str(source), "-o", str(out), "--sparsity", "0.5", "--int8"),
            *("--calibration", str(text), "--calibration-samples", "4"),
            *("--calibration-seq-len", "48", "--eval", str(text), "--eval-tokens", "128"),
            *("--quiet", *extra),
        ]
        assert main(args) == 0
        return out

    ct, hf = sparsify("--format", "compressed-tensors"), sparsify()
    names = {p.name for p in ct.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "report.json", "recipe.yaml"} <= names
    assert "quantization.json" not in names and not list(tmp_path.glob(".out*"))
    assert load_file(ct / "model.safetensors")["model.layers.1.mlp.up_proj.weight"].dtype == (
        torch.int8
    )
    # ablation: the default writes the plain folder, float32 with quantization.json
    assert (hf / "quantization.json").is_file()
    assert "quantization_config" not in json.loads((hf / "config.json").read_text())
    a, _ = load_model(ct, quiet=True)
    b, _ = load_model(hf, quiet=True)
    for name, tensor in b.state_dict().items():
        assert torch.equal(a.state_dict()[name], tensor), name
    assert read_info(ct).scheme is not None
    help_text = build_parser()._subparsers._group_actions[0].choices["sparsify"].format_help()
    assert "--format {hf,compressed-tensors}" in help_text and "hf (default)" in help_text
