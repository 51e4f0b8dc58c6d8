"""`sparsec run`, `sparsec inspect` and `sparsec profile`: generate with a compiled
model, describe one, or time its ops.

Light at import (argparse only): the runtime is imported inside the commands.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    run = subparsers.add_parser(
        "run",
        help="generate text with a compiled model.so",
        description="Stream the model's continuation of PROMPT to stdout; speeds go to stderr.",
    )
    run.add_argument("model", help="a model.so made by `sparsec compile`")
    run.add_argument("prompt", help="the prompt text (a user message with --chat)")
    run.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    run.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)"
    )
    run.add_argument("--top-k", type=int, default=None, metavar="K")
    run.add_argument("--top-p", type=float, default=None, metavar="P")
    run.add_argument("--seed", type=int, default=None, metavar="S")
    run.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        metavar="R",
        help="divide the logits of tokens already in the prompt or output by R (multiply if "
        "negative), as Hugging Face's repetition_penalty: 1.1-1.3 stops the loops small or "
        "very sparse models fall into (default: off)",
    )
    run.add_argument(
        "--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)"
    )
    run.add_argument(
        "--chat", action="store_true", help="wrap PROMPT as a user message in the chat template"
    )
    _add_threads(run)
    run.add_argument("--no-verify", action="store_true", help="skip the weights hash check at load")
    run.add_argument(
        "--no-huge-pages",
        action="store_true",
        help="map the weights from the file (shared page cache, no private copy) instead of "
        "copying them to 2 MiB huge pages (a few %% faster decode)",
    )
    run.set_defaults(func=run_command)

    inspect = subparsers.add_parser(
        "inspect",
        help="describe a compiled model.so",
        description="Show the manifest of a model.so: model, target, weights and every layer.",
    )
    inspect.add_argument("model", help="a model.so made by `sparsec compile`")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="also hash the code and every weight chunk against the manifest (reads the "
        "whole file; no native code runs) and record the file as verified for later loads",
    )
    inspect.set_defaults(func=inspect_command)

    from sparsec.arguments import int_range

    prof = subparsers.add_parser(
        "profile",
        help="where a forward step's time goes, op by op (a model compiled with --profile)",
        description="Run forward steps of one shape on a model compiled with `sparsec "
        "compile --profile` and print the microseconds each op takes per step (linears "
        "by weight, every layer together; each op's time ends at its barrier, so it is "
        "the slowest thread's). The steps use KV caches of their own, zero-filled.",
        epilog="example: sparsec profile prof.so --rows 8 --position 110   # 8-stream decode",
    )
    prof.add_argument("model", help="a model.so made by `sparsec compile --profile`")
    prof.add_argument(
        "--rows",
        type=int_range(1),
        default=1,
        help="tokens per step: one per sequence (batched decode, as `sparsec serve` runs "
        "them), or with --prefill one sequence's chunk; at most the model's "
        "max_tokens_per_call (default 1)",
    )
    prof.add_argument(
        "--prefill", action="store_true", help="the rows are one sequence's prompt chunk"
    )
    prof.add_argument(
        "--position",
        type=int_range(0),
        default=0,
        help="position of the rows (of the chunk's first token with --prefill): how many "
        "keys attention reads (default 0)",
    )
    prof.add_argument(
        "--steps", type=int_range(1), default=100, help="profiled steps (default 100)"
    )
    _add_threads(prof)
    prof.add_argument("--json", default=None, metavar="PATH", help="also write it as JSON here")
    prof.set_defaults(func=profile_command)


def _add_threads(parser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="native threads (default: the model's default_threads, set at compile)",
    )


def run_command(args: argparse.Namespace) -> int:
    from sparsec import runtime
    from sparsec.runtime.arguments import check_generate_options, check_text, check_threads

    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
        stream=True,
    )
    # The API's own checks, run before the load (which reads and hashes the weights) so a
    # bad option fails at once. argv that is not UTF-8 arrives with lone surrogates.
    check_threads(args.threads)
    check_generate_options(**options)
    check_text(args.prompt, "PROMPT", "the argument is not UTF-8: pass UTF-8 text")
    model = runtime.load(
        args.model,
        threads=args.threads,
        verify=not args.no_verify,
        huge_pages=False if args.no_huge_pages else None,
    )
    with model:
        if args.chat:
            stream = model.chat([{"role": "user", "content": args.prompt}], **options)
        else:
            stream = model.generate(args.prompt, **options)
        out = sys.stdout
        for piece in stream:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        result = stream.result
    print(
        f"[{result.finish_reason}] {result.stats.summary()}; {model.threads} thread(s), "
        f"weights in {model.weights_memory}, hashes checked {model.weights_verified}",
        file=sys.stderr,
    )
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    import json

    from sparsec.runtime.artifact import read_artifact
    from sparsec.runtime.summary import format_summary, summarize

    artifact = read_artifact(args.model)
    summary = summarize(artifact)
    if args.verify:
        summary["verified"] = verify_artifact(artifact)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(format_summary(summary))
        if args.verify:
            print(f"verified: {summary['verified']}")
    return 0


def verify_artifact(artifact) -> str:
    """Hash everything in ``artifact`` against its manifest (raises on a mismatch)."""
    from sparsec.runtime import verified
    from sparsec.runtime.artifact import map_weights, read_code, verify_weights

    read_code(artifact)
    verify_weights(artifact, map_weights(artifact))
    verified.record(artifact.path, artifact.identity, artifact.seal)
    chunks = len(artifact.manifest["weights"]["blake2b"])
    return f"manifest, code and {chunks} weight chunk(s) match their hashes"


def profile_command(args: argparse.Namespace) -> int:
    import json

    from sparsec import runtime
    from sparsec.paths import check_output_path, write_text_atomic
    from sparsec.runtime.arguments import check_threads
    from sparsec.runtime.profile import format_profile, profile

    check_threads(args.threads)
    out = None
    if args.json:  # checked before the run: not the model, a writable regular file
        out = check_output_path(args.json, inputs=(args.model,), what="--json")
    with runtime.load(args.model, threads=args.threads) as model:
        prof = profile(model, args.rows, args.position, args.prefill, args.steps)
    print(format_profile(prof, args.model))
    if out is not None:
        report = {"model": args.model, **prof.to_dict()}
        write_text_atomic(out, json.dumps(report, indent=2) + "\n", "--json")
    return 0
