"""The per-token activation quantization kernel against the graph contract's reference."""

import numpy as np
import pytest

from sparsec.codegen.linear import quantize_tokens_reference, quantized_row_bytes
from sparsec.passes.reference import per_token_fake_quant


def stored_q(xq: np.ndarray, offset: int) -> np.ndarray:
    """The signed q of bytes stored as (q + offset) mod 256."""
    return (xq.astype(np.int32) - offset + 128) % 256 - 128


@pytest.mark.parametrize("in_features", [1, 16, 70, 128, 576])
def test_quantize_matches_per_token_fake_quant(in_features, linear_kernel):
    kernel = linear_kernel("dense_i8", 16, in_features)
    rng = np.random.default_rng(in_features)
    n = 9
    x = rng.standard_normal((n, in_features)).astype(np.float32) * 3
    x[2] = 0  # s == 0 -> q == 0
    x[3] = np.round(rng.standard_normal(in_features) * 4) / 2  # exact .5 ties
    x[4, 0] = 127.0 / 2  # makes x[4] / s hit half-way points
    xq, xs = kernel.quantize(x, n)
    offset = kernel.isa.act_offset  # 128 for vpdpbusd (u8), 0 for AVX2's vpmaddubsw
    q = stored_q(xq[:, :in_features], offset)
    # bit-identical to the contract's PerTokenFakeQuant (round half to even, float32)
    np.testing.assert_array_equal((q.astype(np.float32) * xs[:, None]), per_token_fake_quant(x))
    ref_q, ref_s = quantize_tokens_reference(x)
    np.testing.assert_array_equal(q, ref_q)
    np.testing.assert_array_equal(xs, ref_s)
    assert np.all(xq[:, in_features:] == offset % 256), "row padding reads as q = 0"
    assert xq.shape[1] == quantized_row_bytes(in_features) and xq.shape[1] % 64 == 0


def test_quantize_thread_slices(linear_kernel):
    kernel = linear_kernel("dense_i8", 16, 48)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 48)).astype(np.float32)
    ref_q, ref_s = quantize_tokens_reference(x)
    xq = np.zeros((7, quantized_row_bytes(48)), np.uint8)
    xs = np.zeros(7, np.float32)
    for tid in range(3):
        kernel.quant(x.ctypes.data, xq.ctypes.data, xs.ctypes.data, 7, tid, 3)
    np.testing.assert_array_equal(stored_q(xq[:, :48], kernel.isa.act_offset), ref_q)
    np.testing.assert_array_equal(xs, ref_s)
