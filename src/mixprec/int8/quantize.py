"""INT8 quantization: symmetric codes in [-127, 127] and FP32 dequantization scales, per row or tensor.

Convention (torchao's INT8 mixed-precision training, and mixprec.fp8's): scales are *dequantization*
scales in FP32, x ~= q * scale. For a group G (a row along the last dimension, or the whole tensor):

    amax  = max(|x| for x in G), at least AMAX_EPS
    scale = amax / 127                  (correctly rounded to FP32, through float64)
    inv   = 1 / scale                   (correctly rounded to FP32, through float64, once per group)
    q     = round(x * inv)                x * inv in FP32, then round half to even
            (clamped to [-127, 127] when an amax is given: values past it saturate)

Symmetric: -128 is never produced, so negating a tensor negates its codes. The code is defined as the
rounding of the FP32 product x * inv (what a GPU kernel computes: one multiply, one rounding), not of
the exact quotient x / scale; the two differ by one code only where x / scale lies within a few FP32
ulps (relative 2**-23) of a half-integer. Defined this way, the CPU emulation and every device produce
the same codes bit for bit: IEEE FP32 multiplication and round-half-even are correctly rounded
everywhere. Scale and reciprocal go through float64 (rounded once) so that no compiler can turn them
into approximate divisions. With the current amax no clamp is needed: |x * inv| <= amax * inv
<= 127 * (1 + 2**-22), which rounds to 127.

Non-finite values propagate: a group holding inf or NaN gets a non-finite scale, so whatever its
codes, every product that uses it dequantizes to inf or NaN, and loss scalers and guards still see
the overflow.

The crest factor amax / rms of a group sets its quantization error: rounding to a step of
amax / 127 leaves noise of power step**2 / 12, an SQNR of 10*log10(12 * 127**2) - 20*log10(crest)
= 52.9 dB - 20*log10(crest) (`crest_factor`; the outlier fallback tests it).
"""
from __future__ import annotations

from typing import Literal

import torch

Granularity = Literal["tensorwise", "rowwise"]
GRANULARITIES: tuple[str, ...] = ("tensorwise", "rowwise")

QMAX = 127
# Floor on amax so an all-zero group gets a finite scale (0 * inv = 0, not NaN); torchao's choice.
AMAX_EPS = 1e-12


def check_granularity(granularity: str) -> None:
    """Raise ValueError naming the choices unless `granularity` is one of GRANULARITIES."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown INT8 granularity {granularity!r}; choose one of: {', '.join(GRANULARITIES)}")


def group_amax(x: torch.Tensor, granularity: Granularity = "rowwise") -> torch.Tensor:
    """max |x| per group in FP32, shaped like the scale: () tensorwise, (..., 1) rowwise; NaN if the
    group holds a NaN."""
    check_granularity(granularity)
    # one pass for min and max (no |x| temporary): max |x| = max(max, -min), exact in x's dtype
    lo, hi = torch.aminmax(x) if granularity == "tensorwise" else torch.aminmax(x, dim=-1, keepdim=True)
    return torch.maximum(hi, lo.neg()).float()


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Dequantization scale amax / 127 in FP32, correctly rounded (through float64)."""
    return (amax.float().clamp(min=AMAX_EPS).double() / QMAX).float()


def reciprocal_scale(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale correctly rounded to FP32 (through float64): the multiplier quantization applies."""
    return (1.0 / scale.double()).float()


def quantize(x: torch.Tensor, granularity: Granularity = "rowwise", *,
             amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` to INT8 codes and FP32 dequantization scales (x ~= q * scale).

    granularity: "rowwise" (one scale per row along the last dimension, shape (..., 1)) or
                 "tensorwise" (one scale, shape ()). To quantize along another dimension, pass a
                 transposed view (`quantize(w.t())` scales each column of w).
    amax:        use this amax (shaped like the scale) instead of the current one; values past it
                 saturate at +-127.
    Returns (q, scale): q int8 of x's shape (and strides where x is dense), scale FP32.
    """
    codes, scale = float_codes(x, granularity, amax=amax)
    return codes.to(torch.int8), scale


def float_codes(x: torch.Tensor, granularity: Granularity = "rowwise", *,
                amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize`'s codes as FP32 values (exactly the integers q), and the scale: what the emulated GEMM
    reads, without a round trip through int8 (two passes over the tensor fewer on the CPU)."""
    check_granularity(granularity)
    if not torch.is_floating_point(x):
        raise TypeError(f"quantize needs a floating-point tensor, got {x.dtype}")
    scale = scale_from_amax(group_amax(x, granularity) if amax is None else amax)
    inv = reciprocal_scale(scale)
    # x * inv in FP32: a half x is promoted exactly; inv keeps x's number of dimensions so that type
    # promotion applies to it (a 0-dim FP32 scale would leave a BF16 product in BF16)
    inv = inv.reshape((1,) * x.dim()) if inv.dim() == 0 and x.dim() else inv
    codes = (x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.float()).mul(inv)
    if codes.dtype != torch.float32:
        codes = codes.float()
    codes.round_()
    if amax is not None:
        # with the current amax no clamp is needed: |x * inv| <= amax * inv <= 127 * (1 + 2**-22) rounds
        # to at most 127; a given amax may be exceeded (saturate), and non-finite groups are NaN anyway
        codes.clamp_(-QMAX, QMAX)
    return codes, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale in FP32 (exact: codes have 8 bits, the product 24 + 7), then cast to `dtype`."""
    return (q.float() * scale.float()).to(dtype)


def crest_factor(x: torch.Tensor, granularity: Granularity = "rowwise") -> torch.Tensor:
    """amax / rms per group (shaped like the scale), in FP32; 1 for an all-zero group.

    At least 1 always, at most sqrt(group size) (one nonzero value); Gaussian rows of a few thousand
    values sit near 3.5-4.5. The rowwise SQNR of a group is about 52.9 dB - 20*log10(crest).
    """
    check_granularity(granularity)
    a = x.float()
    dims = None if granularity == "tensorwise" else (-1,)
    amax = a.abs().amax() if dims is None else a.abs().amax(dim=-1, keepdim=True)
    # mean of squares in FP32 over amax-normalized values: no overflow or underflow of the squares
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    ms = (a / safe).square().mean() if dims is None else (a / safe).square().mean(dim=-1, keepdim=True)
    return torch.where(amax > 0, ms.rsqrt(), torch.ones_like(amax))
