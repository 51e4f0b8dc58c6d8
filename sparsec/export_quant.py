"""W8A8 in the export: a ``sparsec sparsify --int8`` folder as an ONNX graph with
int8 weights behind ``DequantizeLinear`` and per-token activation fake quantization.

A sparsify ``--int8`` folder keeps float weights that already sit on their int8 grid
(``w = q * scale``) and lists the per-output-channel scales in ``quantization.json``.
The export makes that quantization explicit, in standard ONNX, so the passes fold it
(docs/graph-contract.md) instead of the compiler re-deriving it:

- each quantized Linear's weight initializer (``[in, out]`` after the exporter folds
  the transpose, or ``[out, in]`` when it keeps one) becomes an int8 initializer and a
  ``DequantizeLinear`` with the per-output-channel scale and no zero point;
- the inputs of those Linears are fake-quantized per token while tracing (the same
  hook sparsify evaluated with), which the passes fuse into ``PerTokenFakeQuant``.

Weights are matched to Linears by value (the exporter renames them, ``val_83``), and
every weight must lie exactly on the grid of its scale: anything else is an error, never
a silent re-rounding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsec.errors import SparsecError

QUANTIZATION_FILE = "quantization.json"
QMAX = 127


@dataclass
class W8A8:
    """The scheme of a quantization.json: weight scales by Linear name (``...q_proj``)."""

    path: Path
    scales: dict[str, np.ndarray]  # Linear name -> float32 [out]


def read_quantization(folder: str | Path) -> W8A8 | None:
    """The W8A8 scheme of a Hugging Face folder, or None when it has no quantization.json."""
    path = Path(folder) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        if doc.get("scheme") != "w8a8":
            raise SparsecError(
                f"{path}: scheme {doc.get('scheme')!r} is not supported (only 'w8a8', as "
                "written by `sparsec sparsify --int8`)"
            )
        raw = doc["weights"]["scales"]
        scales = {
            name.removesuffix(".weight"): np.asarray(s, dtype=np.float32) for name, s in raw.items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SparsecError(
            f"{path} is not a valid quantization file ({type(exc).__name__}: {exc}); "
            "re-run `sparsec sparsify --int8` or delete it to export the float model"
        ) from exc
    if not scales:
        raise SparsecError(f"{path} lists no weight scales")
    return W8A8(path, scales)


def quantized_linears(model, scheme: W8A8) -> dict:
    """``{name: Linear}`` of the model's Linears that ``scheme`` quantizes; every name in
    the scheme must exist, with one scale per output channel."""
    from torch import nn

    modules = dict(model.named_modules())
    found = {}
    for name, scale in scheme.scales.items():
        module = modules.get(name)
        if module is None:  # folders saved from a wrapper carry a "model." prefix or not
            module = modules.get(name.removeprefix("model."), modules.get(f"model.{name}"))
        if not isinstance(module, nn.Linear):
            raise SparsecError(
                f"{scheme.path} quantizes {name!r}, which is not a Linear of this model"
            )
        if scale.shape != (module.out_features,):
            raise SparsecError(
                f"{scheme.path}: {name} has {scale.size} scales for {module.out_features} "
                "output channels"
            )
        found[name] = module
    return found


def _quantize_exactly(name: str, w: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """int8 ``q`` with ``q * scale == w`` bit for bit (scale along ``axis``)."""
    shape = (1, -1) if axis == 1 else (-1, 1)
    s = scale.reshape(shape)
    safe = np.where(s > 0, s, np.float32(1))
    q = np.clip(np.rint(w / safe), -QMAX, QMAX)
    if not np.array_equal((q * s).astype(np.float32), w):
        worst = float(np.abs(q * s - w).max())
        raise SparsecError(
            f"the weights of {name} are not on the int8 grid of their quantization.json "
            f"scales (off by up to {worst:.3g}); the folder was edited after `sparsec "
            "sparsify --int8`: re-run it, or delete quantization.json to export floats"
        )
    return q.astype(np.int8)


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


def insert_weight_dequantize(onnx_model, linears: dict, scheme: W8A8) -> int:
    """Replace each quantized Linear's float weight initializer in ``onnx_model`` (an
    ``onnx_ir.Model``) with ``DequantizeLinear(int8, scale)``; returns how many Linears."""
    import onnx_ir as ir

    # digest of a stored array -> [(name, axis)]; Linears with equal weights may share
    # one initializer after the exporter deduplicates constants
    wanted: dict[bytes, list[tuple[str, int]]] = {}
    weights = {}
    for name, linear in linears.items():
        w = linear.weight.detach().float().numpy()
        weights[name] = w
        wanted.setdefault(_digest(w.T), []).append((name, 1))  # [in, out]: scale on axis 1
        wanted.setdefault(_digest(w), []).append((name, 0))
    graph = onnx_model.graph
    replaced: dict[str, int] = {}
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
            continue
        array = tensor.numpy()
        hits = wanted.get(_digest(array))
        if not hits:
            continue
        name, axis = hits[0]
        expected = weights[name].T if axis == 1 else weights[name]
        if not np.array_equal(array, expected):
            continue  # a digest collision: not this weight
        q = _quantize_exactly(name, array, scheme.scales[name], axis)
        q_value = ir.Value(name=f"{value.name}.int8", const_value=ir.tensor(q))
        s_value = ir.Value(name=f"{value.name}.scale", const_value=ir.tensor(scheme.scales[name]))
        for v in (q_value, s_value):
            v.shape, v.type = v.const_value.shape, ir.TensorType(v.const_value.dtype)
            graph.register_initializer(v)
        dq = ir.node(
            "DequantizeLinear", [q_value, s_value], attributes={"axis": axis}, name=f"{name}.dq"
        )
        dq.outputs[0].name = f"{value.name}.dequantized"
        dq.outputs[0].shape, dq.outputs[0].type = value.shape, value.type
        graph.insert_before(graph[0], dq)
        ir.convenience.replace_all_uses_with(value, dq.outputs[0])
        graph.initializers.pop(value.name)
        for other, other_axis in hits:
            if other_axis == axis and np.array_equal(weights[other], weights[name]):
                replaced[other] = replaced.get(other, 0) + 1
    missing = sorted(set(linears) - set(replaced))
    if missing:
        raise SparsecError(
            f"the export has no weight initializer for {len(missing)} quantized Linear(s) "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the exporter "
            "changed how it stores weights: please report this with your torch version"
        )
    return len(replaced)
