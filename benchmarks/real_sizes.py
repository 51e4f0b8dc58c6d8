"""Real sizes (issue 22): Llama-3.2-1B, Llama-3.2-3B and Llama-2-7B-shaped models through
every stage on this machine, measured.

Each model gets random weights at its real configuration (transformers' ``LlamaConfig``),
written as Hugging Face ships them: bf16 safetensors in shards of about 2 GB. Speed,
memory and file sizes do not depend on the weights' values; the 70% variant zeroes the
70% smallest-magnitude weights of every decoder Linear (a threshold on |w| from the
normal distribution they were drawn from). Every stage runs as its own process
(``sparsec export/optimize/compile/build``): wall time and peak RSS (the child's
``ru_maxrss``), and the size of what it wrote. Then decode at 2 threads, in the same run
as the read-bandwidth probe and llama.cpp's ``llama-bench`` on Q8_0 and Q4_0 GGUFs
written from the same checkpoint (``sparsec.gguf_writer``, every 2-D weight in the
type, as ``llama-quantize --pure`` would).

  .venv/bin/python benchmarks/real_sizes.py --sizes 1b,3b,7b \\
      --llama-bench /path/to/llama.cpp/build/bin/llama-bench --json out/real_sizes.json

Disk: a size's checkpoint, its .so files and GGUFs are removed before the next size
(``--keep`` keeps them). The 7B's bf16 checkpoint is 13.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES = {
    "1b": (
        "Llama-3.2-1B",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            max_position_embeddings=131072,
        ),
    ),
    "3b": (
        "Llama-3.2-3B",
        dict(
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            max_position_embeddings=131072,
        ),
    ),
    "7b": (
        "Llama-2-7B",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            head_dim=128,
            vocab_size=32000,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            max_position_embeddings=4096,
        ),
    ),
    # The sparse fine-tuning paper's model (Kurtic et al. 2023): MPT-7B's config.json.
    "mpt-7b": (
        "MPT-7B",
        dict(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432, max_seq_len=2048),
    ),
    "mpt-smoke": ("tiny MPT", dict(d_model=256, n_heads=4, n_layers=2, vocab_size=1000)),
    "smoke": (  # the script's own quick check
        "tiny",
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            vocab_size=1000,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=LLAMA3_ROPE,
            max_position_embeddings=16384,
        ),
    ),
}
INIT_STD = 0.02  # transformers' initializer_range
SHARD_BYTES = 2 << 30
CONTEXT = 4096  # --max-context of every build (Llama 3's 131072 would be a 4 GB+ KV cache)


def context(size: str) -> int:
    """The builds' --max-context: CONTEXT, or less where the model ends sooner (MPT's
    ALiBi table: max_seq_len, 2048 by default)."""
    values = SHAPES[size][1]
    return min(CONTEXT, values.get("max_position_embeddings", values.get("max_seq_len", 2048)))


PROMPT = 32
DECODE = 64
REPS = 3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the checkpoint ------------------------------------------------------------------------


def bench_tokenizer():
    """sparsec.testing's byte-level tokenizer plus one merge: llama.cpp refuses a BPE
    vocabulary without merges. (The vocabulary is far smaller than the models'; their
    other ids are never produced by the tokenizer, which decode speed does not mind.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from sparsec.testing import CHAT_TEMPLATE, SPECIAL_TOKENS

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["th"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("t", "h")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    bos = tok.token_to_id(SPECIAL_TOKENS[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS[0]} $A", special_tokens=[(SPECIAL_TOKENS[0], bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[1],
        pad_token=SPECIAL_TOKENS[1],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_checkpoint(
    size: str, folder: Path, sparsity: float, seed: int = 0, layers: int | None = None
) -> dict:
    """A random bf16 checkpoint of ``size`` in ``folder`` (sharded safetensors + index,
    config, generation config, byte-level tokenizer)."""
    from statistics import NormalDist

    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, MptConfig

    from sparsec.sparsify.layer_walk import prunable_linears

    start = time.perf_counter()
    tokenizer = bench_tokenizer()
    mpt = size.startswith("mpt")
    layer_key = "n_layers" if mpt else "num_hidden_layers"
    config = (MptConfig if mpt else LlamaConfig)(
        **{**SHAPES[size][1], **({layer_key: layers} if layers else {})},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="bfloat16",
    )
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    names = dict(skeleton.named_parameters())
    prunable = {f"{n}.weight" for n in prunable_linears(skeleton)}
    if config.tie_word_embeddings:  # stored once, as save_pretrained does
        names.pop("lm_head.weight", None)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    threshold = INIT_STD * NormalDist().inv_cdf((1 + sparsity) / 2) if sparsity else 0.0
    shard: dict = {}
    shard_bytes, weight_map, files = 0, {}, []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    total = 0
    for name, param in names.items():
        shape = tuple(param.shape)
        if len(shape) == 1:
            values = np.ones(shape, np.float32)
        else:
            values = rng.standard_normal(shape, dtype=np.float32) * np.float32(INIT_STD)
            if threshold and name in prunable:
                values[np.abs(values) < threshold] = 0.0
        shard[name] = torch.from_numpy(values).to(torch.bfloat16)
        del values
        shard_bytes += shard[name].numel() * 2
        total += shard[name].numel()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {
        "parameters": total,
        "bytes": sum((folder / f).stat().st_size for f in files),
        "seconds": round(time.perf_counter() - start, 1),
    }


# --- stages --------------------------------------------------------------------------------


def run_stage(name: str, argv: list[str], outputs: list[Path]) -> dict:
    """Run one stage as its own process: wall time, peak RSS, what it wrote."""
    log(f"{name}: {' '.join(argv)}")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    anon = AnonSampler(proc.pid)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    anon.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    written = sum(_size(p) for p in outputs)
    row = {
        "stage": name,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
        "peak_anon_gb": round(anon.peak / 1e9, 2),
        "written_gb": round(written / 1e9, 2),
        "rc": proc.returncode,
        "tail": output.strip().splitlines()[-3:],
    }
    log(
        f"{name}: rc {row['rc']}, {row['seconds']} s, peak RSS {row['peak_rss_gb']} GB "
        f"(anonymous {row['peak_anon_gb']} GB)"
    )
    if proc.returncode:
        log(output[-3000:])
    return row


class AnonSampler:
    """Peak RssAnon of a process, sampled every 20 ms: the memory it owns. ``ru_maxrss``
    also counts the pages of files it maps (weights read from a data file), which the
    kernel can drop and re-read."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak, self._done = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.02):
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    total = path.stat().st_size if path.exists() else 0
    return total + sum(p.stat().st_size for p in path.parent.glob(f"{path.name}.*.data"))


def sparsec(*args) -> list[str]:
    return [sys.executable, "-m", "sparsec", *map(str, args)]


# --- decode ------------------------------------------------------------------------------


DECODE_SCRIPT = """
import json, statistics, sys, time
from sparsec import runtime
m = runtime.load(sys.argv[1], threads=2, verify=False)
ids = list(range(40, 40 + {prompt}))
rates = []
for _ in range({reps}):
    m.reset()
    logits = m.forward(ids, all_logits=False)
    token = int(logits.argmax())
    start = time.perf_counter()
    for _ in range({decode}):
        token = int(m.forward([token], all_logits=False).argmax())
    rates.append({decode} / (time.perf_counter() - start))
layers = sum(layer["bytes"] for layer in m.manifest["layers"])
print(json.dumps({{"tok_s": statistics.median(rates), "bytes_per_token": layers}}))
"""


def sparsec_decode(so: Path) -> dict:
    script = DECODE_SCRIPT.format(prompt=PROMPT, reps=REPS, decode=DECODE)
    out = subprocess.run(
        [sys.executable, "-c", script, str(so)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_decode(bench: str, gguf: Path) -> dict:
    out = subprocess.run(
        [bench, "-m", str(gguf), "-p", "0", "-n", str(DECODE), "-t", "2", "-r", str(REPS)]
        + ["-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)
    return {"tok_s": float(rows[0]["avg_ts"]), "bytes_per_token": gguf_bytes_per_token(gguf)}


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of the weights a decode step reads: every tensor but the embedding table,
    which is read whole only when it is also the output layer (tied)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors["token_embd.weight"]
    return total


def wait_until_idle(limit_s: float = 1200.0) -> float:
    """Decode timings need the machine to themselves: wait (at most ``limit_s``) until
    the 1-minute load average, which counts this script's finished stages too, falls
    below 0.7; returns the load average the timings start at."""
    deadline = time.monotonic() + limit_s
    while True:
        load = float(Path("/proc/loadavg").read_text().split()[0])
        if load < 0.7 or time.monotonic() > deadline:
            return load
        time.sleep(10)


def probe() -> float:
    from sparsec.bench.bandwidth import ReadBandwidthProbe

    return ReadBandwidthProbe().measure(nthreads=2).median


# --- one size ------------------------------------------------------------------------------


def check_truncated(size: str, work: Path, layers: int = 2) -> dict:
    """Where PyTorch float32 and a float32 .so of the whole model do not fit beside each
    other (3B, 7B): the same shape cut to ``layers`` decoder layers (every width, the
    vocabulary, head_dim and the KV-head layout as at full size) through `sparsec build`
    in fp32, its teacher-forced logits against PyTorch's on the same bf16 checkpoint."""
    ckpt, so = work / f"{size}-{layers}layers", work / f"{size}-{layers}layers.so"
    write_checkpoint(size, ckpt, 0.0, seed=1, layers=layers)
    argv = sparsec("build", ckpt, "-o", so, "--max-context", str(context(size)))
    row = run_stage(f"{layers}-layer build fp32", argv, [so])
    result = check_against_pytorch(ckpt, so) if row["rc"] == 0 else {"error": row["tail"]}
    shutil.rmtree(ckpt)
    _remove(so)
    return {"layers": layers, **result}


def measure_size(size: str, work: Path, args) -> dict:
    name = SHAPES[size][0]
    result: dict = {"size": size, "shape": name, "stages": [], "decode": {}}
    stages = result["stages"]
    if size in args.check_truncated:
        result["fp32_vs_pytorch_truncated"] = check_truncated(size, work)
        log(f"truncated check: {result['fp32_vs_pytorch_truncated']}")
    for sparsity in args.sparsities:
        tag = f"s{int(sparsity * 100):02d}"
        ckpt = work / f"{size}-{tag}"
        log(f"{name} {tag}: writing the bf16 checkpoint")
        result[f"checkpoint_{tag}"] = write_checkpoint(size, ckpt, sparsity)
        log(f"checkpoint {result[f'checkpoint_{tag}']}")
        sos = {}
        if args.staged and size in args.staged:
            onnx, opt = work / f"{tag}.onnx", work / f"{tag}.opt.onnx"
            export = sparsec("export", ckpt, "-o", onnx, "--no-verify")
            stages.append(run_stage(f"{tag} export", export, [onnx]))
            stages.append(run_stage(f"{tag} optimize", sparsec("optimize", onnx, "-o", opt), [opt]))
            _remove(onnx)
            for precision in ("fp32", "int8"):
                so = work / f"{tag}-staged-{precision}.so"
                argv = sparsec("compile", opt, "-o", so, "--precision", precision)
                argv += ["--max-context", str(context(size))]
                stages.append(run_stage(f"{tag} compile {precision}", argv, [so]))
                sos[f"staged {precision}"] = so
            _remove(opt)
        for precision in args.precisions:
            if precision == "fp32" and size not in args.fp32_sizes:
                continue
            so = work / f"{tag}-{precision}.so"
            argv = sparsec("build", ckpt, "-o", so, "--precision", precision)
            argv += ["--max-context", str(context(size))]
            stages.append(run_stage(f"{tag} build {precision}", argv, [so]))
            sos[precision] = so
        if args.llama_bench:
            for gtype in ("q8_0", "q4_0"):
                gguf = work / f"{tag}-{gtype}.gguf"
                log(f"writing {gguf.name}")
                start = time.perf_counter()
                write_gguf(ckpt, gguf, gtype)
                stages.append(
                    {
                        "stage": f"{tag} gguf {gtype}",
                        "seconds": round(time.perf_counter() - start, 1),
                        "written_gb": round(_size(gguf) / 1e9, 2),
                    }
                )
                sos[f"llama.cpp {gtype}"] = gguf
        if args.check_fp32 and size in args.check_fp32 and sparsity == 0.0:
            result["fp32_vs_pytorch"] = check_against_pytorch(ckpt, sos.get("fp32"))
        if not args.keep:
            shutil.rmtree(ckpt)
        result["decode"][f"load_before_{tag}"] = wait_until_idle()
        bandwidth = probe()
        log(f"read-bandwidth probe, 2 threads: {bandwidth:.1f} GB/s")
        result["decode"][f"probe_{tag}_gbps"] = round(bandwidth, 2)
        for label, path in sos.items():
            if not path.exists():
                continue
            if label.startswith("llama.cpp"):
                row = llama_decode(args.llama_bench, path)
            else:
                row = sparsec_decode(path)
            of_probe = row["tok_s"] * row["bytes_per_token"] / 1e9 / bandwidth
            row["of_probe"] = round(float(of_probe), 3)
            row["tok_s"] = round(row["tok_s"], 2)
            result["decode"][f"{tag} {label}"] = row
            log(f"decode {tag} {label}: {row}")
            if not args.keep:
                _remove(path)
    return result


def write_gguf(ckpt: Path, out: Path, gtype: str) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from sparsec.gguf_writer import write_gguf_tensors
    from sparsec.hf_checkpoint import Checkpoint

    checkpoint = Checkpoint(ckpt)
    config = AutoConfig.from_pretrained(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    write_gguf_tensors(config, tokenizer, checkpoint.array, out, gtype)


def check_against_pytorch(ckpt: Path, so: Path | None) -> dict | None:
    """Teacher-forced logits of the compiled fp32 model against PyTorch float32 (both in
    memory at once: the 1B only)."""
    if so is None or not so.exists():
        return None
    script = f"""
import json, numpy as np, torch
from sparsec import runtime
from sparsec.models import load_model
ids = list(range(40, 40 + {PROMPT}))
model, _ = load_model({str(ckpt)!r}, quiet=True)
with torch.no_grad():
    ref = model(torch.tensor([ids])).logits[0].numpy()
del model
got = np.asarray(runtime.load({str(so)!r}, threads=2).forward(ids, all_logits=True))
err = float(np.abs(got - ref).max())
print(json.dumps({{"max_abs": err, "logits_max_abs": float(np.abs(ref).max()),
    "argmax_equal": int((got.argmax(-1) == ref.argmax(-1)).sum()), "positions": len(ids)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if out.returncode:
        log(out.stderr[-2000:])
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _remove(path: Path) -> None:
    for p in [path, *path.parent.glob(f"{path.name}.*.data")]:
        p.unlink(missing_ok=True)


def markdown(report: dict) -> str:
    """The README's tables from a report: stages, then decode."""
    lines = [
        f"CPU: {report['cpu']}",
        "",
        "| model | stage | wall s | peak RSS GB (anonymous) | written GB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for size in report["sizes"]:
        for ckpt in ("s00", "s70"):
            c = size.get(f"checkpoint_{ckpt}")
            if c:
                lines.append(
                    f"| {size['shape']} | {ckpt} bf16 checkpoint ({c['parameters'] / 1e9:.2f}B "
                    f"params) | {c['seconds']} | | {c['bytes'] / 1e9:.2f} |"
                )
        for row in size["stages"]:
            rss = row.get("peak_rss_gb", "")
            anon = f" ({row['peak_anon_gb']})" if "peak_anon_gb" in row else ""
            lines.append(
                f"| {size['shape']} | {row['stage']} | {row['seconds']} | {rss}{anon} | "
                f"{row['written_gb']} |"
            )
    lines += [
        "",
        "| model | system | tok/s | GB/token | of the probe | probe GB/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for size in report["sizes"]:
        decode = size["decode"]
        for key, row in decode.items():
            if not isinstance(row, dict):
                continue
            probe_gbps = decode.get(f"probe_{key.split()[0]}_gbps", "")
            lines.append(
                f"| {size['shape']} | {key} | {row['tok_s']} | "
                f"{row['bytes_per_token'] / 1e9:.3f} | {row['of_probe']:.0%} | {probe_gbps} |"
            )
    for size in report["sizes"]:
        for key in ("fp32_vs_pytorch", "fp32_vs_pytorch_truncated"):
            if size.get(key):
                lines.append(f"\n{size['shape']} {key}: {json.dumps(size[key])}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1b,3b,7b", help="comma list of 1b, 3b, 7b")
    ap.add_argument("--precisions", default="int8,fp32", help="sparsec build precisions")
    ap.add_argument("--sparsities", default="0,0.7", help="comma list of zeroed fractions")
    ap.add_argument(
        "--fp32-sizes", default="1b", help="sizes also built in fp32 (disk: 2x 4 B/param)"
    )
    ap.add_argument("--staged", default="1b", help="sizes also run through export/optimize/compile")
    ap.add_argument("--check-fp32", default="1b", help="sizes whose fp32 .so is checked")
    ap.add_argument(
        "--check-truncated",
        default="3b,7b",
        help="sizes checked against PyTorch with 2 decoder layers (fp32)",
    )
    ap.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "real_sizes")
    ap.add_argument("--json", type=Path, default=ROOT / "out" / "real_sizes.json")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints, models, GGUFs")
    ap.add_argument(
        "--markdown", action="store_true", help="print the tables of --json's report and exit"
    )
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.json.read_text())))
        return 0
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.sparsities = [float(x) for x in args.sparsities.split(",") if x]
    args.fp32_sizes = set(args.fp32_sizes.split(","))
    args.staged = set(args.staged.split(",")) if args.staged else set()
    args.check_fp32 = set(args.check_fp32.split(",")) if args.check_fp32 else set()
    args.check_truncated = set(args.check_truncated.split(",")) if args.check_truncated else set()
    args.work.mkdir(parents=True, exist_ok=True)
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        "unknown",
    )
    report = {"cpu": cpu, "sizes": []}
    if args.json.exists():
        old = json.loads(args.json.read_text())
        report["sizes"] = [s for s in old.get("sizes", []) if s["size"] not in args.sizes]
    for size in args.sizes.split(","):
        report["sizes"].append(measure_size(size, args.work, args))
        args.json.write_text(json.dumps(report, indent=1))
    log(f"wrote {args.json}")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
