"""Range statistics per number format, gathered on the device: one histogram per tensor serves every format.

A tensor's magnitudes |x| are counted into fixed buckets whose edges are every power of two FP32 has
(2**-149 .. 2**127, so each bucket lies inside one binade: the log2 histogram) plus, for every format of
mixprec.formats, the three magnitudes where its rounding changes kind (round-to-nearest-even):

    underflow to zero   0 < |x| <= min_subnormal / 2        (the tie rounds to the even zero)
    subnormal           min_subnormal / 2 < |x| < min_normal - min_subnormal / 2
    overflow            |x| >= max + ulp(max) / 2           (> where max's last mantissa bit is even: E4M3)

Every bucket is half-open, [lo, hi), so a "<=" edge is stored as the next FP32 value above it. One
`bucketize` and one `bincount` per tensor, no host synchronisation: the counts of every format are
sums of bucket ranges, read once when a report is built. Exact for each format in FORMATS (the tests
check it against native casts).
On CUDA with triton installed, RangeAccumulator.add takes one Triton kernel per tensor instead
(mixprec.diagnostics._kernels: the same counts, amax and smallest non-zero magnitude, in one read).

FP8 what-if scaling: scaled so that each group's amax lands on the format's largest value (tensorwise,
rowwise, 1x128 tiles, 128x128 blocks; groups padded with zeros, as mixprec.fp8 quantizes), the fraction
of non-zero values that would still flush to zero or land among the subnormals, and the spread of the
group scales (log2 of the largest over the smallest non-zero group amax). Overflow cannot happen: the
amax maps to max. Computed here from the formats' ranges (diagnostics does not import the FP8 kernels).

INT8 what-if ("int8" among the formats): each tensor quantized as mixprec.int8.quantize defines it,
symmetric absmax, per row along the last dimension and with one scale for the tensor:

    scale = float32(amax / 127), inv = float32(1 / scale), q = round_half_even(float32(x * inv)), x_hat = q * scale

giving the SQNR sum(x**2) / sum((x - x_hat)**2) and the fraction of non-zero values whose code is 0
(those below half a step, amax / 254, of their group). The scale and its reciprocal are mixprec.int8's;
tests/test_diagnostics.py checks the codes against mixprec.int8.quantize.
Per row, INT8 gives up what a row's crest factor takes: about 52.9 dB - 20*log10(amax / rms).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixprec.formats import FORMATS, Format, get_format
from mixprec.int8.quantize import reciprocal_scale, scale_from_amax

__all__ = ["GRANULARITIES", "INT8", "INT8_GRANULARITIES", "KINDS", "FormatEdges", "RangeAccumulator", "edges",
           "fp8_whatif", "fractions", "histogram", "int8_entry", "int8_whatif", "split_formats", "tensor_counts"]

KINDS = ("activations", "activation_grads", "weights", "weight_grads")
GRANULARITIES = ("tensorwise", "rowwise", "1x128", "128x128")
BLOCK = 128   # DeepSeek-V3's tile and block size (mixprec.fp8's default)
INT8 = "int8"   # the what-if format name (not a floating-point format of mixprec.formats)
INT8_GRANULARITIES = ("rowwise", "tensorwise")


def split_formats(formats: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """(the floating-point formats, whether "int8" is among them): "int8" is a what-if format only."""
    fmts = tuple(formats)
    return tuple(f for f in fmts if not (isinstance(f, str) and f.lower() == INT8)), \
        any(isinstance(f, str) and f.lower() == INT8 for f in fmts)


def _f32(v: float) -> float:
    return torch.tensor(v, dtype=torch.float32).item()


def _next_up(v: float) -> float:
    t = torch.tensor(v, dtype=torch.float32)
    return torch.nextafter(t, torch.tensor(math.inf)).item()


@dataclass(frozen=True)
class FormatEdges:
    """The three edges of a format, as FP32 magnitudes: |x| < zero_below flushes to zero (x != 0),
    |x| < subnormal_below is subnormal (or zero), |x| >= overflow_from overflows (or saturates)."""

    format: str
    zero_below: float
    subnormal_below: float
    overflow_from: float


def edges(fmt: str | Format) -> FormatEdges:
    """The rounding edges of a format (see the module docstring)."""
    f = get_format(fmt)
    if f.name == "fp32":   # nothing finite under- or overflows FP32 itself
        return FormatEdges("fp32", _f32(f.min_subnormal), f.min_normal, math.inf)
    half_sub = f.min_subnormal / 2
    e = math.floor(math.log2(f.max))
    ulp = 2.0 ** (e - f.mantissa_bits)
    last_bit_odd = int(round((f.max / 2.0 ** e - 1) * 2 ** f.mantissa_bits)) % 2 == 1
    tie = f.max + ulp / 2    # exact in FP32 for every format here (a few bits past max's)
    return FormatEdges(f.name, _next_up(half_sub), _f32(f.min_normal - half_sub),
                       _f32(tie) if last_bit_odd else _next_up(tie))


_EDGES: dict[str, FormatEdges] = {name: edges(name) for name in FORMATS}
_POWERS = [2.0 ** k for k in range(-149, 128)]
BOUNDARIES: list[float] = sorted(set(_POWERS) | {v for e in _EDGES.values()
                                                 for v in (e.zero_below, e.subnormal_below, e.overflow_from)}
                                 | {math.inf})
N_BOUNDS = len(BOUNDARIES)
INF_BIN = N_BOUNDS           # |x| = inf
NAN_BIN = N_BOUNDS + 1
N_BINS = N_BOUNDS + 2        # bucket 0 holds the zeros: [0, 2**-149)
_INDEX = {v: i for i, v in enumerate(BOUNDARIES)}
# binade of bucket i >= 1: floor(log2) of its lower edge
_BINADE = [math.floor(math.log2(BOUNDARIES[i - 1])) for i in range(1, N_BOUNDS)]
EXPONENTS = list(range(-149, 128))   # the log2 histogram's bins: 2**e <= |x| < 2**(e+1)

_boundaries_on: dict[torch.device, torch.Tensor] = {}


def _boundaries(device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # a constant of the graph: a cached tensor would be a global input that Dynamo fails to clean up
        # when it restarts a trace (seen on CUDA with the monitor's hooks in a compiled GPT)
        return torch.tensor(BOUNDARIES, dtype=torch.float32, device=device)
    b = _boundaries_on.get(device)
    if b is None:
        b = _boundaries_on[device] = torch.tensor(BOUNDARIES, dtype=torch.float32, device=device)
    return b


def tensor_counts(x: torch.Tensor) -> torch.Tensor:
    """Bucket counts of |x| (int64, N_BINS, on x's device; no synchronisation)."""
    return _magnitude_counts(x.detach().reshape(-1).float().abs())


def _magnitude_counts(a: torch.Tensor) -> torch.Tensor:
    """tensor_counts of FP32 magnitudes a = |x| (1-D)."""
    idx = torch.bucketize(a, _boundaries(a.device), right=True)     # B[i-1] <= a < B[i]
    idx = torch.where(torch.isnan(a), NAN_BIN, idx)
    if a.device.type == "cpu" and not torch.compiler.is_compiling():
        return torch.bincount(idx, minlength=N_BINS)
    return fixed_bincount(idx)


HISTC_CHUNK = 2**24   # histc counts in FP32: exact up to 2**24 per bin, so at most that many values per call


def fixed_bincount(idx: torch.Tensor) -> torch.Tensor:
    """bincount into N_BINS without reading anything back: CUDA's bincount syncs to size its output from
    max(idx), and a data-dependent size breaks a compiled graph; histc's size is fixed. Integer bins of
    width 1 over [0, N_BINS): bin = idx exactly."""
    counts = [torch.histc(chunk.float(), bins=N_BINS, min=0, max=N_BINS).long() for chunk in idx.split(HISTC_CHUNK)]
    return torch.stack(counts).sum(0) if len(counts) > 1 else counts[0]


def fractions(counts: torch.Tensor | list[int], fmt: str | Format) -> dict[str, float]:
    """From bucket counts: fractions of all values that flush to zero, become subnormal, or overflow
    in `fmt`; plus `zero` (exact zeros) and `nonfinite` (inf and NaN already)."""
    c = [int(v) for v in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
    total = sum(c)
    if total == 0:
        return {"underflow": 0.0, "subnormal": 0.0, "overflow": 0.0, "zero": 0.0, "nonfinite": 0.0}
    e = _EDGES[get_format(fmt).name]
    iz, isub = _INDEX[e.zero_below], _INDEX[e.subnormal_below]
    io = _INDEX[e.overflow_from] if e.overflow_from != math.inf else N_BOUNDS - 1
    return {"underflow": sum(c[1:iz + 1]) / total, "subnormal": sum(c[iz + 1:isub + 1]) / total,
            "overflow": sum(c[io + 1:INF_BIN]) / total, "zero": c[0] / total,
            "nonfinite": (c[INF_BIN] + c[NAN_BIN]) / total}


def histogram(counts: torch.Tensor | list[int]) -> dict[str, object]:
    """The log2 magnitude histogram: {"exponents": [-149..127], "counts": [...], "zero", "inf", "nan"};
    counts[i] holds the values with 2**e <= |x| < 2**(e+1), e = exponents[i]."""
    c = [int(v) for v in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
    per = [0] * len(EXPONENTS)
    for i in range(1, N_BOUNDS):
        if c[i]:
            per[_BINADE[i - 1] + 149] += c[i]
    return {"exponents": EXPONENTS, "counts": per, "zero": c[0], "inf": c[INF_BIN], "nan": c[NAN_BIN]}


# ---- FP8 what-if scaling -------------------------------------------------------------------------------
def _as_2d(x: torch.Tensor) -> torch.Tensor:
    """Rows by the last dimension, as mixprec.fp8 groups an activation (..., K) -> (R, K)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(-1, x.shape[-1])


def _group_view(a: torch.Tensor, granularity: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """a (R, K) padded and viewed so that amax over `dims` gives one value per group."""
    r, k = a.shape
    if granularity == "tensorwise":
        return a.reshape(1, -1), (1,)
    if granularity == "rowwise":
        return a, (1,)
    nk = -(-k // BLOCK)
    if granularity == "1x128":
        return F.pad(a, (0, nk * BLOCK - k)).reshape(r, nk, BLOCK), (2,)
    nr = -(-r // BLOCK)
    return F.pad(a, (0, nk * BLOCK - k, 0, nr * BLOCK - r)).reshape(nr, BLOCK, nk, BLOCK), (1, 3)


def fp8_whatif(x: torch.Tensor, fp8_formats: tuple[str, ...]) -> torch.Tensor:
    """Per granularity (GRANULARITIES order): [underflow, subnormal counts for each FP8 format...,
    min log2 group amax, max log2 group amax] as one FP64 tensor (len(GRANULARITIES), 2 * n + 2), on
    x's device, no synchronisation. Scale and reciprocal as mixprec.fp8 computes them (amax / max
    rounded to FP32 once, then its FP32 reciprocal)."""
    return _fp8_whatif(_finite_magnitudes(x.detach().float().abs()), fp8_formats)


def _finite_magnitudes(a: torch.Tensor) -> torch.Tensor:
    """FP32 magnitudes a = |x| with inf and NaN set to zero (what the what-ifs and amax take)."""
    return torch.where(torch.isfinite(a), a, torch.zeros((), device=a.device))


def _fp8_whatif(m: torch.Tensor, fp8_formats: tuple[str, ...]) -> torch.Tensor:
    """fp8_whatif of finite magnitudes m (_finite_magnitudes)."""
    a = _as_2d(m)
    rows = []
    for gran in GRANULARITIES:
        g, dims = _group_view(a, gran)
        amax = g.amax(dim=dims, keepdim=True)
        nonzero = g > 0
        cells = []
        for name in fp8_formats:
            f, e = get_format(name), _EDGES[get_format(name).name]
            scale = (amax.double() / f.max).float()
            inv = (1.0 / torch.where(amax > 0, scale, torch.ones_like(scale)).double()).float()
            y = g * inv
            cells.append((nonzero & (y < e.zero_below)).sum())
            cells.append((nonzero & (y >= e.zero_below) & (y < e.subnormal_below)).sum())
        log2 = torch.log2(torch.where(amax > 0, amax, math.nan).double())   # no boolean indexing: no sync
        lo, hi = log2.nan_to_num(math.inf).amin(), log2.nan_to_num(-math.inf).amax()
        rows.append(torch.stack([c.double() for c in cells] + [lo.double(), hi.double()]))
    return torch.stack(rows)


# ---- INT8 what-if quantization ----------------------------------------------------------------------------
def int8_whatif(x: torch.Tensor) -> torch.Tensor:
    """Per INT8 granularity (INT8_GRANULARITIES order): [sum x**2, sum (x - x_hat)**2, non-zero values
    quantized to 0] as one FP64 tensor (2, 3) on x's device, no synchronisation; non-finite values are
    left out. Quantization is symmetric, so |x| quantizes to |q|: it works on magnitudes."""
    return _int8_whatif(_finite_magnitudes(x.detach().float().abs()))


def _int8_whatif(m: torch.Tensor) -> torch.Tensor:
    """int8_whatif of finite magnitudes m (_finite_magnitudes)."""
    a = _as_2d(m)
    signal = a.double().square().sum()
    rows = []
    for gran in INT8_GRANULARITIES:
        amax = a.amax(dim=-1, keepdim=True) if gran == "rowwise" else a.amax()
        scale = scale_from_amax(amax)
        inv = reciprocal_scale(scale)
        q = (a * inv).round()
        noise = ((q * scale).double() - a.double()).square().sum()   # x_hat = q * scale in FP32, as dequantize
        rows.append(torch.stack([signal, noise, ((a > 0) & (q == 0)).sum().double()]))
    return torch.stack(rows)


def int8_entry(cells: list[float], numel: int) -> dict[str, dict[str, float]]:
    """The host-side INT8 what-if of one tensor kind: per granularity {"sqnr_db", "zero"} from the
    accumulated int8_whatif cells (sqnr inf where quantization is exact, nan for an all-zero tensor)."""
    out = {}
    for g, gran in enumerate(INT8_GRANULARITIES):
        signal, noise, zero = cells[3 * g:3 * g + 3]
        if noise == 0:
            sqnr = math.inf if signal > 0 else math.nan
        else:
            sqnr = 10 * math.log10(signal / noise) if signal > 0 else -math.inf
        out[gran] = {"sqnr_db": sqnr, "zero": zero / max(numel, 1)}
    return out


# ---- accumulation over tensors and calls ------------------------------------------------------------------
def _range_op(device: torch.device):
    """The Triton op of mixprec.diagnostics._kernels (counts, amax and min_nonzero in one read) for buffers on
    `device`, or None for the PyTorch path: any device but CUDA, or no triton. Imported on first use, so
    importing mixprec imports no Triton."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return None
    from mixprec.diagnostics import _kernels
    return _kernels.range_stats_


class RangeAccumulator:
    """Device-side statistics of one (module, kind): bucket counts, amax and smallest non-zero magnitude
    over every tensor it saw, and FP8 and INT8 what-if counts. `add` updates buffers in place and never
    synchronises (under torch.compile it traces into the graph: allocate() the buffers beforehand);
    `values()` lists them for one batched copy to the host."""

    def __init__(self, fp8_formats: tuple[str, ...] = (), whatif: bool = False,
                 device: torch.device | None = None, *, int8: bool = False) -> None:
        self.fp8_formats = fp8_formats
        self.whatif = whatif and bool(fp8_formats)
        self.want_int8 = int8
        self.counts: torch.Tensor | None = None
        if device is not None:
            self.allocate(device)

    def allocate(self, device: torch.device | str) -> None:
        n = 2 * len(self.fp8_formats)
        self.counts = torch.zeros(N_BINS, dtype=torch.int64, device=device)
        _boundaries(self.counts.device)   # cached now: a compiled hook then finds it (no guard on the cache)
        self._op = _range_op(self.counts.device)   # resolved now, so that a compiled hook traces no import
        self.amax = torch.zeros((), dtype=torch.float32, device=device)
        self.min_nonzero = torch.full((), math.inf, dtype=torch.float32, device=device)
        self.fp8 = None
        if self.whatif:   # per granularity: FP8 counts, then the min and max log2 group amax
            self.fp8 = torch.zeros(len(GRANULARITIES), n + 2, dtype=torch.float64, device=device)
            self.fp8[:, n] = math.inf
            self.fp8[:, n + 1] = -math.inf
        self.int8 = None
        if self.want_int8:   # per INT8 granularity: signal, noise, values quantized to zero
            self.int8 = torch.zeros(len(INT8_GRANULARITIES), 3, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        if self.counts is None:
            self.allocate(x.device)
        if x.numel() == 0:   # nothing to count (and an amax over no values would raise)
            return
        if self._op is not None:   # buffers on CUDA: one kernel updates counts, amax and min_nonzero
            self._op(x.detach(), self.counts, self.amax, self.min_nonzero)
            if self.fp8 is None and self.int8 is None:
                return
            m = _finite_magnitudes(x.detach().float().abs())
        else:
            a = x.detach().float().abs()
            m = _finite_magnitudes(a)
            self.counts.add_(_magnitude_counts(a.reshape(-1)))
            self.amax.copy_(torch.maximum(self.amax, m.amax()))
            # inf stays inf and NaN is not > 0: the smallest finite non-zero magnitude, inf if none
            self.min_nonzero.copy_(torch.minimum(self.min_nonzero, torch.where(a > 0, a, math.inf).amin()))
        if self.fp8 is not None:
            w = _fp8_whatif(m, self.fp8_formats)
            n = 2 * len(self.fp8_formats)
            self.fp8[:, :n].add_(w[:, :n])
            self.fp8[:, n].copy_(torch.minimum(self.fp8[:, n], w[:, n]))
            self.fp8[:, n + 1].copy_(torch.maximum(self.fp8[:, n + 1], w[:, n + 1]))
        if self.int8 is not None:
            self.int8.add_(_int8_whatif(m))

    def reset(self) -> None:
        if self.counts is not None:
            self.allocate(self.counts.device)

    @property
    def allocated(self) -> bool:
        return self.counts is not None

    def values(self) -> list[torch.Tensor]:
        """[counts, amax, min_nonzero(, fp8)(, int8)] flattened to FP64, for one copy to the host."""
        out = [self.counts.double(), self.amax.double().reshape(1), self.min_nonzero.double().reshape(1)]
        if self.fp8 is not None:
            out.append(self.fp8.reshape(-1))
        if self.int8 is not None:
            out.append(self.int8.reshape(-1))
        return out
