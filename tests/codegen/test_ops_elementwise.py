"""Embedding, RMSNorm (plain and fused residual), SwiGLU activation, residual add."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from llvmlite import ir
from test_ops_support import (
    ODD,
    SMOLLM2,
    TINY,
    _ref_embedding,
    _ref_rmsnorm,
    _ref_silu_mul,
    assert_close,
    assert_shares_partition,
    build_kernels,
)

from sparsec.codegen import ops
from sparsec.codegen.linear_pack import pack_linear, unpack_weight, weight_scale
from sparsec.errors import SparsecError

EPS = 1e-5
SHAPES = {"tiny": TINY, "smollm2": SMOLLM2, "odd": ODD}


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request, tmp_path_factory):
    s = SHAPES[request.param]
    p = functools.partial
    table = np.random.default_rng(0).standard_normal((s["vocab"], s["dim"]), dtype=np.float32)
    head_i8 = pack_linear(table, "dense_i8")
    scale_at = head_i8.sections["scale"] - head_i8.sections["weights"]
    kernels = build_kernels(
        tmp_path_factory.mktemp(f"elementwise-{request.param}"),
        {
            "emb": p(ops.emit_embedding, vocab=s["vocab"], dim=s["dim"]),
            "emb16": p(
                ops.emit_embedding,
                vocab=s["vocab"],
                dim=s["dim"],
                layout="dense_f32",
                rows=head_i8.rows,
            ),
            "emb_i8": p(
                ops.emit_embedding,
                vocab=s["vocab"],
                dim=s["dim"],
                layout="dense_i8",
                scale_at=scale_at,
                rows=head_i8.rows,
            ),
            "rms": p(ops.emit_rmsnorm, dim=s["dim"], eps=EPS, residual=False),
            "rms_res": p(ops.emit_rmsnorm, dim=s["dim"], eps=EPS, residual=True),
            "swiglu": p(ops.emit_swiglu_act, ffn_dim=s["ffn"]),
            "radd": p(ops.emit_residual_add, dim=s["dim"]),
            "bias": p(ops.emit_bias_add, dim=s["dim"]),
        },
    )
    return s, kernels, table


NS = [1, 2, 7]
THREADS = [1, 2, 3]


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
def test_embedding(model, n, nthreads):
    s, k, table = model
    tokens = np.random.default_rng(n).integers(0, s["vocab"], n).astype(np.int32)
    tokens[0] = s["vocab"] - 1  # the last row is reachable
    arrays = {"out": np.full((n, s["dim"]), np.nan, np.float32)}
    out = assert_shares_partition(
        lambda a, tid, nt: k("emb", table, tokens, a["out"], n, tid, nt), arrays, ["out"], nthreads
    )["out"]
    np.testing.assert_array_equal(out, _ref_embedding(table, tokens))


@pytest.mark.parametrize("nthreads", [1, 3])
@pytest.mark.parametrize("fmt", ["dense_f32", "dense_i8"])
def test_embedding_from_a_tied_lm_head(model, fmt, nthreads):
    """Rows read from the LM head's packed weights: the float rows from ``dense_f32``,
    ``q * scale`` (the head's own int8 grid) from ``dense_i8``, bit for bit."""
    s, k, table = model
    kernel = {"dense_f32": "emb16", "dense_i8": "emb_i8"}[fmt]
    packed = pack_linear(table, fmt)  # what the LM head linear ships
    weights = packed.data[packed.sections["weights"] :]
    rows = table
    if fmt == "dense_i8":
        rows = unpack_weight(packed).astype(np.float32) * weight_scale(packed)[:, None]
        assert not np.array_equal(rows, table)  # the int8 grid is not the float table
    n = 7
    tokens = np.random.default_rng(5).integers(0, s["vocab"], n).astype(np.int32)
    tokens[:3] = [s["vocab"] - 1, 0, 17 % s["vocab"]]  # last (padded) block, first lane
    arrays = {"out": np.full((n, s["dim"]), np.nan, np.float32)}
    out = assert_shares_partition(
        lambda a, tid, nt: k(kernel, weights, tokens, a["out"], n, tid, nt),
        arrays,
        ["out"],
        nthreads,
    )["out"]
    np.testing.assert_array_equal(out, _ref_embedding(rows, tokens))
    bad = np.array([s["vocab"], -1], np.int32)
    out = np.full((2, s["dim"]), np.nan, np.float32)
    k(kernel, weights, bad, out, 2, 0, 1)
    np.testing.assert_array_equal(out, 0.0)


def test_embedding_rejects_an_unknown_layout():
    with pytest.raises(ValueError, match="embedding layout must be one of"):
        ops.emit_embedding(ir.Module(), "e", vocab=4, dim=4, layout="dense_bf16")


def test_embedding_out_of_range_token_gives_zero_row(model):
    s, k, table = model
    tokens = np.array([-1, s["vocab"], 0], np.int32)
    out = np.full((3, s["dim"]), np.nan, np.float32)
    k("emb", table, tokens, out, 3, 0, 1)
    np.testing.assert_array_equal(out[:2], 0.0)
    np.testing.assert_array_equal(out[2], table[0])


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
def test_rmsnorm(model, n, nthreads):
    s, k, _ = model
    rng = np.random.default_rng(10 + n)
    x = rng.standard_normal((n, s["dim"]), dtype=np.float32) * 3
    w = rng.standard_normal(s["dim"], dtype=np.float32)
    arrays = {"y": np.full((n, s["dim"]), np.nan, np.float32)}
    y = assert_shares_partition(
        lambda a, tid, nt: k("rms", x, w, a["y"], n, tid, nt), arrays, ["y"], nthreads
    )["y"]
    assert_close(y, _ref_rmsnorm(x, w, EPS))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
def test_rmsnorm_with_residual(model, n, nthreads):
    s, k, _ = model
    rng = np.random.default_rng(20 + n)
    resid = rng.standard_normal((n, s["dim"]), dtype=np.float32)
    delta = rng.standard_normal((n, s["dim"]), dtype=np.float32)
    w = rng.standard_normal(s["dim"], dtype=np.float32)
    arrays = {"resid": resid, "y": np.full((n, s["dim"]), np.nan, np.float32)}
    out = assert_shares_partition(
        lambda a, tid, nt: k("rms_res", a["resid"], delta, w, a["y"], n, tid, nt),
        arrays,
        ["resid", "y"],
        nthreads,
    )
    total = resid + delta  # float32 add, exactly what the kernel does
    np.testing.assert_array_equal(out["resid"], total)
    assert_close(out["y"], _ref_rmsnorm(total, w, EPS))


def test_rmsnorm_zero_row_uses_eps(model):
    s, k, _ = model
    x = np.zeros((1, s["dim"]), np.float32)
    y = np.full_like(x, np.nan)
    k("rms", x, np.ones(s["dim"], np.float32), y, 1, 0, 1)
    np.testing.assert_array_equal(y, 0.0)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
def test_swiglu_act(model, n, nthreads):
    s, k, _ = model
    ffn = s["ffn"]
    gu = np.random.default_rng(30 + n).standard_normal((n, 2 * ffn), dtype=np.float32) * 4
    gu[0, :3] = [-100.0, 100.0, 0.0]  # saturated gates
    arrays = {"h": np.full((n, ffn), np.nan, np.float32)}
    h = assert_shares_partition(
        lambda a, tid, nt: k("swiglu", gu, a["h"], n, tid, nt), arrays, ["h"], nthreads
    )["h"]
    assert_close(h, _ref_silu_mul(gu, ffn))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
def test_residual_add(model, n, nthreads):
    s, k, _ = model
    rng = np.random.default_rng(40 + n)
    acc = rng.standard_normal((n, s["dim"]), dtype=np.float32)
    x = rng.standard_normal((n, s["dim"]), dtype=np.float32)
    out = assert_shares_partition(
        lambda a, tid, nt: k("radd", a["acc"], x, n, tid, nt), {"acc": acc}, ["acc"], nthreads
    )["acc"]
    np.testing.assert_array_equal(out, acc + x)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("nthreads", THREADS)
def test_bias_add(model, n, nthreads):
    s, k, _ = model
    rng = np.random.default_rng(50 + n)
    y = rng.standard_normal((n, s["dim"]), dtype=np.float32)
    bias = rng.standard_normal(s["dim"], dtype=np.float32)
    out = assert_shares_partition(
        lambda a, tid, nt: k("bias", a["y"], bias, n, tid, nt), {"y": y}, ["y"], nthreads
    )["y"]
    np.testing.assert_array_equal(out, y + bias[None, :])


def test_decode_row_is_shared_among_threads(model):
    """One token's elementwise work is split between threads, not left to one of them."""
    s, k, _ = model
    gu = np.ones((1, 2 * s["ffn"]), np.float32)
    busy = []
    for tid in range(2):
        h = np.full((1, s["ffn"]), np.nan, np.float32)
        k("swiglu", gu, h, 1, tid, 2)
        busy.append(bool((~np.isnan(h)).any()))
    # Units are 256 columns wide: a row narrower than two units goes to one thread.
    assert busy == ([True, True] if s["ffn"] > 256 else [False, True])


def test_bad_parameters_are_rejected():
    from llvmlite import ir

    with pytest.raises(SparsecError, match="dim=0"):
        ops.emit_residual_add(ir.Module(), "x", dim=0)
    with pytest.raises(SparsecError, match="epsilon"):
        ops.emit_rmsnorm(ir.Module(), "x", dim=8, eps=float("nan"), residual=False)


def test_shared_kernel_emits_each_parameter_set_once():
    from llvmlite import ir

    module = ir.Module()
    a = ops.shared_kernel(module, ops.emit_residual_add, dim=64)
    b = ops.shared_kernel(module, ops.emit_residual_add, dim=64)
    c = ops.shared_kernel(module, ops.emit_residual_add, dim=128)
    d = ops.shared_kernel(module, ops.emit_rmsnorm, dim=64, eps=1e-5, residual=True)
    assert a is b
    assert len({a.name, c.name, d.name}) == 3
    assert a.name.startswith("spc_residual_add_") and d.name.startswith("spc_rmsnorm_")
