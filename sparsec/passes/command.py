"""``sparsec optimize``: the graph passes from the command line (light: no heavy imports
until the command runs)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "optimize",
        help="fuse an exported graph into the optimized graph the compiler reads",
        description="Rewrite an exported graph (sparsec export) into the optimized graph of "
        "docs/graph-contract.md section 3: RMSNorm (with its residual add), RoPE + attention "
        "+ an in-place fixed-capacity KV cache, the SwiGLU MLP and quantized weights become "
        "fused ops, and every weight's sparsity is recorded. Patterns that do not match stay "
        "as they are; --report says what fused, what did not and why.",
    )
    p.add_argument("model", help="the exported .onnx graph")
    p.add_argument("-o", "--output", required=True, help="the optimized .onnx file to write")
    p.add_argument(
        "--report",
        action="store_true",
        help="print per pass what fused and how often, node counts and the sparsity table",
    )
    checks = p.add_mutually_exclusive_group()
    checks.add_argument(
        "--no-validate",
        dest="validate",
        action="store_false",
        default=None,
        help="skip the attention fusion's numerical check (it runs the whole graph under "
        "onnxruntime, which needs memory for the model's weights twice over). Default: "
        "run it when the weights are at most 2.1 GB, else skip it and say so",
    )
    checks.add_argument(
        "--validate",
        dest="validate",
        action="store_true",
        help="run the attention fusion's numerical check whatever the weights' size",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="afterwards, compare the logits and caches of both graphs under onnxruntime "
        "at prefill, decode and chunked shapes",
    )
    p.set_defaults(func=_optimize_command)


def _optimize_command(args) -> int:
    from sparsec.errors import require_compiler_stack
    from sparsec.onnx_io import check_onnx_output

    out = check_onnx_output(args.output, args.model)
    require_compiler_stack()
    from sparsec.passes import optimize_file
    from sparsec.progress import stage

    with stage(f"optimizing {args.model}"):
        report = optimize_file(args.model, out, report=False, validate=args.validate)
    if args.report:
        print(report.to_text())
    for skipped in report.skipped:
        print(f"note: not run: {skipped}")
    fused = ", ".join(f"{what} x{n}" for p in report.passes for what, n in p.fused.items())
    nodes = f"{report.nodes_before} -> {report.nodes_after} nodes"
    print(f"wrote {out}: {nodes} ({fused or 'nothing fused'})")
    status = 0
    if report.outside_contract:
        left = ", ".join(f"{op} x{n}" for op, n in report.outside_contract.items())
        print(
            f"warning: ops outside the contract remain ({left}); `sparsec compile` will reject "
            "the graph. Run with --report to see what did not fuse and why."
        )
    if args.verify:
        import onnx_ir as ir

        from sparsec.passes.verify import compare

        with stage("comparing with the exported graph under onnxruntime"):
            results = compare(ir.load(args.model), ir.load(out))
        for r in results:
            verdict = "ok" if r.ok(1e-4) else "MISMATCH"
            print(
                f"{r.case}: logits rel. error {r.logits_rel:.1e}, cache {r.cache_rel:.1e}, "
                f"unwritten slots {'kept' if r.untouched else 'CHANGED'}: {verdict}"
            )
            status |= not r.ok(1e-4)
    return status
