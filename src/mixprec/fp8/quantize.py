"""FP8 quantization: codes and dequantization scales at tensor, row, column, tile and block granularity.

Convention: scales are *dequantization* scales in FP32, so x ~= q * scale (the convention of
torch._scaled_mm). For a group of values G (the whole tensor, a row, a 1x128 tile, a 128x128 block):

    amax  = max(|x| for x in G), at least AMAX_EPS
    scale = amax / fmt.max                       (correctly rounded to FP32)
    scale = 2 ** ceil(log2(scale))               (power_of_2 only: exact scaling, never overflows)
    inv   = 1 / scale                            (correctly rounded to FP32, once per group)
    q     = saturate(x * inv) rounded to fmt     (the exact product, rounded once: nearest even)

Quantizing multiplies by the group's reciprocal, as fast FP8 kernels do (one multiply per value; a
division per value costs more than the memory traffic it hides). With power-of-2 scales inv is exact
and q is the correctly rounded x / scale; otherwise x * inv differs from x / scale by at most 2**-24
relative, a code of difference only where x / scale lies that close to a rounding boundary of FP8.

Exactness: scales and codes equal a float64 computation (tests/test_fp8_quantize.py). Scale and
reciprocal are computed in float64 and rounded once to FP32: a quotient of FP32 values rounded to
float64 then FP32 is the correctly rounded one (float64 has over 2*24+2 bits), and no compiler
rewrites a float64 division into an approximate one. The product x * inv is exact in float64 (48
bits) but rounds twice in FP32 (to FP32, then to FP8), which goes wrong where the FP32 product lands
exactly on a tie of the FP8 grid. So the FP32 product is rounded to odd instead (when inexact and even,
step one ulp towards the exact product, whose side the exact error x * inv - p tells): round-to-odd
with 24 >= 4 + 2 bits followed by round-to-nearest-even is one correct rounding.

Scale shapes, for x of shape (..., K) (128x128 takes 2-D x of shape (R, K)); b = block_size:

    tensorwise  ()                 rowwise  (..., 1)
    1x128       (..., ceil(K/b))   128x128  (ceil(R/b), ceil(K/b))

Tiles and blocks that run past the end of a dimension are padded with zeros for the amax (zeros never
raise an amax), so no dimension needs to be a multiple of b. `dequantize(q, scale)` reads the
granularity back off the scale's shape: each scale dimension equals q's, is 1, or is ceil(q's / b).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mixprec.formats import Format, cast_to, get_format

Granularity = Literal["tensorwise", "rowwise", "1x128", "128x128"]
GRANULARITIES: tuple[str, ...] = ("tensorwise", "rowwise", "1x128", "128x128")

# Floor on amax so an all-zero group gets a finite scale (0 / scale = 0, not NaN); torchao's choice.
AMAX_EPS = 1e-12


def get_fp8_format(fmt: str | torch.dtype | Format) -> Format:
    """The FP8 Format for a name or dtype; other formats raise ValueError naming the valid choices."""
    f = get_format(fmt)
    if f.name not in ("fp8_e4m3", "fp8_e5m2"):
        raise ValueError(f"Unknown FP8 format {fmt!r}; choose one of: fp8_e4m3, fp8_e5m2")
    return f


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown granularity {granularity!r}; choose one of: {', '.join(GRANULARITIES)}")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def group_amax(x: torch.Tensor, granularity: Granularity, *, block_size: int = 128) -> torch.Tensor:
    """max |x| over each scaling group, in FP32, shaped like the scale (see the module docstring)."""
    check_granularity(granularity)
    a = x.float().abs()
    if granularity == "tensorwise":
        return a.amax()
    if granularity == "rowwise":
        return a.amax(dim=-1, keepdim=True)
    if granularity == "128x128" and x.dim() != 2:
        raise ValueError(f"granularity {granularity!r} needs a 2-D tensor, got shape {tuple(x.shape)}")
    b = block_size
    k = x.shape[-1]
    nk = _ceil_div(k, b)
    if granularity == "1x128":
        a = F.pad(a, (0, nk * b - k))
        return a.reshape(*a.shape[:-1], nk, b).amax(dim=-1)
    r = x.shape[0]
    nr = _ceil_div(r, b)
    a = F.pad(a, (0, nk * b - k, 0, nr * b - r))
    return a.reshape(nr, b, nk, b).amax(dim=(1, 3))


def scale_from_amax(amax: torch.Tensor, fmt: str | torch.dtype | Format, *, power_of_2: bool = False) -> torch.Tensor:
    """Dequantization scale amax / fmt.max (FP32), optionally rounded up to a power of two.

    Rounding up (not to nearest) keeps amax / scale <= fmt.max, so the largest value never saturates.
    The power of two is taken on the bits: adding 2**23 - 1 to a positive normal FP32 value carries
    into the exponent unless the mantissa is already zero, and masking the mantissa leaves 2**ceil(log2).
    """
    f = get_fp8_format(fmt)
    # in float64, rounded once: correctly rounded on every device and under torch.compile (which may
    # turn an FP32 division into an approximate one or a multiplication by a reciprocal)
    scale = (amax.float().clamp(min=AMAX_EPS).double() / f.max).float()
    if power_of_2:
        bits = scale.view(torch.int32)
        scale = ((bits + 0x7FFFFF) & -0x800000).view(torch.float32)
    return scale


def reciprocal_scale(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale correctly rounded to FP32 (through float64, see the module docstring); the multiplier
    that quantization applies. Exact for power-of-2 scales."""
    return (1.0 / scale.double()).float()


def expand_scale(scale: torch.Tensor, shape: torch.Size | tuple[int, ...], *, block_size: int = 128) -> torch.Tensor:
    """Broadcast a scale to `shape`: each scale dimension equals the tensor's, is 1, or counts blocks."""
    if scale.dim() == 0:
        return scale
    if scale.dim() != len(shape):
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not fit a tensor of shape {tuple(shape)}")
    out = scale
    for d, (s, n) in enumerate(zip(scale.shape, shape)):
        if s == n or s == 1:
            continue
        if s == _ceil_div(n, block_size):
            out = out.repeat_interleave(block_size, dim=d).narrow(d, 0, n)
        else:
            raise ValueError(f"scale of shape {tuple(scale.shape)} does not fit a tensor of shape {tuple(shape)} "
                             f"with block_size {block_size}")
    return out


def quantize(x: torch.Tensor, fmt: str | torch.dtype | Format = "fp8_e4m3", granularity: Granularity = "tensorwise",
             *, block_size: int = 128, power_of_2: bool = False,
             amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` to FP8 codes and FP32 dequantization scales (x ~= q * scale).

    fmt:         "fp8_e4m3" or "fp8_e5m2" (or the torch dtype).
    granularity: "tensorwise", "rowwise" (one scale per row),
                 "1x128" (per 1 x block_size tile along the last dim), "128x128" (per block, 2-D x).
    power_of_2:  round scales up to powers of two (scaling then multiplies exponents only: exact).
    amax:        use this amax (shaped like the scale) instead of the current one, e.g. from an amax
                 history (delayed scaling); values past it saturate.
    Returns (q, scale): q has x's shape and the format's torch dtype, whatever x's strides; scale is FP32.
    """
    f = get_fp8_format(fmt)
    check_granularity(granularity)
    if not torch.is_floating_point(x):
        raise TypeError(f"quantize needs a floating-point tensor, got {x.dtype}")
    current = group_amax(x, granularity, block_size=block_size) if amax is None else amax
    scale = scale_from_amax(current, f, power_of_2=power_of_2)
    q = cast_to(_multiply(x.float(), reciprocal_scale(scale), granularity, block_size, f), f, saturate=True)
    return q, scale


def odd_product(x: torch.Tensor, inv: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """x * inv in FP32 rounded to odd (see the module docstring), from p = x * inv rounded to nearest;
    x and inv FP32, broadcastable to p.

    The error x * inv - p is exact in float64 (the product has 48 bits), so its sign says on which
    side of the FP32 product p the exact one lies.
    """
    error = x.double() * inv.double() - p.double()
    bits = p.view(torch.int32)
    # +1 (one ulp away from zero) when the exact product lies further out than p, -1 when nearer;
    # 0 when p is exact (error 0), is zero, or is already odd
    step = (torch.sign(error) * torch.sign(p)).to(torch.int32) * (1 - (bits & 1))
    return (bits + step).view(torch.float32)


def fp8_product(x: torch.Tensor, inv: torch.Tensor, f: Format) -> torch.Tensor:
    """An FP32 product x * inv whose round-to-nearest-even to FP8 `f` is the correct rounding of the exact one.

    Rounding the plain FP32 product p once more goes wrong only where p lies exactly on a tie of the
    FP8 grid; there, and only there, the round-to-odd product is needed. In eager mode only those few
    values (found as the p whose FP32 neighbours round to different FP8 values) take the float64
    error, which keeps the CPU path fast. On a GPU and under torch.compile a select over the whole
    tensor runs instead: finding the few would need their count on the host (a sync in every training
    step), and traced it fuses into one kernel (no data-dependent shapes).
    """
    p = x * inv
    near_tie = _near_fp8_tie(p, f)
    if p.is_cuda or torch.compiler.is_compiling():
        return torch.where(near_tie, odd_product(x, inv, p), p)
    idx = near_tie.nonzero(as_tuple=True)
    p[idx] = odd_product(x.expand_as(p)[idx], inv.expand_as(p)[idx], p[idx])
    return p


def _near_fp8_tie(r: torch.Tensor, f: Format) -> torch.Tensor:
    """Where r's two FP32 neighbours round to different FP8 values (r on a tie, or next to one)."""
    # past the format's max both neighbours cast to the same NaN/inf byte: no candidate (saturated later)
    inf = torch.full((), float("inf"), device=r.device)
    up = torch.nextafter(r, inf).to(f.torch_dtype).view(torch.uint8)
    down = torch.nextafter(r, -inf).to(f.torch_dtype).view(torch.uint8)
    return (up != down) & (r != 0)    # r = 0: +0 and -0 differ in bytes, and the exact product rounds to 0


def _multiply(x: torch.Tensor, inv: torch.Tensor, granularity: str, b: int, f: Format) -> torch.Tensor:
    """x * inv (see fp8_product) with the reciprocal broadcast over its group by reshaping x into tiles."""
    if granularity not in ("1x128", "128x128"):
        return fp8_product(x, inv, f)
    k = x.shape[-1]
    nk = _ceil_div(k, b)
    if granularity == "1x128":
        xp = F.pad(x, (0, nk * b - k)) if k % b else x
        y = fp8_product(xp.reshape(*x.shape[:-1], nk, b), inv.unsqueeze(-1), f).reshape(*x.shape[:-1], nk * b)
        return y[..., :k] if k % b else y
    r = x.shape[0]
    nr = _ceil_div(r, b)
    xp = F.pad(x, (0, nk * b - k, 0, nr * b - r)) if (k % b or r % b) else x
    y = fp8_product(xp.reshape(nr, b, nk, b), inv[:, None, :, None], f).reshape(nr * b, nk * b)
    return y[:r, :k] if (k % b or r % b) else y


def codes_to_float(q: torch.Tensor) -> torch.Tensor:
    """q.float(), exactly. FP8 codes on the CPU go through FP16's bits: PyTorch's own FP8 upcast is scalar
    code there (2M codes: 3.3 ms against 1.3 ms this way on a 2-core development CPU), and the emulated
    FP8 GEMMs dequantize every operand."""
    if q.device.type != "cpu" or q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return q.float()
    b = q.view(torch.uint8).to(torch.int16)
    if q.dtype == torch.float8_e5m2:
        return b.bitwise_left_shift_(8).view(torch.float16).float()    # E5M2 is FP16's upper byte
    # E4M3 (bias 7): exponent and mantissa placed in FP16's fields and read as FP16 (bias 15) give the
    # value times 2**-8, subnormals included. The NaN codes (S.1111.111) would read as 480: their
    # exponent is completed to FP16's all-ones (0x4000) from the carry of low + 1.
    low = b & 0x7F
    nan = (low + 1).bitwise_and_(0x80).bitwise_left_shift_(7)
    h = b.bitwise_and_(0x80).bitwise_left_shift_(8).bitwise_or_(low.bitwise_left_shift_(7)).bitwise_or_(nan)
    return h.view(torch.float16).float().mul_(256.0)


def dequantize(q: torch.Tensor, scale: torch.Tensor, *, block_size: int = 128,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale in `dtype` (FP32 by default), the granularity read off the scale's shape."""
    scale = scale.float()
    b = block_size
    if q.dim() == 2 and scale.dim() == 2 and q.shape[0] % b == 0 and q.shape[1] % b == 0:
        r, k = q.shape   # whole tiles: broadcast the scale over a tiled view instead of expanding it
        nr = r // b if scale.shape[0] == r // b and r != b else None
        nk = k // b if scale.shape[1] == k // b and k != b else None
        if nk is not None and (nr is not None or scale.shape[0] in (1, r)):
            rows = (nr, b) if nr is not None else (r, 1)
            s = scale.reshape(rows[0], 1, nk, 1) if nr is not None else scale.reshape(scale.shape[0], 1, nk, 1)
            return (codes_to_float(q).reshape(rows[0], rows[1], nk, b) * s).reshape(r, k).to(dtype)
    return (codes_to_float(q) * expand_scale(scale, q.shape, block_size=block_size)).to(dtype)


def delayed_amax(history: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The amax delayed scaling uses: the history's max, or `current` while the history is empty (all 0)."""
    past = history.amax()
    return torch.where(past > 0, past, current)


def record_amax(history: torch.Tensor, current: torch.Tensor) -> None:
    """Push `current` to the front of `history` in place, dropping the oldest value."""
    history.copy_(torch.cat([current.reshape(1).to(history.dtype), history[:-1]]))
