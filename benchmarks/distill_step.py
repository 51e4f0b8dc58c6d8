"""Time one SquareHead distillation step of SmolLM2: the output losses on full logits (the
plain reference) against the LM-head-fused ones ``sparsify`` ships, in the same process.

    python benchmarks/distill_step.py [--threads 2] [--steps 6] [--output-loss ce+kl]

Both variants train the same student (a copy of the dense model: sparsity does not change
the dense training step's cost) on the same 512-token batches, interleaved step by step
so machine noise hits both alike; the figure that matters is the ratio. Each variant's
first step is a warm-up and not timed. ``sparsec`` sets ``THP_MEM_ALLOC_ENABLE=1`` (huge
pages for torch's large tensors); run this under ``THP_MEM_ALLOC_ENABLE=0`` and ``=1``
to see what it is worth, as it is read once per process.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the sparsec CLI does, before torch

import torch  # noqa: E402


def reference_loss(student, teacher, ids, mask, output_loss):
    """SquareHead plus the output losses computed from materialised logits."""
    from sparsec.sparsify.squarehead import (
        language_model_loss,
        logit_kl_loss,
        record_layer_outputs,
        squarehead_loss,
    )

    with torch.no_grad(), record_layer_outputs(teacher) as teacher_hidden:
        t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with record_layer_outputs(student) as student_hidden:
        logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits
    loss = squarehead_loss(student_hidden, teacher_hidden, mask)
    if output_loss != "kl":
        loss = loss + language_model_loss(logits, ids, mask)
    if output_loss != "ce":
        loss = loss + logit_kl_loss(logits, t_logits, mask)
    return loss, {"loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--output-loss", default="ce+kl", choices=("ce", "kl", "ce+kl"))
    args = parser.parse_args()

    from sparsec.models import load_model
    from sparsec.sparsify import data as data_mod
    from sparsec.sparsify.squarehead import distillation_loss
    from sparsec.sparsify.train import MaskedTrainer, TrainConfig, bf16_linear_weights_

    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_model("smollm2-135m", quiet=True)
    config = TrainConfig(100, 1e-5, batch_size=1, seq_len=512, bf16=True)
    names = ("reference (full logits)", "fused head (shipped)")
    trainers = {name: MaskedTrainer(copy.deepcopy(teacher), config) for name in names}
    for p in teacher.parameters():
        p.requires_grad_(False)
    fast_teacher = copy.deepcopy(teacher)
    bf16_linear_weights_(fast_teacher)  # what sparsify does under --bf16
    variants = {names[0]: (reference_loss, teacher), names[1]: (distillation_loss, fast_teacher)}
    data = data_mod.TokenData(tokenizer, ["builtin:fortunes"])
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(args.steps + 1):
        ids, mask = data.batch(step, 1, 512, 0)
        for name, (loss_fn, t) in variants.items():
            trainer = trainers[name]
            started = time.perf_counter()
            step_loss = functools.partial(loss_fn, trainer.model, t, ids, mask, args.output_loss)
            trainer.train_step(step_loss)
            if step:
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["reference (full logits)"])
    thp = os.environ["THP_MEM_ALLOC_ENABLE"]
    print(
        f"SmolLM2 distillation step, 1 x 512, --bf16, {args.output_loss}, "
        f"{args.threads} threads, THP_MEM_ALLOC_ENABLE={thp}"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:26s} median {median:.3f} s  ({base / median:.2f}x)")


if __name__ == "__main__":
    main()
