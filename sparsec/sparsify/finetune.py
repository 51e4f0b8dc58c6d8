"""``sparsec finetune``: dense supervised fine-tuning, to make a task teacher.

The paper first fine-tunes the dense model on the task (GSM8K) and distills the sparse
student from that teacher. This is the same training step as distillation with plain
cross-entropy and no masks.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sparsec.errors import SparsecError
from sparsec.sparsify.data import TokenData, read_corpus
from sparsec.sparsify.squarehead import language_model_loss
from sparsec.sparsify.train import MaskedTrainer, TrainConfig


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
) -> Path:
    from tqdm import tqdm

    from sparsec.models import load_model, save_model

    if steps < 1:
        raise SparsecError(f"--steps {steps}: fine-tuning needs at least one step")
    for source in train:  # bad data files fail before the model loads
        read_corpus(source)
    model, tokenizer = load_model(model_source, quiet=quiet)
    data = TokenData(tokenizer, train)
    trainer = MaskedTrainer(model, TrainConfig(steps, lr, 0.1, batch_size, seq_len, seed))

    def loss_fn(ids, mask):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss = language_model_loss(logits, ids, mask)
        return loss, {"ce": loss.item()}

    with tqdm(total=steps, desc="finetune", disable=quiet, file=sys.stderr) as bar:
        while trainer.step < steps:
            ids, mask = data.batch(trainer.step, batch_size, seq_len, seed)
            metrics = trainer.train_step(lambda ids=ids, mask=mask: loss_fn(ids, mask))
            bar.set_postfix(ce=f"{metrics['ce']:.3f}")
            bar.update(1)
    model.eval()
    return save_model(model, tokenizer, output)
