"""``sparsec finetune``: dense supervised fine-tuning, to make a task teacher.

The paper first fine-tunes the dense model on the task (GSM8K) and distills the sparse
student from that teacher. This is the same training step as distillation with plain
cross-entropy and no masks. Like sparsify, it checkpoints to ``OUTPUT.checkpoint``
every ``checkpoint_every`` seconds and on Ctrl-C; ``resume=True`` continues from there.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sparsec.arguments import NON_NEGATIVE_FLOAT, POSITIVE_INT, SEED, Range
from sparsec.errors import SparsecError
from sparsec.paths import check_output_path
from sparsec.sparsify.checkpoint import Checkpoint, GracefulInterrupt
from sparsec.sparsify.data import TokenData, read_corpus
from sparsec.sparsify.head_loss import fused_head_loss
from sparsec.sparsify.train import MaskedTrainer, TrainConfig, require_bf16_cpu


def finetune(
    model_source: str,
    train: list[str],
    output: Path,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 8,
    seq_len: int = 256,
    seed: int = 0,
    quiet: bool = False,
    checkpoint_every: float = 300.0,
    resume: bool = False,
    bf16: bool = False,
) -> Path:
    from tqdm import tqdm

    from sparsec.models import load_model, resolve, save_model

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SparsecError(f"--steps {steps}: fine-tuning needs at least one step")
    Range(0, 1, above=True).check("--lr", lr)
    POSITIVE_INT.check("--batch-size", batch_size)
    Range(2, integer=True, note="tokens per training sequence").check("--seq-len", seq_len)
    SEED.check("--seed", seed)
    NON_NEGATIVE_FLOAT.check("--checkpoint-every", checkpoint_every)
    source = resolve(model_source)
    check_output_path(
        output,
        inputs=tuple(s for s in train if not s.startswith("builtin:")),
        input_dirs=(source.folder,) if source.kind == "hf" else (),
        what="-o",
        directory=True,
    )
    if bf16:
        require_bf16_cpu()
    output = Path(output)
    checkpoint = Checkpoint(output.parent / f"{output.name}.checkpoint")
    if checkpoint.exists() and not resume:
        raise SparsecError(
            f"a checkpoint of an earlier run is in {checkpoint.folder}; pass --resume to "
            "continue it, or delete that folder to start over"
        )
    if resume and not checkpoint.exists():
        raise SparsecError(f"--resume: no checkpoint in {checkpoint.folder}")
    for source in train:  # bad data files fail before the model loads
        read_corpus(source)
    options = dict(
        model=model_source, train=list(train), steps=steps, lr=lr, batch_size=batch_size,
        seq_len=seq_len, seed=seed, bf16=bf16,
    )  # fmt: skip
    model, tokenizer = load_model(model_source, quiet=quiet)
    data = TokenData(tokenizer, train)
    if (note := data.truncation_note(seq_len)) and not quiet:
        print(note, file=sys.stderr)
    trainer = MaskedTrainer(
        model, TrainConfig(steps, lr, 0.1, batch_size, seq_len, seed, bf16=bf16)
    )
    if resume:
        state, tensors = checkpoint.load()
        if state.get("options") != options:
            raise SparsecError(
                f"the checkpoint in {checkpoint.folder} was made with other options "
                f"({state.get('options')}); rerun with those, or delete it to start over"
            )
        model.load_state_dict(tensors["model"])
        trainer.load_state_dict(tensors["trainer"])

    def save() -> None:
        tensors = {"model": model.state_dict(), "trainer": trainer.state_dict()}
        checkpoint.save({"options": options, "step": trainer.step}, tensors)

    def loss_fn(ids, mask):
        hidden = model.get_decoder()(
            input_ids=ids, attention_mask=mask, use_cache=False
        ).last_hidden_state
        loss, ce, _ = fused_head_loss(
            hidden, model.get_output_embeddings().weight, ids, mask, ce_weight=1.0
        )
        return loss, {"ce": ce}

    bar = tqdm(total=steps, initial=trainer.step, desc="finetune", disable=quiet, file=sys.stderr)
    last_save = time.monotonic()
    with bar, GracefulInterrupt() as interrupt:
        while trainer.step < steps:
            ids, mask = data.batch(trainer.step, batch_size, seq_len, seed)
            metrics = trainer.train_step(lambda ids=ids, mask=mask: loss_fn(ids, mask))
            bar.set_postfix(ce=f"{metrics['ce']:.3f}")
            bar.update(1)
            if trainer.step < steps and (
                interrupt.requested or time.monotonic() - last_save >= checkpoint_every
            ):
                save()
                last_save = time.monotonic()
            if interrupt.requested and trainer.step < steps:
                print(
                    f"\ninterrupted: checkpoint saved in {checkpoint.folder}; run the same "
                    "command with --resume to continue",
                    file=sys.stderr,
                )
                raise KeyboardInterrupt
    model.eval()
    out = save_model(model, tokenizer, output)
    checkpoint.remove()
    return out
