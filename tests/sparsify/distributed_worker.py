"""One rank of the distributed-calibration tests (tests/sparsify/test_distributed.py).

Run by torchrun (or started by the test with torchrun's variables set by hand):

    python distributed_worker.py MODE OUT_DIR

``masks``: prunes the tiny model on this rank's share of the calibration twice, with the
Hessians summed over the ranks and (the ablation) with this rank's own share alone, and
saves both sets of masks and OWL's outlier ratios to OUT_DIR/rank{R}.pt.
``crash``: rank 1 fails before its first collective; ``hang``: rank 1 never reaches it.
Rank 0 writes its one-line outcome to OUT_DIR/rank0.txt either way.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from sparsec.errors import SparsecError
from sparsec.sparsify import distributed
from sparsec.sparsify.owl import outlier_ratios
from sparsec.sparsify.patterns import parse_pattern
from sparsec.sparsify.prune import prune_model
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


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    with distributed.process_group(torch.device("cpu")) as ranks:
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
    main(sys.argv[1], Path(sys.argv[2]))
