"""SquareHead distillation data-parallel over the ranks of a torchrun job, with FSDP2.

Every rank holds a shard of the student and of the frozen teacher: each decoder layer of
both is its own ``fully_shard`` unit, and ``DistillPair``, the module that holds the two
models, is the root unit that owns the rest (embeddings, final norms, the LM heads). A
parameter is a DTensor sharded on dim 0 over the ranks (``Shard(0)``); a layer's whole
weights exist only while its forward or backward runs (all-gathered, then freed), and its
gradients are reduce-scattered back to the shards. The optimizer (AdamW) updates the
shards, so its moments are sharded too.

Each rank trains on its share of every global batch (``Ranks.batch_share``: rows
``rank * b/N`` to ``(rank + 1) * b/N``). The loss of a share is taken over the global
batch's counts (``squarehead.distillation_loss`` with ``reduce``): the teacher's energies
and the token counts are all-reduced first, so the shares' losses sum to the loss one
process computes on the whole batch. FSDP averages the gradients over the ranks, so the
loss is scaled by the world size before the backward pass: the reduced gradient is then
the gradient of the whole batch, and the optimizer step the one-process step up to float
rounding. Gradient clipping takes the norm over all shards (DTensor).

After every optimizer step each pruned weight's local shard is multiplied by the same
rows of its mask (``ShardedTrainer.apply_masks``), so zeros stay zeros in the shards that
the next all-gather assembles.

Checkpoints (``sharded_state``, ``load_sharded``) use torch.distributed.checkpoint: each
rank writes its shards of the model and the optimizer, and a load reshards them to the
loading job's world size, one process included (a plain model and optimizer).

The root unit runs whatever function it is called with (``pair(fn, *args)``): FSDP2
unshards the root's parameters around a root forward and hooks the backward pass to it,
so the distillation loss (which calls the decoders and reads the LM head weights
directly) and the perplexity of the recovery curve both run inside one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sparsec.errors import SparsecError
from sparsec.sparsify.distributed import Ranks
from sparsec.sparsify.layer_walk import decoder_layers
from sparsec.sparsify.train import MaskedTrainer, TrainConfig


class DistillPair(nn.Module):
    """The student and the frozen teacher under one FSDP2 root unit.

    ``pair(fn, *args, **kwargs)`` calls ``fn`` inside the root's forward, with the
    parameters the root owns (embeddings, final norms, heads) gathered for it.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = teacher

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


def mixed_precision(device: torch.device, bf16: bool):
    """FSDP2's policy: with ``--bf16`` on a GPU that has bfloat16, the gathered weights
    are bfloat16 and the gradients reduced in float32 (the shards and the optimizer stay
    float32). On the CPU (gloo) everything stays float32; ``--bf16`` is autocast there,
    as in one process."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(student: nn.Module, teacher: nn.Module, ranks: Ranks, bf16: bool) -> DistillPair:
    """Shard both models in place over the job's ranks; returns the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world_size,))
    policy = mixed_precision(ranks.device, bf16)
    for model in (student, teacher):
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    pair = DistillPair(student, teacher)
    fully_shard(pair, mesh=mesh, mp_policy=policy)
    return pair


class ShardedTrainer(MaskedTrainer):
    """``MaskedTrainer`` on a student sharded by ``shard``: the optimizer holds the
    DTensor shards, the masks are cut to each shard's rows, and the backward pass sums
    the ranks' gradients (see the module's docstring)."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        masks: dict[str, torch.Tensor] | None,
        ranks: Ranks,
    ):
        self.ranks = ranks
        super().__init__(model, config, masks)

    def _mask_for(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(weight, DTensor):
            raise SparsecError(f"internal: a masked weight of shape {weight.shape} is not sharded")
        # Every rank has the whole mask: each cuts its own rows, as FSDP cut the weight
        # (a copy, so that the whole mask is not kept alive by a view of it).
        local = (
            distribute_tensor(
                mask.to(weight.device), weight.device_mesh, weight.placements, src_data_rank=None
            )
            .to_local()
            .clone()
        )
        if local.shape != weight.to_local().shape:
            raise SparsecError(
                f"internal: mask shard {tuple(local.shape)} does not match the weight's "
                f"{tuple(weight.to_local().shape)}"
            )
        return local

    @torch.no_grad()
    def apply_masks(self) -> None:
        for weight, mask in self.masked:
            weight.to_local().mul_(mask)  # the shard, in place (to_local is a view)

    def _backward(self, loss: torch.Tensor) -> None:
        # FSDP averages the gradients over the ranks; each loss is a share of the global
        # batch's, so the sum of the ranks' gradients is the batch's gradient.
        (loss * self.ranks.world_size).backward()


def trainable_names(model: nn.Module) -> list[str]:
    """The names of the parameters ``MaskedTrainer`` optimizes, in its order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def load_one_process_trainer(trainer: ShardedTrainer, state: dict, names: list[str]) -> None:
    """Continue a one-process distillation (a ``MaskedTrainer.state_dict`` from a plain
    checkpoint) on sharded parameters: its optimizer state, keyed by parameter index,
    is keyed by name and cut to the shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    optimizer = state["optimizer"]
    by_name = {
        "state": {names[i]: value for i, value in optimizer["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]}
            for group in optimizer["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        trainer.model,
        trainer.optimizer,
        by_name,
        options=StateDictOptions(full_state_dict=True),
    )
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.step = state["step"]


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What torch.distributed.checkpoint saves: the model's and the optimizer's state,
    keyed by parameter name (each rank's DTensor shards under FSDP, whole tensors in one
    process), so that any world size can load it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def check_sharded_model(folder: Path, model: nn.Module) -> None:
    """The checkpoint's weights have ``model``'s names and shapes (else a SparsecError:
    a checkpoint of another model)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        raise SparsecError(
            f"the checkpoint's sharded weights in {folder} cannot be read ({e}); delete the "
            "checkpoint folder and run without --resume to start over"
        ) from e
    saved = {
        key.removeprefix("model."): tuple(getattr(meta, "size", ()))
        for key, meta in metadata.items()
        if key.startswith("model.")
    }
    here = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    differ = sorted(set(saved) ^ set(here)) + sorted(
        name for name in set(saved) & set(here) if saved[name] != here[name]
    )
    if differ:
        name = differ[0]
        raise SparsecError(
            f"the checkpoint in {folder.parent.parent} holds another model's weights "
            f"({len(differ)} of {len(here)} differ, such as {name}: "
            f"{saved.get(name, 'absent')} there, {here.get(name, 'absent')} here); "
            "delete it to start over"
        )


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load a ``sharded_state`` checkpoint into ``model`` and ``optimizer``, whatever the
    world size it was written with (collective under torchrun)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    check_sharded_model(folder, model)
    state = sharded_state(model, optimizer)  # the tensors to load into, as laid out here
    one_process = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # one process: dcp.load warns that it is one
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=one_process)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def save_sharded(state: dict, folder: Path) -> None:
    """Collective: every rank writes its shards of ``state`` into ``folder``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(folder))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the sharded model's whole state dict on rank 0 (on the CPU); the
    other ranks get an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
