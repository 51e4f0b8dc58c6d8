"""CLI cases: real ``sparsec`` processes with odd arguments, odd files and signals.

Rules (``fuzz.proc.judge``): exit 0; or exit 1 with exactly one error line on stderr
(``sparsec CMD: error: ...``; stage progress and library warnings aside); or exit 2
from argparse (usage + error line); never a ``Traceback``. A case that sends SIGINT or
SIGTERM at a random delay accepts 130/143 (or death by that signal) too, and then the
previous output file must be byte-identical (or, on success, a complete new one) with
no ``.*.tmp`` left beside it; the input must never change. Inputs and outputs live in
the case's own folder (copies of the cached fixtures).
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

from fuzz import proc
from fuzz.common import anatomy, check_unchanged, file_digest
from fuzz.runner import OK, OVERWROTE, WRONG, Finding

NAME = "cli"
TIMEOUT = 150.0
SHARE = 0.12
ESTIMATE = 2.0
RUN_TIMEOUT = 90.0

KINDS = {
    "run_args": 6,
    "inspect": 5,
    "compile_args": 3,
    "optimize_args": 2,
    "signal": 8,
    "broken_pipe": 2,
    "argv": 3,
}

ODD_INTS = ["-1", "0", "1", "2147483648", "99999999999999999999", "1e3", "nan", "", " 1", "0x10"]
ODD_FLOATS = ["nan", "inf", "-inf", "-1", "0", "1e308", "1e999", "5e-324", "abc", "", "-0"]
ODD_TEXT = ["", " ", "hi", "<|im_end|>", "x" * 5000, "\u202e", "-", "--", "-x"]
BAD_BYTES = [b"\xff\xfe", b"caf\xe9", b"\xed\xa0\x80"]  # invalid UTF-8 argv


def run(rng, ctx, workdir, rep):
    workdir = Path(workdir)
    kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
    return CASES[kind](rng, ctx, workdir, rep)


def _pick(rng, sensible, odd, p=0.5):
    return rng.choice(odd) if rng.random() < p else rng.choice(sensible)


def _model_copy(ctx, workdir: Path, name: str = "fp32") -> Path:
    path = workdir / "model.so"
    shutil.copyfile(ctx.artifact(name), path)
    return path


def _finish(ran, inputs: dict, allow_pipe: bool = False):
    for path, digest in inputs.items():
        check_unchanged(path, digest, "the input")
    return proc.judge(ran, allow_pipe=allow_pipe)


def _run_args(rng, ctx, workdir, rep):
    model = _model_copy(ctx, workdir, rng.choice(["fp32", "int8", "long"]))
    prompt = _pick(rng, ["Hello", "The quick brown fox"], ODD_TEXT + BAD_BYTES)
    argv = [*ctx.sparsec_cmd(), "run", str(model), prompt]
    options = {
        "--max-new-tokens": (["1", "4", "8"], ODD_INTS),
        "--temperature": (["0", "0.7"], ODD_FLOATS),
        "--top-k": (["1", "40"], ODD_INTS),
        "--top-p": (["0.9"], ODD_FLOATS),
        "--seed": (["0", "7"], ODD_INTS),
        "--repetition-penalty": (["1.2"], ODD_FLOATS),
        "--stop": (["."], ODD_TEXT + BAD_BYTES),
        "--threads": (["1", "2"], ODD_INTS),
    }
    for flag in rng.sample(sorted(options), rng.randint(1, 4)):
        sensible, odd = options[flag]
        argv += [flag, _pick(rng, sensible, odd)]
    if "--max-new-tokens" not in argv:
        argv += ["--max-new-tokens", "4"]
    for flag in ("--chat", "--no-verify", "--no-huge-pages"):
        if rng.random() < 0.2:
            argv.append(flag)
    rep.describe("run_args", _show(argv))
    before = {model: file_digest(model)}
    ran = proc.run(argv, workdir, RUN_TIMEOUT)
    return _finish(ran, before)


def _inspect(rng, ctx, workdir, rep):
    from fuzz import artifact_cases

    base = rng.choice(["fp32", "int8"])
    data = ctx.artifact(base).read_bytes()
    how = rng.choice(["flip", "overwrite", "truncate", "append", "manifest_edit"] * 3 + ["path"])
    path = workdir / "model.so"
    if how == "path":
        path = Path(rng.choice(["/dev/null", "/", str(workdir / "missing.so"), "-"]))
        desc = f"inspect {path}"
    else:
        desc, _, mutated = artifact_cases.MUTATORS[how](rng, ctx, anatomy(data, base), workdir)
        if mutated is not None:
            path.write_bytes(mutated)
    as_json = rng.random() < 0.5
    argv = [*ctx.sparsec_cmd(), "inspect", str(path)] + (["--json"] if as_json else [])
    rep.describe("inspect", f"{base}: {desc}; {_show(argv)}")
    before = {path: file_digest(path)} if path.is_file() else {}
    ran = proc.run(argv, workdir, RUN_TIMEOUT)
    outcome, detail = _finish(ran, before)
    if outcome == OK and as_json:
        try:
            json.loads(ran.stdout)
        except ValueError as exc:
            raise Finding(WRONG, f"inspect --json printed invalid JSON: {exc}") from None
    return outcome, detail


def _compile_args(rng, ctx, workdir, rep):
    graph = workdir / "model.onnx"
    shutil.copyfile(ctx.cache / "opt.onnx", graph)
    # (never a device such as /dev/null: a writer that renames over it would replace it)
    out_kind = rng.choice(["new", "existing", "input", "directory", "missing_dir"])
    out = {
        "new": workdir / "out.so",
        "existing": workdir / "old.so",
        "input": graph,
        "directory": workdir,
        "missing_dir": workdir / "missing" / "out.so",
    }[out_kind]
    if out_kind == "existing":
        shutil.copyfile(ctx.artifact("int8"), out)
    argv = [*ctx.sparsec_cmd(), "compile", str(graph), "-o", str(out), "--kernels", "dense"]
    argv += ["--max-context", _pick(rng, ["16", "32"], ODD_INTS, 0.4)]
    if rng.random() < 0.4:
        argv += ["--threads", _pick(rng, ["1", "2"], ODD_INTS)]
    if rng.random() < 0.3:
        argv += ["--precision", rng.choice(["fp32", "int8", "fp16", ""])]
    if rng.random() < 0.2:
        argv += ["--target-cpu", rng.choice(["znver4", "nonsense-cpu", "", "x" * 300])]
    if rng.random() < 0.1:
        argv += ["--target", rng.choice(["avx512", "neon"])]
    rep.describe("compile_args", f"-o {out_kind}: {_show(argv)}")
    inputs = {graph: file_digest(graph)} if out != graph else {}
    old = file_digest(out) if out.is_file() else None
    listed = proc.listing(out.parent)
    ran = proc.run(argv, workdir, RUN_TIMEOUT)
    if out == graph and file_digest(graph) != inputs.get(
        graph, file_digest(ctx.cache / "opt.onnx")
    ):
        raise Finding(OVERWROTE, f"compile -o INPUT replaced its own input graph ({_show(argv)})")
    outcome, detail = _finish(ran, inputs)
    _check_output(out, old, ran, listed, outcome)
    return outcome, detail


def _optimize_args(rng, ctx, workdir, rep):
    graph = workdir / "export.onnx"
    shutil.copyfile(ctx.cache / "export.onnx", graph)
    out_kind = rng.choice(["new", "input", "directory", "existing"])
    out = {
        "new": workdir / "out.onnx",
        "input": graph,
        "directory": workdir,
        "existing": workdir / "old.onnx",
    }[out_kind]
    if out_kind == "existing":
        shutil.copyfile(ctx.cache / "opt.onnx", out)
    argv = [*ctx.sparsec_cmd(), "optimize", str(graph), "-o", str(out)]
    for flag in ("--report", "--no-validate", "--verify"):
        if rng.random() < 0.3:
            argv.append(flag)
    rep.describe("optimize_args", f"-o {out_kind}: {_show(argv)}")
    source = file_digest(graph)
    old = file_digest(out) if out.is_file() else None
    listed = proc.listing(out.parent)
    ran = proc.run(argv, workdir, RUN_TIMEOUT)
    if file_digest(graph) != source:
        raise Finding(OVERWROTE, f"optimize changed its input graph ({_show(argv)})")
    outcome, detail = proc.judge(ran)
    if out != graph:
        _check_output(out, old, ran, listed, outcome)
    return outcome, detail


def _check_output(out: Path, old: str | None, ran, listed: set, outcome: str) -> None:
    """A failed or interrupted run leaves the previous output as it was; a successful
    one leaves a complete new one; no temp files either way."""
    proc.check_no_leftovers(out.parent, listed, f"{_show(ran.argv)} (exit {ran.returncode})")
    if not out.is_file():
        return
    if ran.returncode == 0:
        _check_complete(out, ran)
    elif file_digest(out) != old and ran.returncode in (130, 143, -2, -15):
        # The signal came after the atomic rename: the new output must be whole.
        _check_complete(out, ran)
    elif file_digest(out) != old:
        raise Finding(
            OVERWROTE,
            f"{_show(ran.argv)} exited {ran.returncode} but changed the previous output {out.name}",
        )


def _check_complete(out: Path, ran) -> None:
    from sparsec.errors import SparsecError

    if out.suffix == ".so":
        from sparsec.runtime.artifact import read_artifact

        try:
            read_artifact(out)
        except SparsecError as exc:
            raise Finding(
                WRONG, f"{_show(ran.argv)} succeeded but wrote a bad file: {exc}"
            ) from None
    elif out.suffix == ".onnx":
        import onnx

        try:
            onnx.load(str(out), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable output is wrong
            raise Finding(
                WRONG, f"{_show(ran.argv)} succeeded but wrote a bad file: {exc}"
            ) from None


SIGNAL_COMMANDS = {
    # command: (weight, typical seconds)
    "compile": (4, 4.0),
    "optimize": (2, 4.0),
    "run": (3, 1.5),
    "inspect": (1, 0.3),
    "export": (1, 14.0),
}


def _signal(rng, ctx, workdir, rep):
    names = list(SIGNAL_COMMANDS)
    command = rng.choices(names, [SIGNAL_COMMANDS[n][0] for n in names])[0]
    typical = SIGNAL_COMMANDS[command][1]
    sig = rng.choice([signal.SIGINT, signal.SIGINT, signal.SIGTERM])
    delay = rng.uniform(0, 0.4) if rng.random() < 0.3 else rng.uniform(0, typical)
    inputs: dict = {}
    out = None
    if command == "compile":
        graph = workdir / "model.onnx"
        shutil.copyfile(ctx.cache / "opt.onnx", graph)
        out = workdir / "model.so"
        shutil.copyfile(ctx.artifact("int8"), out)
        argv = ["compile", str(graph), "-o", str(out), "--kernels", "dense", "--max-context", "64"]
        inputs[graph] = file_digest(graph)
    elif command == "optimize":
        graph = workdir / "export.onnx"
        shutil.copyfile(ctx.cache / "export.onnx", graph)
        out = workdir / "model.opt.onnx"
        shutil.copyfile(ctx.cache / "opt.onnx", out)
        argv = ["optimize", str(graph), "-o", str(out)]
        inputs[graph] = file_digest(graph)
    elif command == "run":
        model = _model_copy(ctx, workdir, "long")
        argv = ["run", str(model), "Once upon a time", "--max-new-tokens", "200"]
        inputs[model] = file_digest(model)
    elif command == "inspect":
        model = _model_copy(ctx, workdir, "fp32")
        argv = ["inspect", str(model), "--json"]
        inputs[model] = file_digest(model)
    else:
        hf = workdir / "hf"
        shutil.copytree(ctx.cache / "hf", hf)
        out = workdir / "model.onnx"
        shutil.copyfile(ctx.cache / "export.onnx", out)
        argv = ["export", str(hf), "-o", str(out), "--no-verify"]
        inputs[hf] = file_digest(hf)
    argv = [*ctx.sparsec_cmd(), *argv]
    name = signal.Signals(sig).name
    rep.describe("signal", f"{name} after {delay:.2f} s: {_show(argv)}")
    old = file_digest(out) if out is not None else None
    listed = proc.listing(workdir)
    ran = proc.run(argv, workdir, RUN_TIMEOUT, signal_after=(delay, sig))
    for path, digest in inputs.items():
        check_unchanged(path, digest, "the input")
    outcome, detail = proc.judge(ran)
    if out is not None:
        _check_output(out, old, ran, listed, outcome)
    return outcome, detail


def _broken_pipe(rng, ctx, workdir, rep):
    import subprocess

    model = _model_copy(ctx, workdir, "long")
    if rng.random() < 0.5:
        argv = [*ctx.sparsec_cmd(), "inspect", str(model)]
    else:
        argv = [*ctx.sparsec_cmd(), "run", str(model), "Hello", "--max-new-tokens", "100"]
    keep = rng.choice([0, 1, 10])
    rep.describe("broken_pipe", f"{_show(argv)} | head -c {keep}")
    p = subprocess.Popen(
        argv, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    p.stdout.read(keep)
    p.stdout.close()
    try:
        err = p.stderr.read()
        p.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        raise Finding("hang", f"{_show(argv)} did not exit after its stdout closed") from None
    ran = proc.Ran(argv, p.returncode, b"", err.decode(errors="replace"), 0.0)
    return proc.judge(ran, allow_pipe=True)


def _argv(rng, ctx, workdir, rep):
    commands = ["run", "inspect", "compile", "optimize", "export", "sparsify", "bench"]
    commands += ["fetch", "finetune", "generate-data", "nonsense", ""]
    argv = [*ctx.sparsec_cmd()]
    how = rng.choice(["help", "junk", "missing", "version"])
    if how == "version":
        argv.append("--version")
    else:
        argv.append(rng.choice(commands))
    if how == "help":
        argv.append("--help")
    elif how == "junk":
        junk = ["--nope", "-", "--", "-o", "", "x" * 10000, "--max-new-tokens=", "-h5"]
        argv += [rng.choice(junk + BAD_BYTES) for _ in range(rng.randint(1, 4))]
    rep.describe("argv", _show(argv))
    ran = proc.run(argv, workdir, RUN_TIMEOUT)
    outcome, detail = proc.judge(ran)
    if how in ("help", "version") and outcome == OK and not ran.stdout.strip():
        raise Finding(WRONG, f"{_show(argv)} printed nothing")
    return outcome, detail


def _show(argv) -> str:
    return proc._show(argv)


CASES = {
    "run_args": _run_args,
    "inspect": _inspect,
    "compile_args": _compile_args,
    "optimize_args": _optimize_args,
    "signal": _signal,
    "broken_pipe": _broken_pipe,
    "argv": _argv,
}
