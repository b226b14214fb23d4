"""Quantization codes for optimizer state: small non-linear value tables, encoded by arithmetic.

A code maps an n-bit integer to a value. Like bitsandbytes' dynamic code, ours are non-linear
(dense near zero, sparse near the block's absmax) and come in a signed flavour for the first moment
and an unsigned one for the second. Unlike a free-form table, each of ours is a *minifloat*: the code's
bits are a sign, an exponent and a mantissa field of a tiny float format chosen per moment. That buys
two things:

* encoding is arithmetic (round-to-nearest-even on the FP32 bit pattern), not a search through a
  table, so the fused kernel stays memory-bound (a 256-entry binary search is 8 dependent gathers
  per value, which is where bitsandbytes' 8-bit step spends its time);
* the trade between range and precision is one knob per moment: the first moment needs precision
  near its absmax (the largest updates), the second needs range (a small v that rounds down makes
  m / sqrt(v) blow up), so v's code has more exponent bits and no zero: values under the smallest
  code round up to it, never to zero.

`Minifloat.table()` lists every value of a code; tests check that the arithmetic encoder picks the
nearest table entry. FP8 state uses the hardware E4M3 format through native casts.

Encoding of u >= 0 (already divided by the block scale), with M mantissa bits and exponent bias B:
    normal:    r = (bits(u) + 2**(22-M) - 1 + lsb) >> (23-M);  code = r - ((127 - B) << M)
    subnormal: code = rint(u * 2**(B - 1 + M))        (u < 2**(1-B); only codes with a zero)
    clamp:     0 <= code <= 2**(E+M) - 1             (no zero: below the smallest value -> code 0)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Block scales are clamped to at least this, so a block of zeros divides by a finite number (the
# resulting codes decode to ~1e-30 * value, i.e. zero for any practical purpose).
MIN_BLOCK_ABSMAX = 2.0 ** -100
# 1.5 * 2**23: adding and subtracting it rounds an FP32 value in [0, 2**22) to an integer (RNE).
_RINT_MAGIC = 12582912.0


@dataclass(frozen=True)
class Minifloat:
    """A tiny float format used as a quantization code (sign bit optional, no inf or NaN).

    `subnormals=True` gives an IEEE-like code with an exact zero; `subnormals=False` gives a code
    without zero whose lowest exponent field is an ordinary binade (for the second moment).
    """

    name: str
    signed: bool
    exp_bits: int
    man_bits: int
    subnormals: bool

    def __post_init__(self) -> None:
        if not (1 <= self.exp_bits <= 5 and 0 <= self.man_bits <= 7):
            raise ValueError(f"Minifloat {self.name}: exp_bits must be 1..5 and man_bits 0..7")

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        # The top binade is [1, 2): the bias only places the code inside FP32's range (scaling undoes it).
        return 2 ** self.exp_bits - 1

    @property
    def max_magnitude_code(self) -> int:
        return 2 ** (self.exp_bits + self.man_bits) - 1

    @property
    def max_value(self) -> float:
        return (2.0 - 2.0 ** -self.man_bits)

    @property
    def min_normal(self) -> float:
        """Smallest value of the lowest normal binade (exponent field 1, or 0 without subnormals)."""
        return 2.0 ** ((1 if self.subnormals else 0) - self.bias)

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        """Codes (uint8) of FP32 values `u` in [-max_value, max_value] (clamped past it), nearest entry."""
        u = u.float()
        mag = u.abs()
        m = self.man_bits
        shift = 23 - m
        bits = mag.view(torch.int32)
        rounded = (bits + ((1 << (shift - 1)) - 1) + ((bits >> shift) & 1)) >> shift
        code = rounded - ((127 - self.bias) << m)
        if self.subnormals:
            scaled = mag * (2.0 ** (self.bias - 1 + m))  # power of two: exact
            sub = ((scaled + _RINT_MAGIC) - _RINT_MAGIC).to(torch.int32)
            code = torch.where(mag < self.min_normal, sub, code)
        code = code.clamp(0, self.max_magnitude_code)
        if self.signed:
            code = code | (torch.signbit(u).to(torch.int32) << (self.exp_bits + m))
        return code.to(torch.uint8)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """FP32 values of uint8 codes."""
        c = code.to(torch.int32)
        m = self.man_bits
        mag_code = c & self.max_magnitude_code
        value = ((mag_code + ((127 - self.bias) << m)) << (23 - m)).view(torch.float32)
        if self.subnormals:
            sub = mag_code.float() * (2.0 ** (1 - self.bias - m))
            value = torch.where(mag_code < (1 << m), sub, value)
        if self.signed:
            negative = (c >> (self.exp_bits + m)) & 1
            value = torch.where(negative.bool(), -value, value)
        return value

    def table(self) -> torch.Tensor:
        """Every value of the code, indexed by code (2**bits entries)."""
        return self.decode(torch.arange(2 ** self.bits, dtype=torch.int32).to(torch.uint8))


@dataclass(frozen=True)
class NativeFloat8:
    """An FP8 hardware format used as a code through native casts (saturating at its max)."""

    name: str
    dtype: torch.dtype
    max_value: float
    signed: bool = True
    min_value: float = 0.0  # unsigned codes: values under it round up to it (no zero)
    bits: int = 8

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        lowest = -self.max_value if self.signed else self.min_value
        return u.float().clamp(lowest, self.max_value).to(self.dtype)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return code.float()


Code = Minifloat | NativeFloat8


@dataclass(frozen=True)
class StateFormat:
    """How one `state_dtype` stores Adam's two moments: a code each, a block size, the storage dtype."""

    name: str
    m_code: Code | None
    v_code: Code | None
    block: int          # elements per absmax scale
    bits: int           # bits per stored value (4 packs two codes per byte)

    @property
    def quantized(self) -> bool:
        return self.m_code is not None

    def bytes_per_param(self) -> float:
        """State bytes per parameter for a large tensor: two moments plus their FP32 block scales."""
        if not self.quantized:
            return 2 * self.bits / 8
        return 2 * (self.bits / 8 + 4 / self.block)


# The exponent/mantissa splits below each deviate least from torch.optim.AdamW among their candidates:
# parameters after 100 steps of an MLP's gradients, one moment coded and the other kept exact
# (benchmarks/results/optim.md has the table).
# int8: m is E2M5 with subnormals: 5 mantissa bits over the top 3 binades (relative error <= 1.6 %),
# a linear step of 1/256 of the absmax below them; v is E4M4 without zero: 16 binades
# (sqrt(v) down to 1/256 of the block's largest), relative error <= 3 % (1.5 % on sqrt(v)).
INT8_M = Minifloat("int8_m", signed=True, exp_bits=2, man_bits=5, subnormals=True)
INT8_V = Minifloat("int8_v", signed=False, exp_bits=4, man_bits=4, subnormals=False)
# int4: m is FP4 E2M1 (0, 1/12 .. 1 of the absmax: close to the Lloyd-Max levels of a Gaussian block);
# v is E2M2 without zero: 4 binades (v down to 1/16 of the absmax, as torchao's linear 4-bit code
# reaches), whose 2 mantissa bits tracked FP32 better than E3M1's wider range.
INT4_M = Minifloat("int4_m", signed=True, exp_bits=2, man_bits=1, subnormals=True)
INT4_V = Minifloat("int4_v", signed=False, exp_bits=2, man_bits=2, subnormals=False)
# fp8: E4M3 for both moments (E5M2's 2 mantissa bits on v deviated twice as much); v is floored at
# E4M3's smallest subnormal, so a small v never rounds to zero (m / sqrt(0) would blow up).
FP8_M = NativeFloat8("fp8_e4m3", torch.float8_e4m3fn, 448.0)
FP8_V = NativeFloat8("fp8_e4m3_nonzero", torch.float8_e4m3fn, 448.0, signed=False, min_value=2.0 ** -9)

# Block sizes: 256 for 8-bit codes and 128 for 4-bit (bitsandbytes / torchao); smaller blocks adapt
# the scale to local magnitudes, at 4/block bytes of FP32 scale per value.
STATE_FORMATS: dict[str, StateFormat] = {
    "fp32": StateFormat("fp32", None, None, block=256, bits=32),
    "bf16": StateFormat("bf16", None, None, block=256, bits=16),
    "int8": StateFormat("int8", INT8_M, INT8_V, block=256, bits=8),
    "int4": StateFormat("int4", INT4_M, INT4_V, block=128, bits=4),
    "fp8": StateFormat("fp8", FP8_M, FP8_V, block=256, bits=8),
}


def get_state_format(name: str) -> StateFormat:
    """The StateFormat for a `state_dtype` name; ValueError naming the choices otherwise."""
    if not isinstance(name, str) or name not in STATE_FORMATS:
        raise ValueError(f"Unknown state_dtype {name!r}; choose one of: {', '.join(STATE_FORMATS)}")
    return STATE_FORMATS[name]
