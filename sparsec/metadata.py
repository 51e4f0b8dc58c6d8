"""The JSON metadata of a sparsec ``.onnx``, read through one schema.

``sparsec.config``, ``sparsec.generation`` and ``sparsec.sparsity`` (docs/graph-contract.md
section 2) are JSON text in the graph's ``metadata_props``. Every stage that reads them
calls this module, so a bad value is refused the same way everywhere, as one line naming
the file, the key and the field:

    tiny.onnx: metadata 'sparsec.config' is not valid JSON (Expecting value: line 1
    column 1 (char 0)); re-export it with `sparsec export`
    tiny.onnx: metadata 'sparsec.generation' field 'eos_token_id' is 'x', expected a token
    id, a list of token ids or null; re-export it with `sparsec export`

Whether the values agree with the graph is the code generator's check
(``sparsec.codegen.graph_check``); this module checks each value on its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from sparsec import contract
from sparsec.errors import SparsecError

REEXPORT = "re-export it with `sparsec export`"
REOPTIMIZE = "re-create it with `sparsec export` and `sparsec optimize`"
_REMEDY = {
    contract.META_CONFIG: REEXPORT,
    contract.META_GENERATION: REEXPORT,
    contract.META_SPARSITY: REOPTIMIZE,
}
JSON_KEYS = tuple(_REMEDY)
SPARSITY_PATTERN = re.compile(r"dense|unstructured|\d+:\d+|block1x\d+")
_CONFIG_PREFIX = "sparsec.config"


class MetadataError(SparsecError):
    """A sparsec metadata value that is not valid JSON or breaks its schema."""


@dataclass(frozen=True)
class Metadata:
    """The parsed JSON metadata of one graph (None / empty where the graph has none)."""

    config: contract.ModelConfig | None
    generation: dict | None
    sparsity: dict[str, dict] = field(default_factory=dict)


def _error(where: str, key: str, detail: str) -> MetadataError:
    return MetadataError(f"{where}: metadata {key!r} {detail}; {_REMEDY.get(key, REEXPORT)}")


def _field_error(where: str, key: str, label: str, value, expected: str) -> MetadataError:
    """``label``: ``field 'name'`` (or ``entry 'weight' field 'name'``)."""
    return _error(where, key, f"{label} is {_show(value)}, expected {expected}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_json(metadata, key: str, where: str = "the model") -> Any:
    """The JSON value of metadata ``key`` (one of ``JSON_KEYS``), None when absent."""
    if key not in _REMEDY:
        raise ValueError(f"{key!r} is not a JSON metadata key")
    text = metadata.get(key)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:  # json.JSONDecodeError, and a bad surrogate in str input
        raise _error(where, key, f"is not valid JSON ({e})") from e
    except RecursionError as e:  # nesting deeper than the parser's stack
        raise _error(where, key, "is not valid JSON (nested too deeply)") from e


def tokenizer(metadata, where: str = "the model") -> str:
    """The ``sparsec.tokenizer`` text, checked to parse as a tokenizer.json (the runtime
    parses it again at every load: a model.so that cannot tokenize is never written)."""
    from tokenizers import Tokenizer

    text = metadata.get(contract.META_TOKENIZER)
    if not text:
        raise SparsecError(f"{where} carries no tokenizer (sparsec.tokenizer metadata); {REEXPORT}")
    try:
        Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception on bad JSON
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise _error(where, contract.META_TOKENIZER, f"does not parse ({detail})") from e
    return text


# -- sparsec.config ----------------------------------------------------------------------
def config(metadata, where: str = "the model", *, required: bool = False):
    """The ``ModelConfig`` in ``metadata``; None when absent (an error when ``required``).
    Malformed fields and unsupported values are refused, naming the field."""
    key = contract.META_CONFIG
    d = parse_json(metadata, key, where)
    if d is None:
        if required:
            raise MetadataError(f"{where}: the graph has no metadata {key!r}; {REEXPORT}")
        return None
    try:
        cfg = contract.ModelConfig.from_dict(d)
    except contract.ConfigError as e:
        detail = str(e).removeprefix(_CONFIG_PREFIX).lstrip()
        raise _error(where, key, f"is invalid{detail}" if detail[:1] == ":" else detail) from e
    try:
        cfg.check_supported()
    except SparsecError as e:  # "unsupported model: FIELD = VALUE (supported: ...)"
        raise SparsecError(f"{where}: {e}") from e
    return cfg


# -- sparsec.generation ------------------------------------------------------------------
def _is_token_id(value) -> bool:
    return type(value) is int and value >= 0


def generation(metadata, where: str = "the model", *, required: bool = False) -> dict | None:
    """``{"bos_token_id": id | None, "eos_token_id": id | [ids] | None}`` from metadata."""
    key = contract.META_GENERATION
    d = parse_json(metadata, key, where)
    if d is None:
        if required:
            raise MetadataError(f"{where}: the graph has no metadata {key!r}; {REEXPORT}")
        return None
    if not isinstance(d, dict):
        raise _error(where, key, f"is a JSON {type(d).__name__}, expected an object")
    for name in ("bos_token_id", "eos_token_id"):
        if name not in d:
            raise _error(where, key, f"has no field {name!r}")
    if d["bos_token_id"] is not None and not _is_token_id(d["bos_token_id"]):
        bos = d["bos_token_id"]
        raise _field_error(where, key, "field 'bos_token_id'", bos, "a token id or null")
    eos = d["eos_token_id"]
    ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and not (ids and all(_is_token_id(i) for i in ids)):
        raise _field_error(
            where, key, "field 'eos_token_id'", eos, "a token id, a list of token ids or null"
        )
    return d


# -- sparsec.sparsity --------------------------------------------------------------------
def sparsity(metadata, where: str = "the model") -> dict[str, dict]:
    """Per weight name, ``{"shape": [in, out], "sparsity": float, "pattern": str}``;
    empty when the graph has no record."""
    key = contract.META_SPARSITY
    d = parse_json(metadata, key, where)
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise _error(where, key, f"is a JSON {type(d).__name__}, expected an object")
    for name, entry in d.items():
        if not isinstance(entry, dict):
            raise _field_error(where, key, f"entry {name!r}", entry, "an object")
        shape = entry.get("shape")
        if not (
            isinstance(shape, list) and len(shape) == 2 and all(_is_token_id(s) for s in shape)
        ):
            label = f"entry {name!r} field 'shape'"
            raise _field_error(where, key, label, shape, "[in, out] (two ints)")
        fraction = entry.get("sparsity")
        if type(fraction) not in (int, float) or not 0 <= fraction <= 1:
            label = f"entry {name!r} field 'sparsity'"
            raise _field_error(where, key, label, fraction, "a number in [0, 1]")
        pattern = entry.get("pattern")
        if not isinstance(pattern, str) or not SPARSITY_PATTERN.fullmatch(pattern):
            label = f"entry {name!r} field 'pattern'"
            raise _field_error(where, key, label, pattern, "dense, unstructured, N:M or block1xK")
    return d


def read(metadata, where: str = "the model", *, require_config: bool = False) -> Metadata:
    """Every JSON metadata value of a graph, each checked against its schema."""
    return Metadata(
        config=config(metadata, where, required=require_config),
        generation=generation(metadata, where),
        sparsity=sparsity(metadata, where),
    )
