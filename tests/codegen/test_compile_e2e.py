"""The whole compiler on the tiny model: contract graph -> model.so -> runtime.

Each compiled model is checked against PyTorch: logits at prefill and decode, and
greedy generation token for token. int8 is checked against the same model with W8A8
simulated in PyTorch (``fake_quant_w8a8``); tolerance 1e-4 absolute (measured 1.5e-6:
integer dot products are exact, only the scaling rounds), up to the first position where
the reference rounds an activation within 3e-5 steps of a tie (``int8_tie_position``);
from there on fp32 noise may flip that rounding, and rows agree within 0.1 (measured
0.045 for one flip in the LM head's input).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from isa_helpers import host_target_or_skip

from sparsec import runtime
from sparsec.codegen.compile import compile_model
from sparsec.codegen.target import ISAS
from sparsec.errors import SparsecError
from sparsec.testing import (
    build_contract_graph,
    fake_quant_w8a8,
    int8_tie_position,
    make_tiny_llama,
    zero_smallest,
)

FP32_ATOL = 1e-4
INT8_ATOL = 1e-4
INT8_FLIP_ATOL = 0.1
PROMPT = "The quick brown fox jumps over the lazy dog, and then"


def _model(sparsity: float):
    model, tokenizer = make_tiny_llama(seed=1)
    if sparsity:
        zero_smallest(model, sparsity)
    return model, tokenizer


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(precision, kernels, sparsity[, threads, isa]) -> (runtime model, torch reference,
    tokenizer)."""
    cache = {}
    root = tmp_path_factory.mktemp("compiled")

    def get(precision: str, kernels: str, sparsity: float, threads: int = 2, isa="avx512"):
        key = (precision, kernels, sparsity, threads, isa)
        if key not in cache:
            tgt = host_target_or_skip(ISAS[isa])
            model, tokenizer = _model(sparsity)
            graph = root / f"g{sparsity}.onnx"
            ir.save(build_contract_graph(model, tokenizer), graph)
            so = root / f"{precision}-{kernels}-{sparsity}-{threads}-{isa}.so"
            compile_model(
                graph,
                so,
                precision=precision,
                kernels=kernels,
                max_context=128,
                quiet=True,
                target=tgt,
            )
            ref = fake_quant_w8a8(model) if precision == "int8" else model
            cache[key] = (runtime.load(so, threads=threads), ref, tokenizer)
        return cache[key]

    return get


CASES = [
    ("fp32", "dense", 0.0),
    ("fp32", "bitmask", 0.0),
    ("fp32", "bitmask", 0.7),
    ("fp32", "dense", 0.5),
    ("int8", "dense", 0.0),
    ("int8", "bitmask", 0.7),
    ("int8", "bitmask", 0.9),
]
# The 256-bit targets.
AVX2_CASES = [
    ("avx2", "fp32", "dense", 0.0),
    ("avx2", "fp32", "bitmask", 0.7),
    ("avx2", "int8", "dense", 0.0),
    ("avx2", "int8", "bitmask", 0.7),
    ("avx2-vnni", "fp32", "bitmask", 0.7),
    ("avx2-vnni", "int8", "dense", 0.0),
    ("avx2-vnni", "int8", "bitmask", 0.9),
]


def assert_logits_match(got, ref, ids, precision: str, first: int = 0) -> None:
    """``got`` = logits of positions ``first..`` of ``ids`` against the reference model."""
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()[first : first + len(got)]
    if precision == "fp32":
        np.testing.assert_allclose(got, expected, atol=FP32_ATOL)
        return
    strict = max(0, int8_tie_position(ref, ids) - first)
    np.testing.assert_allclose(got[:strict], expected[:strict], atol=INT8_ATOL)
    np.testing.assert_allclose(got[strict:], expected[strict:], atol=INT8_FLIP_ATOL)


@pytest.mark.parametrize("precision,kernels,sparsity", CASES)
def test_prefill_and_decode_logits(compiled, precision, kernels, sparsity):
    rt, ref, tokenizer = compiled(precision, kernels, sparsity)
    ids = tokenizer(PROMPT).input_ids
    rt.reset()
    assert_logits_match(rt.forward(ids[:-3], all_logits=True), ref, ids, precision)
    for i in range(len(ids) - 3, len(ids)):  # decode steps into a partly filled cache
        got = np.atleast_2d(rt.forward([ids[i]], all_logits=False))[-1:]
        assert_logits_match(got, ref, ids, precision, first=i)


@pytest.mark.parametrize("precision,kernels,sparsity", CASES)
def test_greedy_matches_pytorch(compiled, precision, kernels, sparsity):
    _greedy_matches(*compiled(precision, kernels, sparsity))


def _greedy_matches(rt, ref, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    out = rt.generate(ids, max_new_tokens=48)
    with torch.no_grad():
        hf = ref.generate(
            torch.tensor([ids]),
            max_new_tokens=48,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )[0, len(ids) :].tolist()
    assert out.token_ids == hf[: len(out.token_ids)]
    assert len(out.token_ids) == len(hf)


@pytest.mark.parametrize("isa,precision,kernels,sparsity", AVX2_CASES)
def test_avx2_targets_match_pytorch(compiled, isa, precision, kernels, sparsity):
    """Logits at prefill and decode, then 48 greedy tokens, as for AVX-512 above."""
    rt, ref, tokenizer = compiled(precision, kernels, sparsity, isa=isa)
    assert rt.manifest["target"]["isa"] == isa
    kernels_used = {layer["kernel"] for layer in rt.manifest["layers"]}
    assert kernels_used <= set(ISAS[isa].formats)
    assert kernels_used == {f"{kernels}_{'f32' if precision == 'fp32' else 'i8'}"}
    ids = tokenizer(PROMPT).input_ids
    rt.reset()
    assert_logits_match(rt.forward(ids[:-3], all_logits=True), ref, ids, precision)
    got = np.atleast_2d(rt.forward([ids[-3]], all_logits=False))[-1:]
    assert_logits_match(got, ref, ids, precision, first=len(ids) - 3)
    _greedy_matches(rt, ref, tokenizer)


def test_one_thread_equals_two_threads(compiled):
    one, _, tokenizer = compiled("fp32", "bitmask", 0.7, threads=1)
    two, _, _ = compiled("fp32", "bitmask", 0.7, threads=2)
    ids = tokenizer(PROMPT).input_ids
    one.reset()
    two.reset()
    np.testing.assert_array_equal(one.forward(ids), two.forward(ids))


def test_long_prompt_is_fed_in_chunks(compiled):
    """Prompts longer than the 64-token prefill tile run as several native calls."""
    rt, ref, tokenizer = compiled("fp32", "dense", 0.0)
    ids = tokenizer(PROMPT * 2).input_ids
    assert len(ids) > 64
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    rt.reset()
    np.testing.assert_allclose(rt.forward(ids), expected, atol=FP32_ATOL)


def test_manifest_records_kernels_and_sparsity(compiled):
    rt, _, _ = compiled("int8", "bitmask", 0.7)
    layers = rt.manifest["layers"]
    assert len(layers) == 2 * 4 + 1  # per layer: q|k|v, o, gate|up, down; then lm_head
    decoder = [lay for lay in layers if "lm_head" not in lay["name"]]
    assert all(lay["kernel"] == "bitmask_i8" for lay in layers)
    assert all(0.69 <= lay["sparsity"] <= 0.71 for lay in decoder)
    assert rt.manifest["precision"] == "int8"


def test_unsupported_op_is_named(tmp_path):
    model, tokenizer = make_tiny_llama()
    graph = build_contract_graph(model, tokenizer)
    node = next(n for n in graph.graph if n.op_type == "SwiGLU")
    node.op_type = "GeluMLP"
    ir.save(graph, tmp_path / "bad.onnx")
    with pytest.raises(SparsecError, match=r"op sparsec.GeluMLP is not in the optimized-graph"):
        compile_model(tmp_path / "bad.onnx", tmp_path / "bad.so", quiet=True)
    assert not (tmp_path / "bad.so").exists()


def test_foreign_onnx_is_rejected(tmp_path):
    from onnx import TensorProto, helper, save_model

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    save_model(helper.make_model(g), tmp_path / "relu.onnx")
    with pytest.raises(SparsecError, match="not made by sparsec"):
        compile_model(tmp_path / "relu.onnx", tmp_path / "m.so", quiet=True)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(SparsecError, match="not a readable ONNX model"):
        compile_model(tmp_path / "junk.onnx", tmp_path / "m.so", quiet=True)
    with pytest.raises(SparsecError, match="no such file"):
        compile_model(tmp_path / "missing.onnx", tmp_path / "m.so", quiet=True)


def test_context_beyond_rope_table_is_rejected(tmp_path):
    model, tokenizer = make_tiny_llama()
    ir.save(build_contract_graph(model, tokenizer), tmp_path / "g.onnx")
    with pytest.raises(SparsecError, match="--max-context 100000 is outside"):
        compile_model(tmp_path / "g.onnx", tmp_path / "m.so", max_context=100000, quiet=True)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tied_embedding_is_stored_once(tmp_path, precision):
    """A dense LM head tied to the embedding also serves the embedding lookups: float
    rows from a dense_f32 head, rows on the head's int8 grid from a dense_i8 one."""
    sizes = {}
    for tied in (True, False):
        model, tokenizer = make_tiny_llama(seed=1, tie_word_embeddings=tied)
        graph = tmp_path / f"tied{tied}.onnx"
        ir.save(build_contract_graph(model, tokenizer), graph)
        so = tmp_path / f"tied{tied}.so"
        manifest = compile_model(
            graph, so, precision=precision, kernels="dense", max_context=64, quiet=True
        )
        assert manifest["embedding"] == (
            {"fp32": "dense_f32", "int8": "dense_i8"}[precision] if tied else "rows"
        )
        sizes[tied] = so.stat().st_size
        rt = runtime.load(so, threads=2)
        ref = fake_quant_w8a8(model) if precision == "int8" else model
        ids = tokenizer(PROMPT).input_ids
        assert_logits_match(rt.forward(ids, all_logits=True), ref, ids, precision)
    table_bytes = model.config.vocab_size * model.config.hidden_size * 4
    # The .so files also differ by a few bytes of metadata, hence not an exact equality.
    assert sizes[False] - sizes[True] > 0.95 * table_bytes


def test_int8_embedding_does_not_depend_on_the_head_kernel(tmp_path):
    """A sparse int8 head cannot serve rows, so the table is stored, on the same grid."""
    model, tokenizer = make_tiny_llama(seed=1)
    graph = tmp_path / "g.onnx"
    ir.save(build_contract_graph(model, tokenizer), graph)
    ids = tokenizer(PROMPT).input_ids
    logits = {}
    for kernels, embedding in (("dense", "dense_i8"), ("bitmask", "rows")):
        so = tmp_path / f"{kernels}.so"
        manifest = compile_model(
            graph, so, precision="int8", kernels=kernels, max_context=64, quiet=True
        )
        assert manifest["embedding"] == embedding
        assert manifest["layers"][-1]["kernel"].startswith(kernels)  # the LM head
        logits[kernels] = runtime.load(so, threads=2).forward(ids, all_logits=True)
    ref = fake_quant_w8a8(model)
    for got in logits.values():
        assert_logits_match(got, ref, ids, "int8")


def test_int8_tie_position_finds_the_first_row_on_a_rounding_tie():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(3, 2)
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, ids):
            return self.linear(self.embed(ids))

    toy = Toy()
    with torch.no_grad():
        # per-token scale 127 / 127 = 1, so the second value is 3 steps, or 2.5: a tie
        toy.embed.weight.copy_(torch.tensor([[127.0, 3.0], [127.0, 3.0], [127.0, 2.5]]))
    assert int8_tie_position(toy, [0, 1, 2, 0, 2]) == 2
    assert int8_tie_position(toy, [0, 1, 0]) == 3
