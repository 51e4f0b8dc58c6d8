"""``sparsec optimize`` on the command line."""

from __future__ import annotations

import argparse

import onnx_ir as ir

from sparsec import contract
from sparsec.passes import command


def _run(argv) -> int:
    parser = argparse.ArgumentParser(prog="sparsec")
    command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_optimize_with_report_and_verify(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "tiny.opt.onnx"
    assert _run(["optimize", str(tiny_onnx), "-o", str(out), "--report", "--verify"]) == 0
    text = capsys.readouterr().out
    assert "CachedAttention x2" in text and "sparsity:" in text
    assert "prefill then decode:" in text and "MISMATCH" not in text
    assert ir.load(out).metadata_props[contract.META_FORMAT] == "optimized"


def test_command_module_is_light():
    import subprocess
    import sys

    heavy = "('onnx', 'onnx_ir', 'torch', 'onnxscript')"
    code = f"import sys, sparsec.passes.command; print(any(m in sys.modules for m in {heavy}))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
        == "False"
    )
