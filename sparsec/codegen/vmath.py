"""Vector math on llvmlite IR for the op kernels: max, fma, horizontal reductions, the
16-way transposed sum, exp, tanh, erf, SiLU and GELU. Widths come from the values' own
vector types (the target's lanes), so one emitter serves any ISA; the building blocks
are ``irbuild``.
"""

from __future__ import annotations

import math

from llvmlite import ir

from sparsec.codegen.irbuild import I32, const, i32, shuffle, vector_intrinsic


def fmax(b: ir.IRBuilder, x: ir.Value, y: ir.Value) -> ir.Value:
    """max(x, y); a single vmaxps (which NaN wins is irrelevant here)."""
    return b.select(b.fcmp_ordered(">", x, y), x, y)


def fma(b: ir.IRBuilder, x: ir.Value, y: ir.Value, z: ir.Value) -> ir.Value:
    """x * y + z, fused."""
    return vector_intrinsic(b, "llvm.fma", x.type, [x, y, z])


def _reduce(b: ir.IRBuilder, vec: ir.Value, combine) -> ir.Value:
    # Halve the vector until one lane is left: log2(width) shuffle+op steps.
    width = vec.type.count
    while width > 1:
        half = width // 2
        lo = shuffle(b, vec, vec, list(range(half)))
        hi = shuffle(b, vec, vec, list(range(half, width)))
        vec = combine(lo, hi)
        width = half
    return b.extract_element(vec, i32(0))


def hsum(b: ir.IRBuilder, vec: ir.Value) -> ir.Value:
    """Sum of all lanes (width a power of two)."""
    return _reduce(b, vec, b.fadd)


def hmax(b: ir.IRBuilder, vec: ir.Value) -> ir.Value:
    return _reduce(b, vec, lambda x, y: fmax(b, x, y))


def transpose_sums(b: ir.IRBuilder, vecs: list[ir.Value]) -> ir.Value:
    """For W vectors of W partial sums (W lanes each), one vector whose lane i is the sum
    of vecs[i].

    A butterfly: each level adds the two halves of every lane block of a pair of
    vectors while packing the pair into one vector, so 16 horizontal sums cost 15
    shuffle pairs + 15 adds instead of 16 separate reductions.
    """
    lanes = len(vecs)
    assert all(v.type.count == lanes for v in vecs)
    block = lanes // 2
    while len(vecs) > 1:
        first, second = [], []
        for k in range(lanes // (2 * block)):
            first += list(range(2 * block * k, 2 * block * k + block))
            second += list(range(2 * block * k + block, 2 * block * (k + 1)))
        lanes_a = first + [lanes + i for i in first]
        lanes_b = second + [lanes + i for i in second]
        vecs = [
            b.fadd(shuffle(b, x, y, lanes_a), shuffle(b, x, y, lanes_b))
            for x, y in zip(vecs[0::2], vecs[1::2], strict=True)
        ]
        block //= 2
    return vecs[0]


# ----------------------------------------------------------------- exp and friends

_LOG2E = 1.4426950408889634
# ln 2 split so that n * LN2_HI is exact for |n| < 2^9 (Cody-Waite range reduction).
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
# exp(r) = 1 + r + r^2 * P(r) on |r| <= ln2/2: minimax polynomial coefficients
# (the classic Cephes expf set), about 1 ulp in float32.
_EXP_POLY = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)
# Below EXP_LO exp(x) is smaller than the least float32 denormal and returns 0;
# above EXP_HI it overflows to inf.
EXP_LO = -104.0
EXP_HI = 88.72283


def vexp(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """exp(x) for float or float vectors: ~1e-7 relative error, 0 below -104, inf above 88.7.

    -inf gives 0 (masked softmax scores rely on this); NaN stays NaN.
    """
    ty = x.type
    ity = ir.VectorType(I32, ty.count) if isinstance(ty, ir.VectorType) else I32
    # Clamp so that the integer exponent stays in range; the selects below fix the ends.
    xc = b.select(b.fcmp_ordered("<", x, const(ty, EXP_LO)), const(ty, EXP_LO), x)
    xc = b.select(b.fcmp_ordered(">", xc, const(ty, EXP_HI)), const(ty, EXP_HI), xc)
    n = vector_intrinsic(b, "llvm.rint", ty, [b.fmul(xc, const(ty, _LOG2E))])
    r = fma(b, n, const(ty, -_LN2_HI), xc)
    r = fma(b, n, const(ty, -_LN2_LO), r)
    poly = const(ty, _EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        poly = fma(b, poly, r, const(ty, c))
    er = b.fadd(fma(b, poly, b.fmul(r, r), r), const(ty, 1.0))
    # Scale by 2^n as 2^(n//2) * 2^(n - n//2): n spans [-150, 128], beyond what one
    # exponent field holds, while both halves are normal floats and the product
    # rounds into the denormal range or up to the float maximum correctly.
    ni = b.fptosi(n, ity)
    n1 = b.ashr(ni, const(ity, 1))
    n2 = b.sub(ni, n1)
    bias, shift = const(ity, 127), const(ity, 23)
    pow1 = b.bitcast(b.shl(b.add(n1, bias), shift), ty)
    pow2 = b.bitcast(b.shl(b.add(n2, bias), shift), ty)
    result = b.fmul(b.fmul(er, pow1), pow2)
    result = b.select(b.fcmp_ordered("<", x, const(ty, EXP_LO)), const(ty, 0.0), result)
    return b.select(b.fcmp_ordered(">", x, const(ty, EXP_HI)), const(ty, math.inf), result)


def silu_mul(b: ir.IRBuilder, gate: ir.Value, up: ir.Value) -> ir.Value:
    """silu(gate) * up = gate * up / (1 + exp(-gate))."""
    ty = gate.type
    denom = b.fadd(const(ty, 1.0), vexp(b, b.fsub(const(ty, 0.0), gate)))
    return b.fdiv(b.fmul(gate, up), denom)


# ----------------------------------------------------------------- tanh, erf, GELU

# tanh(x) = x + x^3 * P(x^2) on |x| <= 0.625 (Cephes tanhf, < 1 ulp); beyond it
# 1 - 2 / (exp(2|x|) + 1) with x's sign (< 1.5 ulp; exp overflows to inf: exactly 1).
_TANH_SMALL = 0.625
_TANH_POLY = (
    -5.70498872745e-3,
    2.06390887954e-2,
    -5.37397155531e-2,
    1.33314422036e-1,
    -3.33332819422e-1,
)
# erf(x) = x + x * P(x^2) on |x| <= 0.9296875; beyond it 1 - exp(Q(|x|)) with x's
# sign, Q ~ log(erfc) fitted on [0.9296875, 4] (|x| is clamped to 4: erf(4) rounds to
# 1 in float32). Weighted least-squares fits of float64 erf, coefficients rounded to
# float32: about 1 ulp each.
_ERF_SMALL = 0.9296875
_ERF_CLAMP = 4.0
_ERF_POLY_SMALL = (
    -5.978841800242662e-4,
    4.991380963474512e-3,
    -2.6765858754515648e-2,
    1.1281811445951462e-1,
    -3.7612494826316833e-1,
    1.2837915122509003e-1,
)
_ERF_POLY_LARGE = (
    1.6025210243242327e-6,
    -4.5355205656960607e-5,
    5.907205631956458e-4,
    -4.7303070314228535e-3,
    2.6335611939430237e-2,
    -1.0992530733346939e-1,
    -6.319952011108398e-1,
    -1.1301316022872925,
    2.94292374746874e-4,
)
_SQRT_HALF = 0.7071067811865476
_GELU_TANH_K = math.sqrt(2.0 / math.pi)  # gelu_tanh: tanh(K * (x + 0.044715 x^3))
_GELU_TANH_C = 0.044715


def _horner(b: ir.IRBuilder, coefs, x: ir.Value) -> ir.Value:
    ty = x.type
    acc = const(ty, coefs[0])
    for c in coefs[1:]:
        acc = fma(b, acc, x, const(ty, c))
    return acc


def vtanh(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """tanh(x) for float or float vectors, within ~1.5 ulp; +-1 for large |x|."""
    ty = x.type
    ax = vector_intrinsic(b, "llvm.fabs", ty, [x])
    z = b.fmul(x, x)
    small = fma(b, b.fmul(_horner(b, _TANH_POLY, z), z), x, x)
    e = vexp(b, b.fadd(ax, ax))
    large = b.fsub(const(ty, 1.0), b.fdiv(const(ty, 2.0), b.fadd(e, const(ty, 1.0))))
    large = vector_intrinsic(b, "llvm.copysign", ty, [large, x])
    return b.select(b.fcmp_ordered(">", ax, const(ty, _TANH_SMALL)), large, small)


def verf(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """erf(x) for float or float vectors, within ~1 ulp (+ the exp's error); +-1 for
    large |x|."""
    ty = x.type
    ax = vector_intrinsic(b, "llvm.fabs", ty, [x])
    small = fma(b, _horner(b, _ERF_POLY_SMALL, b.fmul(x, x)), x, x)
    t = b.select(b.fcmp_ordered("<", ax, const(ty, _ERF_CLAMP)), ax, const(ty, _ERF_CLAMP))
    large = b.fsub(const(ty, 1.0), vexp(b, _horner(b, _ERF_POLY_LARGE, t)))
    large = vector_intrinsic(b, "llvm.copysign", ty, [large, x])
    return b.select(b.fcmp_ordered(">", ax, const(ty, _ERF_SMALL)), large, small)


def gelu(b: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Exact GELU: 0.5 x (1 + erf(x / sqrt 2))."""
    ty = x.type
    erf = verf(b, b.fmul(x, const(ty, _SQRT_HALF)))
    return b.fmul(b.fmul(x, const(ty, 0.5)), b.fadd(erf, const(ty, 1.0)))


def gelu_tanh_mul(b: ir.IRBuilder, x: ir.Value, up: ir.Value | None = None) -> ir.Value:
    """gelu_tanh(x) (* up): 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3),
    computed as x / (1 + exp(-2u)) (the same value; no cancellation for negative x)."""
    ty = x.type
    x3 = b.fmul(b.fmul(x, x), x)
    u = fma(b, x3, const(ty, _GELU_TANH_C), x)
    denom = b.fadd(const(ty, 1.0), vexp(b, b.fmul(u, const(ty, -2.0 * _GELU_TANH_K))))
    num = x if up is None else b.fmul(x, up)
    return b.fdiv(num, denom)
