"""The ``sparsec`` custom ops as model-local ONNX functions.

Every fused op of the optimized graph (docs/graph-contract.md section 3) is also defined
here as an ONNX function over standard opset-23 ops, and ``attach`` adds the definitions
of the ops a model uses to the model itself. onnxruntime then runs an optimized graph
unchanged: the strongest check that a fusion computes what the exported graph did.
The bodies follow ``reference.py`` op for op; the tests hold them to it.

The KV-cache write uses ``ScatterND`` (a copy in onnxruntime, in place in the compiled
kernels) so that arbitrary ``position_ids`` are honoured, not only a contiguous run.
"""

from __future__ import annotations

from sparsec import contract

OPSET = 23  # RMSNormalization, RotaryEmbedding and Attention appear in opset 23
MIN_IR_VERSION = 10

_HEADER = f'<domain: "{contract.DOMAIN}", opset_import: ["" : {OPSET}, "{contract.DOMAIN}" : 1]>'


def _cached_attention_text(
    *, qk_norm: bool, rope: bool = True, alibi: bool = False, softcap: bool = False
) -> str:
    """The body of ``CachedAttention``; with ``qk_norm`` it takes the two per-head RMSNorm
    scales as inputs 8 and 9; without ``rope`` it has no cos/sin tables (inputs 0-5 only:
    learned positions); with ``alibi`` the ``alibi_slopes`` attribute's per-head bias
    ``slope * (slot - position)`` is added to the visible scores (MPT); with ``softcap``
    the scores are soft-capped by ONNX Attention's own ``softcap``, before the mask
    (Gemma 2). Overloads of the
    op: a model's attention nodes all have one form, and ``attach`` picks the body by it."""
    extra_inputs = ", q_norm, k_norm" if qk_norm else ""
    extra_attributes = ", qk_norm_epsilon: float = 0.000001" if qk_norm else ""
    if qk_norm:
        normalize = """
    tokens = Constant <value_ints = [0, 0, -1]> ()
    head_size = Shape(q_norm)
    head_shape = Concat <axis = 0> (tokens, head_size)
    q_heads_in = Reshape(q_in, head_shape)
    k_heads_in = Reshape(k_in, head_shape)
    q_normed = RMSNormalization <axis = -1, epsilon: float = @qk_norm_epsilon>
        (q_heads_in, q_norm)
    k_normed = RMSNormalization <axis = -1, epsilon: float = @qk_norm_epsilon>
        (k_heads_in, k_norm)
    flat_shape = Constant <value_ints = [0, 0, -1]> ()
    q = Reshape(q_normed, flat_shape)
    k = Reshape(k_normed, flat_shape)"""
        q_in, k_in = "q_in", "k_in"
    else:
        normalize, q_in, k_in = "", "q", "k"
    if rope:
        tables = ", cos_cache, sin_cache"
        rotate = """
    q_rot = RotaryEmbedding <num_heads: int = @num_heads,
                             rotary_embedding_dim: int = @rotary_dim>
        (q, cos_cache, sin_cache, position_ids)
    k_rot = RotaryEmbedding <num_heads: int = @kv_num_heads,
                             rotary_embedding_dim: int = @rotary_dim>
        (k, cos_cache, sin_cache, position_ids)"""
    else:
        tables = ""
        rotate = """
    q_rot = Identity(q)
    k_rot = Identity(k)"""
    if alibi:
        extra_attributes += ", alibi_slopes"
        mask = """
    slopes_1d = Constant <value_floats: floats = @alibi_slopes> ()
    slopes_shape = Constant <value_ints = [1, -1, 1, 1]> ()
    slopes = Reshape(slopes_1d, slopes_shape)
    slot_float = Cast <to = 1> (slot_index)
    position_float = Cast <to = 1> (query_position)
    distance = Sub(slot_float, position_float)
    alibi = Mul(distance, slopes)
    hidden = Constant <value_float = -3.4028234663852886e38> ()
    mask = Where(visible, alibi, hidden)"""
        mask_name = "mask"
    else:
        mask, mask_name = "", "visible"
    capping = ""
    if softcap:
        extra_attributes += ", softcap"
        capping = ", softcap: float = @softcap"
    return f"""
CachedAttention
    <num_heads, kv_num_heads, scale, rotary_dim: int = 0, window: int = 0{extra_attributes}>
    ({q_in}, {k_in}, v, past_key, past_value, position_ids{tables}{extra_inputs})
    => (y, present_key, present_value) {{{normalize}{rotate}
    axis0 = Constant <value_ints = [0]> ()
    axis1 = Constant <value_ints = [1]> ()
    axis_last = Constant <value_ints = [-1]> ()
    axes_1_3 = Constant <value_ints = [1, 3]> ()
    keep2 = Constant <value_ints = [0, 0]> ()
    rest = Constant <value_ints = [-1]> ()
    heads_scalar = Constant <value_int: int = @num_heads> ()
    kv_heads_scalar = Constant <value_int: int = @kv_num_heads> ()
    heads = Unsqueeze(heads_scalar, axis0)
    kv_heads = Unsqueeze(kv_heads_scalar, axis0)
    q_shape = Concat <axis = 0> (keep2, heads, rest)
    kv_shape = Concat <axis = 0> (keep2, kv_heads, rest)
    q4 = Reshape(q_rot, q_shape)
    k4 = Reshape(k_rot, kv_shape)
    v4 = Reshape(v, kv_shape)
    zero = Constant <value_int = 0> ()
    one = Constant <value_int = 1> ()
    batch_1d = Shape <start = 0, end = 1> (position_ids)
    batch = Squeeze(batch_1d, axis0)
    batch_index = Range(zero, batch, one)
    batch_column = Unsqueeze(batch_index, axis1)
    positions_shape = Shape(position_ids)
    batch_grid = Expand(batch_column, positions_shape)
    batch_last = Unsqueeze(batch_grid, axis_last)
    position_last = Unsqueeze(position_ids, axis_last)
    slots = Concat <axis = -1> (batch_last, position_last)
    past_key_t = Transpose <perm = [0, 2, 1, 3]> (past_key)
    past_value_t = Transpose <perm = [0, 2, 1, 3]> (past_value)
    present_key_t = ScatterND(past_key_t, slots, k4)
    present_value_t = ScatterND(past_value_t, slots, v4)
    present_key = Transpose <perm = [0, 2, 1, 3]> (present_key_t)
    present_value = Transpose <perm = [0, 2, 1, 3]> (present_value_t)
    capacity_1d = Shape <start = 2, end = 3> (past_key)
    capacity = Squeeze(capacity_1d, axis0)
    slot_index = Range(zero, capacity, one)
    query_position = Unsqueeze(position_ids, axes_1_3)
    causal = LessOrEqual(slot_index, query_position)
    window_size = Constant <value_int: int = @window> ()
    no_window = Equal(window_size, zero)
    unlimited = Constant <value_int = 1099511627776> ()
    reach = Where(no_window, unlimited, window_size)
    oldest = Sub(query_position, reach)
    in_window = Greater(slot_index, oldest)
    visible = And(causal, in_window){mask}
    q_heads = Transpose <perm = [0, 2, 1, 3]> (q4)
    y_heads = Attention <scale: float = @scale{capping}>
        (q_heads, present_key, present_value, {mask_name})
    y_tokens = Transpose <perm = [0, 2, 1, 3]> (y_heads)
    y_shape = Constant <value_ints = [0, 0, -1]> ()
    y = Reshape(y_tokens, y_shape)
}}"""


def _swiglu_text(*, activation: str) -> str:
    """The body of ``SwiGLU``: SiLU, or with ``activation="gelu_tanh"`` GeGLU (an
    overload chosen by ``attach``, as CachedAttention's forms are)."""
    if activation == "silu":
        extra, act = "", "gate_sigmoid = Sigmoid(gate)\n    gate_act = Mul(gate, gate_sigmoid)"
    else:
        extra = ', activation: string = "gelu_tanh"'
        act = 'gate_act = Gelu <approximate = "tanh"> (gate)'
    return f"""
SwiGLU <quantize_activations: int = 0{extra}> (x, w_gate, w_up, w_down) => (y) {{
    flag_int = Constant <value_int: int = @quantize_activations> ()
    flag = Cast <to = 9> (flag_int)
    x_q = {contract.DOMAIN}.PerTokenFakeQuant(x)
    x_in = Where(flag, x_q, x)
    gate = MatMul(x_in, w_gate)
    up = MatMul(x_in, w_up)
    {act}
    hidden = Mul(gate_act, up)
    hidden_q = {contract.DOMAIN}.PerTokenFakeQuant(hidden)
    hidden_in = Where(flag, hidden_q, hidden)
    y = MatMul(hidden_in, w_down)
}}"""


FUNCTION_TEXT = {
    "SkipRMSNormalization": """
SkipRMSNormalization <epsilon: float = 0.00001> (x, skip, scale) => (y, sum) {
    sum = Add(x, skip)
    y = RMSNormalization <axis = -1, epsilon: float = @epsilon> (sum, scale)
}""",
    "SkipLayerNormalization": """
SkipLayerNormalization <epsilon: float = 0.00001> (x, skip, scale, bias) => (y, sum) {
    sum = Add(x, skip)
    y = LayerNormalization <axis = -1, epsilon: float = @epsilon> (sum, scale, bias)
}""",
    "SoftCap": """
SoftCap <cap: float> (x) => (y) {
    cap_value = Constant <value_float: float = @cap> ()
    scaled = Div(x, cap_value)
    capped = Tanh(scaled)
    y = Mul(capped, cap_value)
}""",
    "PerTokenFakeQuant": """
PerTokenFakeQuant (x) => (y) {
    axes = Constant <value_ints = [-1]> ()
    magnitude = Abs(x)
    row_max = ReduceMax <keepdims = 1> (magnitude, axes)
    qmax = Constant <value_float = 127.0> ()
    qmin = Constant <value_float = -127.0> ()
    zero = Constant <value_float = 0.0> ()
    one = Constant <value_float = 1.0> ()
    s = Div(row_max, qmax)
    nonzero = Greater(s, zero)
    safe = Where(nonzero, s, one)
    scaled = Div(x, safe)
    rounded = Round(scaled)
    q = Clip(rounded, qmin, qmax)
    y = Mul(q, s)
}""",
    "SwiGLU": _swiglu_text(activation="silu"),
    "CachedAttention": _cached_attention_text(qk_norm=False),
}

# Ops whose bodies call other sparsec ops.
_DEPENDS = {"SwiGLU": ("PerTokenFakeQuant",)}


def function_protos(
    op_types,
    *,
    qk_norm: bool = False,
    rope: bool = True,
    alibi: bool = False,
    softcap: bool = False,
    geglu: bool = False,
):
    """``onnx.FunctionProto`` definitions of ``op_types`` and the ops they call;
    ``qk_norm``/``rope``/``alibi``/``softcap``: the CachedAttention form (with q/k norm
    inputs, with RoPE, with ALiBi, soft-capped); ``geglu``: SwiGLU's GeGLU form."""
    import onnx.parser

    wanted: list[str] = []
    for op in op_types:
        for name in (*_DEPENDS.get(op, ()), op):
            if name not in FUNCTION_TEXT:
                raise KeyError(f"no ONNX function for sparsec op {name!r}")
            if name not in wanted:
                wanted.append(name)
    texts = dict(FUNCTION_TEXT)
    if qk_norm or not rope or alibi or softcap:
        texts["CachedAttention"] = _cached_attention_text(
            qk_norm=qk_norm, rope=rope, alibi=alibi, softcap=softcap
        )
    if geglu:
        texts["SwiGLU"] = _swiglu_text(activation="gelu_tanh")
    return [onnx.parser.parse_function(_HEADER + texts[name]) for name in wanted]


# CachedAttention's forms by input count: (q/k norm, RoPE).
ATTENTION_FORMS = {8: (False, True), 10: (True, True), 6: (False, False)}


def attention_form(model) -> dict:
    """``{"qk_norm", "rope", "alibi", "softcap", "geglu"}`` (bools): the form of
    ``model``'s CachedAttention and SwiGLU nodes (all of one op have one)."""
    forms = {
        (
            ATTENTION_FORMS.get(len(node.inputs)),
            "alibi_slopes" in node.attributes,
            "softcap" in node.attributes,
        )
        for node in model.graph
        if node.domain == contract.DOMAIN and node.op_type == "CachedAttention"
    }
    if any(inputs is None for inputs, _, _ in forms):
        raise ValueError("a CachedAttention node has neither 6, 8 nor 10 inputs")
    if len(forms) > 1:
        raise ValueError("CachedAttention nodes mix forms (q/k norm, RoPE, ALiBi, soft-cap)")
    (qk_norm, rope), alibi, softcap = forms.pop() if forms else ((False, True), False, False)
    mlps = {
        "activation" in node.attributes
        for node in model.graph
        if node.domain == contract.DOMAIN and node.op_type == "SwiGLU"
    }
    if len(mlps) > 1:
        raise ValueError("SwiGLU nodes mix activations")
    return {
        "qk_norm": qk_norm,
        "rope": rope,
        "alibi": alibi,
        "softcap": softcap,
        "geglu": mlps == {True},
    }


def sparsec_ops(model) -> list[str]:
    """The sparsec op types used in ``model``'s main graph, in first-use order."""
    ops: list[str] = []
    for node in model.graph:
        if node.domain == contract.DOMAIN and node.op_type not in ops:
            ops.append(node.op_type)
    return ops


def raise_opset(model) -> None:
    """Make the model's default opset at least ``OPSET`` (only type extensions changed
    between opset 20 and 23 for the ops an exported Llama graph uses)."""
    model.opset_imports[""] = max(model.opset_imports.get("", OPSET), OPSET)
    model.ir_version = max(model.ir_version or MIN_IR_VERSION, MIN_IR_VERSION)


def attach(model) -> None:
    """Add the function definitions of every sparsec op ``model`` uses (replacing stale
    ones) and the opset imports they need."""
    import onnx_ir as ir

    for key in [k for k in model.functions if k[0] == contract.DOMAIN]:
        del model.functions[key]
    ops = sparsec_ops(model)
    if not ops:
        return
    raise_opset(model)
    model.opset_imports[contract.DOMAIN] = contract.DOMAIN_VERSION
    for proto in function_protos(ops, **attention_form(model)):
        function = ir.serde.deserialize_function(proto)
        model.functions[function.identifier()] = function


def to_onnx_proto(model):
    """A ``ModelProto`` of ``model`` that onnxruntime can run: the function definitions
    of its sparsec ops are added to the proto, ``model`` itself is not changed."""
    import onnx_ir as ir

    return _with_functions(ir.serde.serialize_model(model), model)


def _with_functions(proto, model):
    """``proto`` (of ``model``) with the function definitions of its sparsec ops."""
    ops = sparsec_ops(model)
    if ops:
        have = {(f.domain, f.name) for f in proto.functions}
        for function in function_protos(ops, **attention_form(model)):
            if (function.domain, function.name) not in have:
                proto.functions.append(function)
        versions = {o.domain: o for o in proto.opset_import}
        if contract.DOMAIN not in versions:
            entry = proto.opset_import.add()
            entry.domain, entry.version = contract.DOMAIN, contract.DOMAIN_VERSION
        default = versions.get("")
        if default is not None and default.version < OPSET:
            default.version = OPSET
        proto.ir_version = max(proto.ir_version, MIN_IR_VERSION)
    return proto


def ort_session(model):
    """An onnxruntime CPU session running ``model`` with its sparsec ops as functions.

    Only semantics-preserving graph rewrites (``ORT_ENABLE_BASIC``): at higher levels
    onnxruntime turns ``MatMul(x, DequantizeLinear(int8))`` into integer kernels that
    quantize ``x`` too, which is not what the graph says (a 2% difference in logits).
    """
    import onnxruntime as ort

    from sparsec.onnx_io import EXTERNAL_DATA_BYTES, initializer_bytes

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    providers = ["CPUExecutionProvider"]
    if initializer_bytes(model) <= EXTERNAL_DATA_BYTES:
        proto = to_onnx_proto(model)
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=providers)
    # Past protobuf's 2 GB: onnxruntime reads the graph and its weights from files
    # (loaded into the session, so the temporary folder can go right after).
    import tempfile
    from pathlib import Path

    import onnx
    import onnx_ir as ir

    with tempfile.TemporaryDirectory(prefix="sparsec-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.data")
        proto = _with_functions(onnx.load(str(path), load_external_data=False), model)
        onnx.save_model(proto, str(path))
        return ort.InferenceSession(str(path), opts, providers=providers)
