"""``sparsec compile`` checks the graph against its metadata before generating code.

Each case mutates the optimized tiny Llama (its ``sparsec.config``, ``.generation`` or
``.sparsity`` metadata, or a weight, a node, an attribute) and expects a one-line
SparsecError that names the tensor or field with the graph's and the metadata's values,
raised before any LLVM code is generated (so these tests are quick). The unmutated graph
must still compile (the checks refuse nothing valid).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from sparsec import contract, metadata
from sparsec.codegen.compile import compile_model, emit_model
from sparsec.codegen.program import lower
from sparsec.errors import SparsecError


def _dense(weight, precision, kernels):
    return "dense_i8" if precision == "int8" else "dense_f32"


@pytest.fixture(scope="module")
def optimized_path(tiny_onnx, tmp_path_factory):
    """The tiny export through ``sparsec optimize``, saved once."""
    from sparsec.passes import optimize

    model, _ = optimize(ir.load(tiny_onnx), validate=False)
    path = tmp_path_factory.mktemp("validation") / "tiny_opt.onnx"
    ir.save(model, path)
    return path


@pytest.fixture
def graph(optimized_path):
    """A fresh copy of the optimized tiny graph to mutate."""
    return ir.load(optimized_path)


def _refused(model, tmp_path, *fragments: str) -> str:
    """Save ``model``, compile it, and return the error, which must be one line holding
    every fragment."""
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    with pytest.raises(SparsecError) as e:
        emit_model(path, quiet=True, choose=_dense, max_context=64)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def _edit_config(model, **changes):
    d = json.loads(model.metadata_props[contract.META_CONFIG])
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            d[outer][inner] = value
        else:
            d[key] = value
    model.metadata_props[contract.META_CONFIG] = json.dumps(d)
    return model


def _set_initializer(model, name: str, array: np.ndarray) -> None:
    value = model.graph.initializers[name]
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=name)
    value.shape = ir.Shape(array.shape)


def _node(model, name: str):
    return next(n for n in model.graph if n.name == name)


# -- the ablation: nothing valid is refused ---------------------------------------------
def test_the_unmutated_graph_compiles(optimized_path, tmp_path):
    manifest = compile_model(
        optimized_path, tmp_path / "tiny.so", quiet=True, choose=_dense, max_context=64
    )
    assert manifest["config"]["vocab_size"] == 272
    assert manifest["generation"] == {"bos_token_id": 256, "eos_token_id": 257}
    assert (tmp_path / "tiny.so").stat().st_size > 0


def test_int8_weights_with_matching_scales_lower(graph):
    _quantize_q_proj(graph)
    prog = lower(graph, where="tiny.onnx")
    weight = prog.linears()[0].args["weights"][0]
    assert weight.int8 is not None and weight.name == "q8"


# -- sparsec.config against the graph --------------------------------------------------
@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"vocab_size": 271}, ["vocab_size is 271", "272"]),
        ({"vocab_size": 300}, ["vocab_size is 300", "272"]),
        ({"hidden_size": 32}, ["hidden_size is 32", "'embed_tokens.weight' is 64"]),
        ({"intermediate_size": 96}, ["intermediate_size is 96", "is 128 in the graph"]),
        ({"num_hidden_layers": 1}, ["num_hidden_layers is 1", "decoder layers", "is 2"]),
        ({"num_hidden_layers": 3}, ["num_hidden_layers is 3", "is 2 in the graph"]),
        ({"num_key_value_heads": 1}, ["num_key_value_heads is 1", "'past_key_values.0.key'"]),
        ({"num_attention_heads": 8}, ["num_attention_heads is 8", "num_heads", "is 4"]),
        ({"head_dim": 8}, ["head_dim is 8", "dimension 3 is 16"]),
        ({"max_position_embeddings": 128}, ["max_position_embeddings is 128", "is 256"]),
        ({"rope.partial_rotary_factor": 0.5}, ["rope.partial_rotary_factor is 0.5", "is 16"]),
    ],
)
def test_config_that_disagrees_with_the_graph_is_refused(graph, tmp_path, changes, fragments):
    message = _refused(_edit_config(graph, **changes), tmp_path, *fragments)
    assert "metadata 'sparsec.config' field" in message


def test_padded_lm_head_is_refused(graph, tmp_path):
    head = graph.graph.initializers["lm_head.weight"].const_value.numpy()
    _set_initializer(graph, "lm_head.weight", np.pad(head, ((0, 0), (0, 8))))
    _refused(
        graph, tmp_path, "LM head 'lm_head.weight'", "is 280 in the graph", "vocab_size is 272"
    )


def test_padded_head_with_a_matching_vocab_is_refused_at_the_embedding(graph, tmp_path):
    head = graph.graph.initializers["lm_head.weight"].const_value.numpy()
    _set_initializer(graph, "lm_head.weight", np.pad(head, ((0, 0), (0, 8))))
    logits = next(v for v in graph.graph.outputs if v.name == contract.LOGITS)
    logits.shape = ir.Shape([logits.shape[0], logits.shape[1], 280])
    _refused(
        _edit_config(graph, vocab_size=280),
        tmp_path,
        "embedding table 'embed_tokens.weight' is 272",
        "vocab_size is 280",
    )


def test_logits_value_info_is_checked(graph, tmp_path):
    logits = next(v for v in graph.graph.outputs if v.name == contract.LOGITS)
    logits.shape = ir.Shape([logits.shape[0], logits.shape[1], 300])
    _refused(graph, tmp_path, "'logits' dimension 2 is 300", "vocab_size is 272")


# -- weights whose shapes do not fit -----------------------------------------------------
def test_query_weight_with_too_few_outputs_is_refused(graph, tmp_path):
    name = "layers.0.self_attn.q_proj.weight"
    w = graph.graph.initializers[name].const_value.numpy()
    _set_initializer(graph, name, w[:, :60])
    _refused(graph, tmp_path, "q input", repr(name), "is 60 in the graph", "4 * 16 = 64")


def test_key_weight_with_the_wrong_input_width_is_refused(graph, tmp_path):
    name = "layers.1.self_attn.k_proj.weight"
    w = graph.graph.initializers[name].const_value.numpy()
    _set_initializer(graph, name, w[:60])
    _refused(graph, tmp_path, repr(name), "[60, 32]", "of 64 features")


def test_value_weight_with_too_few_outputs_is_refused(graph, tmp_path):
    name = "layers.0.self_attn.v_proj.weight"
    w = graph.graph.initializers[name].const_value.numpy()
    _set_initializer(graph, name, w[:, :16])
    _refused(
        graph,
        tmp_path,
        "v input",
        repr(name),
        "is 16 in the graph",
        "num_key_value_heads * head_dim is 2 * 16",
    )


def test_down_weight_that_does_not_read_the_mlp_is_refused(graph, tmp_path):
    name = "layers.0.mlp.down_proj.weight"
    w = graph.graph.initializers[name].const_value.numpy()
    _set_initializer(graph, name, w[:100])
    _refused(graph, tmp_path, repr(name), "[100, 64]", "128 features")


def test_norm_weight_of_the_wrong_size_is_refused(graph, tmp_path):
    node = _node(graph, "layers.0.input_layernorm")
    name = node.inputs[1].name
    _set_initializer(graph, name, np.ones(32, np.float32))
    _refused(graph, tmp_path, repr(name), "[32]", "normalizes 64 features")


def test_quantize_activations_on_float_weights_is_refused(graph, tmp_path):
    for name in ("layers.0.mlp", "layers.1.mlp"):
        _node(graph, name).attributes["quantize_activations"] = ir.AttrInt64(
            "quantize_activations", 1
        )
    _refused(
        graph, tmp_path, "quantize_activations=1", "'layers.0.mlp.gate_proj.weight'", "int8 grid"
    )


def _quantize_q_proj(model, scale_rows: int | None = None):
    """Layer 0's q_proj through DequantizeLinear(int8 'q8', scale 'q8.scale')."""
    mm = _node(model, "layers.0.self_attn.q_proj")
    w = mm.inputs[1].const_value.numpy()  # [in, out]
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    scale = scale[: scale_rows or len(scale)]
    qv = ir.val("q8", const_value=ir.tensor(q, name="q8"))
    sv = ir.val("q8.scale", const_value=ir.tensor(scale, name="q8.scale"))
    model.graph.register_initializer(qv)
    model.graph.register_initializer(sv)
    dq = ir.node("DequantizeLinear", [qv, sv], {"axis": 1}, name="dq")
    model.graph.insert_before(mm, dq)
    mm.replace_input_with(1, dq.outputs[0])
    return model


def test_int8_scale_of_the_wrong_length_is_refused(graph, tmp_path):
    _refused(_quantize_q_proj(graph, scale_rows=63), tmp_path, "'q8.scale' is [63]", "64 output")


# -- metadata JSON -------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, text, fragments",
    [
        (contract.META_CONFIG, "{not json", ["'sparsec.config' is not valid JSON (", "export"]),
        (contract.META_GENERATION, "[1, ", ["'sparsec.generation' is not valid JSON"]),
        (contract.META_SPARSITY, "nan nan", ["'sparsec.sparsity' is not valid JSON"]),
        (contract.META_CONFIG, "[]", ["'sparsec.config' is list, expected a JSON object"]),
        (contract.META_CONFIG, "{}", ["'sparsec.config' has no field 'family'"]),
        (contract.META_GENERATION, '{"bos_token_id": 1}', ["has no field 'eos_token_id'"]),
        (
            contract.META_GENERATION,
            '{"bos_token_id": 1, "eos_token_id": "x"}',
            ["'sparsec.generation' field 'eos_token_id' is 'x', expected a token id"],
        ),
        (
            contract.META_SPARSITY,
            '{"w": 3}',
            ["'sparsec.sparsity' entry 'w' is 3, expected an object"],
        ),
        (
            contract.META_SPARSITY,
            '{"w": {"shape": [1], "sparsity": 0, "pattern": "dense"}}',
            ["entry 'w' field 'shape' is [1], expected [in, out]"],
        ),
        (
            contract.META_SPARSITY,
            '{"w": {"shape": [1, 2], "sparsity": 2, "pattern": "dense"}}',
            ["entry 'w' field 'sparsity' is 2, expected a number in [0, 1]"],
        ),
    ],
)
def test_malformed_metadata_json_is_refused(graph, tmp_path, key, text, fragments):
    graph.metadata_props[key] = text
    message = _refused(graph, tmp_path, f"metadata {key!r}", *fragments)
    assert "re-" in message  # says how to fix it


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("vocab_size", "many", "field 'vocab_size' is 'many', expected int > 0"),
        ("norm_eps", float("nan"), "field 'norm_eps' is nan, expected a finite number"),
        ("tie_word_embeddings", 1, "field 'tie_word_embeddings' must be true or false"),
        ("num_key_value_heads", 3, "is invalid: 4 attention heads are not a multiple of 3"),
        ("rope", None, "field 'rope' must be an object"),
    ],
)
def test_config_field_of_the_wrong_type_is_named(graph, tmp_path, field, value, fragment):
    _refused(_edit_config(graph, **{field: value}), tmp_path, "'sparsec.config'", fragment)


def test_sparsity_record_must_match_the_weight(graph, tmp_path):
    record = json.loads(graph.metadata_props[contract.META_SPARSITY])
    record["layers.0.self_attn.q_proj.weight"]["shape"] = [64, 60]
    graph.metadata_props[contract.META_SPARSITY] = json.dumps(record)
    _refused(graph, tmp_path, "'layers.0.self_attn.q_proj.weight' is [64, 64]", "[64, 60]")


def test_unsupported_value_names_the_file(graph, tmp_path):
    _refused(_edit_config(graph, mlp_bias=True), tmp_path, "unsupported model: mlp_bias = True")


def test_exported_graph_metadata_is_checked_before_the_passes(tiny_onnx, tmp_path):
    from sparsec.passes import optimize_file

    model = ir.load(tiny_onnx)
    model.metadata_props[contract.META_CONFIG] = '{"family": "llama",'
    path = tmp_path / "exported.onnx"
    ir.save(model, path)
    with pytest.raises(SparsecError, match=r"exported.onnx: metadata 'sparsec.config' is not val"):
        emit_model(path, quiet=True, choose=_dense)
    with pytest.raises(SparsecError, match=r"exported.onnx: metadata 'sparsec.config' is not val"):
        optimize_file(path, tmp_path / "out.onnx", validate=False)


def test_metadata_parse_returns_the_values(graph):
    meta = metadata.read(graph.metadata_props, "tiny.onnx", require_config=True)
    assert meta.config.vocab_size == 272
    assert meta.generation == {"bos_token_id": 256, "eos_token_id": 257}
    assert meta.sparsity["lm_head.weight"]["shape"] == [64, 272]
    assert metadata.config({}) is None and metadata.sparsity({}) == {}
    with pytest.raises(metadata.MetadataError, match="has no metadata 'sparsec.config'"):
        metadata.read({}, "x.onnx", require_config=True)


# -- what the fuzz suite found: each refused by name before code generation --------------


def test_nan_weight_refused(graph, tmp_path):
    name = next(n for n in graph.graph.initializers if n.endswith("q_proj.weight"))
    w = graph.graph.initializers[name].const_value.numpy().copy()
    w[0, 0] = np.nan
    _set_initializer(graph, name, w)
    _refused(graph, tmp_path, name, "holds NaN or infinite values")


def test_attribute_of_wrong_type_refused(graph, tmp_path):
    node = next(n for n in graph.graph if n.op_type == "CachedAttention")
    node.attributes["scale"] = ir.AttrString("scale", "x")
    _refused(graph, tmp_path, "attribute 'scale' is 'x', expected a finite number")


def test_graph_the_reference_rejects_is_refused(graph, tmp_path):
    """An optimized graph is checked through its sparsec ops' function bodies, as
    onnxruntime runs it: a norm weight of the wrong type compiles to nothing sensible."""
    node = next(n for n in graph.graph if n.op_type == "SkipRMSNormalization")
    name = node.inputs[2].name
    w = graph.graph.initializers[name].const_value.numpy()
    _set_initializer(graph, name, w.astype(np.float64))
    _refused(graph, tmp_path, "fails the ONNX checker")


@pytest.mark.parametrize(
    "text, fragment",
    [("null", "does not parse"), ("{garbage", "does not parse"), ("", "carries no tokenizer")],
)
def test_bad_tokenizer_refused(graph, tmp_path, text, fragment):
    """A model.so that cannot tokenize is never written (the runtime would refuse it)."""
    graph.metadata_props[contract.META_TOKENIZER] = text
    _refused(graph, tmp_path, fragment)


def test_deeply_nested_metadata_refused(graph, tmp_path):
    graph.metadata_props[contract.META_CONFIG] = "[" * 100_000
    _refused(graph, tmp_path, "'sparsec.config' is not valid JSON (nested too deeply)")


def test_opset_below_the_contract_refused(graph, tmp_path):
    graph.opset_imports[""] = 18  # RMSNormalization and Attention do not exist there
    _refused(graph, tmp_path, "default opset 18 is below 23")


def test_non_positive_attention_scale_refused(graph, tmp_path):
    node = next(n for n in graph.graph if n.op_type == "CachedAttention")
    node.attributes["scale"] = ir.AttrFloat32("scale", -0.25)
    _refused(graph, tmp_path, "attribute 'scale' is -0.25, expected a number > 0")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_tokens": 2**31}, "max_tokens is 2147483648; it must be an integer from 1 to 4096"),
        ({"max_tokens": 1.5}, "max_tokens is 1.5; it must be an integer from 1 to 4096"),
        ({"threads": 0}, "threads is 0; it must be an integer from 1 to 1024"),
        ({"max_context": True}, "max_context is True; it must be an integer >= 1"),
        ({"precision": "int4"}, "unknown precision 'int4'; choose fp32 or int8"),
    ],
)
def test_compile_options_checked(optimized_path, options, message):
    """The API's options get the CLI's ranges: a huge or fractional max_tokens once
    wrote an artifact that could not load, or invalid LLVM IR."""
    with pytest.raises(SparsecError) as e:
        emit_model(optimized_path, quiet=True, choose=_dense, **options)
    assert str(e.value) == message
