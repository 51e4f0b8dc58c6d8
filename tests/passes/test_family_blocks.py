"""The passes that bring OPT-style blocks (LayerNorm, learned positions, biased
Linears, a plain MLP, no RoPE) into the contract: Gemm as MatMul, token unflattening,
position offsets, SkipLayerNormalization and attention without RoPE. Each is checked
for the op types it leaves and, under onnxruntime, for unchanged outputs; each has an
ablation that leaves its pattern alone."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest
from passes_helpers import assert_pass_preserves, ops, run, tiny_graph

from sparsec import contract
from sparsec.passes.cleanup import CleanupPass
from sparsec.passes.flatten import RowFlattenPass
from sparsec.passes.gemm import GemmToMatMulPass
from sparsec.passes.positions import LearnedPositionsPass
from sparsec.passes.skip_layernorm import SkipLayerNormPass


@pytest.fixture(scope="module")
def opt_onnx(tmp_path_factory):
    from sparsec.export import export_model
    from sparsec.testing import make_tiny_family

    model, tokenizer = make_tiny_family("opt", seed=1)
    path = tmp_path_factory.mktemp("opt") / "opt.onnx"
    return export_model(model, tokenizer, path, source="opt")


@pytest.fixture
def opt(opt_onnx):
    return ir.load(opt_onnx)


def _through(model, *passes):
    for p in passes:
        p(model)
    return model


def test_gemm_becomes_matmul_and_bias(opt):
    assert ops(opt)["Gemm"] == 4  # OPT's fc1/fc2 on flattened tokens
    report = assert_pass_preserves(opt, GemmToMatMulPass())
    assert "Gemm" not in ops(opt)
    assert report.fused == {"MatMul (+ bias Add)": 4}
    # the weights became [in, out] (lazily transposed) initializers
    for node in opt.graph:
        if node.op_type == "MatMul" and node.inputs[1].const_value is not None:
            assert node.inputs[1].const_value.shape[0] in (64, 128)


def test_gemm_with_a_scale_is_left_and_reported():
    nodes = [oh.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=2.0)]
    inits = {"w": np.ones((3, 4), np.float32), "b": np.zeros(3, np.float32)}
    model = tiny_graph(
        nodes,
        [oh.make_tensor_value_info("x", 1, [2, 4])],
        [oh.make_tensor_value_info("y", 1, [2, 3])],
        inits,
    )
    p = GemmToMatMulPass()
    p(model)
    assert ops(model) == {"Gemm": 1}
    assert "alpha or beta" in p.report.not_fused[0]


def test_flattened_mlp_is_unflattened(opt):
    _through(opt, GemmToMatMulPass(), CleanupPass())

    def flattening():
        return [
            n
            for n in opt.graph
            if n.op_type == "Reshape"
            and n.inputs[0].shape.rank() == 3
            and n.outputs[0].shape.rank() == 2
        ]

    assert len(flattening()) == 2  # one per layer, around the MLP
    report = assert_pass_preserves(opt, RowFlattenPass())
    assert report.fused == {"unflattened row-wise regions": 2}
    assert flattening() == []
    # the input_ids view to the same shape went too: the embedding reads the input
    gathers = [n for n in opt.graph if n.op_type == "Gather"]
    assert contract.INPUT_IDS in {n.inputs[1].name for n in gathers}


def test_a_flattened_region_that_mixes_rows_is_kept():
    """Ablation: a Transpose reads the flattened tokens, so rows are not independent."""
    nodes = [
        oh.make_node("Reshape", ["x", "flat"], ["f"]),
        oh.make_node("Relu", ["f"], ["r"]),
        oh.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
        oh.make_node("Transpose", ["t"], ["u"], perm=[1, 0]),
        oh.make_node("Reshape", ["u", "back"], ["y"]),
    ]
    inits = {"flat": np.array([-1, 8], np.int64), "back": np.array([2, 3, 8], np.int64)}
    model = tiny_graph(
        nodes,
        [oh.make_tensor_value_info("x", 1, [2, 3, 8])],
        [oh.make_tensor_value_info("y", 1, [2, 3, 8])],
        inits,
    )
    model.graph.node(0).outputs[0].shape = ir.Shape([6, 8])
    p = RowFlattenPass()
    p(model)
    assert ops(model)["Reshape"] == 2
    assert "Transpose" in p.report.not_fused[0]


def test_position_offset_is_folded_into_the_table(opt):
    _through(opt, GemmToMatMulPass(), CleanupPass(), RowFlattenPass())
    report = assert_pass_preserves(opt, LearnedPositionsPass())
    assert report.fused == {"position offsets folded": 1}
    gather = next(
        n for n in opt.graph if n.op_type == "Gather" and n.inputs[1].name == contract.POSITION_IDS
    )
    assert gather.inputs[0].const_value.shape[0] == 256  # OPT's 256 + 2 rows, minus 2


def test_residual_add_and_layernorm_fuse(opt):
    _through(opt, GemmToMatMulPass(), CleanupPass(), RowFlattenPass(), LearnedPositionsPass())
    report = assert_pass_preserves(opt, SkipLayerNormPass())
    # embeddings + positions, then per layer the attention's and the MLP's residual adds
    # (the last one feeds the final norm)
    assert report.fused == {"SkipLayerNormalization": 5}
    assert "LayerNormalization" not in ops(opt)
    assert report.not_fused == []


def test_layernorm_over_another_axis_is_left():
    """Ablation: a LayerNorm over axis 1 of [B, S, D] is not a per-token norm."""
    nodes = [
        oh.make_node("Add", ["x", "skip"], ["s"]),
        oh.make_node("LayerNormalization", ["s", "w", "b"], ["y"], axis=1),
        oh.make_node("Add", ["s", "y"], ["z"]),
    ]
    inits = {"w": np.ones((3, 8), np.float32), "b": np.zeros((3, 8), np.float32)}
    io = [oh.make_tensor_value_info(n, 1, [2, 3, 8]) for n in ("x", "skip")]
    model = tiny_graph(nodes, io, [oh.make_tensor_value_info("z", 1, [2, 3, 8])], inits)
    p = SkipLayerNormPass()
    p(model)
    assert "LayerNormalization" in ops(model)
    assert p.report.not_fused


def test_attention_without_rope_fuses_and_runs(opt):
    from sparsec.passes import optimize, reference

    before = run(opt, _feeds(opt, 2, 3))
    model, report = optimize(opt)
    assert report.outside_contract == {}
    nodes = [n for n in model.graph if n.op_type == "CachedAttention"]
    assert len(nodes) == 2 and all(len(n.inputs) == 6 for n in nodes)  # no cos/sin
    feeds = _feeds(model, 2, 3, capacity=8)
    for got in (run(model, feeds), reference.evaluate(model, feeds)):
        np.testing.assert_allclose(got["logits"], before["logits"], atol=2e-5)


def test_without_the_no_rope_form_nothing_fuses(opt_onnx, monkeypatch):
    """Ablation: matched as a RoPE model, OPT's attention has no RotaryEmbedding."""
    from sparsec.passes import attention, optimize

    real = attention.match_layer
    monkeypatch.setattr(
        attention,
        "match_layer",
        lambda g, i, pos, rope=True, alibi=False: real(g, i, pos, True, alibi),
    )
    _, report = optimize(ir.load(opt_onnx))
    assert "sparsec.CachedAttention" not in report.ops_after
    assert "not rotated by RotaryEmbedding" in " ".join(
        why for p in report.passes for why in p.not_fused
    )


def _feeds(model, batch: int, seq: int, capacity: int = 0) -> dict:
    """A prefill of ``seq`` tokens from an empty cache: the exported form (``capacity``
    0: empty past, full mask) or the optimized one (fixed-capacity caches)."""
    ids = np.random.default_rng(0).integers(0, 256, (batch, seq), dtype=np.int64)
    feeds = {
        contract.INPUT_IDS: ids,
        contract.ATTENTION_MASK: np.ones((batch, seq), np.int64),
        contract.POSITION_IDS: np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
    }
    for v in model.graph.inputs:
        if contract.parse_cache_name(v.name) is not None:
            feeds[v.name] = np.zeros((batch, v.shape[1], capacity, v.shape[3]), np.float32)
    return feeds


# --- GPT-2 and MPT ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_onnx(tmp_path_factory):
    from sparsec.export import export_model
    from sparsec.testing import make_tiny_family

    paths = {}

    def get(family: str):
        if family not in paths:
            model, tokenizer = make_tiny_family(family, seed=1)
            path = tmp_path_factory.mktemp(family) / f"{family}.onnx"
            paths[family] = export_model(model, tokenizer, path, source=family)
        return ir.load(paths[family])

    return get


def test_gelu_tanh_formula_becomes_gelu(family_onnx):
    from sparsec.passes.gelu import GeluPass

    model = family_onnx("gpt2")
    CleanupPass()(model)
    assert ops(model)["Tanh"] == 2  # gelu_new, written out, in each layer
    report = assert_pass_preserves(model, GeluPass())
    assert report.fused == {"Gelu": 2}
    assert "Tanh" not in ops(model) and "Pow" not in ops(model)
    assert all(
        n.attributes["approximate"].value == "tanh" for n in model.graph if n.op_type == "Gelu"
    )


def test_a_gelu_with_another_constant_is_left():
    """Ablation: 0.5 x (1 + tanh(0.8 (x + 0.044715 x^3))) is not GELU."""
    from sparsec.passes.gelu import GeluPass

    nodes = [
        oh.make_node("Mul", ["x", "half"], ["h"]),
        oh.make_node("Pow", ["x", "three"], ["c"]),
        oh.make_node("Mul", ["c", "k"], ["ck"]),
        oh.make_node("Add", ["x", "ck"], ["s"]),
        oh.make_node("Mul", ["s", "root"], ["r"]),
        oh.make_node("Tanh", ["r"], ["t"]),
        oh.make_node("Add", ["t", "one"], ["u"]),
        oh.make_node("Mul", ["h", "u"], ["y"]),
    ]
    consts = {"half": 0.5, "three": 3.0, "k": 0.044715, "one": 1.0}
    for root, fused in ((0.7978845608028654, 1), (0.8, 0)):
        inits = {n: np.float32(v) for n, v in {**consts, "root": root}.items()}
        model = tiny_graph(
            nodes,
            [oh.make_tensor_value_info("x", 1, [2, 8])],
            [oh.make_tensor_value_info("y", 1, [2, 8])],
            inits,
        )
        x = np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)
        before = run(model, {"x": x})["y"]
        p = GeluPass()
        p(model)
        assert ops(model).get("Gelu", 0) == fused
        np.testing.assert_allclose(run(model, {"x": x})["y"], before, atol=1e-6)


def test_fused_projection_with_a_bias_is_split_with_it(family_onnx):
    from sparsec.passes.gelu import GeluPass
    from sparsec.passes.split_linear import SplitFusedLinearPass

    model = family_onnx("gpt2")
    _through(model, GemmToMatMulPass(), CleanupPass(), GeluPass(), RowFlattenPass())
    assert ops(model)["Split"] == 2  # c_attn's q|k|v
    report = assert_pass_preserves(model, SplitFusedLinearPass())
    assert report.fused == {"MatMul split": 2}
    assert "Split" not in ops(model)
    biases = [n for n in model.graph if n.op_type == "Add" and ".bias.cols" in n.inputs[1].name]
    assert len(biases) == 6  # q, k and v of each layer, each with its part of the bias


def test_mpt_alibi_becomes_the_slopes_attribute(family_onnx):
    from sparsec import contract
    from sparsec.passes import optimize

    model, report = optimize(family_onnx("mpt"))
    assert report.outside_contract == {}
    config = contract.graph_config(model.metadata_props)
    for node in (n for n in model.graph if n.op_type == "CachedAttention"):
        slopes = node.attributes["alibi_slopes"].value
        np.testing.assert_allclose(slopes, config.alibi_slopes(), rtol=1e-6)


def test_a_bias_that_is_not_alibi_is_not_fused(family_onnx):
    """Ablation: an ALiBi table with one entry moved is not linear in the key position."""
    from sparsec.passes import attention, optimize

    model = family_onnx("mpt")
    CleanupPass()(model)
    tables = [
        v
        for v in model.graph.initializers.values()
        if v.const_value is not None
        and len(v.const_value.shape) == 3
        and v.const_value.shape[1] == 1
    ]
    assert tables, "no ALiBi table folded into a constant"
    for value in tables:
        array = value.const_value.numpy().copy()
        array[0, 0, 3] += 1.0
        value.const_value = ir.tensor(array)
    _, report = optimize(model)
    assert "sparsec.CachedAttention" not in report.ops_after
    why = " ".join(w for p in report.passes for w in p.not_fused)
    assert "not linear in the key position" in why
    assert attention  # the pass that refused it


# --- Gemma 2 and 3 ----------------------------------------------------------------------


def test_gemma2_caps_geglu_and_windows_fuse(family_onnx):
    from sparsec import contract
    from sparsec.passes import optimize, reference

    exported = family_onnx("gemma2")
    before = run(exported, _feeds(exported, 1, 12))  # 12 tokens: past the window of 8
    model, report = optimize(family_onnx("gemma2"))
    assert report.outside_contract == {}
    config = contract.graph_config(model.metadata_props)
    counts = ops(model)
    assert counts["sparsec.SoftCap"] == 1 and counts["Mul"] == 1  # logits cap, embed scale
    mlps = [n for n in model.graph if n.op_type == "SwiGLU"]
    assert [n.attributes["activation"].value for n in mlps] == ["gelu_tanh"] * 2
    attention = [n for n in model.graph if n.op_type == "CachedAttention"]
    assert [n.attributes["softcap"].value for n in attention] == [config.attn_softcap] * 2
    assert ["window" in n.attributes for n in attention] == [True, False]  # sliding, full
    feeds = _feeds(model, 1, 12, capacity=16)
    for got in (run(model, feeds), reference.evaluate(model, feeds)):
        np.testing.assert_allclose(got["logits"], before["logits"], atol=2e-5)


def test_a_tanh_that_is_not_a_soft_cap_is_left():
    """Ablation: 3 * tanh(x / 2) is not a soft-cap (the caps differ)."""
    from sparsec.passes.softcap import LogitSoftCapPass

    for inner, fused in ((3.0, 1), (2.0, 0)):
        nodes = [
            oh.make_node("Div", ["x", "inner"], ["d"]),
            oh.make_node("Tanh", ["d"], ["t"]),
            oh.make_node("Mul", ["t", "outer"], [contract.LOGITS]),
        ]
        inits = {"inner": np.float32(inner), "outer": np.float32(3.0)}
        model = tiny_graph(
            nodes,
            [oh.make_tensor_value_info("x", 1, [1, 2, 8])],
            [oh.make_tensor_value_info(contract.LOGITS, 1, [1, 2, 8])],
            inits,
        )
        x = np.linspace(-9, 9, 16, dtype=np.float32).reshape(1, 2, 8)
        before = run(model, {"x": x})[contract.LOGITS]
        LogitSoftCapPass()(model)
        assert ops(model).get("sparsec.SoftCap", 0) == fused
        np.testing.assert_allclose(run(model, {"x": x})[contract.LOGITS], before, atol=1e-6)


def test_without_per_layer_windows_gemma2_does_not_fuse(family_onnx, monkeypatch):
    """Ablation: one window for every layer (as before layer_types) fails the check on
    Gemma 2's full layer."""
    from sparsec.contract import ModelConfig
    from sparsec.passes import optimize

    monkeypatch.setattr(ModelConfig, "window_of", lambda self, layer: self.sliding_window)
    _, report = optimize(family_onnx("gemma2"))
    assert "sparsec.CachedAttention" not in report.ops_after
    why = " ".join(w for p in report.passes for w in p.not_fused)
    assert "numerical check failed" in why and "layer 1" in why


def test_gemma3_local_and_global_rope_tables(family_onnx):
    from sparsec.passes import optimize

    model, report = optimize(family_onnx("gemma3_text"))
    assert report.outside_contract == {}
    attention = [n for n in model.graph if n.op_type == "CachedAttention"]
    local, full = (const_of(n.inputs[6]) for n in attention)
    assert local.shape == full.shape and not np.allclose(local, full)  # theta 1e4 vs 1e6


def const_of(value):
    return value.const_value.numpy()


def test_alibi_slopes_are_read_through_a_leading_unit_axis():
    """MPT with a power-of-two head count keeps its table [1, H, 1, N] until a Squeeze."""
    from sparsec.passes.attention import NoMatch, _alibi_slopes

    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    table = (slopes[:, None] * (np.arange(8) - 7)[None, :]).astype(np.float32)
    for array in (table[:, None, :], table[None, :, None, :]):
        value = ir.Value(name="alibi", const_value=ir.tensor(array))
        np.testing.assert_allclose(_alibi_slopes(value), slopes)
    bent = table.copy()
    bent[1, 2] += 1.0
    with pytest.raises(NoMatch, match="not linear"):
        _alibi_slopes(ir.Value(name="alibi", const_value=ir.tensor(bent[:, None, :])))


def test_split_blocks_of_a_float_weight_are_cut_when_read(family_onnx):
    """A float fused projection is cut lazily: the pass keeps no copy of the weights (an
    MPT-7B build held 6 GB of Wqkv slices before). Ablation: the eager slices a copy
    holds are plain tensors."""
    from sparsec.passes.split_linear import SplitFusedLinearPass

    model = family_onnx("mpt")
    CleanupPass()(model)
    fused = {
        n.inputs[1].name: n.inputs[1].const_value.numpy()
        for n in model.graph
        if n.op_type == "MatMul"
        and n.inputs[1].const_value is not None
        and n.inputs[1].const_value.shape[1] == 3 * 64
    }
    assert len(fused) == 2  # Wqkv of each layer
    SplitFusedLinearPass()(model)
    parts = [v for v in model.graph.initializers.values() if ".cols" in v.name]
    assert len(parts) == 6
    for v in parts:
        assert isinstance(v.const_value, ir.LazyTensor)
        base, start = v.name.rsplit(".cols", 1)
        start = int(start)
        np.testing.assert_array_equal(v.const_value.numpy(), fused[base][:, start : start + 64])
