"""Graph cases: a mutated ONNX graph (or odd compile options), compiled and run.

The bases are the cached tiny model's optimized contract graph (``opt.onnx``), its
real export optimized by the passes (``export.opt.onnx``) and the raw export
(``export.onnx``: compile runs the passes first). Mutations work on the ONNX proto, so
they can make graphs that onnx_ir would never build: metadata (``sparsec.config``,
``sparsec.generation``, ``sparsec.sparsity``, format, tokenizer), initializers (shape,
dtype, values, a padded LM head), nodes (removed, duplicated, reordered, inputs swapped,
op type or domain changed), attributes, graph inputs/outputs, opset.

The child compiles with ``compile_model(kernels="dense")``. A clean SparsecError is
``error``. If compile accepts: the artifact must load, and its teacher-forced logits
(a prefill then single-token decode steps) must match onnxruntime on the same mutated
graph (fp32; int8 only by shape and non-finite places); if onnxruntime rejects the
graph, compile accepted an invalid graph: ``wrong``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fuzz.common import FIXED_IDS, check_unchanged, compare_logits, file_digest
from fuzz.runner import OK, WRONG, Finding, clean_message

NAME = "graph"
TIMEOUT = 120.0
SHARE = 0.34
ESTIMATE = 3.0
BASES = {"opt.onnx": 6, "export.opt.onnx": 2, "export.onnx": 2}
ORT_ATOL = 1e-3
ORT_RTOL = 1e-3

KINDS = {
    "config_edit": 12,
    "config_semantic": 12,
    "metadata_other": 10,
    "initializer_shape": 6,
    "initializer_dtype": 5,
    "initializer_values": 6,
    "padded_head": 4,
    "node_remove": 5,
    "node_duplicate": 3,
    "node_reorder": 2,
    "node_swap_inputs": 5,
    "node_op": 4,
    "attribute": 12,
    "io": 5,
    "opset": 2,
    "options": 10,
    "none": 2,
}


def run(rng, ctx, workdir, rep):
    import onnx

    from sparsec.codegen.compile import compile_model
    from sparsec.errors import SparsecError

    workdir = Path(workdir)
    base = rng.choices(list(BASES), list(BASES.values()))[0]
    kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
    proto = onnx.load(str(ctx.cache / base))
    precision = rng.choices(["fp32", "int8"], [4, 1])[0]
    options = {"precision": precision, "kernels": "dense", "max_context": 32, "quiet": True}
    notes: dict = {}
    if kind == "options":
        desc = _options(rng, options)
    elif kind == "none":
        desc = "unmutated"
    else:
        desc = MUTATORS[kind](rng, proto, notes)
    src = workdir / "graph.onnx"
    onnx.save(proto, str(src))
    rep.describe(kind, f"{base}: {desc}; compile {_opts(options)}")
    before = file_digest(src)
    out = workdir / "model.so"
    try:
        compile_model(src, out, **options)
    except SparsecError as exc:
        check_unchanged(src, before, "the input graph")
        return clean_message(exc)
    check_unchanged(src, before, "the input graph")
    return _check_compiled(ctx, proto, out, options, notes)


def _opts(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items() if k != "quiet")


def _check_compiled(ctx, proto, out: Path, options: dict, notes: dict):
    from sparsec import runtime
    from sparsec.errors import SparsecError

    try:
        model = runtime.load(out)
    except SparsecError as exc:
        raise Finding(WRONG, f"compile wrote an artifact that does not load: {exc}") from None
    with model:
        n = min(len(FIXED_IDS), model.max_context)
        ids = FIXED_IDS[:n]
        try:
            model.reset()
            parts = [model.forward(ids[: max(1, n - 3)])]
            parts += [model.forward([t]) for t in ids[max(1, n - 3) :]]
        except SparsecError as exc:
            raise Finding(WRONG, f"the compiled model fails on valid tokens: {exc}") from None
        got = np.concatenate(parts)
        capacity = model.max_context
        precision = model.manifest.get("precision")
    want, ort_error = _ort_logits(proto, ids, capacity)
    if ort_error is not None:
        raise Finding(WRONG, f"compile accepted a graph onnxruntime rejects: {ort_error}")
    if notes.get("slice_vocab") and want.shape[-1] > got.shape[-1]:
        want = want[..., : got.shape[-1]]  # a padded head's extra columns are not tokens
    if not np.isfinite(want).all():
        # The mutated graph overflows float32 in the reference itself: where it does
        # depends on the order of the sums, which ONNX leaves open, so only "it
        # overflows too" is required of the compiled model.
        if np.isfinite(got).all():
            raise Finding(WRONG, "onnxruntime's logits overflow but the compiled ones do not")
        return OK, "both overflow float32 (non-finite logits)"
    if precision == "fp32":
        compare_logits(got, want, "compiled vs onnxruntime", atol=ORT_ATOL, rtol=ORT_RTOL)
    else:
        compare_logits(got, want, "compiled int8 vs onnxruntime", atol=np.inf, rtol=0)
    return OK, f"compiled {precision} logits match onnxruntime"


# --------------------------------------------------------------------------- reference


def ort_proto(proto):
    """``proto`` with the ONNX function definitions of the sparsec ops it uses."""
    import onnx

    from sparsec import contract
    from sparsec.passes import functions

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    ops: list[str] = []
    qk_norm = False
    for node in proto.graph.node:
        if node.domain == contract.DOMAIN:
            if node.op_type not in ops:
                ops.append(node.op_type)
            qk_norm |= node.op_type == "CachedAttention" and len(node.input) > 8
    if ops:
        del proto.functions[:]
        proto.functions.extend(functions.function_protos(ops, qk_norm=qk_norm))
        versions = {o.domain: o for o in proto.opset_import}
        if contract.DOMAIN not in versions:
            entry = proto.opset_import.add()
            entry.domain, entry.version = contract.DOMAIN, contract.DOMAIN_VERSION
        proto.ir_version = max(proto.ir_version, functions.MIN_IR_VERSION)
    return proto


def _feeds(sess, ids: list[int], capacity: int) -> dict:
    from sparsec import contract

    n = len(ids)
    feeds = {}
    types = {
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(double)": np.float64,
    }
    for inp in sess.get_inputs():
        dtype = types.get(inp.type, np.float32)
        if inp.name == contract.INPUT_IDS:
            feeds[inp.name] = np.array([ids], dtype)
        elif inp.name == contract.POSITION_IDS:
            feeds[inp.name] = np.arange(n, dtype=dtype)[None]
        elif inp.name == contract.ATTENTION_MASK:
            feeds[inp.name] = np.ones((1, n), dtype)
        else:
            dims = {"batch": 1, "capacity": capacity, "past": 0}
            shape = [d if isinstance(d, int) else dims.get(d, 1) for d in inp.shape]
            feeds[inp.name] = np.zeros(shape, dtype)
    return feeds


def _ort_logits(proto, ids: list[int], capacity: int):
    """(logits [n, V], None) or (None, why onnxruntime refused)."""
    import onnxruntime as ort

    from sparsec import contract

    try:
        model = ort_proto(proto)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in sess.get_outputs()]
        want = contract.LOGITS if contract.LOGITS in names else names[0]
        (logits,) = sess.run([want], _feeds(sess, ids, capacity))
    except Exception as exc:  # noqa: BLE001 - any refusal of the reference counts
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    logits = np.asarray(logits)
    if logits.ndim == 3 and logits.shape[0] == 1:
        logits = logits[0]
    return logits, None


# --------------------------------------------------------------------------- mutators


def _meta(proto) -> dict:
    return {p.key: p for p in proto.metadata_props}


def _set_meta(proto, key: str, value: str | None) -> None:
    props = _meta(proto)
    if value is None:
        if key in props:
            proto.metadata_props.remove(props[key])
        return
    if key in props:
        props[key].value = value
    else:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _pool(rng, value):
    if isinstance(value, bool):
        pool = [not value, 0, "yes", None]
    elif isinstance(value, int):
        pool = [value + 1, value - 1, 0, -1, value * 2, value // 2, 2**31, 10**30, float(value)]
        pool += [str(value), None, True]
    elif isinstance(value, float):
        pool = [0.0, -value, value * 10, float("nan"), float("inf"), 1e300, str(value), None]
    elif isinstance(value, str):
        pool = ["", value + "x", "gelu", "llama", "layer", 5, None]
    elif isinstance(value, dict):
        pool = [{}, [], None, {**value, "zzz": 1}]
    elif value is None:
        pool = [0, 4, -1, "x", 1.5]
    else:
        pool = [None, [], {}]
    return rng.choice(pool)


CONFIG_KEY = "sparsec.config"


def _config_edit(rng, proto, notes):
    config = json.loads(_meta(proto)[CONFIG_KEY].value)
    key = rng.choice(sorted(config))
    if rng.random() < 0.15:
        del config[key]
        change = f"delete config.{key}"
    elif isinstance(config[key], dict) and config[key] and rng.random() < 0.7:
        sub = rng.choice(sorted(config[key]))
        config[key][sub] = _pool(rng, config[key][sub])
        change = f"config.{key}.{sub} = {config[key][sub]!r}"
    else:
        config[key] = _pool(rng, config[key])
        change = f"config.{key} = {config[key]!r}"
    _set_meta(proto, CONFIG_KEY, json.dumps(config))
    return change


def _config_semantic(rng, proto, notes):
    """Plausible config values that disagree with the graph's tensors."""
    config = json.loads(_meta(proto)[CONFIG_KEY].value)
    edits = {
        "vocab_size": [256, 288, 1],
        "hidden_size": [32, 128],
        "intermediate_size": [64, 256],
        "num_hidden_layers": [1, 3],
        "num_attention_heads": [2, 8],
        "num_key_value_heads": [1, 4],
        "head_dim": [8, 32],
        "max_position_embeddings": [8, 16, 4096],
        "norm_eps": [1e-2, 1.0],
        "tie_word_embeddings": [False],
        "sliding_window": [4, 8],
        "qk_norm": [True],
        "attention_bias": [True],
        "mlp_bias": [True],
        "activation": ["gelu", "relu"],
        "norm": ["layer"],
        "family": ["qwen3", "gpt2"],
    }
    key = rng.choice(sorted(edits))
    config[key] = rng.choice(edits[key])
    if rng.random() < 0.3 and isinstance(config.get("rope"), dict):
        config["rope"]["theta"] = rng.choice([1.0, 500000.0])
        key += " + rope.theta"
    _set_meta(proto, CONFIG_KEY, json.dumps(config))
    return f"config.{key} = {config[key.split(' ')[0]]!r}"


def _metadata_other(rng, proto, notes):
    key = rng.choice(
        ["sparsec.config", "sparsec.generation", "sparsec.sparsity", "sparsec.format"]
        + ["sparsec.tokenizer", "sparsec.chat_template", "sparsec.source"]
    )
    current = _meta(proto).get(key)
    values = [None, "", "null", "[]", "{", "x" * 10, '{"a": ' * 5000 + "1" + "}" * 5000]
    if key == "sparsec.generation":
        values += ['{"bos_token_id": 99999, "eos_token_id": -1}', '{"eos_token_id": [1, "x"]}']
        values += ['{"bos_token_id": 1e400}', '{"bos_token_id": null, "eos_token_id": null}']
    elif key == "sparsec.format":
        values += ["exported", "optimized", "OPTIMIZED"]
    elif key == "sparsec.sparsity" and current is not None:
        table = json.loads(current.value)
        name = rng.choice(sorted(table))
        table[name] = {"shape": [1, 1], "sparsity": 2.0, "pattern": "2:4"}
        values += [json.dumps(table)]
    elif key == "sparsec.sparsity":
        values += ['{"lm_head": {"shape": [64, 272], "sparsity": 0.9, "pattern": "2:4"}}']
    elif key == "sparsec.config":
        values += ['{"vocab_size": ' + "9" * 5000 + "}"]
    value = rng.choice(values)
    _set_meta(proto, key, value)
    shown = value if value is None or len(value) < 80 else value[:40] + "..."
    return f"metadata {key} = {shown!r}"


def _initializers(proto):
    return [t for t in proto.graph.initializer if len(t.dims) >= 1]


def _array(tensor):
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def _replace_tensor(proto, tensor, array) -> None:
    from onnx import numpy_helper

    new = numpy_helper.from_array(np.ascontiguousarray(array), tensor.name)
    tensor.CopyFrom(new)


def _initializer_shape(rng, proto, notes):
    tensor = rng.choice(_initializers(proto))
    a = _array(tensor)
    how = rng.choice(["transpose", "drop_row", "add_row", "flatten", "add_dim", "empty"])
    if how == "transpose" and a.ndim == 2:
        b = a.T
    elif how == "drop_row":
        b = a[:-1]
    elif how == "add_row":
        b = np.concatenate([a, a[:1]])
    elif how == "flatten":
        b = a.reshape(-1)
    elif how == "add_dim":
        b = a[None]
    else:
        b = a[:0]
    _replace_tensor(proto, tensor, b)
    return f"initializer {tensor.name} {list(a.shape)} -> {list(b.shape)} ({how})"


def _initializer_dtype(rng, proto, notes):
    tensor = rng.choice(_initializers(proto))
    a = _array(tensor)
    dtype = rng.choice([np.float16, np.float64, np.int8, np.int64, np.int32, np.uint8, np.bool_])
    _replace_tensor(proto, tensor, a.astype(dtype))
    return f"initializer {tensor.name} {a.dtype} -> {np.dtype(dtype).name}"


def _initializer_values(rng, proto, notes):
    tensor = rng.choice([t for t in _initializers(proto) if _array(t).dtype.kind == "f"])
    a = _array(tensor).copy()
    how = rng.choice(["nan", "inf", "huge", "zeros", "half_zero", "tiny", "negate"])
    flat = a.reshape(-1)
    if how == "nan":
        flat[rng.randrange(flat.size)] = np.nan
    elif how == "inf":
        flat[rng.randrange(flat.size)] = np.inf
    elif how == "huge":
        flat[rng.randrange(flat.size)] = 3e38
    elif how == "zeros":
        flat[:] = 0
    elif how == "half_zero":
        flat[::2] = 0
    elif how == "tiny":
        flat[:] = 1e-40  # float32 subnormals
    else:
        flat[:] = -flat
    _replace_tensor(proto, tensor, a)
    return f"initializer {tensor.name} values: {how}"


def _padded_head(rng, proto, notes):
    """The LM head (or embedding) padded past the vocabulary, as HF checkpoints do."""
    names = {t.name: t for t in proto.graph.initializer}
    head = next((names[n] for n in ("lm_head",) if n in names), None)
    if head is None:  # an exported graph: the head is the last MatMul's weight
        matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
        weights = [i for n in matmuls[::-1] for i in n.input if i in names]
        head = names[weights[0]] if weights else rng.choice(_initializers(proto))
    a = _array(head)
    pad = rng.choice([1, 16, 64])
    axis = a.ndim - 1 if rng.random() < 0.8 else 0
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    fill = rng.choice(["zeros", "random"])
    b = np.pad(a, widths)
    if fill == "random":
        r = np.random.default_rng(rng.randrange(2**32))
        index = [slice(None)] * a.ndim
        index[axis] = slice(a.shape[axis], None)
        b[tuple(index)] = r.normal(0, 0.1, b[tuple(index)].shape)
    _replace_tensor(proto, head, b)
    notes["slice_vocab"] = True
    return f"pad {head.name} {list(a.shape)} -> {list(b.shape)} on axis {axis} ({fill})"


def _node_remove(rng, proto, notes):
    i = rng.randrange(len(proto.graph.node))
    node = proto.graph.node[i]
    desc = f"remove node {i} {node.op_type} ({node.name or node.output[0]})"
    del proto.graph.node[i]
    return desc


def _node_duplicate(rng, proto, notes):
    i = rng.randrange(len(proto.graph.node))
    node = proto.graph.node[i]
    proto.graph.node.insert(i + 1, type(node).FromString(node.SerializeToString()))
    return f"duplicate node {i} {node.op_type}"


def _node_reorder(rng, proto, notes):
    nodes = list(proto.graph.node)
    i, j = sorted(rng.sample(range(len(nodes)), 2))
    nodes[i], nodes[j] = nodes[j], nodes[i]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return f"swap node order {i} ({nodes[j].op_type}) and {j} ({nodes[i].op_type})"


def _node_swap_inputs(rng, proto, notes):
    candidates = [n for n in proto.graph.node if len(n.input) >= 2]
    node = rng.choice(candidates)
    i, j = rng.sample(range(len(node.input)), 2)
    node.input[i], node.input[j] = node.input[j], node.input[i]
    return f"swap inputs {i} and {j} of {node.op_type} {node.name or node.output[0]}"


def _node_op(rng, proto, notes):
    node = rng.choice(list(proto.graph.node))
    old = f"{node.domain}:{node.op_type}"
    how = rng.choice(["op_type", "domain"])
    if how == "op_type":
        node.op_type = rng.choice(["Gemm", "Add", "Mul", "Relu", "SkipRMSNormalization", "Foo"])
    else:
        node.domain = rng.choice(["", "sparsec", "com.microsoft", "ai.onnx.ml"])
    return f"node {old} -> {node.domain}:{node.op_type}"


def _attribute(rng, proto, notes):
    import onnx.helper as oh

    nodes = [n for n in proto.graph.node if n.attribute]
    node = rng.choice(nodes)
    if rng.random() < 0.15:
        node.attribute.append(oh.make_attribute("zzz_unknown", 1))
        return f"add unknown attribute to {node.op_type}"
    attr = rng.choice(list(node.attribute))
    value = oh.get_attribute_value(attr)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, int):
        new = rng.choice([value + 1, value - 1, 0, -1, value * 2, 2**31 - 1, 3, 4, 8])
    elif isinstance(value, float):
        new = rng.choice([value * 2, value / 2, 0.0, -value, float("nan"), 1.0, 1e-30])
    elif isinstance(value, list):
        new = value[::-1] if value else [1]
    else:
        new = rng.choice([0, 1.5, "x"])
    if rng.random() < 0.1:
        new = rng.choice(["x", 1.5, [1, 2]])  # a wrong attribute type
    i = list(node.attribute).index(attr)
    node.attribute[i].CopyFrom(oh.make_attribute(attr.name, new))
    return f"{node.op_type}.{attr.name} {value!r} -> {new!r}"


def _io(rng, proto, notes):
    from onnx import TensorProto

    g = proto.graph
    how = rng.choice(
        ["rename_input", "input_dtype", "drop_output", "rename_logits", "extra_output"]
    )
    if how == "rename_input":
        inp = rng.choice(list(g.input))
        old = inp.name
        inp.name = old + "_x"
        return f"rename graph input {old}"
    if how == "input_dtype":
        inp = rng.choice(list(g.input))
        new = rng.choice([TensorProto.INT32, TensorProto.FLOAT16, TensorProto.INT64])
        inp.type.tensor_type.elem_type = new
        return f"graph input {inp.name} dtype -> {TensorProto.DataType.Name(new)}"
    if how == "drop_output" and len(g.output) > 1:
        i = rng.randrange(len(g.output))
        name = g.output[i].name
        del g.output[i]
        return f"drop graph output {name}"
    if how == "rename_logits":
        for out in g.output:
            if out.name == "logits":
                for node in g.node:
                    for k, o in enumerate(node.output):
                        if o == "logits":
                            node.output[k] = "scores"
                out.name = "scores"
        return "rename the logits output to scores"
    node = rng.choice(list(g.node))
    extra = g.output.add()
    extra.name = node.output[0]
    return f"extra graph output {node.output[0]} (untyped)"


def _opset(rng, proto, notes):
    default = next(o for o in proto.opset_import if o.domain == "")
    old = default.version
    default.version = rng.choice([13, 17, 18, 21, 22, 24, 99])
    return f"default opset {old} -> {default.version}"


def _options(rng, options: dict) -> str:
    key = rng.choice(["max_context", "max_tokens", "threads", "precision", "kernels", "several"])
    pools = {
        "max_context": [0, -1, 1, 2, 11, 12, 255, 256, 257, 2**31, 10**12, 1.5, "32", None, True],
        "max_tokens": [0, -1, 1, 3, 5, 12, 2**31, 100_000, 1.5, "8", True],
        "threads": [0, -1, 1, 64, 2**31, 1.5, "2", True],
        "precision": ["fp16", "", None, "INT8", "int4", 8],
        "kernels": ["sparse", "", None, "DENSE", 1],
    }
    keys = list(pools) if key == "several" else [key]
    changed = []
    for k in keys:
        if key == "several" and rng.random() < 0.5:
            continue
        options[k] = rng.choice(pools[k])
        changed.append(f"{k}={options[k]!r}")
    return "options " + (", ".join(changed) or "unchanged")


MUTATORS = {
    "config_edit": _config_edit,
    "config_semantic": _config_semantic,
    "metadata_other": _metadata_other,
    "initializer_shape": _initializer_shape,
    "initializer_dtype": _initializer_dtype,
    "initializer_values": _initializer_values,
    "padded_head": _padded_head,
    "node_remove": _node_remove,
    "node_duplicate": _node_duplicate,
    "node_reorder": _node_reorder,
    "node_swap_inputs": _node_swap_inputs,
    "node_op": _node_op,
    "attribute": _attribute,
    "io": _io,
    "opset": _opset,
}
