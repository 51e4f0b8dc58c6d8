"""The fixtures every run mutates, built once per sparsec source and cached.

``ensure_cache()`` returns a folder holding:

- ``hf/``: the tiny random Llama (``sparsec.testing.make_tiny_llama(seed=0)``) as a
  Hugging Face folder (sparsify's input) and ``text.txt`` (its data);
- ``opt.onnx``: the optimized contract graph of that model (``build_contract_graph``);
- ``export.onnx``: its raw ``sparsec export`` graph, ``export.opt.onnx`` optimized;
- compiled artifacts (``kernels="dense"`` unless named: no autotune timing):
  ``fp32.so`` (max context 64), ``int8.so`` (32), ``fp32_bitmask48.so`` (48, bitmask
  kernels), ``layers1.so`` (a one-layer model, 64), ``long.so`` (fp32, 256: the CLI's
  long generations);
- ``done``: written last.

The key is a hash of sparsec's sources and this file, so a change to the product
rebuilds it (about 20 s: the export takes most of it). It is built in a fresh
``python -m fuzz.build`` process, so torch never loads into the warm parent that forks
the cases. Older keys are removed: the cache holds one build.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO / "build" / "fuzz-cache"

ARTIFACTS = {
    # name: (graph, precision, kernels, max_context)
    "fp32": ("opt.onnx", "fp32", "dense", 64),
    "int8": ("opt.onnx", "int8", "dense", 32),
    "fp32_bitmask48": ("opt.onnx", "fp32", "bitmask", 48),
    "layers1": ("layers1.onnx", "fp32", "dense", 64),
    "long": ("opt.onnx", "fp32", "dense", 256),
}

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
) * 30


KEEP_SECONDS = 4 * 3600


def source_key() -> str:
    import sparsec

    h = hashlib.sha256()
    root = Path(sparsec.__file__).parent
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".c", ".h", ".json") and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def ensure_cache(root: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    root = Path(root or os.environ.get("SPARSEC_FUZZ_CACHE") or DEFAULT_ROOT)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / source_key()
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "done").exists():
            return folder
        # Older builds go, but not one a run started in the last hours may still use
        # (a --replay after an edit builds anew while a long run goes on).
        for old in root.iterdir():
            stale = time.time() - old.stat().st_mtime > KEEP_SECONDS
            if old.is_dir() and old != folder and stale:
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        if not quiet:
            print(f"fuzz: building fixtures in {folder} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "fuzz.build", str(folder)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0 or not (folder / "done").exists():
            raise RuntimeError(
                f"building the fuzz fixtures failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-4000:]}"
            )
        if not quiet:
            print(
                f"fuzz: fixtures built in {time.monotonic() - start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    return folder


def build(folder: Path) -> None:
    import onnx_ir as ir

    from sparsec.codegen.compile import compile_model
    from sparsec.export import export_model
    from sparsec.models import save_model
    from sparsec.passes import optimize_file
    from sparsec.testing import build_contract_graph, make_tiny_llama

    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer = make_tiny_llama(seed=0)
    save_model(model, tokenizer, folder / "hf")
    (folder / "text.txt").write_text(TEXT)
    ir.save(build_contract_graph(model, tokenizer), folder / "opt.onnx")
    one, tok1 = make_tiny_llama(seed=3, num_hidden_layers=1)
    ir.save(build_contract_graph(one, tok1), folder / "layers1.onnx")
    export_model(model, tokenizer, folder / "export.onnx", source="tiny")
    optimize_file(folder / "export.onnx", folder / "export.opt.onnx")
    for name, (graph, precision, kernels, ctx) in ARTIFACTS.items():
        compile_model(
            folder / graph,
            folder / f"{name}.so",
            precision=precision,
            kernels=kernels,
            max_context=ctx,
            threads=2,
            quiet=True,
        )
    (folder / "done").write_text("ok\n")


if __name__ == "__main__":
    build(Path(sys.argv[1]))
