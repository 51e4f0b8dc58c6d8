"""The IR math helpers: vector exp over a wide range, silu, transposed sums."""

from __future__ import annotations

import numpy as np
import pytest
from llvmlite import ir
from test_ops_support import build_kernels

from sparsec.codegen import irbuild, vmath
from sparsec.codegen.irbuild import FPTR, I64, kernel_function, load, ptr_add, store
from sparsec.codegen.target import AVX512

VW = AVX512.lanes_f32


def _emit_map(op):
    """void name(const float* x, float* y, i32 count): y = op(x), 16 lanes at a time."""

    def emit(module, name):
        fn = kernel_function(module, name, [FPTR, FPTR, irbuild.I32])
        x, y, count = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        with irbuild.loop(b, irbuild.i64(0), b.sext(count, I64), VW) as i:
            store(b, op(b, load(b, ptr_add(b, x, i), VW)), ptr_add(b, y, i))
        b.ret_void()
        return fn

    return emit


def _emit_scalar_exp(module, name):
    fn = kernel_function(module, name, [FPTR, FPTR, irbuild.I32])
    x, y, count = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    with irbuild.loop(b, irbuild.i64(0), b.sext(count, I64)) as i:
        b.store(vmath.vexp(b, b.load(ptr_add(b, x, i))), ptr_add(b, y, i))
    b.ret_void()
    return fn


def _emit_transpose_sums(module, name):
    """y[16] = row sums of x[16, 16] via transpose_sums; z = hsum(x[0]), hmax(x[0])."""
    fn = kernel_function(module, name, [FPTR, FPTR, irbuild.I32])
    x, y, _ = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    rows = [load(b, ptr_add(b, x, VW * r), VW) for r in range(VW)]
    store(b, vmath.transpose_sums(b, rows), y)
    b.store(vmath.hsum(b, rows[0]), ptr_add(b, y, VW))
    b.store(vmath.hmax(b, rows[0]), ptr_add(b, y, VW + 1))
    b.ret_void()
    return fn


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return build_kernels(
        tmp_path_factory.mktemp("vmath"),
        {
            "vexp16": _emit_map(vmath.vexp),
            "silu16": _emit_map(lambda b, v: vmath.silu_mul(b, v, irbuild.const(v.type, 1.0))),
            "vexp1": _emit_scalar_exp,
            "tsum": _emit_transpose_sums,
        },
    )


def _run(kernels, name, x):
    x = np.ascontiguousarray(x, np.float32)
    y = np.empty_like(x)
    kernels(name, x, y, x.size)
    return y


def test_exp_relative_error_over_wide_range(kernels):
    x = np.concatenate(
        [
            np.linspace(-87.0, 88.7, 200_000, dtype=np.float32),
            np.random.default_rng(0).standard_normal(20_000).astype(np.float32) * 5,
            np.array([0.0, -0.0, 1e-8, -1e-8, 0.5 * np.log(2), -0.5 * np.log(2)], np.float32),
        ]
    )
    x = np.concatenate([x, np.zeros((-x.size) % VW, np.float32)])
    ref = np.exp(x.astype(np.float64))
    for name in ("vexp16", "vexp1"):
        rel = np.abs(_run(kernels, name, x) - ref) / ref
        assert rel.max() < 3e-7, (name, x[rel.argmax()], rel.max())


def test_exp_ends_of_the_range(kernels):
    x = np.array(
        [-np.inf, -1e30, -200.0, -104.5, -103.0, -95.0, -88.0, 88.72, 88.8, 100.0, 1e30, np.inf]
        + [np.nan] * 4,
        np.float32,
    )
    y = _run(kernels, "vexp16", x)
    with np.errstate(over="ignore"):
        ref = np.exp(x.astype(np.float64)).astype(np.float32)  # rounds (de)normals and infs
    finite = np.isfinite(ref) & (ref > 0)
    # Denormal results keep fewer significant bits: compare with an absolute floor.
    np.testing.assert_allclose(y[finite], ref[finite], rtol=1e-6, atol=2e-45)
    np.testing.assert_array_equal(y[:3], 0.0)
    np.testing.assert_array_equal(y[8:11], np.inf)
    assert np.isnan(y[12:]).all()


def test_silu(kernels):
    x = np.linspace(-120, 120, 4000, dtype=np.float32)
    y = _run(kernels, "silu16", x)
    xd = x.astype(np.float64)
    ref = xd / (1 + np.exp(-xd))
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-30)


def test_transpose_sums_hsum_hmax(kernels):
    x = np.random.default_rng(1).standard_normal((VW, VW)).astype(np.float32)
    y = np.zeros(VW + 2, np.float32)
    kernels("tsum", x, y, 0)
    np.testing.assert_allclose(y[:VW], x.astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[VW], x[0].astype(np.float64).sum(), rtol=1e-5, atol=1e-6)
    assert y[VW + 1] == x[0].max()


def test_span_chunks_cover_exactly():
    for length in [1, 5, 15, 16, 17, 31, 45, 64, 576, 1536]:
        chunks = irbuild.span_chunks(length, VW)
        covered = [off + k for off, w in chunks for k in range(w)]
        assert covered == list(range(length))
        assert all(w in (16, 8, 4, 1) for _, w in chunks)
    # an 8-lane ISA: full vectors of 8, then 4 and 1
    assert irbuild.span_chunks(13, 8) == [(0, 8), (8, 4), (12, 1)]
