"""``sparsec sparsify``: dense model → SparseGPT one-shot → SquareHead → INT8 → HF folder.

Each stage records its results in a state dict that is checkpointed (with the model,
masks, optimizer and in-flight activations) so that ``--resume`` continues from the
last layer or step done. The output folder is assembled in a temporary folder and
renamed into place at the very end: an interrupted run never leaves half an output.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from sparsec import __version__
from sparsec.arguments import (
    FRACTION,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    SEED,
    Range,
    check_ranges,
)
from sparsec.errors import SparsecError
from sparsec.models import checkpoint_state_dict
from sparsec.paths import check_output_path
from sparsec.progress import stage
from sparsec.sparsify import data as data_mod
from sparsec.sparsify import distributed, fsdp
from sparsec.sparsify import report as report_mod
from sparsec.sparsify.checkpoint import Checkpoint, GracefulInterrupt, write_errors
from sparsec.sparsify.device import check_device, resolve_device
from sparsec.sparsify.layer_walk import decoder_layers, prunable_linears
from sparsec.sparsify.owl import OWL_LAMBDA, check_owl_lambda, outlier_ratios, owl_sparsities
from sparsec.sparsify.patterns import Pattern, check_sparsity, parse_pattern
from sparsec.sparsify.perplexity import perplexity
from sparsec.sparsify.prune import prune_model
from sparsec.sparsify.quant import (
    ActivationFakeQuant,
    QuantAwareLinears,
    quantize_weights_,
    write_quantization_json,
)
from sparsec.sparsify.squarehead import OUTPUT_LOSSES, distillation_loss
from sparsec.sparsify.train import (
    MaskedTrainer,
    TrainConfig,
    bf16_linear_weights_,
    require_bf16_cpu,
)


def default_lr(sparsity: float) -> float:
    """The paper's 7B learning rates by sparsity (40-50%: 3e-5, 60%: 1e-4, 70%: 8e-5),
    times 3: a 135M model trained on 512-token batches for a few hundred steps tolerates
    a higher rate than a 7B one (not tuned yet: pass --lr to override)."""
    paper = 3e-5 if sparsity <= 0.55 else 1e-4 if sparsity <= 0.65 else 8e-5
    return 3 * paper


SMOOTH_SAMPLES = 16  # calibration sequences for the smoothing statistics
# Calibration sequences a forward of the pruning walk (and the unit a torchrun job shards).
CALIBRATION_CHUNK = 4
# A MODEL with this share of zero weights or more was pruned before: it is pruned further
# (gradual pruning, as Sparse Llama's 70% models were made from its 50% ones) and the
# report's "dense" row is the teacher's. Dense checkpoints have next to no exact zeros.
SPARSE_INPUT = 0.05

# Options that shape the one-shot model, and those that shape distillation: a checkpoint
# taken before distillation began may be resumed with other training options.
PRUNE_OPTIONS = tuple(
    "model sparsity pattern method layer_sparsity owl_lambda calibration calibration_samples "
    "calibration_seq_len seed".split()
)
TRAIN_OPTIONS = tuple(
    "train steps lr batch_size seq_len example_share warmup teacher output_loss qat_steps "
    "smooth bf16".split()
)

# SparseGPT calibrates on 128 sequences; every one more runs through every layer again
# and its activations stay in memory (and in the checkpoints) for the whole walk.
MAX_CALIBRATION_SAMPLES = 4096
# The calibration activations (each decoder layer's inputs and outputs, float32) may
# take this share of the machine's memory at most: more fails late, out of memory.
CALIBRATION_MEMORY_SHARE = 0.75

# The range of every numeric option, checked before any work (sparsec/arguments.py);
# --sparsity's and --example-share's are checked by patterns.py and data.py.
OPTION_RANGES = {
    "owl_lambda": NON_NEGATIVE_FLOAT,
    "calibration_samples": replace(
        POSITIVE_INT,
        maximum=MAX_CALIBRATION_SAMPLES,
        note="SparseGPT calibrates on 128; each sequence more costs time in every layer "
        "and memory for little accuracy",
    ),
    "calibration_seq_len": POSITIVE_INT,
    "steps": replace(NON_NEGATIVE_INT, note="0: one-shot, no distillation"),
    "lr": Range(0, 1, above=True, note="the default depends on --sparsity, such as 9e-05"),
    "batch_size": POSITIVE_INT,
    "seq_len": Range(2, integer=True, note="tokens per training sequence"),
    "warmup": FRACTION,
    "qat_steps": NON_NEGATIVE_INT,
    "eval_tokens": Range(2, integer=True, note="perplexity scores every token after the first"),
    "eval_every": replace(NON_NEGATIVE_INT, note="0: about 10 points over --steps"),
    "curve_tokens": Range(2, integer=True),
    "seed": SEED,
    "checkpoint_every": replace(
        NON_NEGATIVE_FLOAT, note="seconds; 0: at every layer and step, 1e9: only on Ctrl-C"
    ),
}


@dataclass
class SparsifyOptions:
    model: str
    output: Path
    sparsity: float
    pattern: str = "unstructured"
    method: str = "sparsegpt"  # or "magnitude", the baseline
    layer_sparsity: str = "uniform"  # or "owl": outlier-weighted per-layer sparsity (owl.py)
    owl_lambda: float = OWL_LAMBDA
    calibration: list[str] = field(default_factory=lambda: list(data_mod.DEFAULT_CALIBRATION))
    calibration_samples: int = 32
    calibration_seq_len: int = 512
    train: list[str] = field(default_factory=lambda: list(data_mod.DEFAULT_TRAIN))
    steps: int = 0
    lr: float | None = None
    # One 512-token sequence a step: the context length perplexity is scored at (and the
    # paper's). Measured on SmolLM2 at 50%, Verne 1.5% better than 4 x 128, same tutorial.
    batch_size: int = 1
    seq_len: int = 512
    example_share: float | None = None  # fraction of training rows that are .jsonl examples
    warmup: float = 0.1
    teacher: str | None = None
    output_loss: str = "ce"  # next to SquareHead: "ce" (the paper's), "kl" (teacher logits), both
    int8: bool = False
    qat_steps: int = 0  # the last N distillation steps train through W8A8 fake quant
    smooth: bool = True  # SmoothQuant-style smoothing before W8A8 (see smooth.py)
    bf16: bool = False  # distill under bfloat16 autocast (see train.py)
    eval: list[str] = field(default_factory=lambda: list(data_mod.DEFAULT_EVAL))
    eval_tokens: int = 16384
    eval_every: int = 0  # recovery-curve points every N steps (0: about 10 points)
    curve_tokens: int = 4096
    seed: int = 0
    checkpoint_dir: Path | None = None
    checkpoint_every: float = 300.0  # seconds between checkpoints (0: every layer/step)
    resume: bool = False
    quiet: bool = False
    device: str = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N (device.py)
    output_format: str = "hf"  # or "compressed-tensors" (sparsec/compressed.py)

    def fingerprint(self) -> dict:
        """The options a checkpoint must agree with to be resumed."""
        keep = PRUNE_OPTIONS + TRAIN_OPTIONS + ("int8",)
        return {k: v for k, v in asdict(self).items() if k in keep}

    @property
    def checkpoint_folder(self) -> Path:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        out = Path(self.output)
        return out.parent / f"{out.name}.checkpoint"


_OPTION_DEFAULTS = {f.name: f.default for f in fields(SparsifyOptions) if f.default is not MISSING}


def _log(opts: SparsifyOptions, message: str) -> None:
    if not opts.quiet:
        print(message, file=sys.stderr, flush=True)


def _bar(opts: SparsifyOptions, total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=opts.quiet, file=sys.stderr)


class Run:
    """One sparsify run: the model, its state and the checkpoint that mirrors them.

    Under torchrun (``ranks.distributed``) every rank runs this with its share of the
    calibration, then distills with its share of every batch (FSDP2, fsdp.py); rank 0
    alone goes on after distillation (distributed.py says why).
    """

    def __init__(self, opts: SparsifyOptions, ranks: distributed.Ranks | None = None):
        self.opts = opts
        self.ranks = ranks or distributed.Ranks()
        self.device = self.ranks.device
        self.calibration_seq_len = opts.calibration_seq_len  # cut to the model's context
        self.checkpoint = Checkpoint(opts.checkpoint_folder)
        self.last_save = time.monotonic()
        self.interrupt: GracefulInterrupt | None = None
        self.tensors: dict = {}
        # Under torchrun while the ranks distill: the trainer whose shards the
        # checkpoints save (every rank takes part), and the sharded checkpoint to resume.
        self.sharded_trainer: fsdp.ShardedTrainer | None = None
        self.resume_sharded: Path | None = None
        self.state: dict = {
            "stage": "start",
            "options": opts.fingerprint(),
            "perplexity": {},  # stage -> {source: ppl}
            "curve": [],  # [{"step", "perplexity"}]
            "layers": [],  # per pruned Linear: name, shape, sparsity, error
            "timings": {},
        }

    # --- checkpoints -------------------------------------------------------------------
    def save(self) -> None:
        if self.sharded_trainer is not None:  # a collective: every rank writes its shards
            self._save_sharded(self.sharded_trainer)
            return
        if not self.ranks.main or self._sharded():
            return
        tensors = dict(self.tensors)
        tensors["model"] = self.model.state_dict()
        self.checkpoint.save(self.state, tensors)
        self.last_save = time.monotonic()

    def _save_sharded(self, trainer: fsdp.ShardedTrainer) -> None:
        """The model and optimizer as torch.distributed.checkpoint shards, and rank 0's
        state.json and tensors.pt (the masks, the schedule) beside them."""
        tensors = {k: v for k, v in self.tensors.items() if k != "trainer"}
        tensors["schedule"] = {"scheduler": trainer.scheduler.state_dict(), "step": trainer.step}
        sharded = fsdp.sharded_state(self.model, trainer.optimizer)
        self.checkpoint.save_sharded(self.state, tensors, sharded, self.ranks)
        self.last_save = time.monotonic()

    def _sharded(self) -> bool:
        """Pruning under torchrun: each rank holds only its share of the activations, so
        there is no whole state to checkpoint (not yet: see docs/sparsify.md)."""
        return self.ranks.distributed and self.state["stage"] == "start"

    def safe_point(self) -> None:
        """Between layers/steps: checkpoint when due, and stop here after a Ctrl-C."""
        due = time.monotonic() - self.last_save >= self.opts.checkpoint_every
        requested = self.interrupt.requested
        if self._sharded():  # every rank stops after the same layer, or none does
            requested = self.ranks.any(requested)
            if requested:
                _log(
                    self.opts,
                    "\ninterrupted: a distributed run keeps no checkpoint while it prunes; "
                    "run the command again to start over",
                )
                raise KeyboardInterrupt
            return
        if self.sharded_trainer is not None:  # every rank saves and stops at the same step
            requested, due = self.ranks.any_of(requested, due)
        if due or requested:
            self.save()
        if requested:
            _log(
                self.opts,
                f"\ninterrupted: checkpoint saved in {self.checkpoint.folder}; "
                "run the same command with --resume to continue",
            )
            raise self.interrupt.stop()

    # --- stages ------------------------------------------------------------------------
    def evaluate(self, stage: str, quantized: bool = False, model=None) -> None:
        if stage in self.state["perplexity"]:
            return
        model = self.model if model is None else model
        results = {}
        started = time.monotonic()
        for source, tokens in self.eval_tokens.items():
            if quantized:
                with ActivationFakeQuant(self.linears):
                    results[source] = perplexity(model, tokens, max_tokens=self.opts.eval_tokens)
            else:
                results[source] = perplexity(model, tokens, max_tokens=self.opts.eval_tokens)
        self.state["perplexity"][stage] = results
        self.state["timings"][f"eval_{stage}"] = time.monotonic() - started
        shown = ", ".join(f"{Path(s).name} {p:.2f}" for s, p in results.items())
        _log(self.opts, f"perplexity {stage}: {shown}")

    def prune(self) -> None:
        opts = self.opts
        calibration = self.tensors.get("calibration")
        if calibration is None:
            with stage("preparing calibration data", quiet=opts.quiet):
                data = data_mod.TokenData(self.tokenizer, opts.calibration)
                calibration = data.windows(
                    opts.calibration_samples, self.calibration_seq_len, opts.seed
                )
            self.tensors["calibration"] = calibration
        start = self.state.get("next_layer", 0)
        layers = decoder_layers(self.model)
        # Under torchrun: this rank's share, and the sums over all ranks' shares.
        calibration = self.ranks.shard(calibration, CALIBRATION_CHUNK)
        total = self.ranks.sum_hessian if self.ranks.distributed else None
        start_inputs = self.tensors.get("layer_inputs")  # one process's, chunk by chunk
        if start_inputs is not None and self.ranks.distributed:
            start_inputs = start_inputs[self.ranks.rank :: self.ranks.world_size]
        if "layer_sparsity" not in self.state:  # from the dense model, before any pruning
            self.state["layer_sparsity"] = self._layer_sparsities(calibration, len(layers), total)
        bar = _bar(opts, len(layers), start, f"{opts.method} {opts.sparsity:.0%}")
        started = time.monotonic() - self.state["timings"].get("prune", 0.0)

        def on_layer(i, reports, masks, outputs):
            self.state["layers"].extend(asdict(r) for r in reports)
            self.tensors.setdefault("masks", {}).update(masks)
            self.tensors["layer_inputs"] = outputs.hidden
            self.state["next_layer"] = i + 1
            self.state["timings"]["prune"] = time.monotonic() - started
            bar.update(1)
            self.safe_point()

        try:
            prune_model(
                self.model,
                calibration,
                self.state["layer_sparsity"],
                self.pattern,
                chunk=CALIBRATION_CHUNK,
                method=opts.method,
                start_layer=start,
                start_inputs=start_inputs,
                on_layer=on_layer,
                hessian_sum=total,
            )
        finally:
            bar.close()
        self.tensors.pop("layer_inputs", None)
        self.tensors.pop("calibration", None)
        self.state["stage"] = "pruned"
        self.save()

    def _layer_sparsities(self, calibration, layers: int, total=None) -> list[float]:
        opts = self.opts
        if opts.layer_sparsity == "uniform":
            return [opts.sparsity] * layers
        started = time.monotonic()
        ratios = outlier_ratios(self.model, calibration, chunk=CALIBRATION_CHUNK, total=total)
        sparsities = owl_sparsities(ratios, opts.sparsity, opts.owl_lambda)
        self.state["timings"]["owl"] = time.monotonic() - started
        shown = ", ".join(f"{s:.3f}" for s in sparsities)
        _log(opts, f"OWL layer sparsities (lambda {opts.owl_lambda}): {shown}")
        return sparsities

    def smooth(self) -> None:
        """SmoothQuant-style smoothing for W8A8, once (before QAT, else before quantizing)."""
        opts = self.opts
        if not (opts.int8 and opts.smooth) or self.state.get("smoothed"):
            return
        from sparsec.sparsify.smooth import activation_maxima, smooth_

        started = time.monotonic()
        samples = min(opts.calibration_samples, SMOOTH_SAMPLES)
        batches = data_mod.TokenData(self.tokenizer, opts.calibration).windows(
            samples, self.calibration_seq_len, opts.seed
        )
        batches = batches.to(self.device)
        count = smooth_(self.model, activation_maxima(self.model, batches))
        self.state["smoothed"] = True
        self.state["timings"]["smooth"] = time.monotonic() - started
        _log(opts, f"smoothed {count} W8A8 inputs on {samples} calibration sequences")

    def distill(self) -> None:
        """SquareHead distillation; under torchrun every rank trains its shard (fsdp.py)
        and rank 0 alone comes out of it with the whole model."""
        opts = self.opts
        teacher = self.teacher or self._load_teacher()
        self.teacher = None
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        sharded = self.ranks.distributed
        if opts.bf16 and not sharded:  # sharded: fsdp.mixed_precision on a GPU, else autocast
            bf16_linear_weights_(teacher)
        lr = opts.lr if opts.lr is not None else default_lr(opts.sparsity)
        config = TrainConfig(
            opts.steps, lr, opts.warmup, opts.batch_size, opts.seq_len, opts.seed, bf16=opts.bf16
        )
        self.state["train_config"] = config.to_dict()
        pair = None
        if sharded:
            names = fsdp.trainable_names(self.model)
            pair = fsdp.shard(self.model, teacher, self.ranks, opts.bf16)
            trainer = fsdp.ShardedTrainer(self.model, config, self.tensors.get("masks"), self.ranks)
            if "trainer" in self.tensors:  # a one-process checkpoint, continued sharded
                fsdp.load_one_process_trainer(trainer, self.tensors.pop("trainer"), names)
            if not self.ranks.main:  # only rank 0 writes them into the checkpoints
                self.tensors.pop("masks", None)
            self.sharded_trainer = trainer
            _log(
                opts,
                f"distilling on {self.ranks.world_size} ranks (FSDP2), "
                f"{opts.batch_size // self.ranks.world_size} of every {opts.batch_size} "
                "sequences a rank",
            )
        else:
            trainer = MaskedTrainer(self.model, config, self.tensors.get("masks"))
            if "trainer" in self.tensors:
                trainer.load_state_dict(self.tensors["trainer"])
        if self.resume_sharded is not None:  # written by a distributed distillation
            fsdp.load_sharded(self.model, trainer.optimizer, self.resume_sharded)
            schedule = self.tensors.pop("schedule")
            trainer.scheduler.load_state_dict(schedule["scheduler"])
            trainer.step = schedule["step"]
            self.resume_sharded = None
        # Inside the FSDP root unit when sharded (fsdp.DistillPair); a plain call if not.
        run = pair if pair is not None else (lambda fn, *args, **kwargs: fn(*args, **kwargs))
        reduce = self.ranks.all_sum if sharded else None
        with stage("preparing training data", quiet=opts.quiet):
            data = data_mod.TokenData(self.tokenizer, opts.train, opts.example_share)
        if note := data.truncation_note(opts.seq_len):
            _log(opts, note)
        curve_source, curve_tokens = next(iter(self.eval_tokens.items()))
        every = opts.eval_every or max(1, opts.steps // 10)

        def curve_point(step: int) -> None:  # on every rank when sharded: the same work
            ppl = run(perplexity, self.model, curve_tokens, max_tokens=opts.curve_tokens)
            self.state["curve"].append({"step": step, "perplexity": ppl})
            if step and not opts.quiet:
                from tqdm import tqdm

                tqdm.write(f"step {step}: {curve_source} perplexity {ppl:.2f}", file=sys.stderr)

        if not self.state["curve"]:
            self.state["curve_source"] = curve_source
            curve_point(0)
        bar = _bar(opts, opts.steps, trainer.step, "squarehead")
        started = time.monotonic() - self.state["timings"].get("distill", 0.0)
        qat_from = opts.steps - opts.qat_steps
        if sharded:  # torchrun passes a Ctrl-C on: each rank sees it twice
            self.interrupt.escalate = False
        try:
            while trainer.step < opts.steps:
                ids, mask = data.batch(trainer.step, opts.batch_size, opts.seq_len, opts.seed)
                ids, mask = self.ranks.batch_share(ids, mask)  # the whole batch in one process
                ids, mask = ids.to(self.device), mask.to(self.device)
                qat = trainer.step >= qat_from and opts.qat_steps > 0
                if qat:
                    self.smooth()  # QAT trains the smoothed weights
                with QuantAwareLinears(self.linears) if qat else contextlib.nullcontext():
                    metrics = trainer.train_step(
                        lambda ids=ids, mask=mask: run(
                            distillation_loss,
                            self.model,
                            teacher,
                            ids,
                            mask,
                            opts.output_loss,
                            reduce=reduce,
                        )
                    )
                self.state["last_metrics"] = metrics
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", ce=f"{metrics['ce']:.2f}")
                bar.update(1)
                if trainer.step % every == 0 or trainer.step == opts.steps:
                    curve_point(trainer.step)
                self.state["timings"]["distill"] = time.monotonic() - started
                if not sharded:
                    self.tensors["trainer"] = trainer.state_dict()
                if trainer.step < opts.steps:
                    self.safe_point()
        finally:
            bar.close()
            self.sharded_trainer = None
            self.interrupt.escalate = True
        self.state["stage"] = "distilled"
        if sharded:
            full = fsdp.full_model_state(self.model)  # collective: rank 0's is whole
            del pair, trainer, teacher
            if not self.ranks.main:
                self.model = None
                return
            self.model = self._plain_model(full)
        self.model.eval()
        self.tensors.pop("trainer", None)
        self.save()

    def _plain_model(self, state: dict):
        """MODEL loaded again, with ``state`` (a distributed distillation's result, which
        rank 0 then quantizes and writes alone) in place of its weights."""
        from sparsec.models import load_model

        model, _ = load_model(self.opts.model, quiet=True)
        model.load_state_dict(state)
        model.to(self.device)
        self.linears = prunable_linears(model)
        return model

    def _check_input_sparsity(self) -> float:
        """MODEL's fraction of zero weights; a sparse MODEL is pruned further (gradually)."""
        opts = self.opts
        sparsity = report_mod.overall_sparsity(report_mod.layer_sparsity(self.linears))
        if sparsity < SPARSE_INPUT:
            return sparsity
        if sparsity > opts.sparsity + 0.005:
            raise SparsecError(
                f"{opts.model} is already {sparsity:.1%} sparse, more than --sparsity "
                f"{opts.sparsity}: sparsify prunes further, never less; pass a higher --sparsity"
            )
        if opts.teacher is None:
            raise SparsecError(
                f"{opts.model} is already {sparsity:.1%} sparse: pass --teacher with the dense "
                "model it was pruned from; it is the distillation teacher and the dense "
                "reference of the report"
            )
        _log(opts, f"{opts.model} is {sparsity:.1%} sparse: pruning it further")
        return sparsity

    def _load_teacher(self):
        from sparsec.models import load_model

        teacher, _ = load_model(self.opts.teacher or self.opts.model, quiet=True)
        return teacher.to(self.device)

    # --- the whole run -----------------------------------------------------------------
    def execute(self) -> Path | None:
        """The whole run; the output folder, or None on a rank > 0 of a torchrun job."""
        opts = self.opts
        from sparsec.models import load_model

        if self.checkpoint.exists() and not opts.resume:
            raise SparsecError(
                f"a checkpoint of an earlier run is in {self.checkpoint.folder}; pass --resume "
                "to continue it, or delete that folder to start over"
            )
        if opts.resume and not self.checkpoint.exists():
            raise SparsecError(f"--resume: no checkpoint in {self.checkpoint.folder}")
        if opts.resume:  # a corrupt checkpoint or other options fail before the work
            self._check_resume(self.checkpoint.load_state(), {})
        # Read every data source before the expensive work so bad files fail at once.
        with stage("reading data", quiet=opts.quiet):
            for source in [*opts.calibration, *opts.eval]:
                data_mod.read_corpus(source)
            if opts.steps:
                train = [data_mod.read_corpus(source) for source in opts.train]
                if opts.example_share is not None:
                    data_mod.check_example_share(opts.example_share, train)

        self.model, self.tokenizer = load_model(opts.model, quiet=opts.quiet)
        if opts.output_format == "compressed-tensors" and checkpoint_state_dict(self.model):
            raise SparsecError(
                f"--format compressed-tensors: {opts.model}'s projections are Conv1D modules "
                "(GPT-2), which compressed-tensors does not quantize; use --format hf"
            )
        self.model.to(self.device)
        where = f"rank {self.ranks.rank} of {self.ranks.world_size}, " * self.ranks.distributed
        _log(opts, f"sparsify on {where}{self.device}")
        # The config read again, as loaded (a GGUF's header may not have said).
        context, hidden = _text_config_limits(self.model.config)
        self.calibration_seq_len = check_model_limits(opts, context, hidden, opts.model)
        self.linears = prunable_linears(self.model)
        for name, linear in self.linears.items():
            self.pattern.check_width(name, linear.in_features)
        # Checked on --resume too: a resumed staged run still needs its dense teacher.
        self.state["input_sparsity"] = self._check_input_sparsity()
        if opts.resume:
            state, self.tensors = self.checkpoint.load()
            self._check_resume(state, self.tensors)
            self.state = state
            self.state["options"] = opts.fingerprint()
            if state.pop("sharded", None):  # a distributed distillation's: loaded by distill
                self.resume_sharded = self.checkpoint.sharded_folder()
            else:
                self.model.load_state_dict(self.tensors.pop("model"))
            _log(opts, f"resuming from {self.checkpoint.folder} (stage {state['stage']})")
        if self.calibration_seq_len != opts.calibration_seq_len:
            _log(
                opts,
                f"note: --calibration-seq-len {opts.calibration_seq_len} is longer than "
                f"{opts.model}'s context of {context} tokens; calibrating on "
                f"{self.calibration_seq_len}-token sequences",
            )
        self.state["calibration_seq_len"] = self.calibration_seq_len
        with stage("preparing evaluation data", quiet=opts.quiet):
            self.eval_tokens = {
                source: data_mod.TokenData(self.tokenizer, [source]).stream for source in opts.eval
            }
        self.teacher = None
        if opts.steps and opts.teacher is None and not opts.resume:
            self.teacher = copy.deepcopy(self.model)  # the dense model, before pruning

        # Under torchrun SIGTERM stops after the step too: the agent passes it on to every
        # rank (and kills them 30 s later), and a checkpoint needs all ranks.
        with GracefulInterrupt(terminate=self.ranks.distributed) as self.interrupt:
            if self.state.get("input_sparsity", 0.0) >= SPARSE_INPUT:
                # Pruning further: the dense teacher is the reference, MODEL the start.
                if "dense" not in self.state["perplexity"]:
                    self.teacher = self._load_teacher()
                    self.evaluate("dense", model=self.teacher)
                self.evaluate("input")
            self.evaluate("dense")
            if self.state["stage"] == "start":
                self.prune()
            distilling = opts.steps and self.state["stage"] == "pruned"
            if not self.ranks.main and not distilling:
                # INT8, the evaluations after distillation and the output are rank 0's
                # alone (not sharded yet).
                return None
            self.evaluate("one-shot")  # on every rank that distills next: the same work
            if distilling:
                self.distill()  # sharded over the ranks under torchrun
            if not self.ranks.main:
                return None
            if self.ranks.distributed:  # rank 0 goes on alone
                self.interrupt.alone()
            self.teacher = None
            if opts.steps:
                self.evaluate("distilled")
            scales = None
            if opts.int8:
                self.smooth()
                scales = quantize_weights_(self.linears)
                self.evaluate("int8", quantized=True)
            self.state["stage"] = "done"
            self.state["final_layers"] = report_mod.layer_sparsity(self.linears)

            write_output(opts, self.model, self.tokenizer, scales, self.state)
        self.checkpoint.remove()
        return Path(opts.output)

    def _check_resume(self, state: dict, tensors: dict) -> None:
        """The checkpoint's options must be this run's (its training options too, once
        distillation began)."""
        training_began = (
            "trainer" in tensors
            or "train_config" in state
            or state.get("stage") in ("distilled", "done")
        )
        must_match = PRUNE_OPTIONS + (TRAIN_OPTIONS if training_began else ())
        now = self.opts.fingerprint()
        # An option newer than the checkpoint was at its default (its old behaviour).
        saved = {**_OPTION_DEFAULTS, **state["options"]}
        differ = {k: saved.get(k) for k in must_match if saved.get(k) != now[k]}
        if differ:
            raise SparsecError(
                f"the checkpoint in {self.checkpoint.folder} was made with other options "
                f"({differ}); rerun with those, or delete it to start over"
            )


def write_output(opts: SparsifyOptions, model, tokenizer, scales, state: dict) -> Path:
    """The output folder, written beside ``opts.output`` and renamed over it when whole:
    a failed write (a full disk) leaves nothing half-written and raises SparsecError."""
    from sparsec.models import atomic_output_dir, replace_dir

    out = Path(opts.output)
    with write_errors(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)  # check_paths found it can be made
    tmp = atomic_output_dir(out)
    kept = ""
    if Checkpoint(opts.checkpoint_folder).exists():
        kept = f"the checkpoint in {opts.checkpoint_folder} is kept for --resume"
    try:
        with write_errors(out, kept):
            if opts.output_format == "compressed-tensors":
                from sparsec.compressed import save_compressed

                save_compressed(
                    model,
                    tokenizer,
                    tmp,
                    sparse_linears=prunable_linears(model),
                    scales=scales,
                    pattern=opts.pattern,
                )
            else:
                # GPT-2's projections back in their Conv1D layout (models.as_linear_modules)
                weights = checkpoint_state_dict(model)
                model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
                tokenizer.save_pretrained(tmp)
                if scales is not None:
                    write_quantization_json(tmp, scales)
            report_mod.write_recipe(tmp / "recipe.yaml", opts, state, __version__)
            report_mod.write_report(tmp, opts, state)
            replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_options(opts: SparsifyOptions) -> Pattern:
    """Every option's range and the combinations that make sense, before any work (no
    file is read); returns the parsed --pattern."""
    check_ranges(opts, OPTION_RANGES)
    if opts.example_share is not None:
        data_mod.check_share(opts.example_share)
    pattern = parse_pattern(opts.pattern)
    check_sparsity(opts.sparsity, pattern)
    check_device(opts.device)
    if opts.method not in ("sparsegpt", "magnitude"):
        raise SparsecError(f"unknown pruning method {opts.method}; use sparsegpt or magnitude")
    if opts.layer_sparsity not in ("uniform", "owl"):
        raise SparsecError(f"unknown --layer-sparsity {opts.layer_sparsity!r}; use uniform or owl")
    if opts.layer_sparsity == "owl":
        if pattern.kind == "nm":
            raise SparsecError(
                f"--layer-sparsity owl varies the sparsity by layer, which the {opts.pattern} "
                "pattern fixes: use --pattern unstructured or block16"
            )
        check_owl_lambda(opts.sparsity, opts.owl_lambda)
    if opts.output_format not in ("hf", "compressed-tensors"):
        raise SparsecError(f"unknown --format {opts.output_format!r}; use hf or compressed-tensors")
    if opts.output_format == "compressed-tensors":
        from sparsec.compressed import require_compressed_tensors

        require_compressed_tensors()  # now, not after the run
    if opts.output_loss not in OUTPUT_LOSSES:
        raise SparsecError(
            f"unknown --output-loss {opts.output_loss!r}; use one of {', '.join(OUTPUT_LOSSES)}"
        )
    for name in ("calibration", "train", "eval"):
        sources = getattr(opts, name)
        if isinstance(sources, str) or not sources:
            raise SparsecError(f"--{name} needs a list of one or more data sources")
    if opts.example_share is not None and not opts.steps:
        raise SparsecError(
            "--example-share mixes the distillation data, and there is none without --steps: "
            "add --steps or drop --example-share"
        )
    if not opts.smooth and not opts.int8:
        raise SparsecError("--no-smoothing turns off a step of --int8: add --int8 or drop it")
    if opts.qat_steps:
        if not opts.int8:
            raise SparsecError("--qat-steps trains for the int8 model: add --int8")
        if not 0 < opts.qat_steps <= opts.steps:
            raise SparsecError(
                f"--qat-steps {opts.qat_steps} must be between 1 and --steps ({opts.steps}): "
                "quantization-aware training is the last part of distillation"
            )
    if opts.bf16 and opts.qat_steps:
        raise SparsecError(
            "--qat-steps trains through int8 rounding, which bfloat16 activations blur: "
            "use --bf16 or --qat-steps, not both"
        )
    return pattern


def check_paths(opts: SparsifyOptions) -> None:
    """MODEL and --teacher exist; -o and the checkpoint folder can be written and are
    none of the inputs (nor inside an input model folder). Reads no weights."""
    from sparsec.models import resolve

    sources = [resolve(opts.model)] + ([resolve(opts.teacher)] if opts.teacher else [])
    model_dirs = tuple(src.folder for src in sources if src.kind == "hf")
    files = [src.folder / src.gguf_file for src in sources if src.kind == "gguf"]
    files += [
        s for s in (*opts.calibration, *opts.train, *opts.eval) if not s.startswith("builtin:")
    ]
    out = check_output_path(
        opts.output, inputs=tuple(files), input_dirs=model_dirs, what="-o", directory=True
    )
    if out.is_dir():  # an earlier output, replaced at the end: say now if it cannot be
        try:
            foreign = any(out.iterdir()) and not (out / "config.json").is_file()
        except OSError as e:
            raise SparsecError(f"-o {out}: cannot read the folder ({e.strerror or e})") from e
        if foreign:
            raise SparsecError(
                f"-o {out} is a folder with other files in it (no config.json); sparsify "
                "replaces its output folder, so name a new or empty folder, or an earlier output"
            )
        if not os.access(out, os.W_OK | os.X_OK):
            raise SparsecError(f"-o {out}: the folder is not writable, so it cannot be replaced")
    folder = Path(opts.checkpoint_folder)
    what = "--checkpoint-dir" if opts.checkpoint_dir is not None else "the checkpoint folder"
    check_output_path(folder, input_dirs=model_dirs, what=what, directory=True)
    if opts.checkpoint_dir is None:
        return
    if _inside(folder, out):
        raise SparsecError(
            f"--checkpoint-dir {folder} is inside -o {out}, which is replaced when the run "
            "ends; put the checkpoints elsewhere"
        )
    if folder.is_dir() and any(p.name not in ("current", "next", "old") for p in folder.iterdir()):
        raise SparsecError(
            f"--checkpoint-dir {folder} holds other files; name a new or empty folder (it "
            "holds the checkpoints of this run only)"
        )


def _inside(path: Path, folder: Path) -> bool:
    path, folder = (Path(os.path.abspath(p)).resolve() for p in (path, folder))
    return path == folder or path.is_relative_to(folder)


def model_limits(source: str) -> tuple[int | None, int | None]:
    """``(context length, hidden size)`` of MODEL from its config alone (no weights):
    config.json's max_position_embeddings and hidden_size, or a GGUF header's. None where
    this cannot tell; load_model reports a config it cannot read."""
    from sparsec.models import resolve

    src = resolve(source)
    if src.kind == "hf":
        try:
            config = json.loads((src.folder / "config.json").read_bytes())
        except (OSError, ValueError, RecursionError):
            return None, None
        if not isinstance(config, dict):
            return None, None
        text = config.get("text_config")
        config = text if isinstance(text, dict) else config
        return _positive(config.get("max_position_embeddings")), _positive(
            config.get("hidden_size")
        )
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(src.folder / src.gguf_file))
        values = {}
        for key in ("general.architecture", "context_length", "embedding_length"):
            arch = values.get("general.architecture", "")
            field = reader.fields.get(key if "." in key else f"{arch}.{key}")
            if field is not None:
                part = field.parts[field.data[0]]
                values[key] = bytes(part).decode() if key[0] == "g" else int(part[0])
    except (OSError, ValueError, IndexError, KeyError, UnicodeDecodeError):
        return None, None
    return _positive(values.get("context_length")), _positive(values.get("embedding_length"))


def _text_config_limits(config) -> tuple[int | None, int | None]:
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    context = getattr(config, "max_position_embeddings", None)
    if context is None:  # MPT: its ALiBi table's length
        context = getattr(config, "max_seq_len", None)
    return _positive(context), _positive(getattr(config, "hidden_size", None))


def _positive(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_model_limits(
    opts: SparsifyOptions, context: int | None, hidden: int | None, model: str
) -> int:
    """Check --seq-len against ``model``'s context length and the calibration against the
    machine's memory; returns the calibration sequence length (cut to the context)."""
    if context is not None and opts.steps and opts.seq_len > context:
        raise SparsecError(
            f"--seq-len {opts.seq_len} is longer than {model}'s context of {context} tokens "
            f"(max_position_embeddings): pass --seq-len {context} or less"
        )
    seq_len = min(opts.calibration_seq_len, context or opts.calibration_seq_len)
    memory = _physical_memory()
    if hidden is not None and memory is not None:
        need = 2 * opts.calibration_samples * seq_len * hidden * 4  # layer inputs + outputs
        if need > CALIBRATION_MEMORY_SHARE * memory:
            raise SparsecError(
                f"--calibration-samples {opts.calibration_samples} x --calibration-seq-len "
                f"{seq_len}: the calibration activations alone take {need / 2**30:.1f} GiB "
                f"({model}'s hidden size is {hidden}), more than "
                f"{CALIBRATION_MEMORY_SHARE:.0%} of this machine's {memory / 2**30:.1f} GiB; "
                "pass fewer samples or shorter sequences"
            )
    return seq_len


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def sparsify(opts: SparsifyOptions) -> Path | None:
    """Run the whole pipeline; returns the output folder. Options, paths and the model's
    limits are checked first: a bad one fails before any model or data is read.

    Under torchrun (2+ ranks) the ranks share the SparseGPT calibration (distributed.py)
    and the distillation's batches (fsdp.py); rank 0 returns the output folder, the
    others None.
    """
    pattern = check_options(opts)
    device = resolve_device(opts.device)
    check_paths(opts)
    for model in filter(None, (opts.model, opts.teacher)):
        check_model_limits(opts, *model_limits(model), model)
    if opts.bf16 and device.type == "cpu":  # a GPU has bfloat16 in hardware
        require_bf16_cpu()
    if distributed.launched() and opts.steps:  # every rank takes a share of each batch
        world = distributed.world_size()
        if opts.batch_size % world:
            raise SparsecError(distributed.batch_error(opts.batch_size, world))
        if opts.qat_steps:
            raise SparsecError(
                "--qat-steps under torchrun is not supported yet (smoothing and the W8A8 "
                "forward are not sharded): run it in one process, or drop --qat-steps"
            )
    with distributed.process_group(device) as ranks:
        if not ranks.main:  # progress and messages from rank 0 only
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # load_model's "Loading weights"
            opts = replace(opts, quiet=True)
        run = Run(opts, ranks)
        run.pattern = pattern
        torch.manual_seed(opts.seed)
        return run.execute()


def summary(folder: Path) -> str:
    """One JSON line for the CLI: where the output is and the headline figures."""
    report = json.loads((folder / "report.json").read_text())
    return json.dumps({"output": str(folder), "perplexity": report["perplexity"]})
