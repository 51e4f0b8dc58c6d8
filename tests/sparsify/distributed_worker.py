"""One rank of the distributed tests (tests/sparsify/test_distributed.py).

Run by torchrun (or started by the test with torchrun's variables set by hand):

    python distributed_worker.py MODE OUT_DIR
    python distributed_worker.py sparsify STOP_AT OUT_DIR SPARSIFY_ARGS...

``masks``: prunes the tiny model on this rank's share of the calibration twice, with the
Hessians summed over the ranks and (the ablation) with this rank's own share alone, and
saves both sets of masks and OWL's outlier ratios to OUT_DIR/rank{R}.pt.
``crash``: rank 1 fails before its first collective; ``hang``: rank 1 never reaches it.
Rank 0 writes its one-line outcome to OUT_DIR/rank0.txt either way.
``fsdp``: distills the tiny model with the student sharded by FSDP2 (``distill``), saves
each step's loss, the parameters' placements and shard shapes, and the pruned entries
that are not zero after each step, with the masks re-applied and (the ablation) without.
``sparsify``: ``sparsec sparsify SPARSIFY_ARGS`` with every training step recorded in
OUT_DIR/steps{R}.jsonl; rank 1 sends itself SIGTERM after step STOP_AT (0: never).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from sparsec.errors import SparsecError
from sparsec.sparsify import distributed
from sparsec.sparsify.owl import outlier_ratios
from sparsec.sparsify.patterns import parse_pattern
from sparsec.sparsify.prune import prune_model
from sparsec.sparsify.squarehead import distillation_loss
from sparsec.sparsify.train import MaskedTrainer, TrainConfig
from sparsec.testing import make_tiny_llama

CHUNK = 4
SAMPLES = 16  # 4 chunks: 2 a rank, so each rank sums more than one chunk itself
SEQ_LEN = 32


def calibration() -> torch.Tensor:
    """The whole calibration set, the same on every rank and in the 1-process reference."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (SAMPLES, SEQ_LEN), generator=generator)


def masks_of(shard: torch.Tensor, hessian_sum) -> dict[str, torch.Tensor]:
    model, _ = make_tiny_llama(seed=0)
    masks: dict[str, torch.Tensor] = {}
    prune_model(
        model,
        shard,
        0.5,
        parse_pattern("unstructured"),
        chunk=CHUNK,
        on_layer=lambda _i, _reports, layer_masks, _outputs: masks.update(layer_masks),
        hessian_sum=hessian_sum,
    )
    return masks


# Distillation: global batches of BATCH x TRAIN_LEN tokens (each rank takes BATCH / N
# rows), row 1 with padding, so that the global means differ from the shares' own.
BATCH, TRAIN_LEN, STEPS = 4, 24, 4


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 256, (BATCH, TRAIN_LEN), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, TRAIN_LEN - 9 :] = 0
    return ids, mask


def pruned_pair() -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    """The tiny model's dense teacher, its 50% magnitude-pruned student and the masks."""
    student, _ = make_tiny_llama(seed=0)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    masks = {}
    with torch.no_grad():
        for name, module in student.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                masks[f"{name}.weight"] = w.abs() > w.abs().flatten().median()
                w.mul_(masks[f"{name}.weight"])
    return student, teacher, masks


def distill(
    ranks: distributed.Ranks, whole_loss: bool = True, masks_on: bool = True, steps: int = STEPS
) -> dict:
    """``steps`` distillation steps as sparsify takes them (sharded by FSDP2 under
    torchrun, MaskedTrainer in one process); each rank on its share of the global batch.
    ``whole_loss`` False (the ablation): each share's loss over its own tokens only.
    Returns the losses, the pruned non-zeros after each step, the parameters' layout and
    the trained weights (whole: on rank 0 only under torchrun)."""
    from sparsec.sparsify import fsdp

    student, teacher, masks = pruned_pair()
    config = TrainConfig(steps, 3e-3, 0.1, BATCH, TRAIN_LEN, 0)
    run = lambda fn, *a, **k: fn(*a, **k)  # noqa: E731
    if ranks.distributed:
        run = fsdp.shard(student, teacher, ranks, bf16=False)
        trainer = fsdp.ShardedTrainer(student, config, masks, ranks)
    else:
        trainer = MaskedTrainer(student, config, masks)
    if not masks_on:
        trainer.masked = []
    reduce = ranks.all_sum if ranks.distributed and whole_loss else None
    losses, nonzero = [], []
    for step in range(steps):
        ids, mask = ranks.batch_share(*global_batch(step))
        metrics = trainer.train_step(
            lambda ids=ids, mask=mask: run(
                distillation_loss, student, teacher, ids, mask, "ce+kl", reduce=reduce
            )
        )
        losses.append(metrics["loss"])
        nonzero.append(_pruned_nonzero(student, masks, ranks))
    layout = {
        name: (
            type(p).__name__,
            [str(pl) for pl in getattr(p, "placements", ())],
            tuple(p.shape),
            tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape),
        )
        for name, p in student.named_parameters()
    }
    weights = fsdp.full_model_state(student) if ranks.distributed else student.state_dict()
    return {"losses": losses, "pruned_nonzero": nonzero, "layout": layout, "weights": weights}


def _pruned_nonzero(student, masks: dict, ranks: distributed.Ranks) -> int:
    """Entries of this rank's shards that are pruned and not zero."""
    params = dict(student.named_parameters())
    count = 0
    for name, mask in masks.items():
        weight = params[name]
        if hasattr(weight, "to_local"):
            from torch.distributed.tensor import distribute_tensor

            mask = distribute_tensor(
                mask, weight.device_mesh, weight.placements, src_data_rank=None
            ).to_local()
            weight = weight.to_local()
        count += int(((weight != 0) & ~mask).sum())
    return count


def record_steps(out: Path, stop_at: int) -> None:
    """Every training step's index and loss to OUT/steps{RANK}.jsonl; rank 1 sends
    itself SIGTERM after step ``stop_at`` (a kill of one rank mid-distillation)."""
    rank = int(os.environ.get("RANK", "0"))
    train_step = MaskedTrainer.train_step

    def recorded(self, loss_fn):
        step = self.step
        metrics = train_step(self, loss_fn)
        with open(out / f"steps{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": metrics["loss"]}) + "\n")
        if rank == 1 and self.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    MaskedTrainer.train_step = recorded


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    with distributed.process_group(torch.device("cpu")) as ranks:
        if mode == "fsdp":
            results = {"kept": distill(ranks), "whole_loss_off": distill(ranks, whole_loss=False)}
            results["masks_off"] = distill(ranks, masks_on=False, steps=1)
            torch.save(results, out / f"rank{ranks.rank}.pt")
            return
        shard = ranks.shard(calibration(), CHUNK)
        if mode == "masks":
            model, _ = make_tiny_llama(seed=0)
            torch.save(
                {
                    "summed": masks_of(shard, ranks.sum_hessian),
                    "own_share": masks_of(shard, None),
                    "owl": outlier_ratios(model, shard, chunk=CHUNK, total=ranks.sum_hessian),
                },
                out / f"rank{ranks.rank}.pt",
            )
            return
        if ranks.rank == 1:
            if mode == "crash":
                raise SparsecError("rank 1 failed on purpose")
            time.sleep(3600)  # "hang": rank 0 must give up after the timeout
        try:
            masks_of(shard, ranks.sum_hessian)
            outcome = "finished"
        except SparsecError as e:
            outcome = str(e)
        (out / "rank0.txt").write_text(outcome)


if __name__ == "__main__":
    if sys.argv[1] == "sparsify":
        from sparsec import cli

        record_steps(Path(sys.argv[3]), int(sys.argv[2]))
        sys.exit(distributed.exit_status(cli.main(["sparsify", *sys.argv[4:]])))
    main(sys.argv[1], Path(sys.argv[2]))
    sys.exit(distributed.exit_status(0))  # as the console script leaves
