"""Reading and checking the input of ``sparsec optimize``: clear errors, not tracebacks.

A graph the passes cannot trust is refused before any pass runs: an unreadable file,
JSON metadata that breaks its schema (``sparsec.metadata``, naming the key and field),
a node reading a value nothing produces (named, with the node), or anything else the
ONNX checker rejects (its message, with the node it names).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from sparsec.errors import SparsecError


def load(path: str | os.PathLike):
    """``onnx_ir.Model`` from ``path``, or a SparsecError saying why not."""
    import onnx_ir as ir

    path = Path(path)
    if not path.is_file():
        raise SparsecError(f"{path}: no such file")
    try:
        return ir.load(path)
    except Exception as e:  # protobuf/onnx raise many kinds for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SparsecError(f"{path} is not a readable ONNX model: {first}") from e


def check(model, where: str = "the model", *, functions: bool = False) -> None:
    """Raise SparsecError when ``model`` (an ``onnx_ir.Model``) is malformed.

    ``functions``: check the sparsec ops (an optimized graph) through their ONNX function
    bodies, as onnxruntime runs them: their inputs' types and attributes are checked
    too, so the code generator never accepts a graph the reference would reject."""
    import onnx
    import onnx_ir as ir

    from sparsec import metadata

    metadata.read(model.metadata_props, where)  # the keys it has: each against its schema
    graph = model.graph
    for node in graph:
        for value in node.inputs:
            if value is None:
                continue
            if (
                value.producer() is None
                and not value.is_graph_input()
                and not value.is_initializer()
            ):
                raise SparsecError(
                    f"{where}: node {node.name!r} ({node.op_type}) reads {value.name!r}, which "
                    "no node, graph input or initializer produces; fix or re-export the graph"
                )
    try:
        with _weights_as_references(model):
            proto = ir.serde.serialize_model(model)
    except Exception as e:
        raise SparsecError(f"{where} cannot be serialized to ONNX: {e}") from e
    _externals_as_inputs(proto)
    # Values the passes created carry no type; onnx-ir writes them as value_info with a
    # name only, which the checker rejects. They say nothing: inference types them.
    # Graph outputs without a type (graphs built by hand, or by older sparsec versions)
    # run under onnxruntime; the checker would refuse them, so they are left out of the
    # check (their producers are checked all the same).
    for values in (proto.graph.value_info, proto.graph.output):
        for value in [v for v in values if not v.HasField("type")]:
            values.remove(value)
    if functions:
        from sparsec.passes.functions import _with_functions

        _with_functions(proto, model)
    try:
        # full_check: type and shape inference too (an int64-only input given floats).
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise SparsecError(f"{where} fails the ONNX checker: {_describe(str(e))}") from e


# Initializers above this many bytes are checked by type and shape only (see below).
CHECKED_DATA_BYTES = 1 << 16


@contextlib.contextmanager
def _weights_as_references(model):
    """Serialize the large initializers as external-data references (type and shape,
    no bytes), which ``_externals_as_inputs`` turns into typed inputs. The checker needs
    no weight values, and copying them into a proto (and again into the string the C++
    checker reads) made compile hold the weights three times: 2.6 GB for SmolLM2's
    655 MB graph. Small initializers (shapes, scalars: what shape inference reads) keep
    their data; weight values are checked where they are read (NaN/inf by lowering)."""
    import onnx_ir as ir

    saved = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor):
            continue
        if tensor.nbytes <= CHECKED_DATA_BYTES:
            continue
        saved[value] = tensor
        value.const_value = ir.ExternalTensor(
            "sparsec-check-reference",
            0,
            tensor.nbytes,
            tensor.dtype,
            shape=tensor.shape,
            name=value.name,
        )
    try:
        yield
    finally:
        for value, tensor in saved.items():
            value.const_value = tensor


def _externals_as_inputs(proto) -> None:
    """Turn initializers held in external data files into graph inputs of the same type:
    the checker would look for the files relative to the working directory (a proto
    has no folder), and the structure it checks is the same either way. Reading the
    data is the loader's business (a missing or short file fails there, by name)."""
    import onnx

    graph = proto.graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        graph.input.append(
            onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
        )
        graph.initializer.remove(tensor)


def _describe(message: str) -> str:
    """One line from an onnx checker message, naming the node when it does."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    first = lines[0] if lines else "invalid model"
    node = re.search(r"Name:\s*(\S*)\s+OpType:\s*(\S+)", message)
    if node:
        name = node.group(1) or "(unnamed)"
        first = re.sub(r"\s*of node:\s*$", "", first)
        return f"node {name!r} ({node.group(2)}): {first}"
    return first
