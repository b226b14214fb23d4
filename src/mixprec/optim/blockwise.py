"""Block-wise quantization of a flat tensor with one FP32 absmax per block, and 4-bit packing.

Storage of a tensor of n values in blocks of B:
    absmax: FP32, ceil(n / B) values (the block's largest magnitude)
    codes:  ceil(n / B) * B codes (the tail block is padded), uint8 or an FP8 dtype; 4-bit codes
            pack two per byte, B / 2 bytes a block, byte j holding value j (low nibble) and value
            j + B/2 (high nibble) of its block. This split-halves layout lets a kernel load the two
            halves of a block as two contiguous vectors instead of de-interleaving nibbles.

Quantize:   x = x if finite else 0;  absmax = max |x| over the block
            safe = max(absmax, MIN_BLOCK_ABSMAX); u = x * (code.max_value / safe); q = code.encode(u)
Dequantize: x = code.decode(q) * (safe / code.max_value)

Non-finite values (the contract): a NaN or +-inf is stored as 0, and the block's absmax is the largest
*finite* magnitude. So the codes and the absmax of a block are bit for bit those of the same block with
its non-finite values replaced by 0: one bad value never reaches its neighbours through the shared scale
(an inf absmax would decode the whole block to inf or NaN, a NaN absmax to NaN), and every block decodes
to finite values.
"""
from __future__ import annotations

import math

import torch

from mixprec.optim.codes import MIN_BLOCK_ABSMAX, Code


def num_blocks(numel: int, block: int) -> int:
    return math.ceil(numel / block)


def _pad_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    x = x.reshape(-1)
    pad = num_blocks(x.numel(), block) * block - x.numel()
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """x with NaN and +-inf replaced by 0 (the value of a fresh moment: the element restarts its averages).

    Why 0, not +-inf saturated to the block's max: a NaN has no magnitude to keep, and a saturated moment
    would steer its element for ~1/(1 - beta) steps (pushed by m, all but frozen by v).
    """
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)   # one pass (isfinite + where takes two)


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """FP32 max |x| over the finite values of each block of a flat tensor (the padded tail counts as
    zeros; a block with no finite non-zero value gets 0)."""
    return finite_or_zero(_pad_to_blocks(x.float(), block)).view(-1, block).abs().amax(dim=1)


def encode_multiplier(absmax: torch.Tensor, code: Code) -> torch.Tensor:
    """Per-block factor taking values onto the code's range: max_value / max(absmax, tiny).

    Both operands are tensors: torch computes `float / tensor` as reciprocal(tensor) * float (two
    roundings), while the kernel divides once (div_rn); a 1-ulp difference flips codes near ties.
    """
    top = torch.full_like(absmax, code.max_value)
    return torch.div(top, absmax.clamp(min=MIN_BLOCK_ABSMAX))


def decode_multiplier(absmax: torch.Tensor, code: Code) -> torch.Tensor:
    """Per-block factor taking code values back: max(absmax, tiny) / max_value (one IEEE division)."""
    return torch.div(absmax.clamp(min=MIN_BLOCK_ABSMAX), torch.full_like(absmax, code.max_value))


def quantize_blockwise(x: torch.Tensor, code: Code, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a tensor (flattened) block by block; returns (codes, absmax). 4-bit codes are packed.

    Non-finite values are stored as 0 over the absmax of the finite ones (module docstring): the result
    equals quantize_blockwise(finite_or_zero(x), ...) bit for bit.
    """
    xs = finite_or_zero(_pad_to_blocks(x.float(), block)).view(-1, block)
    absmax = xs.abs().amax(dim=1)
    u = xs * encode_multiplier(absmax, code)[:, None]
    q = code.encode(u.reshape(-1))
    if code.bits == 4:
        q = pack_4bit(q, block)
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: Code, block: int,
                         numel: int) -> torch.Tensor:
    """FP32 values (flat, `numel` long) of block-quantized codes."""
    if code.bits == 4:
        q = unpack_4bit(q, block)
    values = code.decode(q).view(-1, block) * decode_multiplier(absmax, code)[:, None]
    return values.reshape(-1)[:numel]


def pack_4bit(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Pack 4-bit codes (uint8 values < 16, whole blocks) two per byte in the split-halves layout."""
    halves = codes.view(-1, 2, block // 2)
    return (halves[:, 0] | (halves[:, 1] << 4)).reshape(-1)


def unpack_4bit(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `pack_4bit`."""
    p = packed.view(-1, block // 2)
    return torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)
