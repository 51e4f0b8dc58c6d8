"""The CLI at its boundaries: bad outputs, bad option values, a full disk, a closed
stdout, Ctrl-C wrapped by torch and SIGTERM. Each gives one line on stderr and a
non-zero exit, never a traceback, and leaves every existing file as it was."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import onnx_ir
import pytest

from sparsec import interrupts, onnx_io
from sparsec.cli import main

PREVIOUS = b"the previous output"


def _one_line_error(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"sparsec {command}: error: "), err
    for needle in needles:
        assert needle in lines[-1], err
    return lines[-1]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def fake_hf(tmp_path):
    """A folder that resolves as a Hugging Face model (config.json) and its weights."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


# --- outputs that must not be written -------------------------------------------------


def test_compile_refuses_to_overwrite_its_input(tmp_path, capsys):
    src = tmp_path / "x.onnx"
    src.write_bytes(b"graph")
    assert main(["compile", str(src), "-o", str(src)]) == 1
    _one_line_error(capsys, "compile", "is also an input")
    assert src.read_bytes() == b"graph"
    data = tmp_path / "x.onnx.0123abcd.data"  # its external weights are inputs too
    data.write_bytes(b"weights")
    assert main(["compile", str(src), "-o", str(data)]) == 1
    _one_line_error(capsys, "compile", "is also an input")
    assert data.read_bytes() == b"weights"


def test_optimize_refuses_to_overwrite_its_input_through_a_link(tmp_path, capsys):
    src = tmp_path / "x.onnx"
    src.write_bytes(b"graph")
    (tmp_path / "link.onnx").symlink_to(src)
    assert main(["optimize", str(src), "-o", str(tmp_path / "link.onnx")]) == 1
    _one_line_error(capsys, "optimize", "is also an input")
    assert src.read_bytes() == b"graph"


def test_export_refuses_to_write_into_the_model_folder(fake_hf, capsys):
    out = fake_hf / "model.safetensors"
    assert main(["export", str(fake_hf), "-o", str(out)]) == 1
    _one_line_error(capsys, "export", "inside the input model folder")
    assert out.read_bytes() == b"weights"


def test_export_refuses_to_overwrite_a_gguf_input(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["export", str(gguf), "-o", str(gguf)]) == 1
    _one_line_error(capsys, "export", "is also an input")
    assert gguf.read_bytes() == b"GGUF"


def test_convert_refuses_the_model_folder_and_a_folder_holding_it(fake_hf, capsys):
    assert main(["convert", str(fake_hf), "-o", str(fake_hf)]) == 1
    _one_line_error(capsys, "convert", "inside the input model folder")
    assert main(["convert", str(fake_hf), "-o", str(fake_hf.parent)]) == 1
    _one_line_error(capsys, "convert", "contains the input model folder")
    assert (fake_hf / "model.safetensors").read_bytes() == b"weights"


def test_bench_outputs_are_checked_before_running(fake_hf, tmp_path, capsys):
    argv = ["bench", str(fake_hf), "--compare", "none"]
    assert main([*argv, "--json", str(fake_hf / "config.json")]) == 1
    _one_line_error(capsys, "bench", "--json", "inside the input model folder")
    same = str(tmp_path / "r.json")
    assert main([*argv, "--json", same, "--plot", same]) == 1
    _one_line_error(capsys, "bench", "--plot", "name two files")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main([*argv, "--json", str(fifo)]) == 1
    _one_line_error(capsys, "bench", "not a regular file")
    assert main([*argv, "--cache-dir", str(fake_hf / "config.json")]) == 1
    _one_line_error(capsys, "bench", "--cache-dir", "not a folder")
    assert (fake_hf / "config.json").read_text() == "{}"


@pytest.mark.parametrize("command", ["export", "optimize", "compile"])
def test_outputs_that_are_not_regular_files(command, fake_hf, tmp_path, capsys):
    src = str(fake_hf) if command == "export" else str(tmp_path / "x.onnx")
    fifo = tmp_path / "fifo"  # a device node as far as the check goes (S_ISREG false)
    os.mkfifo(fifo)
    assert main([command, src, "-o", str(fifo)]) == 1
    _one_line_error(capsys, command, "not a regular file")
    assert Path(fifo).is_fifo()
    assert main([command, src, "-o", "/proc/sparsec-test.onnx"]) == 1
    _one_line_error(capsys, command, "kernel filesystem")
    assert main([command, src, "-o", str(tmp_path / ("n" * 300))]) == 1
    _one_line_error(capsys, command, "300 characters long")
    assert main([command, src, "-o", str(tmp_path)]) == 1
    _one_line_error(capsys, command, "is a folder")


def _external_graph(path: Path, data_name: str) -> None:
    """A one-initializer ONNX graph whose weights are in ``data_name`` beside it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    onnx.save_model(
        helper.make_model(graph),
        str(path),
        save_as_external_data=True,
        location=data_name,
        size_threshold=0,
    )


def test_optimize_keeps_the_data_file_a_renamed_input_reads(tmp_path, capsys):
    """`mv m.onnx a.onnx; sparsec optimize a.onnx -o m.onnx`: replacing m.onnx removes
    m.onnx's data files, and a.onnx still reads its weights from one of them."""
    data = "m.onnx.0123abcd.data"
    _external_graph(tmp_path / "a.onnx", data)
    (tmp_path / "m.onnx").write_bytes(b"old graph")
    weights = (tmp_path / data).read_bytes()
    assert main(["optimize", str(tmp_path / "a.onnx"), "-o", str(tmp_path / "m.onnx")]) == 1
    _one_line_error(capsys, "optimize", data, "reads its weights from")
    assert (tmp_path / data).read_bytes() == weights


# --- option ranges ------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["export", "M", "-o", "o.onnx", "--verify-tokens", "-1"], "--verify-tokens: -1"),
        (["export", "M", "-o", "o.onnx", "--verify-tokens", "x"], "--verify-tokens: 'x'"),
        (["compile", "m.onnx", "-o", "m.so", "--max-context", "0"], "--max-context: 0"),
        (["compile", "m.onnx", "-o", "m.so", "--max-context", "-8"], "--max-context: -8"),
        (["compile", "m.onnx", "-o", "m.so", "--threads", "0"], "--threads: 0"),
        (["compile", "m.onnx", "-o", "m.so", "--threads", "-2"], "--threads: -2"),
        (["compile", "m.onnx", "-o", "m.so", "--threads", "100000"], "--threads: 100000"),
    ],
)
def test_option_values_out_of_range(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"sparsec {argv[0]}: error: argument {needle}")
    assert "allowed range" in err


@pytest.mark.parametrize(
    "option,value,needle",
    [
        ("--reps", "1000000", "--reps 1000000 is outside the allowed range 3..1000"),
        ("--probe-mb", "0", "--probe-mb 0 is outside the allowed range 1..65536"),
        ("--probe-mb", str(1 << 40), "the allowed range 1..65536"),
    ],
)
def test_bench_option_ranges(option, value, needle, fake_hf, capsys):
    assert main(["bench", str(fake_hf), "--compare", "none", option, value]) == 1
    _one_line_error(capsys, "bench", needle)


def test_export_checks_the_greedy_check_fits_before_exporting(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(tiny_model_dir), "-o", str(out), "--verify-tokens", "100000"]) == 1
    line = _one_line_error(capsys, "export", "--verify-tokens 100000 is outside the allowed range")
    assert "the model's context" in line
    assert not out.exists()


# --- a full disk --------------------------------------------------------------------


def _full_disk(written: list):
    def save(model, path, **kwargs):
        Path(path).write_bytes(b"half a graph")
        if "external_data" in kwargs:
            data = Path(path).parent / kwargs["external_data"]
            data.write_bytes(b"half the weights")
            written.append(data)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def test_optimize_on_a_full_disk_keeps_the_previous_output(
    tiny_onnx, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "m.opt.onnx"
    out.write_bytes(PREVIOUS)
    monkeypatch.setattr(onnx_ir, "save", _full_disk([]))
    assert main(["optimize", str(tiny_onnx), "-o", str(out), "--no-validate"]) == 1
    line = _one_line_error(capsys, "optimize", f"no space left writing {out} (needs about")
    assert " MB)" in line
    assert out.read_bytes() == PREVIOUS
    assert _leftovers(tmp_path) == []


def test_a_full_disk_removes_the_half_written_data_file(tiny_onnx, tmp_path, monkeypatch):
    from sparsec.errors import SparsecError

    graph = onnx_ir.load(tiny_onnx)
    out = tmp_path / "m.onnx"
    out.write_bytes(PREVIOUS)
    written = []
    monkeypatch.setattr(onnx_ir, "save", _full_disk(written))
    with pytest.raises(SparsecError, match=r"no space left writing .*m\.onnx \(needs about"):
        onnx_io.save_atomic(graph, out, external=True)
    assert written and not written[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert out.read_bytes() == PREVIOUS


def test_convert_on_a_full_disk(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def full(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "copy"
    assert main(["convert", str(tiny_model_dir), "-o", str(out)]) == 1
    _one_line_error(capsys, "convert", f"no space left writing {out} (needs about")
    assert list(tmp_path.iterdir()) == []


# --- standard output ----------------------------------------------------------------


def test_a_failing_stdout_is_one_line(monkeypatch, capsys):
    import sparsec.models

    def prints(args):
        print("result")
        return 0

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

    monkeypatch.setattr(sparsec.models, "_convert", prints)
    monkeypatch.setattr(sys, "stdout", Full())
    assert main(["convert", "m", "-o", "out"]) == 1
    _one_line_error(capsys, "convert", "cannot write to standard output: No space left")


def _python(tmp_path, code: str, redirect: str = ""):
    """Run ``code`` in a fresh interpreter, through the shell for ``redirect``."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        f"{sys.executable} {script} {redirect}",
        shell=True,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )


def test_run_with_stdout_closed(tmp_path):
    result = subprocess.run(
        f"{sys.executable} -m sparsec.cli run missing.so hi >&-",
        shell=True,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "sparsec run: error: standard output is closed; redirect it, e.g. >/dev/null"
    )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_stdout_on_a_full_device(tmp_path):
    code = """
        import sys
        import sparsec.models
        from sparsec.cli import main

        sparsec.models._convert = lambda args: print("x" * 100000) or 0
        sys.exit(main(["convert", "m", "-o", "out"]))
    """
    result = _python(tmp_path, code, "> /dev/full")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "sparsec convert: error: cannot write to standard output: No space left on device"
    )


# --- interrupts ---------------------------------------------------------------------


class _Interrupting:
    """torch.nn.Module code that hits Ctrl-C while torch.export traces it."""

    def __init__(self):
        import torch

        class Module(torch.nn.Module):
            def forward(self, x):
                raise KeyboardInterrupt

        self.module = Module()

    def __call__(self, *args, **kwargs):
        import torch

        # strict=True traces with dynamo, which reports the KeyboardInterrupt as
        # torch._dynamo.exc.Unsupported caused by ObservedKeyboardInterruptError.
        return torch.export.export(self.module, (torch.ones(2),), strict=True)


def test_ctrl_c_wrapped_by_torch_during_export(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import torch

    out = tmp_path / "m.onnx"
    out.write_bytes(PREVIOUS)
    monkeypatch.setattr(torch.onnx, "export", _Interrupting())
    assert main(["export", str(tiny_model_dir), "-o", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "sparsec export: interrupted"
    assert "Traceback" not in err
    assert out.read_bytes() == PREVIOUS
    assert _leftovers(tmp_path) == []


def test_an_interrupt_in_an_error_chain_is_an_interrupt(tmp_path, monkeypatch, capsys):
    import sparsec.models
    from sparsec.errors import SparsecError

    def wrapped(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("some library's own error") from e

    def reported(args):
        try:
            wrapped(args)
        except RuntimeError as e:
            raise SparsecError(f"convert failed: {e}") from e

    monkeypatch.setattr(sparsec.models, "_convert", reported)
    assert main(["convert", "m", "-o", "out"]) == 130
    assert capsys.readouterr().err.strip() == "sparsec convert: interrupted"


def test_a_swallowed_interrupt_still_keeps_the_output(tiny_onnx, tmp_path, monkeypatch, capsys):
    """Ctrl-C whose KeyboardInterrupt a library swallowed (torch prints "Exception
    ignored in ..." from a weakref callback and goes on): the output is not replaced."""
    from sparsec.passes import pipeline

    original = pipeline.optimize

    def swallowed(*args, **kwargs):
        interrupts.request_stop(signal.SIGINT)  # what the handler records before raising
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "optimize", swallowed)
    out = tmp_path / "m.opt.onnx"
    out.write_bytes(PREVIOUS)
    assert main(["optimize", str(tiny_onnx), "-o", str(out), "--no-validate"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "sparsec optimize: interrupted"
    assert out.read_bytes() == PREVIOUS
    assert _leftovers(tmp_path) == []
    assert interrupts.stop_requested() is None  # cleared for the next command


def test_sigterm_keeps_the_previous_output(tiny_onnx, tmp_path):
    out = tmp_path / "m.opt.onnx"
    out.write_bytes(PREVIOUS)
    code = f"""
        import os, signal, sys, time
        import onnx_ir
        from sparsec.cli import main

        def slow_save(model, path, **kwargs):
            open(path, "wb").write(b"half a graph")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        onnx_ir.save = slow_save
        sys.exit(main(["optimize", {str(tiny_onnx)!r}, "-o", {str(out)!r}, "--no-validate"]))
    """
    result = _python(tmp_path, code, "> /dev/null")
    assert result.returncode == 143, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "sparsec optimize: terminated"
    assert out.read_bytes() == PREVIOUS
    assert _leftovers(tmp_path) == []


def test_handlers_are_restored_after_a_command(monkeypatch):
    import sparsec.models

    monkeypatch.setattr(sparsec.models, "_convert", lambda args: 0)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["convert", "m", "-o", "out"]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_finished_command_ignores_late_signals(monkeypatch):
    """The console script (final=True): once the command has finished, a Ctrl-C no
    longer kills the process (its outputs are complete; Python would exit by SIGINT)."""
    import sparsec.models

    monkeypatch.setattr(sparsec.models, "_convert", lambda args: 0)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        assert main(["convert", "m", "-o", "out"], final=True) == 0
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_console_script_interrupt_while_importing(tmp_path):
    """A Ctrl-C before the CLI is imported is reported, not a traceback."""
    code = """
        import builtins, sys
        real_import = builtins.__import__

        def interrupted(name, *args, **kwargs):
            if name == "sparsec.cli":
                raise KeyboardInterrupt
            return real_import(name, *args, **kwargs)

        builtins.__import__ = interrupted
        from sparsec.entry import main
        sys.exit(main())
    """
    result = _python(tmp_path, code, "")
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "sparsec: interrupted"
