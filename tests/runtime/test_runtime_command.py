"""`sparsec run` and `sparsec inspect` through sparsec.cli.main."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import runtime_fake as fake

from sparsec import cli, runtime


@pytest.fixture(autouse=True)
def only_runtime_commands(monkeypatch):
    # Other stages' command modules are written in parallel and may not import yet.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("sparsec.runtime.command",))


def test_run_streams_text_then_speeds(model_path, capsys):
    assert cli.main(["run", str(model_path), "Hello", "--max-new-tokens", "7"]) == 0
    out, err = capsys.readouterr()
    with runtime.load(model_path) as m:
        expected = m.generate("Hello", max_new_tokens=7)
    assert out == expected.text + "\n"
    assert err.startswith("[length] prompt: ") and "decode: " in err and "tok/s (6 steps" in err


def test_run_sampling_options_and_chat(model_path, capsys):
    args = ["--max-new-tokens", "9", "--temperature", "0.8", "--top-k", "30", "--top-p", "0.9"]
    assert (
        cli.main(["run", str(model_path), "hi", "--chat", "--seed", "4", "--threads", "1", *args])
        == 0
    )
    out, _ = capsys.readouterr()
    with runtime.load(model_path) as m:
        expected = m.chat(
            [{"role": "user", "content": "hi"}],
            max_new_tokens=9,
            temperature=0.8,
            top_k=30,
            top_p=0.9,
            seed=4,
        )
    assert out == expected.text + "\n"


def test_run_errors_exit_1(model_path, tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "x.so"), "hi"]) == 1
    assert capsys.readouterr().err == (
        f"sparsec run: error: {tmp_path / 'x.so'} does not exist; pass the path of a compiled "
        "model.so\n"
    )
    assert cli.main(["run", str(model_path), "hi", "--top-p", "2"]) == 1
    assert "sparsec run: error: top_p must be in (0, 1]" in capsys.readouterr().err


def test_inspect_table(model_path, capsys):
    assert cli.main(["inspect", str(model_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"{model_path}  (sparsec 0.1.0, ABI 3)"
    assert "fake: layers 2, hidden 260, heads 2, kv heads 2, head_dim 130" in out
    assert "this host: ok" in out and "64 tokens (KV cache 266.2 KB float32 per sequence)" in out
    assert "50.0% of weights (" in out and "100.0% of FLOPs, 1 of 2 layers" in out
    # a manifest without the embedding record (older .so files) has a float table
    assert next(ln for ln in lines if ln.split()[:1] == ["embedding"]).endswith("float32 table")
    header = next(i for i, line in enumerate(lines) if line.startswith("name "))
    assert lines[header].split() == ["name", "shape", "sparsity", "pattern", "kernel", "bytes"]
    assert lines[header + 1].split() == ["emb", "260x260", "0.0%", "dense", "gather_f32", "270400"]
    assert lines[header + 2].split() == [
        "out",
        "260x260",
        "50.0%",
        "unstructured",
        "matmul_bitmask_f32",
        "143650",
    ]


def test_inspect_json(model_path, capsys):
    assert cli.main(["inspect", str(model_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = fake.manifest()
    assert summary["config"] == manifest["config"]
    assert summary["layers"] == manifest["layers"]
    assert summary["file_size"] == model_path.stat().st_size
    assert summary["weights"]["size"] == len(fake.pack(fake.random_weights()))
    assert summary["non_weight_bytes"] == summary["file_size"] - summary["weights"]["size"]
    assert (
        summary["sparse"]["weights_fraction"] == 0.5 and summary["sparse"]["flops_fraction"] == 1.0
    )
    assert summary["host_missing_cpu_features"] == []
    assert summary["tokenizer"]["vocab_size"] == 260 and "tokenizer" not in summary["config"]


def test_inspect_runs_where_the_model_cannot(make_model, capsys):
    path = make_model(cpu_features=["avx512f", "made_up_flag"])
    assert cli.main(["inspect", str(path)]) == 0
    assert "this host lacks made_up_flag" in capsys.readouterr().out


def test_inspect_rejects_non_model(libs, capsys):
    assert cli.main(["inspect", str(libs["ok"])]) == 1
    assert "is not a sparsec model (no SPARSEC2 trailer)" in capsys.readouterr().err


def test_inspect_into_a_closed_pipe_stops_quietly(model_path):
    # `sparsec inspect m.so | head -1`: the reader is gone before the table is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sparsec.cli", "inspect", str(model_path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141  # 128 + SIGPIPE, what a shell reports for `cmd | head`
