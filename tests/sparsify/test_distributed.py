"""SparseGPT calibration and FSDP2 distillation sharded over 2 gloo ranks on the CPU,
sharded checkpoints and ``--resume`` across world sizes, and ``--device``.

The 2-rank runs are real torchrun (or torchrun-like) process groups: subprocesses with
one torch thread each, so the test machine's 2 cores run both ranks at once.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsec.sparsify.distributed as distributed_mod
from sparsec import cli
from sparsec.errors import SparsecError
from sparsec.sparsify.pipeline import SparsifyOptions, sparsify

HERE = Path(__file__).parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import distributed_worker as worker  # noqa: E402


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in distributed_mod.TORCHRUN_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def torchrun(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (a free port, one node)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(
        command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def differing(a: dict, b: dict) -> int:
    assert a.keys() == b.keys()
    return sum(int((a[k] != b[k]).sum()) for k in a)


def test_two_ranks_give_the_masks_of_one_process_and_not_without_the_all_reduce(
    tmp_path, one_thread
):
    done = torchrun(HERE / "distributed_worker.py", "masks", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    full = worker.calibration()
    reference = worker.masks_of(full, None)  # one process, all 16 sequences
    assert sum(m.numel() for m in reference.values()) > 20000
    for rank in ranks:
        assert differing(rank["summed"], reference) == 0
    # The ablation: each rank on its own share only (half the tokens) picks other masks,
    # so this test fails if the all-reduce does not happen.
    for rank in ranks:
        assert differing(rank["own_share"], reference) > 100
    assert differing(ranks[0]["own_share"], ranks[1]["own_share"]) > 100

    from sparsec.sparsify.owl import outlier_ratios
    from sparsec.testing import make_tiny_llama

    owl = outlier_ratios(make_tiny_llama(seed=0)[0], full, chunk=worker.CHUNK)
    assert ranks[0]["owl"] == ranks[1]["owl"]
    assert ranks[0]["owl"] == pytest.approx(owl, rel=1e-12, abs=0)


def test_torchrun_sparsify_matches_one_process_and_only_rank_0_writes(
    tiny_model_dir, text_file, tmp_path, one_thread
):
    common = [
        "--sparsity", "0.5", "--calibration", text_file, "--calibration-samples", "16",
        "--calibration-seq-len", "48", "--eval", text_file, "--eval-tokens", "128",
        "--layer-sparsity", "owl", "--owl-lambda", "0.05", "--train", text_file, "--steps", "2",
        "--batch-size", "2", "--seq-len", "24", "--device", "cpu",
    ]  # fmt: skip
    out2 = tmp_path / "two"
    done = torchrun("-m", "sparsec", "sparsify", tiny_model_dir, *common, "-o", out2)
    assert done.returncode == 0, done.stderr[-3000:]
    # One summary line on stdout (rank 0's), progress from rank 0 only.
    assert [json.loads(line)["output"] for line in done.stdout.splitlines()] == [str(out2)]
    assert done.stderr.count("sparsify on rank 0 of 2, cpu") == 1
    assert "rank 1 of 2" not in done.stderr
    assert not (tmp_path / "two.checkpoint").exists()

    out1 = sparsify(
        SparsifyOptions(
            model=str(tiny_model_dir),
            output=tmp_path / "one",
            sparsity=0.5,
            calibration=[str(text_file)],
            calibration_samples=16,
            calibration_seq_len=48,
            eval=[str(text_file)],
            eval_tokens=128,
            layer_sparsity="owl",
            owl_lambda=0.05,
            train=[str(text_file)],
            steps=2,
            batch_size=2,
            seq_len=24,
            device="cpu",
            quiet=True,
        )
    )
    one, two = load_file(out1 / "model.safetensors"), load_file(out2 / "model.safetensors")
    assert differing({k: v == 0 for k, v in one.items()}, {k: v == 0 for k, v in two.items()}) == 0
    # Both ranks distilled (FSDP2, a sequence of each batch each), rank 0 wrote the result:
    # float64 Hessian sums and whole-batch losses, so the weights agree to float32 rounding
    # (the gradients are summed in another order: measured 2e-7 at most).
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
    ppl = [json.loads((o / "report.json").read_text())["perplexity"] for o in (out1, out2)]
    assert ppl[0].keys() == ppl[1].keys() == {"dense", "one-shot", "distilled"}
    for stage in ppl[0]:
        assert list(ppl[1][stage].values()) == pytest.approx(list(ppl[0][stage].values()))
    # The torchrun output is a model folder like any other: it builds and runs.
    from sparsec import runtime
    from sparsec.cli import main

    so = tmp_path / "two.so"
    assert main(["build", str(out2), "-o", str(so), "--max-context", "64"]) == 0
    assert len(runtime.load(so).generate("Hello", max_new_tokens=4).token_ids) > 0


# --- distillation sharded with FSDP2 -----------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory) -> list[dict]:
    """``distributed_worker.py fsdp`` on 2 gloo ranks: each rank's results."""
    out = tmp_path_factory.mktemp("fsdp")
    done = torchrun(HERE / "distributed_worker.py", "fsdp", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_the_student_is_sharded_over_the_ranks_not_replicated(fsdp_ranks):
    for rank in fsdp_ranks:
        layout = rank["kept"]["layout"]
        assert len(layout) == 20  # embeddings (= the tied head), 2 x (7 Linears, 2 norms), norm
        for name, (kind, placements, full, local) in layout.items():
            # Plain DDP (or rank 0 alone) would hold every parameter whole on every rank.
            assert kind == "DTensor" and placements == ["S(0)"], name
            assert local[0] == full[0] // 2 and local[1:] == full[1:], name


def test_two_ranks_distill_as_one_process_on_the_same_global_batches(fsdp_ranks, one_thread):
    one = worker.distill(distributed_mod.Ranks())  # the whole batches in one process
    for rank in fsdp_ranks:
        # The loss of the whole batch, the same on both ranks, within float32 rounding.
        assert rank["kept"]["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=0)
    assert one["losses"][-1] < one["losses"][0]  # it trains
    two = fsdp_ranks[0]["kept"]["weights"]  # gathered on rank 0
    assert two.keys() == one["weights"].keys()
    for name in two:
        torch.testing.assert_close(two[name], one["weights"][name], rtol=1e-5, atol=1e-5)
    # The ablation: each rank's loss over its own share's tokens (its own SquareHead energy
    # and token counts, as a plain data-parallel loop computes it) trains another model.
    naive = [rank["whole_loss_off"] for rank in fsdp_ranks]
    mean = [(a + b) / 2 for a, b in zip(naive[0]["losses"], naive[1]["losses"], strict=True)]
    assert mean != pytest.approx(one["losses"], rel=1e-3, abs=0)
    drift = max((naive[0]["weights"][k] - one["weights"][k]).abs().max().item() for k in two)
    assert drift > 1e-3  # measured 1.4e-2 (the model above: 3e-6)


def test_masks_hold_on_the_shards_after_every_step(fsdp_ranks):
    for rank in fsdp_ranks:
        assert rank["kept"]["pruned_nonzero"] == [0] * worker.STEPS
        # The ablation: one step without re-applying the masks to the shards.
        assert rank["masks_off"]["pruned_nonzero"][0] > 1000
    zeros = sum(int((w == 0).sum()) for w in fsdp_ranks[0]["kept"]["weights"].values())
    assert zeros >= 36864  # half of the decoder Linears' 73,728 weights, gathered whole


@pytest.fixture(scope="module")
def stopped_run(tiny_model_dir, tmp_path_factory) -> dict:
    """2 ranks distilling 4 steps, rank 1 sent SIGTERM after step 2 (no periodic
    checkpoint: --checkpoint-every 1e9); the checkpoint it leaves, copied twice."""
    out = tmp_path_factory.mktemp("stopped")
    text = out / "text.txt"
    text.write_text(
        "The quick brown fox jumps over the lazy dog. Pack my box with five dozen " * 40
    )
    args = [
        "--sparsity", "0.5", "--calibration", text, "--calibration-samples", "8",
        "--calibration-seq-len", "48", "--eval", text, "--eval-tokens", "128",
        "--train", text, "--steps", "4", "--batch-size", "2",
        "--seq-len", "24", "--device", "cpu", "--checkpoint-every", "1e9",
    ]  # fmt: skip
    done = torchrun(
        HERE / "distributed_worker.py", "sparsify", 2, out, tiny_model_dir, *args,
        "-o", out / "two",
    )  # fmt: skip
    assert (out / "two.checkpoint").is_dir(), done.stderr[-3000:]
    for copy in ("for_one", "for_refusals"):
        shutil.copytree(out / "two.checkpoint", out / copy)
    return {"done": done, "out": out, "args": [str(a) for a in args]}


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _one_process(tiny_model_dir, run: dict, output: Path, **extra) -> Path:
    """The stopped run's options, in this process."""
    text = str(run["out"] / "text.txt")
    options = dict(
        model=str(tiny_model_dir),
        output=output,
        sparsity=0.5,
        calibration=[text],
        calibration_samples=8,
        calibration_seq_len=48,
        eval=[text],
        eval_tokens=128,
        train=[text],
        steps=4,
        batch_size=2,
        seq_len=24,
        device="cpu",
        checkpoint_every=1e9,
        quiet=True,
    )
    return sparsify(SparsifyOptions(**{**options, **extra}))


def _recording(monkeypatch) -> list[dict]:
    from sparsec.sparsify.train import MaskedTrainer

    steps, train_step = [], MaskedTrainer.train_step

    def recorded(self, loss_fn):
        step = self.step
        metrics = train_step(self, loss_fn)
        steps.append({"step": step, "loss": metrics["loss"]})
        return metrics

    monkeypatch.setattr(MaskedTrainer, "train_step", recorded)
    return steps


def test_sigterm_on_one_rank_leaves_a_sharded_checkpoint_that_resumes_on_2_ranks_and_on_1(
    stopped_run, tiny_model_dir, monkeypatch, one_thread
):
    out, done = stopped_run["out"], stopped_run["done"]
    assert done.returncode != 0  # stopped, not finished
    assert "checkpoint saved in" in done.stderr and not (out / "two").exists()
    # Without the graceful stop there would be no checkpoint: none was due.
    current = out / "two.checkpoint" / "current"
    state = json.loads((current / "state.json").read_text())
    assert state["stage"] == "pruned" and state["sharded"] == 2
    assert (current / "sharded" / ".metadata").is_file()
    assert sorted(p.name for p in (current / "sharded").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]  # each rank wrote its own shards
    stopped = [_steps(out / f"steps{r}.jsonl") for r in (0, 1)]
    assert [s["step"] for s in stopped[0]] == [s["step"] for s in stopped[1]] == [0, 1]

    # The reference: one process, the 4 steps uninterrupted.
    steps = _recording(monkeypatch)
    reference = _one_process(tiny_model_dir, stopped_run, out / "reference")
    ref = [s["loss"] for s in steps]
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert [s["loss"] for s in stopped[0]] == pytest.approx(ref[:2], rel=1e-5, abs=0)

    # Resumed on 2 ranks: it continues at step 2 and ends where the reference does.
    for r in (0, 1):
        (out / f"steps{r}.jsonl").unlink()
    args = [*stopped_run["args"], "-o", out / "two", "--resume"]
    again = torchrun(HERE / "distributed_worker.py", "sparsify", 0, out, tiny_model_dir, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = _steps(out / "steps0.jsonl")
    assert [s["step"] for s in resumed] == [2, 3]  # without resume: [0, 1, 2, 3]
    assert [s["loss"] for s in resumed] == pytest.approx(ref[2:], rel=1e-5, abs=0)
    # The ablation: a restart at step 0 would give the first steps' losses instead.
    assert ref[:2] != pytest.approx(ref[2:], rel=1e-3, abs=0)
    assert not (out / "two.checkpoint").exists()

    # Resumed in one process from the same 2-rank checkpoint.
    steps.clear()
    one = _one_process(
        tiny_model_dir, stopped_run, out / "one", resume=True, checkpoint_dir=out / "for_one"
    )
    assert [s["step"] for s in steps] == [2, 3]
    assert [s["loss"] for s in steps] == pytest.approx(ref[2:], rel=1e-5, abs=0)

    expected = load_file(reference / "model.safetensors")
    for folder in (out / "two", one):
        got = load_file(folder / "model.safetensors")
        assert (
            differing({k: v == 0 for k, v in got.items()}, {k: v == 0 for k, v in expected.items()})
            == 0
        )
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_a_sharded_checkpoint_of_other_options_or_another_model_is_refused(
    stopped_run, tiny_model_dir
):
    from sparsec.sparsify import fsdp
    from sparsec.testing import make_tiny_llama

    folder = stopped_run["out"] / "for_refusals"
    with pytest.raises(SparsecError, match=r"was made with other options \(\{'steps': 4\}\)"):
        out = stopped_run["out"] / "x"
        _one_process(tiny_model_dir, stopped_run, out, resume=True, checkpoint_dir=folder, steps=5)
    sharded = folder / "current" / "sharded"
    fsdp.check_sharded_model(sharded, make_tiny_llama(seed=1)[0])  # same shapes: accepted
    other, _ = make_tiny_llama(seed=0, intermediate_size=96)
    with pytest.raises(SparsecError, match="holds another model's weights .* delete it"):
        fsdp.check_sharded_model(sharded, other)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(mode: str, out: Path, timeout_s: str) -> list[subprocess.Popen]:
    """Both ranks as plain processes with torchrun's variables: no agent that would
    stop rank 0 when rank 1 fails, so rank 0's own handling of it is what is seen."""
    port = str(_free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(HERE / "distributed_worker.py"), mode, str(out)],
            cwd=REPO,
            env=_env(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                SPARSEC_DIST_TIMEOUT=timeout_s,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]


@pytest.mark.parametrize("mode, timeout_s", [("crash", "60"), ("hang", "5")])
def test_a_failed_or_stuck_rank_does_not_hang_the_other(tmp_path, mode, timeout_s):
    rank0, rank1 = _start_ranks(mode, tmp_path, timeout_s)
    started = time.monotonic()
    try:
        assert rank0.wait(timeout=50) == 0, rank0.stderr.read()[-3000:]
        elapsed = time.monotonic() - started
    finally:
        for p in (rank0, rank1):
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stderr.close()
    outcome = (tmp_path / "rank0.txt").read_text()
    assert outcome.startswith("rank 0 of 2: a collective with the other ranks failed (")
    assert "\n" not in outcome
    # A dead rank is noticed at once; a stuck one after the timeout (plus start-up).
    assert elapsed < (30 if mode == "crash" else 45)


def test_missing_rendezvous_is_a_one_line_error(monkeypatch):
    for name in distributed_mod.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SparsecError, match="torch.distributed could not start .*MASTER_ADDR"):
        with distributed_mod.process_group(torch.device("cpu")):
            pass


@pytest.mark.parametrize("world_size", [None, "1"])
def test_without_torchrun_there_is_no_process_group(monkeypatch, world_size):
    for name in distributed_mod.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    if world_size is not None:  # torchrun --nproc-per-node 1: one process, as without it
        monkeypatch.setenv("WORLD_SIZE", world_size)
    with distributed_mod.process_group(torch.device("cpu")) as ranks:
        assert ranks == distributed_mod.Ranks() and ranks.main and not ranks.distributed
        assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--batch-size", "3"],
            "--batch-size 3 does not split over the 2 ranks of this torchrun job (each rank "
            "trains on an equal share of every batch): pass a multiple of 2, such as "
            "--batch-size 4",
        ),
        (["--batch-size", "2", "--int8", "--qat-steps", "1"], "--qat-steps under torchrun"),
    ],
)
def test_a_batch_the_ranks_cannot_share_is_a_one_line_error_before_any_work(
    tiny_model_dir, tmp_path, monkeypatch, capsys, extra, message
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["sparsify", str(tiny_model_dir), "--sparsity", "0.5", "-o", str(tmp_path / "o")]
    argv += ["--steps", "2", "--seq-len", "24", "--device", "cpu"]
    err = _refused(capsys, [*argv, *extra])
    assert err.startswith(f"sparsec sparsify: error: {message}")
    assert not torch.distributed.is_initialized() and not (tmp_path / "o").exists()
    # The ablation: with a batch that splits, the same command gets past the check (and
    # stops at the rendezvous, which this process has no torchrun for).
    err = _refused(capsys, [*argv, "--batch-size", "2"])
    assert "torch.distributed could not start" in err


def test_shard_takes_whole_chunks_round_robin_and_needs_one_per_rank():
    calibration = torch.arange(10)[:, None].expand(10, 3)  # sequence i is all i
    ranks = [distributed_mod.Ranks(r, 2) for r in (0, 1)]
    assert ranks[0].shard(calibration, 4)[:, 0].tolist() == [0, 1, 2, 3, 8, 9]
    assert ranks[1].shard(calibration, 4)[:, 0].tolist() == [4, 5, 6, 7]
    assert distributed_mod.Ranks().shard(calibration, 4) is calibration
    with pytest.raises(SparsecError, match="pass --calibration-samples 12 or more"):
        distributed_mod.Ranks(0, 3).shard(calibration[:8], 4)


# --- --device ---------------------------------------------------------------------------


def _refused(capsys, argv) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_device_cuda_without_cuda_is_a_one_line_error(tiny_model_dir, tmp_path, device, capsys):
    argv = ["sparsify", str(tiny_model_dir), "--sparsity", "0.5", "-o", str(tmp_path / "o")]
    err = _refused(capsys, [*argv, "--device", device])
    assert err.startswith(f"sparsec sparsify: error: --device {device}: PyTorch ")
    assert "sees no CUDA device" in err and "use --device cpu" in err
    assert not (tmp_path / "o").exists()


def test_device_spelling_is_checked_and_shown_in_help(tiny_model_dir, tmp_path, capsys):
    argv = ["sparsify", str(tiny_model_dir), "--sparsity", "0.5", "-o", str(tmp_path / "o")]
    err = _refused(capsys, [*argv, "--device", "gpu"])
    assert err == (
        "sparsec sparsify: error: --device 'gpu' is not a device; use auto, cpu, cuda or cuda:N"
    )
    with pytest.raises(SystemExit):
        cli.main(["sparsify", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--device auto|cpu|cuda[:N]" in help_text and "(default: auto," in help_text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparsify_on_cuda_runs_every_stage_and_matches_the_cpu_masks(
    tiny_model_dir, text_file, tmp_path
):
    base = dict(
        model=str(tiny_model_dir),
        sparsity=0.5,
        calibration=[str(text_file)],
        calibration_samples=8,
        calibration_seq_len=48,
        train=[str(text_file)],
        batch_size=2,
        seq_len=24,
        eval=[str(text_file)],
        eval_tokens=128,
        curve_tokens=64,
        quiet=True,
    )
    full = dict(steps=2, int8=True, qat_steps=1)
    out = sparsify(SparsifyOptions(**base, **full, output=tmp_path / "all", device="cuda"))
    report = json.loads((out / "report.json").read_text())
    assert list(report["perplexity"]) == ["dense", "one-shot", "distilled", "int8"]
    bf16 = sparsify(
        SparsifyOptions(**base, steps=2, bf16=True, output=tmp_path / "bf16", device="cuda")
    )
    assert (bf16 / "model.safetensors").is_file()

    gpu = sparsify(SparsifyOptions(**base, output=tmp_path / "gpu", device="cuda"))
    cpu = sparsify(SparsifyOptions(**base, output=tmp_path / "cpu", device="cpu"))
    g, c = load_file(gpu / "model.safetensors"), load_file(cpu / "model.safetensors")
    zeros = sum(int((v == 0).sum()) for v in c.values())
    # Other matmul kernels: a few near-tie mask choices may go the other way.
    masks = differing({k: v == 0 for k, v in g.items()}, {k: v == 0 for k, v in c.items()})
    assert masks < 0.01 * zeros


_LEAVE_AFTER_FAILURE = """
import atexit, sys
from sparsec.sparsify import distributed
atexit.register(lambda: print("teardown ran", flush=True))
ranks = distributed.Ranks(0, 2)
if sys.argv[1] == "failed":
    try:
        with distributed._collective(ranks):
            raise RuntimeError("Connection closed by peer")
    except Exception as e:
        print(e, flush=True)
sys.exit(distributed.exit_status(3))
"""


@pytest.mark.parametrize("collective", ["failed", "fine"])
def test_a_rank_whose_collective_failed_leaves_without_the_interpreter_teardown(collective):
    # gloo can hold a thread blocked on the lost peer, which the normal teardown destroys
    # unjoined (SIGABRT after the one-line error); the ablation ("fine") tears down.
    done = subprocess.run(
        [sys.executable, "-c", _LEAVE_AFTER_FAILURE, collective],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert ("teardown ran" in done.stdout) == (collective == "fine")
    if collective == "failed":
        assert "a collective with the other ranks failed (Connection closed by peer)" in done.stdout
