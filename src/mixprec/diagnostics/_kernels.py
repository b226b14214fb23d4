"""A Triton kernel of the range statistics (mixprec.diagnostics.stats): one read of a tensor updates its
accumulator's bucket counts, amax and smallest non-zero magnitude in place.

    counts      += bincount(bucketize(|x| as FP32, BOUNDARIES, right=True), NaN -> NAN_BIN)
    amax         = max(amax, max over finite |x|)            (|x| of none: 0)
    min_nonzero  = min(min_nonzero, min over finite |x| > 0)  (of none: inf)

The PyTorch path takes about fifteen kernels per tensor (casts, abs, isfinite, bucketize, where, histc,
the reductions), each reading the tensor again; the monitor counts hundreds of tensors per sampled step,
so the statistics were bound by launches and memory traffic. Here each tensor is read once, by one launch.

The bucket comes from the FP32 bits of |x|, with integer arithmetic only: the number of powers of two
<= |x| from the exponent field (a subnormal's from its mantissa, converted exactly to FP32), plus one
comparison per edge of BOUNDARIES that is not a power of two (non-negative FP32 values order like their
bit patterns). It equals torch.bucketize bit for bit (tests/test_diagnostics_kernels.py). amax and
min_nonzero are kept as bit patterns too, so the accumulator's FP32 buffers take int32 atomics.

Each program loops over several blocks (a grid of a few programs per SM), sums their histograms
(tl.histogram) and adds its histogram to the global counts with one masked atomic per non-empty bin.
The entry point is a torch.library op that mutates its buffers, so torch.compile keeps it as one
opaque call inside a compiled graph.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mixprec.diagnostics.stats import BOUNDARIES, INF_BIN, N_BINS, NAN_BIN

__all__ = ["range_stats_"]

_INF_BITS = tl.constexpr(0x7F800000)   # FP32 +inf; larger patterns of |x| are NaN
_HIST_BINS = 1 << N_BINS.bit_length()  # tl.histogram takes a power of two: the first one above N_BINS,
_PAD_BIN = N_BINS                      # so a padding bin is left for elements past the end (never added)
_BLOCK = 2048
_PROGRAMS_PER_SM = 4


def _layout(boundaries: list[float]) -> tuple[int, int, list[float]]:
    """(lowest power of two's exponent, number of powers, the other finite edges) of BOUNDARIES, which
    must be FP32 values: a run of consecutive powers of two, a few other edges, and inf last."""
    assert boundaries == sorted(set(boundaries)) and boundaries[-1] == math.inf
    finite = boundaries[:-1]
    assert all(0 < b < math.inf and torch.tensor(b, dtype=torch.float32).item() == b for b in finite)
    exponents = [math.frexp(b)[1] - 1 for b in finite if math.frexp(b)[0] == 0.5]
    assert exponents == list(range(exponents[0], exponents[0] + len(exponents))), "powers of two with a gap"
    return exponents[0], len(exponents), [b for b in finite if math.frexp(b)[0] != 0.5]


_POW_LO, _N_POW, _EDGES = _layout(BOUNDARIES)
_edges_on: dict[torch.device, torch.Tensor] = {}


def _edge_bits(device: torch.device) -> torch.Tensor:
    t = _edges_on.get(device)
    if t is None:
        t = _edges_on[device] = torch.tensor(_EDGES, dtype=torch.float32).view(torch.int32).to(device)
    return t


@triton.jit
def _range_stats_kernel(x_ptr, n, edges_ptr, counts_ptr, amax_ptr, min_ptr,
                        N_EDGES: tl.constexpr, POW_LO: tl.constexpr, N_POW: tl.constexpr,
                        INF_BIN: tl.constexpr, NAN_BIN: tl.constexpr, N_BINS: tl.constexpr,
                        HIST_BINS: tl.constexpr, PAD_BIN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    hist = tl.zeros([HIST_BINS], dtype=tl.int64)
    top = tl.zeros([BLOCK], dtype=tl.int32)
    low = tl.full([BLOCK], _INF_BITS, tl.int32)
    # int64 offsets: an int32 n just below 2**31 would overflow start + BLOCK
    for start in range(pid.to(tl.int64) * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        bits = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF   # |x| as FP32 (the widening is exact)
        exponent = bits >> 23
        mantissa = bits & 0x7FFFFF
        # floor(log2 |x|); a subnormal is mantissa * 2**-149, and float(mantissa) is exact (zero: far below)
        sub_log2 = (mantissa.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127 - 149
        log2 = tl.where(exponent == 0, sub_log2, exponent - 127)
        idx = tl.minimum(tl.maximum(log2 - POW_LO + 1, 0), N_POW)        # powers of two <= |x|
        for i in tl.static_range(N_EDGES):
            idx += (bits >= tl.load(edges_ptr + i)).to(tl.int32)         # the other edges <= |x|
        idx = tl.where(bits >= _INF_BITS, tl.where(bits > _INF_BITS, NAN_BIN, INF_BIN), idx)
        hist += tl.histogram(tl.where(inside, idx, PAD_BIN), HIST_BINS).to(tl.int64)
        # past the end bits = 0: no effect on either. inf and NaN are not below inf, so only finite values count
        top = tl.maximum(top, tl.where(bits < _INF_BITS, bits, 0))
        low = tl.minimum(low, tl.where(bits > 0, bits, _INF_BITS))
    bins = tl.arange(0, HIST_BINS)
    tl.atomic_add(counts_ptr + bins, hist, mask=(bins < N_BINS) & (hist > 0))
    tl.atomic_max(amax_ptr, tl.max(top, 0))
    tl.atomic_min(min_ptr, tl.min(low, 0))


_programs_on: dict[torch.device, int] = {}


def _max_programs(device: torch.device) -> int:
    """A few programs per SM: each loops over blocks, so the atomics stay few. Elsewhere (Triton's
    interpreter) a handful, so that the tests see programs loop."""
    p = _programs_on.get(device)
    if p is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        p = _programs_on[device] = _PROGRAMS_PER_SM * sms
    return p


_LIB = torch.library.Library("mixprec", "FRAGMENT")
_LIB.define("range_stats_(Tensor x, Tensor(a!) counts, Tensor(b!) amax, Tensor(c!) min_nonzero) -> ()")


def _range_stats_(x: torch.Tensor, counts: torch.Tensor, amax: torch.Tensor, min_nonzero: torch.Tensor) -> None:
    if counts.shape != (N_BINS,) or counts.dtype != torch.int64:
        raise ValueError(f"counts must be int64 of shape ({N_BINS},); got {counts.dtype} {tuple(counts.shape)}")
    for name, t in (("amax", amax), ("min_nonzero", min_nonzero)):
        if t.shape != () or t.dtype != torch.float32:
            raise ValueError(f"{name} must be a 0-d float32 tensor; got {t.dtype} {tuple(t.shape)}")
    n = x.numel()
    if n == 0:   # nothing to count; no launch
        return
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x = x.float()   # as the PyTorch path: FP32 magnitudes
    x = x.contiguous().view(-1)
    grid = (min(triton.cdiv(n, _BLOCK), _max_programs(x.device)),)
    _range_stats_kernel[grid](x, n, _edge_bits(x.device), counts, amax.view(torch.int32),
                              min_nonzero.view(torch.int32), N_EDGES=len(_EDGES), POW_LO=_POW_LO, N_POW=_N_POW,
                              INF_BIN=INF_BIN, NAN_BIN=NAN_BIN, N_BINS=N_BINS, HIST_BINS=_HIST_BINS,
                              PAD_BIN=_PAD_BIN, BLOCK=_BLOCK)


_LIB.impl("range_stats_", _range_stats_, "CompositeExplicitAutograd")
range_stats_ = torch.ops.mixprec.range_stats_.default


@torch.library.register_fake("mixprec::range_stats_")
def _(x, counts, amax, min_nonzero):
    return None
