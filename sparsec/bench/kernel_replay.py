"""One side of the A/B kernel check: this checkout's kernel suite, built and timed on request.

    python -m sparsec.bench.kernel_replay --out DIR [--only REGEX] [--emitter FILE:FUNC]

``benchmarks/kernel_regression.py --check`` starts this module twice, in the working
tree and in a checkout of the baseline commit, so each version builds its kernels with
its own code in its own process (tinygrad's process replay, for CPU kernels). The
protocol is the contract between versions, so it stays small and versioned:

1. Build ``kernel_suite.Suite``; write ``DIR/functions.json`` (``{"protocol", "target_cpu",
   "fingerprints": {function: fingerprint}, "items": {name: {"key", "bytes"}}}``) and
   ``DIR/code.s`` (every function's assembly for the fixed cpu, sorted by name, each
   after a ``# ==== name`` line); then print one JSON line ``{"ready": PROTOCOL,
   "package": <the sparsec/__init__.py this process imported>}``.
2. Answer JSON lines on stdin, one JSON line each on stdout:
   ``{"op": "prepare", "item": NAME}`` -> ``{"ok": true}`` (buffers, warm-up);
   ``{"op": "time", "item": NAME, "reps": R}`` -> ``{"seconds": S}`` (fastest of R runs,
   per call); ``{"op": "quit"}`` or end of input -> exit. A failed request answers
   ``{"error": MESSAGE}``.

Everything else this process prints goes to stderr (the protocol owns stdout).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

PROTOCOL = 1
SEPARATOR = "# ==== "


def load_emitter(spec: str):
    """``FILE:FUNC`` -> the function FUNC of the Python file FILE."""
    path, _, func = spec.rpartition(":")
    if not path or not func:
        raise SystemExit(f"--emitter {spec!r}: expected FILE.py:FUNCTION")
    module_spec = importlib.util.spec_from_file_location("kernel_replay_emitter", path)
    if module_spec is None:
        raise SystemExit(f"--emitter {spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return getattr(module, func)
    except AttributeError:
        raise SystemExit(f"--emitter {spec!r}: {path} defines no {func}") from None


def write_outputs(suite, out: Path) -> None:
    from sparsec.bench.kernel_suite import FINGERPRINT_CPU

    out.mkdir(parents=True, exist_ok=True)
    items = {n: {"key": i.key, "bytes": i.nbytes} for n, i in suite.items.items()}
    data = {
        "protocol": PROTOCOL,
        "target_cpu": FINGERPRINT_CPU,
        "fingerprints": dict(sorted(suite.fingerprints.items())),
        "items": items,
    }
    (out / "functions.json").write_text(json.dumps(data, indent=1) + "\n")
    with open(out / "code.s", "w") as f:
        for name in sorted(suite.assembly):
            f.write(f"{SEPARATOR}{name}\n{suite.assembly[name]}")


def read_code(path: Path) -> dict[str, str]:
    """``code.s`` back into function -> assembly text."""
    texts: dict[str, str] = {}
    name = None
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith(SEPARATOR):
            name = line[len(SEPARATOR) :].strip()
            texts[name] = ""
        elif name is not None:
            texts[name] += line
    return texts


def serve(suite, requests, reply) -> None:
    for line in requests:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req["op"]
            if op == "quit":
                return
            if op == "prepare":
                suite.prepare(req["item"])
                reply({"ok": True})
            elif op == "time":
                reply({"seconds": suite.time(req["item"], int(req.get("reps", 1)))})
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception as exc:  # the client reports it; this side keeps serving
            traceback.print_exc(file=sys.stderr)
            reply({"error": f"{type(exc).__name__}: {exc}"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="where functions.json, code.s go")
    ap.add_argument("--only", default=None, help="regex: build only matching kernels/models")
    ap.add_argument("--emitter", default=None, help="FILE.py:FUNC emitting the linear kernels")
    ap.add_argument("--no-timing", action="store_true", help="write the outputs and exit")
    args = ap.parse_args(argv)
    # Stopped while building (the check was interrupted): exit through the finally
    # below, so the suite's temporary models are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    # The protocol owns file descriptor 1; whatever else writes there (prints, C code,
    # compilers) goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        protocol.write(json.dumps(obj) + "\n")

    from sparsec.bench.kernel_suite import Suite, emit_kernel

    emitter = load_emitter(args.emitter) if args.emitter else emit_kernel
    t0 = time.perf_counter()
    suite = Suite(only=args.only, emitter=emitter, log=lambda m: print(m, file=sys.stderr))
    try:
        suite.build(timing=not args.no_timing)
        write_outputs(suite, args.out)
        print(f"suite built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        import sparsec

        reply({"ready": PROTOCOL, "package": sparsec.__file__})
        if not args.no_timing:
            serve(suite, sys.stdin, reply)
    finally:
        suite.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
