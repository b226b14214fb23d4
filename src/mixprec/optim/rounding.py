"""Writing FP32 results into BF16/FP16 storage without losing small updates.

Round-to-nearest drops any change under half a unit in the last place: a BF16 weight of 1.0 moves
only by steps of 2**-8, so weight decay of lr * wd = 1e-4 per step never changes it. Two remedies:

* stochastic rounding: round up with probability equal to the distance to the lower neighbour over
  the gap, so the stored value is right on average. The random numbers come from a counter-based
  hash of (seed, tensor, step, element index), so a run is reproducible and the CPU reference and
  the GPU kernel draw the same numbers.
* Kahan compensation: keep what rounding lost in a buffer of the parameter's dtype and add it to the
  next update (two extra bytes per parameter, deterministic).

The hash is "lowbias32" (Chris Wellons' 32-bit integer finalizer); torch has no wrapping uint32
arithmetic, so here it runs on int64 with products split in 16-bit halves to stay below 2**63.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B
GOLDEN = 0x9E3779B9   # odd constant spreading tensor ids over 32 bits
# The random streams a step draws: parameter rounding, and the moments of BF16 state (one 32-bit number
# per element: its low half rounds m, its high half v).
STREAM_PARAM, STREAM_MOMENTS = 0, 1


def _mul32(x: torch.Tensor | int, c: int) -> torch.Tensor | int:
    """(x * c) mod 2**32 for 0 <= x < 2**32 without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """lowbias32: a bijective 32-bit hash with good avalanche (works on ints and int64 tensors)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_MUL2)
    return x ^ (x >> 16)


def tensor_base_key(seed: int, tensor_id: int) -> int:
    """The step-independent part of a tensor's random key (the kernel gets it from a table)."""
    return mix32((seed & _MASK32) ^ _mul32(tensor_id & _MASK32, GOLDEN))


def stream_key(seed: int, tensor_id: int, step: int | torch.Tensor, stream: int) -> int | torch.Tensor:
    """The 32-bit key of one tensor's random numbers at one step (`step`: the new step count, an int
    or an int64 tensor on the device)."""
    base = tensor_base_key(seed, tensor_id)
    return mix32(((mix32((base + step) & _MASK32)) + stream) & _MASK32)


def random_bits(key: int | torch.Tensor, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """32 random bits per element (int64 tensor): mix32(index ^ key)."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    return mix32(idx ^ key)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, rbits: torch.Tensor) -> torch.Tensor:
    """Round FP32 `x` to `dtype` (bf16 or fp16), up in magnitude with probability equal to the fraction.

    `rbits`: random integers (int64 tensor); the low 16 bits are used for BF16, bits 8..31 for FP16.
    BF16 is FP32's top half: add 16 random bits to the FP32 pattern and cut the low half off (a carry,
    i.e. rounding up, happens with probability low_half / 2**16; it saturates nowhere: values near
    BF16's max are far from any optimizer state or weight). +-inf stay (their low half is 0); NaN is
    passed through, since a NaN's pattern may carry: the GPU's NaN 0x7FFFFFFF would round to -0.0.
    FP16: with down/up the neighbours of |x|, up if u < (|x| - down) / (up - down), u = bits 8..31 of
    rbits times 2**-24 (the gap is a power of two, so the fraction is exact); past the largest finite
    value it saturates (the gap to inf gives a fraction of 0).
    """
    if dtype == torch.bfloat16:
        bits = x.float().view(torch.int32).to(torch.int64) & _MASK32
        rounded = (bits + (rbits & 0xFFFF)) & 0xFFFF0000
        rounded = torch.where(rounded >= 2 ** 31, rounded - 2 ** 32, rounded).to(torch.int32)
        return torch.where(torch.isnan(x), x.float(), rounded.view(torch.float32)).to(torch.bfloat16)
    if dtype != torch.float16:
        raise ValueError(f"stochastic rounding targets bfloat16 or float16, not {dtype}")
    rand = ((rbits & _MASK32) >> 8).float() * (2.0 ** -24)
    x = x.float()
    a = x.abs()
    nearest = a.to(dtype)
    bits = nearest.view(torch.int16)
    above = nearest.float() > a
    down_bits = torch.where(above, bits - 1, bits)
    up_bits = torch.where(above, bits, bits + 1)
    down = down_bits.view(dtype).float()
    up = up_bits.view(dtype).float()
    frac = (a - down) / (up - down)
    mag = torch.where(rand < frac, up, down)
    return torch.copysign(mag, x).to(dtype)


def kahan_add(p: torch.Tensor, delta: torch.Tensor, comp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p + delta in p's dtype, carrying the rounding loss in `comp` (same dtype); returns (p, comp).

        y = delta + comp;  p_new = rne(p + y);  comp_new = rne(y - (p_new - p))
    """
    p32 = p.float()
    y = delta + comp.float()
    p_new = (p32 + y).to(p.dtype)
    comp_new = (y - (p_new.float() - p32)).to(comp.dtype)
    return p_new, comp_new
