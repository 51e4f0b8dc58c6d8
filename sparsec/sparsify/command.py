"""CLI for ``sparsec sparsify``, ``finetune`` and ``generate-data`` (light: torch loads on
run)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

# Same as sparsec.sparsify.data's defaults (not imported: that module imports torch).
DEFAULT_CALIBRATION = [
    "builtin:python-docs",
    "builtin:fortunes",
    "builtin:austen",
    "builtin:moby-dick",
]
DEFAULT_TRAIN = DEFAULT_CALIBRATION
DEFAULT_EVAL = ["builtin:verne", "builtin:python-tutorial"]
DATA_HELP = (
    "text files, .jsonl files ({'text'} or {'question','answer'} per line) or built-in "
    "data: builtin:python-docs, builtin:fortunes, builtin:austen, builtin:moby-dick, "
    "builtin:verne, builtin:python-tutorial, builtin:gsm-train, builtin:gsm-eval"
)

TRAIN_BF16_HELP = (
    "train under bfloat16 autocast: about 2x faster on CPUs with AVX512-BF16 or AMX "
    "(weights, optimizer and losses stay float32)"
)


class _Given(argparse.Action):
    """An option that records, in ``args.given_options``, that the command line gave it:
    those override a --recipe's (the others keep their defaults in ``args``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.given_options = getattr(namespace, "given_options", frozenset()) | {self.dest}


def _option(parser, *flags, action: str = "store", **kwargs) -> None:
    """``parser.add_argument`` (store, store_true or store_false), through ``_Given``."""
    if action in ("store_true", "store_false"):
        kwargs.setdefault("default", action == "store_false")
        kwargs.update(nargs=0, const=action == "store_true")
    elif action != "store":
        raise ValueError(f"unsupported action {action}")
    parser.add_argument(*flags, action=_Given, **kwargs)


def register(sub) -> None:
    p = sub.add_parser(
        "sparsify",
        help="prune MODEL with SparseGPT, recover with SquareHead distillation, optionally INT8",
        description="Prune every decoder Linear of MODEL to --sparsity with SparseGPT "
        "(one-shot, on calibration text), optionally recover accuracy with --steps of "
        "SquareHead distillation from the dense model, optionally snap weights to INT8 "
        "(W8A8). Writes a Hugging Face folder with exact zeros, recipe.yaml and "
        "report.md/report.json (per-layer sparsity, perplexity after each stage). "
        "Checkpoints go to OUTPUT.checkpoint; Ctrl-C saves one, --resume continues. "
        "A MODEL that is already sparse (the output of an earlier sparsify) is pruned "
        "further, with --teacher naming the dense model: gradual pruning in stages, "
        "such as 50% then 70%. "
        "--recipe OUTPUT/recipe.yaml re-runs an earlier run with the options it records; "
        "options given on the command line override the recipe's. "
        "Under 'torchrun --nproc-per-node N -m sparsec sparsify ...' the N processes share "
        "the SparseGPT calibration and distill with FSDP2, each on --batch-size / N "
        "sequences of every batch (rank 0 writes the output; --resume works on any N). "
        f"Data sources: {DATA_HELP}.",
    )
    p.add_argument("model", help="Hugging Face folder, .gguf file, or built-in name")
    p.add_argument("-o", "--output", required=True, help="folder to write")
    _option(
        p,
        "--sparsity",
        type=float,
        default=None,
        help="fraction of zeros, 0 to 0.99 (required, unless --recipe gives it)",
    )
    _option(
        p,
        "--pattern",
        default="unstructured",
        help="unstructured (default), N:M such as 2:4 (N kept of every M), or block16",
    )
    _option(p, "--method", default="sparsegpt", choices=["sparsegpt", "magnitude"])
    _option(
        p,
        "--layer-sparsity",
        choices=["uniform", "owl"],
        default="uniform",
        help="uniform: every decoder layer at --sparsity (default); owl: outlier-weighted "
        "(OWL), layers with more outlier weights keep more of them, the model as a whole "
        "at --sparsity",
    )
    _option(
        p,
        "--owl-lambda",
        type=float,
        default=0.08,
        help="with --layer-sparsity owl: layer densities spread over target +- this (0.08)",
    )
    _option(p, "--calibration", nargs="+", metavar="FILE", default=DEFAULT_CALIBRATION)
    _option(
        p,
        "--calibration-samples",
        type=int,
        default=32,
        help="sequences (default 32, at most 4096)",
    )
    _option(
        p,
        "--calibration-seq-len",
        type=int,
        default=512,
        help="tokens each (512; cut to the model's context length)",
    )
    _option(p, "--train", nargs="+", metavar="FILE", default=DEFAULT_TRAIN)
    _option(p, "--steps", type=int, default=0, help="SquareHead steps (default 0: one-shot)")
    _option(
        p,
        "--lr",
        type=float,
        default=None,
        help="peak learning rate, > 0 and <= 1 (default by sparsity)",
    )
    _option(p, "--batch-size", type=int, default=1, help="training sequences a step (default 1)")
    _option(
        p,
        "--seq-len",
        type=int,
        default=512,
        help="training sequence length, at most the model's context length (default 512, the "
        "length perplexity is scored at)",
    )
    _option(
        p,
        "--example-share",
        type=float,
        default=None,
        metavar="F",
        help="when --train mixes .jsonl examples (such as generate-data --chat turns) with "
        "running text: the fraction F of training rows that are examples (default: their "
        "share of the tokens)",
    )
    _option(
        p,
        "--teacher",
        default=None,
        help="distillation teacher (default: dense MODEL); required when MODEL is already "
        "sparse, as the dense reference",
    )
    _option(
        p,
        "--output-loss",
        choices=["ce", "kl", "ce+kl"],
        default="ce",
        help="the loss on the student's logits next to SquareHead: ce, cross-entropy on the "
        "training text's next tokens (the paper's, default); kl, KL divergence from the "
        "teacher's next-token distribution (logit distillation); or ce+kl, both",
    )
    _option(
        p,
        "--int8",
        action="store_true",
        help="W8A8: int8-grid weights (+ quantization.json, or int8 tensors with "
        "--format compressed-tensors)",
    )
    _option(
        p,
        "--format",
        dest="output_format",
        choices=["hf", "compressed-tensors"],
        default="hf",
        help="how OUTPUT stores the weights. hf (default): a plain Hugging Face folder, "
        "float32 safetensors with exact zeros (and quantization.json with --int8); every "
        "tool and every sparsec version reads it, so it stays the default. "
        "compressed-tensors: the checkpoint format of llm-compressor, which vLLM and "
        "transformers (with compressed-tensors installed) load: config.json's "
        "quantization_config records the sparsity (sparsity_config) and, with --int8, the "
        "Linears are stored as int8 with per-channel scales (W8A8, activations per token): "
        "4x smaller Linears, 0.41 of the float32 folder for SmolLM2-135M. The zeros are "
        "stored as zeros (compressed-tensors 0.15+ has no bitmask compression). sparsec "
        "export and build read both formats",
    )
    _option(
        p,
        "--no-smoothing",
        dest="smooth",
        action="store_false",
        help="with --int8: skip the SmoothQuant-style smoothing of the quantized Linears' "
        "inputs (folded into the norm weights and the gated MLP's up rows; on by default)",
    )
    _option(
        p,
        "--qat-steps",
        type=int,
        default=0,
        metavar="N",
        help="with --int8: the last N of the --steps distillation steps train through W8A8 "
        "fake quantization (straight-through gradients), so the int8 model loses less",
    )
    _option(p, "--bf16", action="store_true", help=TRAIN_BF16_HELP)
    _option(p, "--eval", nargs="+", metavar="FILE", default=DEFAULT_EVAL)
    _option(
        p, "--eval-tokens", type=int, default=16384, help="tokens scored per eval source (16384)"
    )
    _option(
        p,
        "--eval-every",
        type=int,
        default=0,
        help="recovery-curve interval in steps (default 0: about 10 points)",
    )
    _option(p, "--seed", type=int, default=0, help="0 to 4294967295 (default 0)")
    _option(
        p,
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="a new or empty folder for the checkpoints (default OUTPUT.checkpoint)",
    )
    _option(
        p,
        "--checkpoint-every",
        type=float,
        default=300.0,
        help="seconds (default 300; 0: at every layer and step)",
    )
    _option(p, "--resume", action="store_true", help="continue from the last checkpoint")
    _option(
        p,
        "--device",
        default="auto",
        metavar="auto|cpu|cuda[:N]",
        help="where the forwards, SparseGPT and distillation run (default: auto, CUDA when "
        "PyTorch sees a GPU, else cpu); under torchrun, cuda is each rank's LOCAL_RANK GPU",
    )
    _option(p, "--quiet", action="store_true")
    p.add_argument(
        "--recipe",
        type=Path,
        default=None,
        metavar="FILE",
        help="re-run an earlier run: every option that FILE, the recipe.yaml sparsify wrote, "
        "records (sparsity, pattern, method, data, seed, steps, lr, ..., --int8); options "
        "given on this command line override the recipe's. Data paths are used as recorded "
        "(relative ones from the current folder). Not recorded: MODEL, -o, --device and "
        "the checkpoint options",
    )
    p.set_defaults(func=_sparsify, given_options=frozenset())

    f = sub.add_parser(
        "finetune",
        help="dense supervised fine-tuning of MODEL on task data (to make a teacher)",
        description=f"Fine-tune MODEL with cross-entropy on --train data. Data: {DATA_HELP}.",
    )
    f.add_argument("model", help="Hugging Face folder, .gguf file, or built-in name")
    f.add_argument("-o", "--output", required=True, help="folder to write")
    f.add_argument("--train", nargs="+", metavar="FILE", required=True)
    f.add_argument("--steps", type=int, required=True)
    f.add_argument("--lr", type=float, default=1e-4)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--seq-len", type=int, default=256)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--bf16", action="store_true", help=TRAIN_BF16_HELP)
    f.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds (default 300)")
    f.add_argument("--resume", action="store_true", help="continue from OUTPUT.checkpoint")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_finetune)

    g = sub.add_parser(
        "generate-data",
        help="sample training text from MODEL, for distillation without in-domain data",
        description="Sample text from MODEL into a .jsonl file that --train reads. Each "
        "sample continues an opener (the first 3-8 words of a random line of --prompts) "
        "for --length tokens: training text for distillation when no in-domain text is "
        "at hand (see docs/sparsify.md for what it measured). Samples are appended as each "
        "batch finishes; Ctrl-C keeps them and --resume continues up to --tokens. Prompt "
        "sources: "
        f"{DATA_HELP}.",
    )
    g.add_argument("model", help="Hugging Face folder, .gguf file, or built-in name")
    g.add_argument("-o", "--output", required=True, type=Path, help=".jsonl file to write")
    g.add_argument("--tokens", type=int, required=True, help="total tokens to sample")
    g.add_argument(
        "--prompts",
        nargs="+",
        metavar="FILE",
        default=None,
        help="where openers are cut from (default: the default --train data); not with --chat",
    )
    g.add_argument(
        "--length",
        type=int,
        default=256,
        help="tokens sampled per opener (with --chat: at most, per answer)",
    )
    g.add_argument("--batch-size", type=int, default=16, help="samples generated together")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--bf16",
        action="store_true",
        help="sample under bfloat16 autocast (faster on CPUs with AVX512-BF16 or AMX; the "
        "samples come from a slightly perturbed model)",
    )
    g.add_argument(
        "--chat",
        action="store_true",
        help="sample chat turns instead: the model writes a user message (from its chat "
        "template's user-turn start) and answers it; distilling on these keeps an "
        "instruction-tuned model's chat behaviour (not with --prompts)",
    )
    g.add_argument("--resume", action="store_true", help="add to an existing OUTPUT")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=_generate_data)


def _sparsify(args) -> int:
    from sparsec.errors import SparsecError, require_compiler_stack

    require_compiler_stack()
    from sparsec.sparsify.pipeline import SparsifyOptions, sparsify, summary

    # Every option's argparse dest is the SparsifyOptions field of the same name.
    names = {f.name for f in dataclasses.fields(SparsifyOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if args.recipe is not None:
        values.update(recipe_options(args.recipe, args.given_options, values))
    if values["sparsity"] is None:
        raise SparsecError("--sparsity is required (or --recipe FILE, an earlier run's recipe)")
    for k in ("calibration", "train", "eval"):  # nargs lists or the default tuples
        values[k] = list(values[k])
    opts = SparsifyOptions(**{**values, "output": Path(args.output)})
    out = sparsify(opts)
    if out is not None:  # None: a rank > 0 of a torchrun job, which writes nothing
        print(summary(out))
    return 0


def recipe_options(path: Path, given: frozenset[str], values: dict) -> dict:
    """The options recipe.yaml ``path`` records, less those in ``given`` (the command
    line's); ``values`` are the command line's options (its defaults for the rest)."""
    from sparsec.errors import SparsecError
    from sparsec.sparsify.pipeline import OPTION_RANGES
    from sparsec.sparsify.report import read_recipe

    recorded, keys = read_recipe(path)
    options = {k: v for k, v in recorded.items() if k not in given}
    for name, value in options.items():
        if name in OPTION_RANGES and value is not None:
            OPTION_RANGES[name].check(f"{path}: {keys[name]}", value)
    steps = options.get("steps", values["steps"])
    for name in ("calibration", "eval") + ("train",) * bool(steps):
        for source in options.get(name, ()):
            if not source.startswith("builtin:") and not Path(source).exists():
                raise SparsecError(
                    f"{path}: {keys[name]}: {source} does not exist (relative paths are "
                    f"read from the current folder, as in the run that wrote the recipe); "
                    f"pass --{name} FILE... for other data"
                )
    return options


def _finetune(args) -> int:
    from sparsec.errors import require_compiler_stack

    require_compiler_stack()
    from sparsec.sparsify.finetune import finetune

    out = finetune(
        args.model,
        list(args.train),
        Path(args.output),
        args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        quiet=args.quiet,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        bf16=args.bf16,
    )
    print(f'{{"output": "{out}"}}')
    return 0


def _generate_data(args) -> int:
    import json

    from sparsec.errors import SparsecError, require_compiler_stack

    if args.chat and args.prompts:
        raise SparsecError(
            "--prompts is not used with --chat: the model writes the user messages itself; "
            "drop one of them"
        )
    require_compiler_stack()
    from sparsec.sparsify.teacher_text import SampleOptions, generate_corpus

    prompts = tuple(args.prompts or DEFAULT_TRAIN)
    names = {f.name for f in dataclasses.fields(SampleOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    print(json.dumps(generate_corpus(SampleOptions(**{**values, "prompts": prompts}))))
    return 0
