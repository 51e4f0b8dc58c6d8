"""Linear kernels against reference_linear (from the packed data) and plain numpy."""

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from isa_helpers import skip_unless_offered
from llvmlite import ir

from sparsec.codegen.autotune import LinearLibrary, choose_linear_format
from sparsec.codegen.linear import (
    LINEAR_FORMATS,
    emit_linear,
    pack_linear,
    pack_linear_quantized,
    quantize_weight_rows,
    reference_linear,
    unpack_weight,
)
from sparsec.codegen.target import AVX2, Target, default_target
from sparsec.errors import SparsecError

# 200 and 410 rows: 13 and 26 row blocks, so decode block groups (up to 6 blocks) run
# whole and with a remainder, on 1-3 threads.
SHAPES = [(32, 32), (64, 128), (40, 70), (130, 64), (200, 24), (410, 40)]
SPARSITIES = [0.0, 0.5, 0.7, 0.9, 1.0]
MAX_TOKENS = 16
TOKENS = [1, 3, 8, 13, MAX_TOKENS]  # 13 = 8 + 4 + 1 covers every token tile size


def random_weight(rng, out_features, in_features, sparsity):
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    if sparsity >= 1.0:
        return np.zeros_like(w)
    w[rng.random(w.shape) < sparsity] = 0.0
    return w


def _check(y, packed, w, x, y0=None):
    """fp32: ~1e-5 relative to numpy; int8: equal to the simulated W8A8 reference."""
    ref = reference_linear(packed, x, y0)
    if packed.precision == "fp32":
        exact = x.astype(np.float64) @ w.T.astype(np.float64)
        if y0 is not None:
            exact = exact + y0
        scale = np.abs(exact).max() + 1e-6
        assert np.abs(y - exact).max() / scale < 1e-5
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * scale)
    else:
        scale = np.abs(ref).max() + 1e-6
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("fmt", LINEAR_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_formats_tokens_threads_sparsities(fmt, shape, isa, linear_kernel):
    rng = np.random.default_rng(hash((fmt, shape)) % 2**32)
    out_f, in_f = shape
    kernel = linear_kernel(fmt, out_f, in_f, MAX_TOKENS)
    for sparsity in SPARSITIES:
        w = random_weight(rng, out_f, in_f, sparsity)
        packed = pack_linear(w, fmt, isa)
        assert packed.data.dtype == np.uint8 and packed.data.size % 64 == 0
        for n in TOKENS:
            x = rng.standard_normal((n, in_f)).astype(np.float32)
            for nthreads in (1, 2, 3):
                y = np.full((n, out_f), np.nan, np.float32)
                kernel(packed.data, x, y, n, nthreads)
                _check(y, packed, w, x)


@pytest.mark.parametrize("fmt", LINEAR_FORMATS)
def test_accumulate_and_strides(fmt, isa, linear_kernel):
    rng = np.random.default_rng(7)
    out_f, in_f, n = 40, 70, 13
    x_stride = 80 if fmt.endswith("f32") else 192  # int8: bytes between xq rows
    y_stride = 50
    kernel = linear_kernel(
        fmt, out_f, in_f, MAX_TOKENS, accumulate=True, x_stride=x_stride, y_stride=y_stride
    )
    w = random_weight(rng, out_f, in_f, 0.6)
    packed = pack_linear(w, fmt, isa)
    x = rng.standard_normal((n, in_f)).astype(np.float32)
    if fmt.endswith("f32"):
        xbuf = np.full((n, x_stride), np.nan, np.float32)  # padding must never be read
        xbuf[:, :in_f] = x
    else:
        xbuf = x  # the helper quantizes and spreads xq rows x_stride bytes apart
    ybuf = rng.standard_normal((n, y_stride)).astype(np.float32)
    y0 = ybuf.copy()
    kernel(packed.data, np.ascontiguousarray(xbuf), ybuf, n, nthreads=2)
    _check(ybuf[:, :out_f], packed, w, x, y0[:, :out_f])
    np.testing.assert_array_equal(ybuf[:, out_f:], y0[:, out_f:])  # gaps untouched


@pytest.mark.parametrize("fmt", LINEAR_FORMATS)
def test_thread_slices_partition_rows(fmt, isa, linear_kernel):
    rng = np.random.default_rng(3)
    out_f, in_f = 130, 64
    kernel = linear_kernel(fmt, out_f, in_f, MAX_TOKENS)
    w = random_weight(rng, out_f, in_f, 0.7)
    w[:40] = 0  # skewed nnz: balanced sparse slices differ from even ones
    packed = pack_linear(w, fmt, isa)
    x = rng.standard_normal((2, in_f)).astype(np.float32)
    for nthreads in (2, 3, 16):
        written = np.zeros(out_f, int)
        for tid in range(nthreads):
            y = np.full((2, out_f), np.nan, np.float32)
            kernel(packed.data, x, y, 2, nthreads, tids=[tid])
            rows = ~np.isnan(y[0])
            assert np.array_equal(rows, ~np.isnan(y[1]))
            idx = np.flatnonzero(rows)
            assert idx.size == 0 or np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
            written += rows
        assert np.all(written == 1), "each output row is written by exactly one thread"


@pytest.mark.parametrize("fmt", LINEAR_FORMATS)
def test_real_threads(fmt, isa):
    skip_unless_offered(isa, fmt)
    rng = np.random.default_rng(11)
    w = random_weight(rng, 96, 64, 0.5)
    packed = pack_linear(w, fmt, isa)
    tgt = Target(isa, default_target().cpu)
    lib = LinearLibrary([("lin", packed)], max_tokens=MAX_TOKENS, tgt=tgt)
    for n in (1, 11):
        x = rng.standard_normal((n, 64)).astype(np.float32)
        y = np.full((n, 96), np.nan, np.float32)
        lib.run("lin", x, y, nthreads=2)
        _check(y, packed, w, x)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fmt=st.sampled_from(LINEAR_FORMATS),
    out_f=st.integers(1, 260),
    in_f=st.integers(1, 90),
    sparsity=st.sampled_from(SPARSITIES),
    n=st.integers(1, 12),
    nthreads=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(fmt, out_f, in_f, sparsity, n, nthreads, seed, isa, linear_kernel):
    assume(fmt in isa.formats)
    rng = np.random.default_rng(seed)
    w = random_weight(rng, out_f, in_f, sparsity)
    packed = pack_linear(w, fmt, isa)
    x = rng.standard_normal((n, in_f)).astype(np.float32)
    y = np.full((n, out_f), np.nan, np.float32)
    linear_kernel(fmt, out_f, in_f, 12)(packed.data, x, y, n, nthreads)
    _check(y, packed, w, x)


@pytest.mark.parametrize("fmt", LINEAR_FORMATS)
def test_pack_roundtrip_and_stats(fmt, isa):
    skip_unless_offered(isa, fmt)
    rng = np.random.default_rng(5)
    w = random_weight(rng, 33, 45, 0.7)
    packed = pack_linear(w, fmt, isa)
    if fmt.endswith("f32"):
        np.testing.assert_array_equal(unpack_weight(packed), w)
        assert packed.nnz == np.count_nonzero(w)
    else:
        q, _ = quantize_weight_rows(w)
        np.testing.assert_array_equal(unpack_weight(packed), q)
        assert packed.nnz == np.count_nonzero(q)
    assert packed.sparsity == pytest.approx(1 - packed.nnz / w.size)


def test_weight_quantization_rule():
    w = np.array([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.5, -3.0, 0.01]], np.float32)
    q, s = quantize_weight_rows(w)
    np.testing.assert_array_equal(s, np.float32([1 / 127, 0, 3 / 127]))
    # round half to even: -0.5*127 = -63.5 -> -64; 0.25*127 = 31.75 -> 32; 1.5/(3/127) = 63.5 -> 64
    np.testing.assert_array_equal(q, [[127, -64, 32, 0], [0, 0, 0, 0], [127, 64, -127, 0]])


def test_prequantized_weights(isa, linear_kernel):
    rng = np.random.default_rng(9)
    q = rng.integers(-127, 128, size=(48, 64)).astype(np.int8)
    scale = rng.random(48).astype(np.float32) * 0.01
    packed = pack_linear_quantized(q, scale, "bitmask_i8", isa)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    y = np.zeros((5, 48), np.float32)
    linear_kernel("bitmask_i8", 48, 64)(packed.data, x, y, 5)
    _check(y, packed, q.astype(np.float32) * scale[:, None], x)


def test_bad_inputs_raise():
    with pytest.raises(SparsecError, match="unknown linear format"):
        pack_linear(np.ones((4, 4), np.float32), "csr_f32")
    with pytest.raises(SparsecError, match="2-D"):
        pack_linear(np.ones(4, np.float32), "dense_f32")
    with pytest.raises(SparsecError, match="NaN"):
        pack_linear(np.full((4, 4), np.nan, np.float32), "bitmask_f32")
    with pytest.raises(SparsecError, match="int8"):
        pack_linear_quantized(np.full((2, 2), -128, np.int8), np.ones(2), "dense_i8")


@pytest.mark.parametrize("fmt", LINEAR_FORMATS)
def test_kernel_code_is_weight_independent(fmt, isa, linear_kernel):
    """One kernel per (format, shape) serves all layers of that shape (kernel_key)."""
    rng = np.random.default_rng(13)
    kernel = linear_kernel(fmt, 48, 80)  # compiled for zero weights
    for sparsity in (0.0, 0.9):
        w = random_weight(rng, 48, 80, sparsity)
        packed = pack_linear(w, fmt, isa)
        assert packed.kernel_key == pack_linear(np.zeros((48, 80), np.float32), fmt, isa).kernel_key
        x = rng.standard_normal((5, 80)).astype(np.float32)
        y = np.zeros((5, 48), np.float32)
        kernel(packed.data, x, y, 5, nthreads=2)
        _check(y, packed, w, x)


def test_avx2_bitmask_int8_masks_byte_pairs():
    """AVX2's int8 mask bit covers the two bytes of a row that vpmaddubsw multiplies
    together: a pair is stored whole when either byte is nonzero."""
    q = np.zeros((8, 4), np.int8)
    q[0, 0], q[0, 1] = 5, -7  # row 0, columns 0-1: pair (r0, h0), both bytes nonzero
    q[1, 3] = 9  # row 1, column 3: pair (r1, h1), stored with its zero column 2
    packed = pack_linear_quantized(q, np.ones(8, np.float32), "bitmask_i8", AVX2)
    assert packed.mask_unit == 2 and packed.rows == 8
    stream = int(packed.data[packed.sections["table"] :][:8].view(np.int64)[0])
    mask = packed.data[stream : stream + 2].view(np.uint16)[0]
    assert mask == 0b1001  # bits 2r+h
    assert packed.data[stream + 2 : stream + 6].view(np.int8).tolist() == [5, -7, 0, 9]
    np.testing.assert_array_equal(unpack_weight(packed), q)
    # ablation: AVX-512 masks single bytes, so the zero of the second pair is not stored
    wide = pack_linear_quantized(q, np.ones(8, np.float32), "bitmask_i8")
    stream = int(wide.data[wide.sections["table"] :][:8].view(np.int64)[0])
    assert wide.mask_unit == 1
    assert wide.data[stream + 8 : stream + 11].view(np.int8).tolist() == [5, -7, 9]


def test_a_format_the_isa_lacks_is_refused_by_name():
    """Packing, emitting or forcing --kernels for a format the ISA has no kernel for."""
    no_sparse = dataclasses.replace(AVX2, name="test256", formats=("dense_f32", "dense_i8"))
    tgt = Target(no_sparse, default_target().cpu)
    w = random_weight(np.random.default_rng(0), 32, 64, 0.7)
    with pytest.raises(SparsecError, match="'bitmask_i8' has no test256 kernel"):
        pack_linear(w, "bitmask_i8", no_sparse)
    with pytest.raises(SparsecError, match="test256 target has no bitmask_i8 kernel"):
        choose_linear_format(w, "int8", "bitmask", tgt=tgt)
    assert choose_linear_format(w, "int8", "auto", tgt=tgt, use_cache=False) == "dense_i8"
    packed = pack_linear(w, "bitmask_i8")  # AVX-512 blocks
    with pytest.raises(SparsecError, match="no avx2 kernel"):
        emit_linear(ir.Module(), "k", packed, max_tokens=4, target=Target(AVX2, tgt.cpu))
