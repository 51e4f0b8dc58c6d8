"""compressed-tensors checkpoints: the format llm-compressor writes and vLLM and
transformers load (``quantization_config.quant_method = "compressed-tensors"`` in
config.json).

Writing (``sparsec sparsify --format compressed-tensors``): the pruned Linears keep
their exact zeros, described by a ``sparsity_config`` (compressed-tensors'
``DenseSparsityConfig``: global sparsity and structure); with ``--int8`` every
quantized Linear is stored as int8 with its per-output-channel float32 scale by
compressed-tensors' own ``int-quantized`` compressor, under a W8A8 scheme (weights int8
symmetric per channel, activations int8 symmetric dynamic per token: sparsec's W8A8),
and ``ModelCompressor.update_config`` writes the ``quantization_config``.

The sparsity is recorded, not compressed: compressed-tensors removed its sparse
compressors (``sparse-bitmask`` and ``sparse-24-bitmask``) in 0.15, and transformers 5
requires compressed-tensors >= 0.15 and ignores ``sparsity_config`` (vLLM dropped them
too), so a bitmask-compressed checkpoint would load nowhere with the pinned stack.

Reading (``CompressedCheckpoint``, what ``sparsec export``/``build`` and
``models.load_model`` use): one tensor at a time, each decompressed when read:
int8 weights through compressed-tensors' own decompressor for the checkpoint's format,
and the legacy ``sparse-bitmask`` layout that llm-compressor wrote for
``SparseGPTModifier`` results before compressed-tensors 0.15 (``X.compressed``,
``X.bitmask``, ``X.shape``, ``X.row_offsets``), unpacked with compressed-tensors'
``unpack_bitmasks``. Only the W8A8 scheme above is read as quantized; any other
(group-wise, asymmetric, static activations, fp8, 4-bit, ...) is refused naming it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparsec.errors import SparsecError
from sparsec.hf_checkpoint import RAW_DTYPES, Checkpoint, StoredTensor

METHOD = "compressed-tensors"
FORMATS = ("hf", "compressed-tensors")
# The sparsity formats read: "dense" (the zeros stored as they are) and the legacy
# bitmask of llm-compressor's sparse models.
SPARSITY_FORMATS = ("dense", "sparse-bitmask")
BITMASK_PARTS = ("compressed", "bitmask", "shape", "row_offsets")
W8A8_TEXT = (
    "sparsec reads W8A8 int8 only: weights int8 symmetric per output channel, "
    "activations int8 symmetric dynamic per token"
)


def require_compressed_tensors() -> None:
    """Fail clearly when the compressed-tensors package (compiler extra) is missing."""
    import importlib.util

    from sparsec.errors import MissingDependencyError

    if importlib.util.find_spec("compressed_tensors") is None:
        raise MissingDependencyError(
            "compressed-tensors checkpoints need the compressed-tensors package; install "
            "it with: pip install 'sparsec[compiler]'"
        )


@dataclass(frozen=True)
class CompressedInfo:
    """What config.json says of a compressed-tensors checkpoint, checked."""

    config: Path  # config.json, for messages
    sparsity_format: str | None  # "dense", "sparse-bitmask" or None (no sparsity_config)
    quant_format: str | None  # "int-quantized", ... or None when nothing is quantized
    scheme: Any = None  # the compressed_tensors QuantizationScheme (W8A8) or None


def compression_config(folder: str | Path) -> dict | None:
    """config.json's compressed-tensors section (``quantization_config``, or the
    ``compression_config`` of early llm-compressor), or None for any other folder."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SparsecError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict):
        raise SparsecError(f"{path} is not a JSON object")
    section = config.get("quantization_config")
    if isinstance(section, dict) and section.get("quant_method") == METHOD:
        return section
    section = config.get("compression_config")  # llm-compressor before transformers' key
    return section if isinstance(section, dict) else None


def _describe(args) -> str:
    """``QuantizationArgs`` in a few words: ``int4 group(128) asymmetric static``."""
    if args is None:
        return "none"
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if args.group_size:
        strategy += f"({args.group_size})"
    words = [
        f"{args.type.value if hasattr(args.type, 'value') else args.type}{args.num_bits}",
        strategy,
        "symmetric" if args.symmetric else "asymmetric",
        "dynamic" if args.dynamic else "static",
    ]
    return " ".join(words)


def _is_w8a8(scheme) -> bool:
    w, a = scheme.weights, scheme.input_activations

    def int8_symmetric(args) -> bool:
        return (
            args is not None
            and str(getattr(args.type, "value", args.type)) == "int"
            and args.num_bits == 8
            and args.symmetric
            and not args.group_size
            and getattr(args, "block_structure", None) is None
        )

    return (
        int8_symmetric(w)
        and str(getattr(w.strategy, "value", w.strategy)) == "channel"
        and not w.dynamic
        and getattr(w, "actorder", None) is None
        and int8_symmetric(a)
        and str(getattr(a.strategy, "value", a.strategy)) == "token"
        and a.dynamic is True
        and scheme.output_activations is None
    )


def read_info(folder: str | Path) -> CompressedInfo | None:
    """The checked compressed-tensors description of ``folder``, None when it is not a
    compressed-tensors checkpoint. A scheme or format sparsec cannot represent is
    refused here, naming it, before any weight is read."""
    section = compression_config(folder)
    if section is None:
        return None
    path = Path(folder) / "config.json"
    sparsity = section.get("sparsity_config") or {}
    if not isinstance(sparsity, dict):
        raise SparsecError(f"{path}: sparsity_config is not an object")
    sparsity_format = sparsity.get("format") if sparsity else None
    if sparsity and sparsity_format not in SPARSITY_FORMATS:
        raise SparsecError(
            f"{path}: compressed-tensors sparsity format {sparsity_format!r} is not supported "
            f"(sparsec reads {' and '.join(repr(f) for f in SPARSITY_FORMATS)})"
        )
    if section.get("transform_config"):
        raise SparsecError(
            f"{path}: the checkpoint has a compressed-tensors transform_config (rotations); "
            "sparsec cannot represent transforms"
        )
    if section.get("kv_cache_scheme"):
        raise SparsecError(
            f"{path}: the checkpoint quantizes the KV cache (kv_cache_scheme); sparsec keeps "
            "it float32"
        )
    groups = section.get("config_groups") or {}
    if groups or sparsity_format == "sparse-bitmask":
        require_compressed_tensors()
    if not groups:
        return CompressedInfo(path, sparsity_format, None)
    from compressed_tensors.quantization import QuantizationConfig

    fields = {k: v for k, v in section.items() if k in QuantizationConfig.model_fields}
    try:
        qconfig = QuantizationConfig.model_validate(fields)
    except Exception as e:  # pydantic's ValidationError, a preset name it does not know
        first = str(e).splitlines()
        raise SparsecError(
            f"{path}: not a valid compressed-tensors quantization_config ({' '.join(first[:3])})"
        ) from e
    scheme = None
    for name, group in qconfig.config_groups.items():
        if not _is_w8a8(group):
            raise SparsecError(
                f"{path}: quantization scheme {name!r} (weights {_describe(group.weights)}, "
                f"activations {_describe(group.input_activations)}) is not supported; "
                f"{W8A8_TEXT}"
            )
        scheme = scheme or group
    fmt = str(getattr(qconfig.format, "value", qconfig.format))
    if scheme.format is not None:
        fmt = str(getattr(scheme.format, "value", scheme.format))
    if fmt not in ("int-quantized", "naive-quantized"):
        raise SparsecError(
            f"{path}: quantization format {fmt!r} is not supported (sparsec reads int8 weights "
            "stored as 'int-quantized' or 'naive-quantized')"
        )
    return CompressedInfo(path, sparsity_format, fmt, scheme)


class CompressedCheckpoint(Checkpoint):
    """A compressed-tensors checkpoint whose ``tensors`` are the model's parameters
    (``X.weight``, float32 when read), each decompressed from its stored parts when
    ``array``/``lazy`` reads it: as ``hf_checkpoint.Checkpoint``, one tensor at a time."""

    def __init__(self, folder: str | Path, info: CompressedInfo):
        super().__init__(folder, readable=RAW_DTYPES)
        self.info = info
        self.stored = self.tensors  # every stored tensor, by its own name
        self.parts: dict[str, dict[str, str]] = {}  # parameter -> {part: stored name}
        self.scales: dict[str, np.ndarray] = {}  # quantized Linear -> float32 [out]
        self.tensors = {}
        self._index()

    def _error(self, message: str) -> SparsecError:
        return SparsecError(f"{self.folder}: {message}")

    def _index(self) -> None:
        stored = self.stored
        bitmask_prefixes = {
            name.removesuffix(".compressed") for name in stored if name.endswith(".compressed")
        }
        if bitmask_prefixes and self.info.sparsity_format != "sparse-bitmask":
            raise self._error(
                f"tensor {sorted(bitmask_prefixes)[0]}.compressed is bitmask-compressed, but "
                f"config.json's sparsity_config format is {self.info.sparsity_format!r}; the "
                "checkpoint and its config do not match"
            )
        used = set()
        for prefix in sorted(bitmask_prefixes):
            names = {part: f"{prefix}.{part}" for part in BITMASK_PARTS}
            missing = [n for n in names.values() if n not in stored]
            if missing:
                raise self._error(f"the bitmask-compressed {prefix} has no tensor {missing[0]}")
            shape = self._read(names["shape"]).reshape(-1).tolist()
            if len(shape) not in (1, 2) or min(shape) <= 0:
                raise self._error(f"tensor {names['shape']} holds {shape}, not a weight's shape")
            used.update(names.values())
            self.parts[f"{prefix}.weight"] = names
            dtype = stored[names["compressed"]].dtype
            self.tensors[f"{prefix}.weight"] = StoredTensor(
                stored[names["compressed"]].file, dtype, tuple(int(d) for d in shape)
            )
        for name in stored:
            if name.endswith((".input_scale", ".weight_zero_point", ".input_zero_point")):
                raise self._error(
                    f"tensor {name} belongs to a static or asymmetric quantization; {W8A8_TEXT}"
                )
        scale_owners = [
            n.removesuffix(".weight_scale") for n in stored if n.endswith(".weight_scale")
        ]
        if scale_owners and self.info.scheme is None:
            raise self._error(
                f"tensor {scale_owners[0]}.weight_scale is a quantization scale, but "
                "config.json's quantization_config has no config_groups; the checkpoint and "
                "its config do not match"
            )
        for module in scale_owners:
            weight = f"{module}.weight"
            self._add_quantized(module, weight, stored)
            used.update({weight, f"{module}.weight_scale"})
        if self.info.scheme is not None and not self.scales:
            raise self._error(
                "config.json quantizes Linears (config_groups), but no tensor has a "
                "weight_scale; the checkpoint and its config do not match"
            )
        for name, tensor in stored.items():
            if name in used or name in self.tensors:
                continue
            if tensor.dtype not in ("F32", "BF16", "F16"):
                raise self._error(
                    f"tensor {name!r} is {tensor.dtype} without a weight_scale; the "
                    "checkpoint and its config do not match"
                )
            self.tensors[name] = tensor

    def _add_quantized(self, module: str, weight: str, stored: dict) -> None:
        if weight in self.parts:  # bitmask-compressed int8 values
            shape = self.tensors[weight].shape
            dtype = stored[self.parts[weight]["compressed"]].dtype
        elif weight in stored:
            shape, dtype = stored[weight].shape, stored[weight].dtype
            self.parts[weight] = {"weight": weight}
            self.tensors[weight] = stored[weight]
        else:
            raise self._error(f"tensor {module}.weight_scale has no weight {weight}")
        if dtype != "I8":
            raise self._error(f"the quantized weight {weight} is {dtype}, not int8 (I8)")
        scale = self._read(f"{module}.weight_scale").astype(np.float32)
        if scale.size != shape[0] or scale.shape not in ((shape[0],), (shape[0], 1)):
            raise self._error(
                f"tensor {module}.weight_scale has shape {list(scale.shape)}; a per-channel "
                f"scale of {weight} {list(shape)} is [{shape[0]}, 1] ({W8A8_TEXT})"
            )
        self.parts[weight]["weight_scale"] = f"{module}.weight_scale"
        self.scales[module] = scale.reshape(-1)
        self.tensors[weight] = StoredTensor(self.tensors[weight].file, "I8", tuple(shape))

    def _read_torch(self, name: str):
        from safetensors import safe_open

        stored = self.stored[name]
        try:
            with safe_open(str(stored.file), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:  # safetensors' own error types on a damaged file
            raise self._error(f"cannot read tensor {name}: {str(e).splitlines()[0]}") from e

    def _read(self, name: str) -> np.ndarray:
        t = self._read_torch(name)
        return (t.float() if t.is_floating_point() else t).numpy()  # bf16 scales too

    def weight(self, name: str):
        """Parameter ``name`` as a torch tensor of its checkpoint dtype, decompressed
        (int8 stays int8 before ``array`` dequantizes it)."""
        import torch

        parts = self.parts.get(name)
        if parts is None:
            return self._read_torch(name)
        if "compressed" in parts:
            from compressed_tensors.utils import unpack_bitmasks

            shape = list(self.tensors[name].shape)
            values = self._read_torch(parts["compressed"])
            packed = self._read_torch(parts["bitmask"])
            if list(packed.shape) != [*shape[:-1], -(-shape[-1] // 8)]:
                raise self._error(
                    f"tensor {parts['bitmask']} is {list(packed.shape)}, not the packed "
                    f"bitmask of a {shape} weight"
                )
            mask = unpack_bitmasks(packed, shape)
            if int(mask.sum()) != values.numel():
                raise self._error(
                    f"{parts['compressed']} holds {values.numel()} values but its bitmask "
                    f"marks {int(mask.sum())}; the checkpoint is damaged"
                )
            # compressed-tensors < 0.15's bitmask_decompress: the values in row-major order
            dense = torch.zeros(shape, dtype=values.dtype)
            dense[mask] = values
            return dense
        return self._read_torch(parts["weight"])

    def array(self, name: str, *, transpose: bool = False) -> np.ndarray:
        import torch

        if name not in self.parts:
            return super().array(name, transpose=transpose)
        t = self.weight(name)
        if "weight_scale" in self.parts[name]:
            from compressed_tensors.compressors import BaseCompressor

            compressor = BaseCompressor.get_value_from_registry(self.info.quant_format)
            scale = torch.from_numpy(self.scales[name.removesuffix(".weight")])[:, None]
            t = compressor.decompress({"weight": t, "weight_scale": scale}, self.info.scheme)[
                "weight"
            ]
        if transpose:
            t = t.t()
        out = torch.empty(tuple(t.shape), dtype=torch.float32)
        out.copy_(t)
        return out.numpy()

    def check_symmetric_grid(self) -> None:
        """sparsec's W8A8 grid is -127..127 (``DequantizeLinear`` with no zero point,
        docs/graph-contract.md); compressed-tensors' symmetric int8 reaches -128."""
        for name in self.parts:
            if "weight_scale" in self.parts[name] and int(self.weight(name).min()) < -127:
                raise self._error(
                    f"{name} has int8 value -128; sparsec's W8A8 weights are symmetric, "
                    "-127..127; export it with --ignore-quantization for float weights"
                )


def read_w8a8(folder: str | Path):
    """The ``export_quant.W8A8`` of a compressed-tensors W8A8 checkpoint (its
    per-channel weight scales), or None when ``folder`` is not one."""
    from sparsec.export_quant import W8A8

    info = read_info(folder)
    if info is None or info.scheme is None:
        return None
    checkpoint = CompressedCheckpoint(folder, info)
    checkpoint.check_symmetric_grid()
    return W8A8(info.config, dict(checkpoint.scales))


def load_model(folder: str | Path, config):
    """The float32 model of a compressed-tensors checkpoint, every weight decompressed
    (in memory: the whole model in float32, as ``models.load_model`` gives any model);
    ``config`` is its transformers config."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    info = read_info(folder)
    checkpoint = CompressedCheckpoint(folder, info)
    config = copy.deepcopy(config)
    for key in ("quantization_config", "compression_config"):
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = dict(model.named_parameters(remove_duplicate=False))
    unexpected = [name for name in checkpoint.tensors if name not in params]
    if unexpected:
        raise SparsecError(
            f"{folder}: the checkpoint's tensor {unexpected[0]!r} is not a parameter of the "
            "model its config.json describes; the checkpoint and its config do not match"
        )
    state = {}
    for name in checkpoint.tensors:
        array = checkpoint.array(name)
        if tuple(array.shape) != tuple(params[name].shape):
            raise SparsecError(
                f"{folder}: tensor {name!r} is {list(array.shape)}, but config.json makes it "
                f"{list(params[name].shape)}; the checkpoint and its config do not match"
            )
        state[name] = torch.from_numpy(array)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise SparsecError(
            f"{folder}: the checkpoint has no tensor {missing[0]!r} (a parameter of the model "
            "its config.json describes); the checkpoint and its config do not match"
        )
    return model


# --- writing ---------------------------------------------------------------------------


def w8a8_scheme():
    """sparsec's W8A8 as a compressed-tensors scheme: weights int8 symmetric per output
    channel (static scales), inputs int8 symmetric per token (dynamic)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def int8(strategy: str, dynamic: bool):
        return QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy=strategy, dynamic=dynamic
        )

    return QuantizationScheme(
        targets=["Linear"],
        weights=int8("channel", False),
        input_activations=int8("token", True),
        format="int-quantized",
    )


def sparsity_structure(pattern: str) -> str:
    """compressed-tensors' name for a sparsec --pattern: "2:4" is its own structure,
    anything else (N:M, blocks) reads as "unstructured" (a superset)."""
    return "2:4" if pattern == "2:4" else "unstructured"


def save_compressed(
    model,
    tokenizer,
    folder: str | Path,
    *,
    sparse_linears: dict,
    scales: dict[str, list[float]] | None,
    pattern: str = "unstructured",
) -> None:
    """Write ``model`` into the (new, empty) ``folder`` as a compressed-tensors
    checkpoint: ``sparse_linears`` (name -> Linear) described by a ``sparsity_config``,
    and, with ``scales`` (name -> per-output-channel scales, the weights already on
    their int8 grid), those Linears stored int8 by compressed-tensors' compressor."""
    import torch
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.config import DenseSparsityConfig
    from compressed_tensors.quantization import QuantizationConfig

    folder = Path(folder)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    state = dict(model.state_dict())
    if scales:
        scheme = w8a8_scheme()
        compressor = BaseCompressor.get_value_from_registry("int-quantized")
        for name, values in scales.items():
            w = linears[name].weight.detach().float()
            scale = torch.tensor(values, dtype=torch.float32)[:, None]
            out = compressor.compress({"weight": w, "weight_scale": scale}, scheme)
            if not torch.equal(out["weight"].float() * scale, w):
                raise SparsecError(
                    f"the weights of {name} are not on the int8 grid of their scales; "
                    "cannot store them as int8 without changing them"
                )
            state[f"{name}.weight"] = out["weight"]
            state[f"{name}.weight_scale"] = out["weight_scale"]
        qconfig = QuantizationConfig(
            config_groups={"group_0": scheme},
            format="int-quantized",
            quantization_status="compressed",
            ignore=sorted(set(linears) - set(scales)),
        )
    else:  # nothing quantized: the config carries the sparsity alone
        qconfig = QuantizationConfig(
            config_groups={}, format="dense", quantization_status="compressed"
        )
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    ModelCompressor(quantization_config=qconfig).update_config(str(folder))
    zeros = sum(int((m.weight == 0).sum()) for m in sparse_linears.values())
    total = sum(m.weight.numel() for m in sparse_linears.values())
    sparsity = DenseSparsityConfig(
        global_sparsity=zeros / max(total, 1),
        sparsity_structure=sparsity_structure(pattern),
        targets=["Linear"],
        ignore=sorted(set(linears) - set(sparse_linears)),
    )
    path = folder / "config.json"
    config = json.loads(path.read_text())
    # compressed-tensors >= 0.15 writes an empty sparsity_config ("removed for now")
    config["quantization_config"]["sparsity_config"] = sparsity.model_dump()
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
