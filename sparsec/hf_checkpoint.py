"""A Hugging Face checkpoint's weights, read one tensor at a time from its safetensors.

Large models ship as bf16 (or fp16) safetensors, often sharded
(``model.safetensors.index.json``). Export must not hold an fp32 copy of the whole
model: ``Checkpoint.lazy(name)`` is an ``onnx_ir.LazyTensor`` that reads its tensor
(memory-mapped by safetensors), converts it to float32 and, if asked, transposes it,
only when a stage reads it (the save of an external-data graph, the compile's packer),
and keeps nothing afterwards. The peak is then a few copies of the largest single
tensor, whatever the model's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsec.errors import SparsecError

# safetensors dtype names this reader converts to float32, and their bytes per element.
STORED_DTYPES = {"F32": 4, "BF16": 2, "F16": 2}
# What a compressed-tensors checkpoint stores besides (sparsec.compressed reads them):
# int8 weights, packed bitmasks, shapes and row offsets.
RAW_DTYPES = {**STORED_DTYPES, "I8": 1, "U8": 1, "I32": 4, "I64": 8}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: str  # safetensors name: F32, BF16, F16
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * RAW_DTYPES[self.dtype]


def has_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


class Checkpoint:
    """The tensors of the safetensors checkpoint in ``folder`` (read lazily).

    ``readable``: the stored dtypes accepted (a subclass that decodes compressed tensors
    accepts more)."""

    def __init__(self, folder: str | Path, *, readable: dict = STORED_DTYPES):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = self._files()
        self.tensors: dict[str, StoredTensor] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        part = f.get_slice(name)
                        stored = StoredTensor(file, part.get_dtype(), tuple(part.get_shape()))
                        if stored.dtype not in readable:
                            raise SparsecError(
                                f"{file}: tensor {name!r} is {stored.dtype}; sparsec reads "
                                f"{', '.join(STORED_DTYPES)} checkpoints"
                            )
                        self.tensors[name] = stored
            except SparsecError:
                raise
            except Exception as e:  # safetensors raises its own error types on bad files
                raise SparsecError(f"cannot read {file}: {str(e).splitlines()[0]}") from e

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({self.folder / str(f) for f in weight_map.values()})
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise SparsecError(f"{index} is not a safetensors index: {e}") from e
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise SparsecError(
                    f"{index} names {missing[0].name}, which is not in {self.folder}"
                )
            return files
        single = self.folder / SINGLE_FILE
        if single.is_file():
            return [single]
        raise SparsecError(
            f"{self.folder} has no {SINGLE_FILE} or {INDEX_FILE}; sparsec reads safetensors "
            "checkpoints (save the model with save_pretrained(safe_serialization=True))"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors as stored."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values()}

    def array(self, name: str, *, transpose: bool = False) -> np.ndarray:
        """Tensor ``name`` as a new contiguous float32 array (2-D ones transposed if
        asked): one float32 allocation, converted straight from the mapped file."""
        import torch
        from safetensors import safe_open

        stored = self.tensors[name]
        with safe_open(str(stored.file), framework="pt") as f:
            t = f.get_tensor(name)
        if transpose:
            t = t.t()
        out = torch.empty(tuple(t.shape), dtype=torch.float32)
        out.copy_(t)  # casts and lays out in one pass
        del t
        return out.numpy()

    def lazy(self, name: str, *, transpose: bool = False):
        """An ``onnx_ir.LazyTensor`` (float32) evaluating ``array(name, transpose)``."""
        import onnx_ir as ir

        shape = self.tensors[name].shape
        if transpose:
            shape = shape[::-1]

        def load():
            return ir.Tensor(self.array(name, transpose=transpose), name=name)

        return ir.LazyTensor(load, dtype=ir.DataType.FLOAT, shape=ir.Shape(shape), name=name)


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """The checkpoint in ``folder`` as export reads it: a compressed-tensors checkpoint
    (config.json's ``quantization_config``) decompressed tensor by tensor
    (``sparsec.compressed.CompressedCheckpoint``), any other as stored."""
    from sparsec.compressed import CompressedCheckpoint, read_info

    info = read_info(folder)
    return CompressedCheckpoint(folder, info) if info is not None else Checkpoint(folder)
