"""Triton device functions the fused Adam kernel is built from: codes, hashing, rounding.

Each mirrors a PyTorch function bit for bit (codes.Minifloat.encode/decode, rounding.mix32,
rounding.stochastic_round, rounding.kahan_add); the kernel is compiled without FMA contraction so
that FP32 products and sums round exactly as they do in the reference.
Import only where triton is installed.
"""
from __future__ import annotations

import triton
import triton.language as tl

RINT_MAGIC = tl.constexpr(12582912.0)   # 1.5 * 2**23: (x + M) - M rounds x in [0, 2**22) to an integer (RNE)
FLT_MAX = tl.constexpr(3.4028234663852886e38)   # largest finite FP32: |x| <= it is false for NaN and +-inf


@triton.jit
def finite_or_zero(x):
    """blockwise.finite_or_zero: NaN and +-inf -> 0 (one compare and one select per value)."""
    return tl.where(tl.abs(x) <= FLT_MAX, x, 0.0)


@triton.jit
def mix32(x):
    """lowbias32 on uint32 (wrapping products), as rounding.mix32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def random_bits(offs, key):
    """32 random bits per element: mix32(index ^ key) (as rounding.random_bits)."""
    return mix32(offs.to(tl.uint32) ^ key)


@triton.jit
def stream_key(base, step_u32, stream):
    """rounding.stream_key, from the tensor's base key and the new step count."""
    return mix32(mix32(base + step_u32) + stream)


@triton.jit
def stochastic_round(x, rbits, DT: tl.constexpr):
    """rounding.stochastic_round: FP32 -> DT (bf16/fp16), up in magnitude with probability of the fraction."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (rbits & 0xFFFF)) & 0xFFFF0000
        # NaN passes through (0x7FFFFFFF, the GPU's NaN, would carry into the sign bit and round to -0.0)
        return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True)).to(tl.bfloat16)
    r = (rbits >> 8).to(tl.float32) * 5.9604644775390625e-08
    a = tl.abs(x)
    nearest = a.to(DT)
    bits = nearest.to(tl.int16, bitcast=True)
    above = nearest.to(tl.float32) > a
    down_bits = tl.where(above, bits - 1, bits)
    up_bits = tl.where(above, bits, bits + 1)
    down = down_bits.to(DT, bitcast=True).to(tl.float32)
    up = up_bits.to(DT, bitcast=True).to(tl.float32)
    frac = tl.div_rn(a - down, up - down)
    mag = tl.where(r < frac, up, down)
    negative = (x.to(tl.int32, bitcast=True) >> 31) != 0
    return tl.where(negative, -mag, mag).to(DT)


@triton.jit
def pow2(K: tl.constexpr):
    """Exactly 2**K as an FP32 scalar (built from its bits; exp2 on the GPU is approximate)."""
    return tl.full([], (K + 127) << 23, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def minifloat_encode(u, EXP: tl.constexpr, MAN: tl.constexpr, SIGNED: tl.constexpr, SUB: tl.constexpr):
    """codes.Minifloat.encode (int32 codes) of FP32 values already scaled onto the code's range."""
    BIAS: tl.constexpr = (1 << EXP) - 1
    SHIFT: tl.constexpr = 23 - MAN
    MAXC: tl.constexpr = (1 << (EXP + MAN)) - 1
    mag = tl.abs(u)
    bits = mag.to(tl.int32, bitcast=True)
    rounded = (bits + ((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1)) >> SHIFT
    code = rounded - ((127 - BIAS) << MAN)
    if SUB:
        # min normal 2**(1 - BIAS); subnormal quantum 2**(1 - BIAS - MAN): both exact FP32 constants
        min_normal = pow2(1 - BIAS)
        scaled = mag * pow2(BIAS - 1 + MAN)
        sub = ((scaled + RINT_MAGIC) - RINT_MAGIC).to(tl.int32)
        code = tl.where(mag < min_normal, sub, code)
    code = tl.minimum(tl.maximum(code, 0), MAXC)
    if SIGNED:
        code = code | (((u.to(tl.int32, bitcast=True) >> 31) & 1) << (EXP + MAN))
    return code


@triton.jit
def minifloat_decode(code, EXP: tl.constexpr, MAN: tl.constexpr, SIGNED: tl.constexpr, SUB: tl.constexpr):
    """codes.Minifloat.decode: FP32 values of int32 codes."""
    BIAS: tl.constexpr = (1 << EXP) - 1
    MAXC: tl.constexpr = (1 << (EXP + MAN)) - 1
    mag = code & MAXC
    value = ((mag + ((127 - BIAS) << MAN)) << (23 - MAN)).to(tl.float32, bitcast=True)
    if SUB:
        value = tl.where(mag < (1 << MAN), mag.to(tl.float32) * pow2(1 - BIAS - MAN), value)
    if SIGNED:
        value = tl.where(((code >> (EXP + MAN)) & 1) != 0, -value, value)
    return value


@triton.jit
def one_minus_exp(x):
    """reference.one_minus_exp: 1 - e**x for x <= 0 (bias corrections), the same Horner series in FP32
    (bit for bit, with FMA contraction off) above -0.5, the exp below it. Coefficients: 1/k!, k = 10..1."""
    p = 2.755731922398589e-07
    p = p * x + 2.7557319223985893e-06
    p = p * x + 2.48015873015873e-05
    p = p * x + 0.0001984126984126984
    p = p * x + 0.001388888888888889
    p = p * x + 0.008333333333333333
    p = p * x + 0.041666666666666664
    p = p * x + 0.16666666666666666
    p = p * x + 0.5
    p = p * x + 1.0
    return tl.where(x > -0.5, -(p * x), 1.0 - tl.exp(x))
