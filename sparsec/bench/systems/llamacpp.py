"""llama.cpp through llama-cpp-python (an optional extra: it builds from source) on a
GGUF written from the variant's weights.

F32/F16 GGUFs are written by ``sparsec.gguf_writer`` with the ``gguf`` package;
Q8_0/Q4_0/Q4_1 are made from the F32 file by llama.cpp's own quantizer with its
default choices (so the output layer may get a different type, as for any llama.cpp
user). Q8_0 and Q4_0 keep exact zeros (their blocks are scale * int); Q4_1 adds a
per-block minimum, so its zeros become small nonzeros and it no longer runs the same
weights.
"""

from __future__ import annotations

import numpy as np

from sparsec.bench import variants
from sparsec.bench.systems.base import System, Unavailable

INSTALL_HINT = (
    "install the optional extra: pip install llama-cpp-python (builds llama.cpp from "
    "source, several minutes)"
)
_FTYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
}


def _import():
    try:
        import llama_cpp
    except ImportError as exc:
        raise Unavailable(f"llama-cpp-python is not installed ({exc}); {INSTALL_HINT}") from exc
    except OSError as exc:  # the package is there but its shared library does not load
        raise Unavailable(
            f"llama-cpp-python is installed but its library fails to load: "
            f"{exc}; reinstall it: {INSTALL_HINT}"
        ) from exc
    return llama_cpp


def build_isa(llama_cpp) -> str:
    """The widest x86 vector ISA this llama.cpp build uses ("avx512 build"), from its
    system info ("AVX2 = 1 | ... | AVX512 = 1"): the report says what it was built for."""
    try:
        info = llama_cpp.llama_print_system_info().decode(errors="replace")
    except (AttributeError, OSError):
        return "build unknown"
    flags = {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in info.split("|"))}
    for isa in ("AVX512", "AVX2", "AVX"):
        if flags.get(isa) == "1" or flags.get(f"CPU : {isa}") == "1":
            return f"{isa.lower()} build"
    return "no-AVX build"


def quantize_gguf(src, out, gtype: str) -> None:
    """llama.cpp's quantizer (llama_model_quantize), default parameters, 2 threads."""
    llama_cpp = _import()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[gtype])
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise Unavailable(f"llama.cpp could not quantize {src} to {gtype.upper()} (code {rc})")


class LlamaCppSystem(System):
    engine = "llama.cpp"
    kv_bytes_per_value = 2  # llama.cpp's default KV cache type is f16

    def __init__(self, variant, gtype: str, max_context: int):
        super().__init__(variant, f"llama.cpp {gtype.upper()}")
        self.gtype = gtype
        self.weights_format = gtype.upper()
        self.precision = {"f32": "fp32", "f16": "fp16", "q8_0": "int8"}.get(gtype, "int4")
        self.max_context = max_context
        self.llm = None
        self._weight_bytes = 0
        self.keeps_zeros = variants.GGUF_KEEPS_ZEROS[gtype]

    def prepare(self) -> None:
        llama_cpp = _import()
        self.version = f"llama-cpp-python {llama_cpp.__version__} ({build_isa(llama_cpp)})"
        path = variants.gguf_file(self.variant, self.gtype)
        self.artifact = str(path)
        self._weight_bytes = _gguf_weight_bytes(path, self.variant.model.config)
        _preflight(self.artifact, self.gtype)  # a crash costs a subprocess, not the run
        self._open(1)  # fails here, not mid-measurement, if llama.cpp rejects the file

    def _open(self, threads: int) -> None:
        llama_cpp = _import()
        try:
            self.llm = llama_cpp.Llama(
                model_path=self.artifact,
                n_ctx=self.max_context,
                n_batch=512,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=False,
                verbose=False,
            )
        except ValueError as exc:
            reason = _load_error(self.artifact) or str(exc)
            raise Unavailable(f"llama.cpp cannot load {self.artifact}: {reason}") from exc
        self.n_vocab = self.llm.n_vocab()

    def _load(self, threads: int) -> None:
        if self.llm is None:
            self._open(threads)
        else:
            _import().llama_set_n_threads(self.llm.ctx, threads, threads)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
            self.threads = None

    def _reset(self) -> None:
        self.llm.reset()

    def _forward_last(self, ids) -> np.ndarray:
        self.llm.eval(ids)
        ptr = self.llm._ctx.get_logits_ith(-1)  # the last token's logits (not copied)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def weight_bytes_per_token(self) -> int:
        return self._weight_bytes


_PREFLIGHT = """
import sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval([1, 2])
"""
AMX_HINT = (
    " This CPU reports AMX: llama.cpp built with -march=native runs Q4_0/Q4_1/Q8_0 on AMX "
    "tiles, which fault on some machines (seen: a general protection fault in ldtilecfg "
    "in a VM); rebuild without AMX: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX512=ON "
    "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF "
    "-DGGML_AMX_INT8=OFF' pip install --force-reinstall --no-cache-dir llama-cpp-python"
)


def _preflight(path: str, gtype: str) -> None:
    """Load the GGUF and evaluate two tokens in a child process: llama.cpp builds can
    crash on a CPU (signal, no exception), and that must not end the whole benchmark."""
    import signal
    import subprocess
    import sys

    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PREFLIGHT, path],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise Unavailable(f"llama.cpp did not finish 2 tokens of {path} in 300 s") from exc
    if proc.returncode < 0:
        from sparsec.codegen.target import host_cpu_flags

        name = signal.Signals(-proc.returncode).name
        hint = AMX_HINT if gtype.startswith("q") and "amxtile" in host_cpu_flags() else ""
        raise Unavailable(
            f"llama.cpp crashed ({name}) evaluating {path} with this llama-cpp-python build.{hint}"
        )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
        raise Unavailable(f"llama.cpp cannot load {path}: {_load_error(path) or tail[0]}")


def _load_error(path: str) -> str:
    """llama.cpp's own error lines for a failed load: load again (vocabulary only, cheap)
    with its log on. The log reaches Python's sys.stderr (llama-cpp-python's callback)
    or, from native code, file descriptor 2: both are captured."""
    import contextlib
    import io
    import os
    import tempfile

    llama_cpp = _import()
    text = io.StringIO()
    with tempfile.TemporaryFile(mode="w+") as native:
        saved = os.dup(2)
        os.dup2(native.fileno(), 2)
        try:
            with contextlib.redirect_stderr(text):
                llama_cpp.Llama(model_path=path, vocab_only=True, verbose=True)
        except ValueError:
            pass
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        native.seek(0)
        lines = text.getvalue().splitlines() + native.read().splitlines()
    errors = [ln.strip() for ln in lines if "error" in ln.lower()]
    return "; ".join(dict.fromkeys(errors))


def _gguf_weight_bytes(path, config) -> int:
    """Every 2-D tensor of the file is read per token, except the token embedding: one
    row of it, unless the embeddings are tied (then it is the output matrix too)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    total = 0
    for t in reader.tensors:
        if len(t.shape) < 2:
            continue
        nbytes = int(t.n_bytes)
        if t.name == "token_embd.weight" and not config.tie_word_embeddings:
            nbytes = nbytes // config.vocab_size
        total += nbytes
    return total
