"""sparsec itself: the variant compiled to a model.so, run through ``sparsec.runtime``."""

from __future__ import annotations

from collections import Counter

import numpy as np

from sparsec.bench import variants
from sparsec.bench.systems.base import System
from sparsec.contract import ModelConfig


class SparsecSystem(System):
    engine = "sparsec"

    def __init__(
        self, variant, precision: str, kernels: str, max_context: int, target: str = "auto"
    ):
        suffix = "" if target == "auto" else f" {target}"
        super().__init__(variant, f"sparsec {precision}{suffix}")
        self.target = target
        from sparsec import __version__

        self.version = __version__
        self.precision = precision
        self.kernels = kernels
        self.max_context = max_context
        self.model = None
        self.manifest: dict | None = None

    def prepare(self) -> None:
        from sparsec.runtime.artifact import read_artifact

        path = variants.sparsec_library(
            self.variant, self.precision, self.kernels, self.max_context, self.target
        )
        self.artifact = str(path)
        self.manifest = read_artifact(path).manifest
        formats = Counter(layer["kernel"] for layer in self.manifest["layers"])
        self.weights_format = ", ".join(f"{n}x {k}" for k, n in sorted(formats.items()))

    def _load(self, threads: int) -> None:
        from sparsec import runtime

        self.close()
        self.model = runtime.load(self.artifact, threads=threads, verify=False)

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None
            self.threads = None

    def _reset(self) -> None:
        self.model.reset()

    def _forward_last(self, ids) -> np.ndarray:
        return self.model.forward(ids, all_logits=False)

    def weight_bytes_per_token(self) -> int:
        layers = sum(layer["bytes"] for layer in self.manifest["layers"])
        hidden = ModelConfig.from_dict(self.manifest["config"]).hidden_size
        return layers + 4 * hidden  # + one embedding row
