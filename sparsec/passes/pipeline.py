"""The pass pipeline of ``sparsec optimize``: exported graph in, optimized graph out.

Order matters: Gemm as MatMul before anything (the cleanup would fold its weight's
transpose eagerly), cleanup next (constants, no-op casts), weights into the int8 form and
activation fake-quant into its op before the MLP fusion looks for them, the tokens
unflattened (OPT's MLP) and learned-position offsets folded before the fusions, fused
projections (Phi-3's qkv_proj, gate_up_proj) split before the fusions match them, RMSNorm before
the residual add that precedes it, RoPE before the attention that reads it, and the
weight names before the sparsity record that uses them.
"""

from __future__ import annotations

import time
from pathlib import Path

from sparsec import contract
from sparsec.errors import SparsecError
from sparsec.onnx_io import check_writable, save_atomic
from sparsec.passes import functions
from sparsec.passes.report import OptimizeReport, op_counts

ALLOWED_OPS = frozenset(
    {"Gather", "MatMul", "Add", "RMSNormalization", "DequantizeLinear"}
    | {"LayerNormalization", "Relu", "Gelu", "Mul"}
    | {f"{contract.DOMAIN}.{op}" for op in functions.FUNCTION_TEXT}
)


# The attention fusion's numerical check runs the whole graph under onnxruntime, which
# holds every weight again (and, past protobuf's 2 GB, a temporary copy on disk): by
# default it runs up to this many bytes of weights (SmolLM2 fp32: 0.54 GB; a 1B fp32:
# 5 GB). The fusion is the same pattern in every layer and at every size.
VALIDATE_MAX_BYTES = 2 << 30


def optimize(model, *, validate: bool | None = None, check: bool = True):
    """Run every pass on ``model`` (an ``onnx_ir.Model``, changed in place).

    Returns ``(model, OptimizeReport)``. ``validate`` runs the attention fusion's
    numerical check under onnxruntime (None: when the weights are at most
    ``VALIDATE_MAX_BYTES``; a skip is named in ``report.skipped``); ``check`` refuses
    malformed input first.
    """
    from sparsec.onnx_io import initializer_bytes
    from sparsec.passes import check as checks
    from sparsec.passes.attention import CachedAttentionPass
    from sparsec.passes.cleanup import CleanupPass
    from sparsec.passes.fake_quant import FakeQuantPass
    from sparsec.passes.flatten import RowFlattenPass
    from sparsec.passes.gelu import GeluPass
    from sparsec.passes.gemm import GemmToMatMulPass
    from sparsec.passes.names import NameWeightsPass
    from sparsec.passes.positions import LearnedPositionsPass
    from sparsec.passes.qdq import FoldWeightQDQPass
    from sparsec.passes.rmsnorm import RMSNormPass
    from sparsec.passes.rope import RoPEPass
    from sparsec.passes.skip_layernorm import SkipLayerNormPass
    from sparsec.passes.skip_rmsnorm import SkipRMSNormPass
    from sparsec.passes.softcap import LogitSoftCapPass
    from sparsec.passes.sparsity import SparsityRecordPass
    from sparsec.passes.split_linear import SplitFusedLinearPass
    from sparsec.passes.swiglu import SwiGLUPass

    meta = model.metadata_props
    if meta.get(contract.META_FORMAT) == "optimized":
        raise SparsecError("the graph is already optimized (sparsec.format = optimized)")
    if check:
        checks.check(model)
    report = OptimizeReport(nodes_before=len(model.graph), ops_before=op_counts(model))
    if validate is None:
        weights = initializer_bytes(model)
        validate = weights <= VALIDATE_MAX_BYTES
        if not validate:
            report.skipped.append(
                f"the attention fusion's check under onnxruntime ({weights / 1e9:.1f} GB of "
                f"weights, over {VALIDATE_MAX_BYTES / 1e9:.1f} GB: it would hold them "
                "again); `sparsec optimize --validate` runs it"
            )
    names = NameWeightsPass()
    passes = [
        GemmToMatMulPass(),
        CleanupPass(),
        FoldWeightQDQPass(),
        FakeQuantPass(),
        GeluPass(),
        RowFlattenPass(),
        LearnedPositionsPass(),
        SplitFusedLinearPass(),
        RMSNormPass(),
        SkipRMSNormPass(),
        SkipLayerNormPass(),
        RoPEPass(),
        CachedAttentionPass(validate=validate),
        SwiGLUPass(),
        LogitSoftCapPass(),
        CleanupPass("final cleanup", fold=False),
        names,
    ]
    for p in passes:
        _run(p, model, report)
    record = SparsityRecordPass(names.roles)
    _run(record, model, report)
    report.sparsity = record.rows
    functions.attach(model)
    meta[contract.META_FORMAT] = "optimized"
    report.nodes_after = len(model.graph)
    report.ops_after = op_counts(model)
    report.outside_contract = {op: n for op, n in report.ops_after.items() if op not in ALLOWED_OPS}
    return model, report


def _run(the_pass, model, report: OptimizeReport) -> None:
    start = time.perf_counter()
    the_pass.report.nodes_before = len(model.graph)
    the_pass(model)
    the_pass.report.nodes_after = len(model.graph)
    the_pass.report.seconds = time.perf_counter() - start
    report.passes.append(the_pass.report)


def optimize_file(
    src, dst, *, report: bool = False, validate: bool | None = None
) -> OptimizeReport:
    """Optimize the graph in ``src`` into ``dst`` (written atomically); prints the
    report when ``report``. Returns the report. ``validate``: as ``optimize``'s."""
    from sparsec.passes import check as checks

    src, dst = Path(src), Path(dst)
    check_writable(dst)
    model = checks.load(src)
    if model.metadata_props.get(contract.META_FORMAT) == "optimized":
        raise SparsecError(f"{src} is already optimized; give the exported graph")
    checks.check(model, where=str(src))
    model, result = optimize(model, validate=validate, check=False)
    save_atomic(model, dst)
    if report:
        print(result.to_text())
    return result
