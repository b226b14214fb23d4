"""Inputs and references for the exactness tests of quantization, shared by the CPU, Triton-interpreter and
CUDA tests: the FP8 grid's rounding (ties that a multiply-then-cast gets wrong) and INT8 sums in int32
(operands whose sums lie far past 2**24, where FP32 holds no odd integer)."""
from __future__ import annotations

import torch

from mixprec.formats import get_format


def ref_round(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round float64 values to the FP8 grid: RNE at the value's exponent quantum, saturating at max."""
    f = get_format(fmt)
    a = v.abs()
    _, e = torch.frexp(a)                                   # a = m * 2**e, m in [0.5, 1): floor(log2 a) = e - 1
    exp = torch.clamp(e - 1, min=f.min_exponent)            # subnormals share the smallest normal's quantum
    quantum = torch.pow(2.0, (exp - f.mantissa_bits).double())
    r = torch.round(a / quantum) * quantum                  # torch.round is round-half-to-even
    return torch.copysign(torch.clamp(r, max=f.max), v)


def tie_inputs(fmt: str, amax: torch.Tensor) -> torch.Tensor:
    """Values x whose FP32 product x * inv (inv = 1 / (amax / max) in FP32) lands exactly on a tie of the
    FP8 grid while the exact product does not, and a plain multiply-then-cast rounds them the wrong way."""
    f = get_format(fmt)
    scale = (amax.double() / f.max).float().double().item()
    inv = torch.tensor(1.0 / scale, dtype=torch.float64).float()
    m = f.mantissa_bits
    odd = torch.arange(2 ** (m + 1) + 1, 2 ** (m + 2), 2).double()
    ties = torch.cat([odd * 2.0 ** (e - m - 1) for e in range(f.min_exponent, 6)])   # midpoints of the grid
    near = (ties / inv.double()).float()
    steps = [near]
    for _ in range(3):   # a few FP32 neighbours on each side: some of them multiply onto the tie
        steps = [torch.nextafter(steps[0], steps[0] * 0)] + steps + [torch.nextafter(steps[-1], steps[-1] * 2)]
    candidates = torch.cat(steps)
    candidates = candidates * (torch.randint(0, 2, candidates.shape) * 2 - 1)        # random signs
    naive = ref_round((candidates * inv).double(), fmt)      # FP32 product, then rounded again
    exact = ref_round(candidates.double() * inv.double(), fmt)
    return candidates[naive != exact]


def tie_tensor(fmt: str, rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) tensor of tie_inputs with the same amax in every row, column, 1x128 tile and
    128x128 block, so that every granularity scales them by that amax (for the kernels' tests)."""
    torch.manual_seed(1)
    for _ in range(100):
        amax = (torch.empty(()).uniform_(1e3, 1e5) * get_format(fmt).max / 448).float()
        tricky = tie_inputs(fmt, amax)
        if tricky.numel() >= 16:
            break
    x = tricky[torch.randint(0, tricky.numel(), (rows, cols))]
    x[::128, :] = amax      # the first row of each 128-row block and the first column of each 128-column
    x[:, ::128] = amax      # block: every row, column, tile and block holds amax
    return x


def int32_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_k a[i, k] * b[j, k] in int32, element by element products, no GEMM library involved."""
    return (a.to(torch.int32)[:, None, :] * b.to(torch.int32)[None, :, :]).sum(-1, dtype=torch.int32)


def extreme_pair(m: int, k: int, n: int):
    """Codes of +-127 with B's first rows copies of A's first row, a few signs flipped: sums near
    127**2 * K, far past 2**24 where FP32 has no odd integers, so the FP32 result is a rounding of
    the int32 sum (flipping one sign moves it by 2 * 127**2, which makes ties and non-ties)."""
    a = (torch.randint(0, 2, (m, k)) * 254 - 127).to(torch.int8)
    b = (torch.randint(0, 2, (n, k)) * 254 - 127).to(torch.int8)
    for row in range(min(n, 4)):
        b[row] = a[0]
        b[row, :row] *= -1
    b[3, -1] = 1
    return a, b
