"""The kernels the CI regression check tracks, as this version of sparsec generates them.

``benchmarks/kernel_regression.py`` builds this suite twice, from the baseline commit
and from the working tree, each in a process of its own (``kernel_replay``), and
compares the two. Everything is at SmolLM2-135M's real shapes, with fixed weights:

- Linear kernels: the four distinct layer shapes (576x576, 192x576, 1536x576, 576x1536)
  at 0/50/70/90% sparsity in every format of ``LINEAR_FORMATS``, the int8
  activation-quantize kernels and the dense output layer (49152x576), emitted as
  ``sparsec compile`` emits them (64 tokens per call at most), for AVX-512; the same at
  0/70% for AVX2 (``avx2_`` names) and the int8 ones for AVX2-VNNI (``avx2_vnni_``),
  timed where this CPU runs that ISA (an AMD Zen 4 has no AVX-VNNI).
- Model compiles: a 4-layer SmolLM2-shaped model (70% of every decoder Linear zeroed)
  compiled fp32 and int8, with dense and with bitmask decoder layers (the output layer
  dense, as autotuning picks it): every function LLVM emits for a model (embedding,
  norms, RoPE/KV write, attention, SwiGLU, quantize, linears, the forward body); and
  the int8 bitmask one for avx512-amx (AMX tiles in multi-token calls), whose prefill
  chunk is timed where the CPU has AMX.

Per function: the fingerprint and the assembly text for one fixed LLVM cpu
(``FINGERPRINT_CPU``), so they are the same on every host. Timed items, on this host's
code (``kernel_timing``): each bitmask kernel at every sparsity and each dense kernel
at 0% (a dense kernel's time does not depend on its zeros), and each model's decode
step on 1 and 2 threads and a prefill chunk.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsec.bench.kernel_timing import (
    DECODE_POSITION,
    KERNEL_THREADS,
    STEPS,
    WORKING_SET,
    LinearTiming,
    StepTiming,
)

# Kernels are emitted with the model compiler's prefill chunk, so the code is the code
# that runs in a model.so (sparsec.codegen.compile.DEFAULT_MAX_TOKENS).
MAX_TOKENS = 64
SMOLLM2_SHAPES = {  # [out, in] of each distinct SmolLM2-135M linear layer
    "q_o": (576, 576),
    "k_v": (192, 576),
    "gate_up": (1536, 576),
    "down": (576, 1536),
}
LM_HEAD = ("lm_head", (49152, 576))
SPARSITIES = (0.0, 0.5, 0.7, 0.9)
# Fingerprints and code text are made for one fixed LLVM cpu, whatever the host, so
# they compare like with like on any machine (same llvmlite version).
FINGERPRINT_CPU = "znver4"

# SmolLM2-135M's configuration with 4 of its 30 layers: every op kernel at its real
# shape, in a compile of seconds.
MODEL_CONFIG = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    initializer_range=0.02,
)
MODEL_SPARSITY = 0.7
MODEL_CAPACITY = 1024


# The 256-bit ISAs' share of the check (fewer sparsities: their code does not depend on
# the sparsity, the timings show the decode at the sparsity that matters). AVX2-VNNI
# differs from AVX2 only in its int8 dot product.
AVX2_SPARSITIES = (0.0, 0.7)
NARROW_ISAS = {"avx2": ("f32", "i8"), "avx2-vnni": ("i8",)}
BASE_ISA = "avx512"


@dataclass(frozen=True)
class KernelSpec:
    role: str
    fmt: str
    shape: tuple[int, int]
    sparsity: float
    isa: str = BASE_ISA

    @property
    def prefix(self) -> str:
        """Names of the AVX-512 kernels carry no ISA (they are the baseline's names)."""
        return "" if self.isa == BASE_ISA else self.isa.replace("-", "_") + "_"

    @property
    def name(self) -> str:
        out, inp = self.shape
        sp = round(self.sparsity * 100)
        return f"{self.prefix}{self.fmt}_{self.role}_{out}x{inp}_s{sp:02d}"

    @property
    def quantize_name(self) -> str:
        return f"{self.prefix}quantize_{self.shape[1]}"

    @property
    def int8(self) -> bool:
        return self.fmt.endswith("_i8")


def kernel_set() -> list[KernelSpec]:
    """Every (ISA, shape, sparsity, format) of the check, plus the dense output layer."""
    from sparsec.codegen.linear import LINEAR_FORMATS

    specs = []
    for isa, sparsities, precisions in (
        (BASE_ISA, SPARSITIES, ("f32", "i8")),
        *((isa, AVX2_SPARSITIES, precisions) for isa, precisions in NARROW_ISAS.items()),
    ):
        formats = [f for f in LINEAR_FORMATS if f.rsplit("_", 1)[1] in precisions]
        specs += [
            KernelSpec(role, fmt, shape, sp, isa)
            for role, shape in SMOLLM2_SHAPES.items()
            for sp in sparsities
            for fmt in formats
        ]
        specs += [KernelSpec(LM_HEAD[0], f"dense_{p}", LM_HEAD[1], 0.0, isa) for p in precisions]
    return specs


def is_timed(spec: KernelSpec) -> bool:
    """A dense kernel's time does not depend on its zeros: timed at sparsity 0 only."""
    return spec.fmt.startswith("bitmask") or spec.sparsity == 0.0


def make_weight(spec: KernelSpec) -> np.ndarray:
    """The spec's fixed random weight ([out, in] float32) with exactly its share of zeros."""
    rng = np.random.default_rng(zlib.crc32(f"{spec.role}{spec.shape}{spec.sparsity}".encode()))
    w = (rng.standard_normal(spec.shape) * 0.05).astype(np.float32)
    k = int(round(spec.sparsity * w.size))
    if k:
        w.reshape(-1)[rng.choice(w.size, size=k, replace=False)] = 0.0
    return w


# (module, name, packed, target) -> ir.Function
Emitter = Callable[[object, str, object, object], object]


def emit_kernel(module, name: str, packed, target):
    """The kernel as the model compiler emits it for ``target``."""
    from sparsec.codegen.linear import emit_linear

    return emit_linear(module, name, packed, max_tokens=MAX_TOKENS, target=target)


def code_target(isa: str = BASE_ISA):
    """What the compared code is compiled for, on every host: the ISA scheduled and tuned
    for ``FINGERPRINT_CPU``."""
    from sparsec.codegen.target import ISAS, Target

    return Target(ISAS[isa], FINGERPRINT_CPU)


def pack_all(specs: list[KernelSpec]) -> dict:
    from sparsec.codegen.linear import pack_linear
    from sparsec.codegen.target import ISAS

    weights: dict = {}
    packs = {}
    for spec in specs:
        key = (spec.role, spec.shape, spec.sparsity)
        if key not in weights:
            weights[key] = make_weight(spec)
        packs[spec.name] = pack_linear(weights[key], spec.fmt, ISAS[spec.isa])
    return packs


def linear_module(specs: list[KernelSpec], packs: dict, emitter: Emitter, target):
    """One LLVM module with every spec's kernel for ``target`` and the quantize kernels
    they need."""
    from llvmlite import ir

    from sparsec.codegen.linear import emit_quantize_tokens

    module = ir.Module(name="kernel_regression")
    for spec in specs:
        emitter(module, spec.name, packs[spec.name], target)
    quantize = {s.quantize_name: s.shape[1] for s in specs if s.int8}
    for name, in_features in sorted(quantize.items()):
        emit_quantize_tokens(module, name, in_features, max_tokens=MAX_TOKENS, isa=target.isa)
    return module


@dataclass(frozen=True)
class CompiledCode:
    """What one module compiles to for ``FINGERPRINT_CPU``: per function, its fingerprint
    and assembly text, under stable names (``fingerprint.canonical_names``)."""

    fingerprints: dict[str, dict[str, int]]
    assembly: dict[str, str]


def compiled_code(module, prefix: str = "", tgt=None) -> CompiledCode:
    from sparsec.bench.fingerprint import (
        canonical_names,
        canonical_text,
        fingerprint_module,
        function_assembly,
    )
    from sparsec.codegen import target

    obj, asm = target.compile_ir_and_assembly(module, tgt or code_target())
    names = canonical_names(asm)
    fps = fingerprint_module(asm, obj)
    texts = function_assembly(asm)

    def key(name: str) -> str:
        return prefix + names.get(name, name)

    return CompiledCode(
        {key(n): fp for n, fp in fps.items()},
        {key(n): canonical_text(t, names) for n, t in texts.items()},
    )


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelVariant:
    precision: str  # fp32 | int8
    kernels: str  # dense | bitmask (decoder layers; the output layer is always dense)
    isa: str = BASE_ISA

    @property
    def name(self) -> str:
        suffix = "" if self.isa == BASE_ISA else "_" + self.isa.replace("-", "_")
        return f"model_{'i8' if self.precision == 'int8' else 'f32'}_{self.kernels}{suffix}"

    @property
    def steps(self) -> tuple[tuple[str, int], ...]:
        """Timed steps: another ISA's variant only where its code differs from the base
        ISA's (avx512-amx: multi-token tiles, i.e. the prefill chunk)."""
        return STEPS if self.isa == BASE_ISA else tuple(s for s in STEPS if s[0] != "decode")

    def choose(self, weight, precision: str, kernels: str) -> str:
        """The format autotuning picks on a 70%-sparse model, fixed so the code is too:
        bitmask for sparse layers in the bitmask variant, dense for the rest."""
        from sparsec.codegen.autotune import DENSE_ONLY_BELOW

        suffix = "i8" if precision == "int8" else "f32"
        sparsity = 1.0 - np.count_nonzero(weight) / max(weight.size, 1)
        sparse = self.kernels == "bitmask" and sparsity >= DENSE_ONLY_BELOW
        return f"{'bitmask' if sparse else 'dense'}_{suffix}"


MODEL_VARIANTS = (
    *(ModelVariant(p, k) for p in ("fp32", "int8") for k in ("dense", "bitmask")),
    ModelVariant("int8", "bitmask", "avx512-amx"),  # AMX tiles: prefill and batched decode
)


def model_graph(out: Path) -> Path:
    """The suite's model as an optimized graph (sparsec.testing.build_contract_graph)."""
    import onnx_ir as ir

    from sparsec.testing import build_contract_graph, make_tiny_llama, zero_smallest

    model, tokenizer = make_tiny_llama(seed=0, **MODEL_CONFIG)
    zero_smallest(model, MODEL_SPARSITY)
    ir.save(build_contract_graph(model, tokenizer), out)
    return out


# --------------------------------------------------------------------------- timed items


@dataclass(frozen=True)
class Item:
    """A timed call. ``key`` says what it measures (its inputs, not this version's
    outputs): the check compares two versions' items only when their keys agree."""

    name: str
    key: str
    nbytes: int  # weight bytes one call reads (for GB/s in the report), 0 if unknown


class Suite:
    """This version's suite, built (``build``), then timed item by item (``time``).

    ``only``: a regular expression; just the linear kernels and model variants whose
    name it matches (searched) are built. ``emitter`` emits the linear kernels (a variant
    to try against the baseline; default: sparsec's)."""

    def __init__(self, only: str | None = None, emitter: Emitter = emit_kernel, log=print):
        pattern = re.compile(only) if only else None
        self.specs = [s for s in kernel_set() if not pattern or pattern.search(s.name)]
        self.variants = [v for v in MODEL_VARIANTS if not pattern or pattern.search(v.name)]
        self.emitter = emitter
        self.log = log
        self.fingerprints: dict[str, dict[str, int]] = {}
        self.assembly: dict[str, str] = {}
        self.items: dict[str, Item] = {}
        self._linear: dict[str, LinearTiming] = {}  # timed item name -> its library
        self._steps: StepTiming | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="sparsec-kernel-suite-")

    def build(self, timing: bool = True) -> None:
        """Compile everything for the fixed cpu (fingerprints, text) and, with ``timing``,
        for this host (the timed code)."""
        from sparsec.codegen.target import ISAS, Target, default_target, missing_features

        t0 = time.perf_counter()
        packs = pack_all(self.specs)
        for isa in dict.fromkeys(s.isa for s in self.specs):
            specs = [s for s in self.specs if s.isa == isa]
            tgt = code_target(isa)
            self._add(compiled_code(linear_module(specs, packs, self.emitter, tgt), tgt=tgt))
            timed = [s for s in specs if is_timed(s)]
            if not (timing and timed) or missing_features(ISAS[isa].features):
                continue  # this CPU cannot run that ISA: code compared, not timed
            for s in timed:
                key = [s.fmt, list(s.shape), s.sparsity, MAX_TOKENS, KERNEL_THREADS, WORKING_SET]
                key += [] if isa == BASE_ISA else [isa]
                self.items[s.name] = Item(s.name, json.dumps(key), packs[s.name].data.nbytes)
            host = Target(ISAS[isa], default_target().cpu)
            module = linear_module(timed, packs, self.emitter, host)
            timer = LinearTiming(module, timed, packs, host)
            self._linear.update({s.name: timer for s in timed})
        if self.specs:
            self.log(f"linear kernels: {len(self.specs)} built ({time.perf_counter() - t0:.0f} s)")
        if self.variants:
            self._build_models(timing)

    def _add(self, code: CompiledCode) -> None:
        self.fingerprints.update(code.fingerprints)
        self.assembly.update(code.assembly)

    def _build_models(self, timing: bool) -> None:
        from sparsec.codegen.compile import build_model, emit_model
        from sparsec.codegen.target import ISAS, Target, default_target, missing_features

        tmp = Path(self._tmp.name)
        graph = model_graph(tmp / "graph.onnx")
        libraries = {}
        for v in self.variants:
            t0 = time.perf_counter()
            options = dict(
                precision=v.precision,
                max_context=MODEL_CAPACITY,
                kernels="auto",
                quiet=True,
                choose=v.choose,
                tuning="builtin",  # the table's code, timed on every host alike
            )
            em = emit_model(graph, **options, target=code_target(v.isa))
            self._add(compiled_code(em.emitted.module, prefix=f"{v.name}/", tgt=em.target))
            if timing and not missing_features(ISAS[v.isa].features):
                # The timed build is this host's: emitted again only if its tuning differs.
                host = Target(ISAS[v.isa], default_target().cpu)
                if host.tuning == em.target.tuning:
                    em = dataclasses.replace(em, target=host)
                else:
                    em = emit_model(graph, **options, target=host)
                manifest = build_model(em, tmp / f"{v.name}.so", quiet=True)
                libraries[v.name] = tmp / f"{v.name}.so"
                layer_bytes = sum(layer["bytes"] for layer in manifest["layers"])
                for kind, threads in v.steps:
                    name = f"{v.name}:{kind}@{threads}t"
                    key = [MODEL_CONFIG, MODEL_SPARSITY, MODEL_CAPACITY, v.precision, v.kernels]
                    key += [kind, threads, DECODE_POSITION]
                    key += [] if v.isa == BASE_ISA else [v.isa]
                    nbytes = layer_bytes if kind == "decode" else 0
                    self.items[name] = Item(name, json.dumps(key), nbytes)
            self.log(f"{v.name}: compiled ({time.perf_counter() - t0:.0f} s)")
        if timing:
            self._steps = StepTiming(libraries)

    def _timer(self, name: str):
        if name not in self.items:
            raise KeyError(f"no timed item {name!r}")
        return self._steps if ":" in name else self._linear[name]

    def prepare(self, name: str) -> None:
        self._timer(name).prepare(name)

    def time(self, name: str, reps: int) -> float:
        """Fastest of ``reps`` runs of item ``name``, in seconds per call."""
        return self._timer(name).time(name, reps)

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
        self._tmp.cleanup()
