"""`sparsec bench` on the tiny model: every engine runs the same greedy tokens, the report
follows its schema and its roofline arithmetic, comparators that cannot run are listed
with the reason, and bad arguments fail before anything slow happens."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from sparsec.bench import command
from sparsec.errors import SparsecError

NEW_TOKENS = 8


def _parse(argv):
    parser = argparse.ArgumentParser(prog="sparsec")
    command.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


@pytest.fixture(scope="module")
def bench_run(tiny_bpe_dir, tmp_path_factory):
    """One interleaved run: sparsec fp32/int8, PyTorch, onnxruntime fp32/int8 and
    llama.cpp F32 on the tiny model pruned to 50%, 1 thread."""
    out = tmp_path_factory.mktemp("bench")
    args = _parse(
        [
            str(tiny_bpe_dir),
            "--sparsity",
            "0.5",
            "--threads",
            "1",
            "--new-tokens",
            str(NEW_TOKENS),
            "--llama-types",
            "f32",
            "--probe-mb",
            "8",
            "--prompt",
            "The quick brown fox jumps over the lazy dog",
            "--cache-dir",
            str(out / "cache"),
            "--json",
            str(out / "r.json"),
            "--plot",
            str(out / "r.png"),
        ]
    )
    assert args.func(args) == 0
    return json.loads((out / "r.json").read_text()), out


def _result(report, system):
    return next(r for r in report["results"] if r["system"] == system)


def test_report_schema_and_settings(bench_run):
    report, _ = bench_run
    assert report["schema"] == "sparsec.bench/1"
    s = report["settings"]
    assert s["new_tokens"] == NEW_TOKENS and s["reps"] == 3 and s["threads"] == [1]
    (variant,) = report["model"]["variants"]
    assert variant["requested_sparsity"] == 0.5
    assert variant["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert len(variant["weights_hash"]) == 16
    assert report["machine"]["usable_cpus"] >= 1
    assert len(report["machine"]["load_average"]["before"]) == 3
    (bw,) = report["bandwidth"]
    assert bw["threads"] == 1 and bw["gbps_median"] > 0 and len(bw["samples"]) == 3
    for r in report["results"]:
        assert r["model_hash"] == variant["weights_hash"]  # same weights for everyone
        if r["status"] != "ok":
            continue
        d = r["decode_tokens_per_second"]
        assert len(d["samples"]) == 3 and d["min"] <= d["median"] <= d["max"]
        assert r["input_shapes"]["decode"] == [1, 1]


def test_every_fp32_engine_generates_pytorchs_greedy_tokens(bench_run):
    """The harness feeds every engine the same ids and reads its logits right: on the
    same fp32 weights all produce HF generate's tokens (int8 ones are approximations)."""
    report, _ = bench_run
    for system in ("sparsec fp32", "onnxruntime fp32"):
        match = _result(report, system)["tokens_match_reference"]
        assert match["reference"] == "torch eager fp32"
        assert match["matching_prefix"] == NEW_TOKENS, system


def test_llama_cpp_runs_or_is_reported_unavailable_with_the_reason(bench_run):
    report, _ = bench_run
    r = _result(report, "llama.cpp F32")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert r["status"] == "unavailable"
        assert "pip install llama-cpp-python" in r["reason"]
    else:
        # a GGUF of the same weights (Q/K permutation applied): the same greedy tokens
        assert r["status"] == "ok"
        assert r["tokens_match_reference"]["matching_prefix"] == NEW_TOKENS


def test_roofline_arithmetic_uses_the_compiled_layers(bench_run):
    report, _ = bench_run
    from sparsec.runtime.artifact import read_artifact

    cfg = report["model"]["config"]
    r = _result(report, "sparsec int8")
    manifest = read_artifact(r["artifact"]).manifest
    weights = sum(layer["bytes"] for layer in manifest["layers"]) + 4 * cfg["hidden_size"]
    roof = r["roofline"]
    assert roof["weight_bytes_per_token"] == weights
    avg_context = report["settings"]["prompt_tokens"] + NEW_TOKENS / 2
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
    assert roof["kv_bytes_per_token"] == int(kv * avg_context)
    gbps = roof["bytes_per_token"] * r["decode_tokens_per_second"]["median"] / 1e9
    assert roof["gbps"] == pytest.approx(gbps, abs=0.01)
    assert roof["percent_of_ceiling"] == pytest.approx(
        100 * roof["gbps"] / report["bandwidth"][0]["gbps_median"], abs=0.1
    )
    # int8 weights: about a quarter of the fp32 bytes (plus bitmasks, scales)
    fp32 = _result(report, "sparsec fp32")["roofline"]["weight_bytes_per_token"]
    assert roof["weight_bytes_per_token"] < 0.5 * fp32


def test_plot_is_a_png(bench_run):
    _, out = bench_run
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cached_artifacts_are_reused(bench_run, tiny_bpe_dir):
    report, out = bench_run
    so = _result(report, "sparsec fp32")["artifact"]
    from pathlib import Path

    mtime = Path(so).stat().st_mtime_ns
    from sparsec.bench import variants

    (v,) = variants.load_variants(str(tiny_bpe_dir), [0.5], out / "cache")
    assert v.weights_hash == report["model"]["variants"][0]["weights_hash"]
    path = variants.sparsec_library(v, "fp32", "auto", report["settings"]["max_context"])
    assert str(path) == so and path.stat().st_mtime_ns == mtime


def test_missing_llama_cpp_is_reported_not_skipped(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as when absent
    from sparsec.bench.runner import BenchOptions, build_systems
    from sparsec.bench.variants import load_variants

    vs = load_variants(str(tiny_model_dir), [0.0], tmp_path)
    opts = BenchOptions(
        model=str(tiny_model_dir),
        sparsities=[0.0],
        precisions=[],
        compare=["llama.cpp"],
        llama_types=["q8_0"],
        threads=[1],
    )
    systems, skipped = build_systems(opts, vs, 128)
    assert systems == []
    (sk,) = skipped
    assert sk.name == "llama.cpp Q8_0" and "pip install llama-cpp-python" in sk.reason


def test_gguf_llama_cpp_rejects_is_reported_with_its_error(tmp_path):
    """A GGUF llama.cpp refuses (the byte tokenizer built in memory has an empty merges
    list, which llama.cpp rejects) is reported with llama.cpp's own error, or, without
    the package, with the install hint."""
    from sparsec.bench.runner import BenchOptions, build_systems
    from sparsec.bench.variants import Variant
    from sparsec.testing import make_tiny_llama

    model, tokenizer = make_tiny_llama(seed=0)
    v = Variant("0%", "dense", 0.0, model, tokenizer, "x", 0.0, tmp_path)
    opts = BenchOptions(
        model="tiny",
        sparsities=[0.0],
        precisions=[],
        compare=["llama.cpp"],
        llama_types=["f32"],
        threads=[1],
    )
    systems, skipped = build_systems(opts, [v], 128)
    assert systems == []
    (sk,) = skipped
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert "pip install llama-cpp-python" in sk.reason
    else:
        assert "cannot find tokenizer merges" in sk.reason


def test_plot_without_matplotlib_fails_before_running(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    args = _parse([str(tiny_model_dir), "--plot", "x.png"])
    with pytest.raises(SparsecError, match="pip install matplotlib"):
        command.parse_options(args)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--reps", "2"], "at least 3"),
        (["--compare", "tensorrt"], "--compare 'tensorrt' is unknown"),
        (["--precision", "fp16"], "choose from fp32, int8"),
        (["--llama-types", "q5_k"], "--llama-types"),
        (["--threads", "two"], "comma list of integers"),
        (["--threads", "0"], "1..64"),
        (["--sparsity", "1.5"], "outside [0, 1)"),
        (["--sparsity", "no-such-folder"], "neither a fraction"),
        (["--new-tokens", "1"], "at least 2"),
    ],
)
def test_bad_arguments_fail_with_a_message(tiny_model_dir, argv, message):
    with pytest.raises(
        SparsecError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        command.parse_options(_parse([str(tiny_model_dir), *argv]))


def test_bad_model_fails_before_running(tmp_path):
    with pytest.raises(SparsecError, match="not found"):
        command.parse_options(_parse([str(tmp_path / "missing")]))


def test_gguf_types_that_keep_exact_zeros():
    """The GGUF_KEEPS_ZEROS table, checked with the gguf package's reference quantizers:
    Q8_0/Q4_0 store zeros exactly, Q4_1's block minimum does not."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    from sparsec.bench.variants import GGUF_KEEPS_ZEROS

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0.0
    for name, qtype in (("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q4_1", T.Q4_1), ("f16", T.F16)):
        back = dequantize(quantize(w, qtype), qtype).reshape(w.shape)
        keeps = bool(np.all(back[w == 0] == 0))
        assert keeps == GGUF_KEEPS_ZEROS[name], name


@pytest.mark.slow
def test_smollm2_engines_agree_on_greedy_tokens(tmp_path):
    """Real SmolLM2 (minutes): sparsec fp32 and onnxruntime fp32 produce PyTorch's
    greedy tokens on the same weights, dense and 70% zeroed."""
    out = tmp_path / "r.json"
    args = _parse(
        [
            "smollm2-135m",
            "--sparsity",
            "0,0.7",
            "--precision",
            "fp32",
            "--compare",
            "torch,onnxruntime",
            "--threads",
            "2",
            "--new-tokens",
            "16",
            "--json",
            str(out),
        ]
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    for r in report["results"]:
        if r["system"] in ("sparsec fp32", "onnxruntime fp32"):
            assert r["tokens_match_reference"]["matching_prefix"] == 16, r["system"]


def test_sparsify_folder_variant_carries_its_report_to_the_plot(tiny_model_dir, tmp_path):
    """A sparsify output folder is benchmarked as is; its report's perplexity becomes the
    accuracy-against-speed panel."""
    import shutil

    from sparsec.bench.plot import _accuracy_points, plot_report
    from sparsec.bench.variants import load_variants, parse_sparsity

    folder = tmp_path / "s50"
    shutil.copytree(tiny_model_dir, folder)
    ppl = {"dense": {"wiki": 10.0}, "oneshot": {"wiki": 12.5}}
    (folder / "report.json").write_text(json.dumps({"perplexity": ppl}))
    items = parse_sparsity(f"0,{folder}")
    vs = load_variants(str(tiny_model_dir), items, tmp_path / "cache")
    assert [v.kind for v in vs] == ["dense", "sparsify"]
    assert vs[1].label == "s50" and vs[1].describe()["perplexity"] == ppl
    result = {
        "status": "ok",
        "engine": "sparsec",
        "system": "sparsec int8",
        "threads": 1,
        "decode_tokens_per_second": {"median": 100.0, "min": 90.0, "max": 110.0},
    }
    report = {
        "model": {"source": "tiny", "variants": [v.describe() for v in vs]},
        "settings": {"new_tokens": 8},
        "results": [{**result, "variant": "0%"}, {**result, "variant": "s50"}],
    }
    # the folder's last stage is what its weights give
    assert _accuracy_points(report) == [("sparsec int8 s50 (1t)", 100.0, 12.5)]
    png = plot_report(report, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
