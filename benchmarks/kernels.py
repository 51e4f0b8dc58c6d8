"""Linear-kernel benchmark on SmolLM2-135M shapes (llm.c style: check, then time).

For each shape, sparsity and format: pack random weights, check the kernel against
``reference_linear`` and numpy, then time it (median of --reps, weights replicated past
L2 on huge pages so they stream from memory as in a model step) and print a table with
the GB/s of weight bytes and the 70%-sparse speedups over dense. Then the whole
30-layer linear stack of SmolLM2 (q,k,v,o,gate,up,down per layer, distinct weight
copies, 106M weights) per format, against numpy fp32.

    .venv/bin/python benchmarks/kernels.py --threads 2 [--target avx2]
    .venv/bin/python benchmarks/kernels.py --threads 1 --skip-stack --expand register
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import mmap
import os
import statistics
import sys
import time
from pathlib import Path


def _threads_arg() -> str:
    for i, a in enumerate(sys.argv):
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
        if a == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return "2"


# numpy's BLAS baseline gets the same thread count (must precede the numpy import; an
# oversubscribed OpenBLAS on a busy 2-core machine is 10-100x slower than it should be).
os.environ.setdefault("OPENBLAS_NUM_THREADS", _threads_arg())

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsec.codegen.autotune import LinearLibrary  # noqa: E402
from sparsec.codegen.host_tuning import host_tuned  # noqa: E402
from sparsec.codegen.linear import LINEAR_FORMATS, pack_linear, reference_linear  # noqa: E402
from sparsec.codegen.quantize import quantized_row_bytes  # noqa: E402
from sparsec.codegen.target import ISAS, host_cpu_model, host_target  # noqa: E402
from sparsec.codegen.tuning import SPARSE_EXPANDS  # noqa: E402

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
# one decoder layer: q, k, v, o, gate, up, down
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
N_LAYERS = 30
SPARSITIES = (0.0, 0.5, 0.7, 0.9)
WORKING_SET = 64 << 20
pack = pack_linear  # main() binds the --target ISA


def random_weight(rng, shape, sparsity):
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if sparsity > 0:
        w[rng.random(shape) < sparsity] = 0.0
    return w


class Buffers:
    def __init__(self, n_tokens, in_features, out_features, rng):
        self.x = rng.standard_normal((n_tokens, in_features)).astype(np.float32)
        self.y = np.zeros((n_tokens, out_features), np.float32)
        self.xq = np.zeros((n_tokens, quantized_row_bytes(in_features)), np.uint8)
        self.xs = np.zeros(n_tokens, np.float32)


def check(lib, name, packed, w, rng, threads):
    """Max relative error vs reference_linear and vs numpy, at 1 and 7 tokens."""
    errs = []
    for n in (1, 7):
        b = Buffers(n, packed.in_features, packed.out_features, rng)
        lib.run(name, b.x, b.y, nthreads=threads, data=packed.data)
        ref = reference_linear(packed, b.x)
        scale = np.abs(ref).max() + 1e-30
        errs.append(float(np.abs(b.y - ref).max() / scale))
        exact = b.x @ w.T
        errs.append(float(np.abs(b.y - exact).max() / (np.abs(exact).max() + 1e-30)))
    ref_err, np_err = max(errs[0::2]), max(errs[1::2])
    tol = 1e-5
    if ref_err > tol:
        raise SystemExit(f"FAILED {name} {packed.fmt}: error vs reference {ref_err:.2e}")
    return ref_err, np_err


class Arena:
    """WORKING_SET bytes for the weight replicas, on 2 MiB huge pages when asked (as the
    runtime holds a model's weights: separate 4 KiB-page copies time the sparse kernels
    20-40% apart between runs, docs/experiments/register-expand.md)."""

    def __init__(self, huge: bool):
        self.map = mmap.mmap(-1, WORKING_SET + (2 << 20))
        if huge and hasattr(mmap, "MADV_HUGEPAGE"):
            self.map.madvise(mmap.MADV_HUGEPAGE)
        raw = np.frombuffer(self.map, np.uint8)
        start = -raw.ctypes.data % (2 << 20)
        self.bytes = raw[start : start + WORKING_SET]

    def replicas(self, data: np.ndarray) -> list[np.ndarray]:
        if data.nbytes > WORKING_SET:
            return [data.copy()]  # streams from memory as it is (the LM head)
        stride = -(-data.nbytes // 4096) * 4096
        copies = max(1, min(256, WORKING_SET // stride))
        out = []
        for c in range(copies):
            view = self.bytes[c * stride : c * stride + data.nbytes]
            view[:] = data
            out.append(view)
        return out


def time_layer(lib, name, packed, rng, threads, reps, arena, n_tokens=1):
    blobs = arena.replicas(packed.data)
    copies = len(blobs)
    b = Buffers(n_tokens, packed.in_features, packed.out_features, rng)
    calls = []
    for blob in blobs:
        kernel_calls = lib.calls(name, blob, b.x, b.y, b.xq, b.xs)
        calls.append(kernel_calls[-1])  # the linear kernel only (quantize timed apart)
    if packed.precision == "int8":  # quantized activations must be valid
        lib.time_calls(lib.calls(name, blobs[0], b.x, b.y, b.xq, b.xs)[:1], n_tokens, 1, 1)
    lib.time_calls(calls, n_tokens, threads, 1)
    return statistics.median(lib.time_calls(calls, n_tokens, threads, reps)) / copies


def bench_shapes(args, rng):
    print(
        f"\n## per-layer kernels, {args.threads} thread(s), decode (1 token), median of "
        f"{args.reps}, weights streamed (working set {WORKING_SET >> 20} MB)"
    )
    print(f"{'shape':>11} {'sparsity':>8} | " + " | ".join(f"{f:>20}" for f in LINEAR_FORMATS))
    worst = {f: 0.0 for f in LINEAR_FORMATS}
    speedups = {}
    arena = Arena(args.huge_pages)
    for shape in SHAPES:
        if shape[0] > 10000 and not args.lm_head:
            continue
        t0 = time.perf_counter()
        libs = {
            f: LinearLibrary([("lin", pack(np.zeros(shape, np.float32), f))], 16, tgt=args.tgt)
            for f in LINEAR_FORMATS
        }
        ratios = {}
        compile_s = time.perf_counter() - t0
        # lm_head (tied embeddings) stays dense in practice; packing it 16 ways is slow
        for sp in SPARSITIES if shape[0] < 10000 else (0.0,):
            w = random_weight(rng, shape, sp)
            cells, times = [], {}
            for f in LINEAR_FORMATS:
                packed = pack(w, f)
                ref_err, _ = check(libs[f], "lin", packed, w, rng, args.threads)
                worst[f] = max(worst[f], ref_err)
                t = time_layer(libs[f], "lin", packed, rng, args.threads, args.reps, arena)
                times[f] = t
                cells.append(f"{t * 1e6:7.1f}us {packed.data.nbytes / t / 1e9:6.1f}GB/s")
            print(f"{shape[0]:>5}x{shape[1]:<5} {sp:>8.1f} | " + " | ".join(cells))
            if sp == 0.7:
                ratios = {p: times[f"dense_{p}"] / times[f"bitmask_{p}"] for p in ("f32", "i8")}
        print(f"{'':>11} compile of the 4 kernels: {compile_s:.2f} s")
        if ratios:
            speedups[shape] = ratios
    print(
        "max relative error vs reference_linear: "
        + ", ".join(f"{f} {e:.1e}" for f, e in worst.items())
    )
    print("70% sparse over dense, same shape (the sparse-kernels issue: int8 1.6x, fp32 1.8x):")
    for (o, i), r in speedups.items():
        print(f"  {o}x{i}: int8 {r['i8']:.2f}x, fp32 {r['f32']:.2f}x")


def bench_stack(args, rng):
    n = args.tokens
    print(
        f"\n## SmolLM2 linear stack ({N_LAYERS} layers x 7, 106M weights), {n} token(s), "
        f"{args.threads} thread(s), median of {args.reps}"
    )
    shapes = sorted(set(LAYER))
    layer_w = {s: random_weight(rng, s, 0.0) for s in shapes}
    stack_w = [(s, layer_w[s].copy()) for _layer in range(N_LAYERS) for s in LAYER]
    xs = {s[1]: rng.standard_normal((n, s[1])).astype(np.float32) for s in shapes}
    times = []
    for _ in range(max(3, args.reps // 3)):
        t0 = time.perf_counter()
        for s, w in stack_w:
            xs[s[1]] @ w.T
        times.append(time.perf_counter() - t0)
    del stack_w
    base = statistics.median(times)
    print(
        f"numpy fp32 x @ W.T (OpenBLAS, {os.environ['OPENBLAS_NUM_THREADS']} threads): "
        f"{base * 1e3:7.2f} ms"
    )
    for sp in SPARSITIES:
        row = []
        for f in LINEAR_FORMATS:
            if sp == 0.0 and f.startswith("bitmask") and not args.all:
                row.append(f"{f} {'-':>6}")
                continue
            packs = {s: pack(random_weight(rng, s, sp), f) for s in shapes}
            kernels = [(f"l{o}x{i}", packs[(o, i)]) for o, i in shapes]
            lib = LinearLibrary(kernels, n, tgt=args.tgt)
            bufs = {s: Buffers(n, s[1], s[0], rng) for s in shapes}
            calls = []
            keep = []
            for _layer in range(N_LAYERS):
                for s in LAYER:
                    blob = packs[s].data.copy()
                    keep.append(blob)
                    b = bufs[s]
                    c = lib.calls(f"l{s[0]}x{s[1]}", blob, b.x, b.y, b.xq, b.xs)
                    calls.append(c[-1])
            for s in shapes:  # valid quantized activations for the int8 kernels
                b = bufs[s]
                qc = lib.calls(f"l{s[0]}x{s[1]}", packs[s].data, b.x, b.y, b.xq, b.xs)
                lib.time_calls(qc, n, 1, 1)
            lib.time_calls(calls, n, args.threads, 1)
            ts = lib.time_calls(calls, n, args.threads, args.reps)
            t = statistics.median(ts)
            nbytes = sum(k.nbytes for k in keep)
            row.append(
                f"{f} {t * 1e3:6.2f}ms (best {ts.min() * 1e3:6.2f}, {nbytes / t / 1e9:4.1f}GB/s, "
                f"{base / t:4.1f}x)"
            )
            del keep, calls, lib
        print(f"sparsity {sp:.1f}: " + " | ".join(row))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=1, help="tokens per step in the stack run")
    ap.add_argument("--no-lm-head", dest="lm_head", action="store_false")
    ap.add_argument("--skip-shapes", action="store_true")
    ap.add_argument("--skip-stack", action="store_true")
    ap.add_argument("--all", action="store_true", help="also bitmask formats at sparsity 0")
    ap.add_argument(
        "--target",
        choices=("auto", *ISAS),
        default="auto",
        help="instruction set of the kernels (default auto: the best this CPU runs)",
    )
    ap.add_argument(
        "--expand",
        choices=("host", "table", *SPARSE_EXPANDS),
        default="host",
        help="how the bitmask kernels expand their nonzeros (Tuning.sparse_expand): host "
        "= what `sparsec compile` measures on this CPU (cached), table = tuning.py's "
        "value, memory/register = forced (default host)",
    )
    ap.add_argument(
        "--no-huge-pages",
        dest="huge_pages",
        action="store_false",
        help="per-layer weights on 4 KiB pages instead of 2 MiB ones (the runtime's)",
    )
    args = ap.parse_args()
    args.tgt = host_target(args.target)
    if args.expand == "host":
        args.tgt = host_tuned(args.tgt)
    elif args.expand != "table" and args.tgt.isa.sparse_decode == "expand":
        tuning = args.tgt.tuning
        forced = {fmt: args.expand for fmt in tuning.sparse_expand}
        args.tgt = dataclasses.replace(
            args.tgt, measured=dataclasses.replace(tuning, sparse_expand=forced)
        )
    global pack
    pack = functools.partial(pack_linear, isa=args.tgt.isa)
    expand = args.tgt.describe()["tuning"]
    print(
        f"target {args.tgt.isa.name}, cpu {args.tgt.cpu} ({host_cpu_model()}), sparse expand "
        f"{expand['sparse_expand']} ({expand['source']})"
    )
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if not args.skip_shapes:
        bench_shapes(args, rng)
    if not args.skip_stack:
        bench_stack(args, rng)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
