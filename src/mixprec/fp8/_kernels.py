"""Triton kernels that quantize a 2-D tensor to FP8 and write its transpose in the same pass.

A linear layer's backward needs each tensor twice, quantized along each of its dimensions (x for the
forward GEMM along K and x^T for the weight gradient along M; W and W^T; dy and dy^T). Each kernel
reads the tensor from memory once, tile by tile, and writes both code layouts (q: (R, K) and qT: (K, R), both
row-major) with their scales, so the backward needs no transpose pass:

    quantize_1x128_t    per 1x128 tile of x and per 1x128 tile of x^T (a 128x1 tile of x): a
                        128x128 tile gives 128 row amaxes and 128 column amaxes; a program per
                        chunk of its rows (x's codes) or of its columns (x^T's), so the tile is
                        read twice
    quantize_128x128_t  per 128x128 block; x^T's scales are the transpose of x's
    quantize_tensor_t   tensorwise: an amax reduction (atomic max) then one cast pass, whose x^T codes
                        come from the transposed input tile
    quantize_rowwise_t  per row of x and per row of x^T (a column of x): one pass reduces tiles to
                        their row and column amaxes (atomic max into an R- and a K-vector), then one cast
                        pass writes both code layouts. A row's scale needs the whole row and a column's
                        the whole column, so no single tile sees either: two reads, as tensorwise.

Arithmetic is that of mixprec.fp8.quantize (one correctly rounded reciprocal per group, then per
value the product rounded to odd, saturation and the RNE cast to FP8; on a GPU the rounding to odd,
and the cast of FP32 inputs, are inline PTX), so codes and scales equal the PyTorch path bit for bit
(tests/test_fp8_cuda.py on a GPU, tests/test_fp8_kernels.py in Triton's interpreter). The entry points
are torch.library ops (defined at the dispatcher's level, not by custom_op: a lighter call), so
torch.compile keeps them as opaque calls.

Scales come back in the layouts torch._scaled_mm reads: 1x128 scales outer-dim-major (a contiguous
(K/128, R) buffer viewed as (R, K/128)), 128x128 scales contiguous (R/128, K/128), rowwise scales
contiguous (R, 1) for x and (K, 1) for x^T.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mixprec.fp8.quantize import AMAX_EPS, get_fp8_format

_BLOCK = 128           # DeepSeek-V3's tile; also the only block torch._scaled_mm scales

# A 128x128 FP32 tile is 64 values per thread at 8 warps: measured per shape which warp count keeps it
# in registers best (autotuned once per shape; training shapes repeat).
_TILE_CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8, 16)]
# The 1x128 kernel splits its tile into chunks of rows and of columns, a program each: at BF16 8192^2
# on an H200, chunks of 32 at 2 warps reach 0.70 of copy bandwidth; larger chunks, one program walking
# all chunks, or the whole tile in one program are slower (benchmarks/results/fp8.md).
_CHUNK_CONFIGS = [triton.Config({"CHUNK": c}, num_warps=w) for w, c in ((2, 32), (4, 32), (2, 16), (8, 64))]
# Tensorwise kernels have no tile the scale depends on: rectangles trade registers for parallelism.
_FREE_CONFIGS = [triton.Config({"BR": br, "BK": bk}, num_warps=w)
                 for br, bk in ((128, 128), (64, 128), (128, 64), (64, 64)) for w in (4, 8)]
# The tensorwise amax pass: STRIPS tiles per program, one atomic each.
_AMAX_CONFIGS = [triton.Config({"BR": br, "BK": bk, "STRIPS": n}, num_warps=w)
                 for br, bk in ((64, 128), (32, 256)) for n in (4, 16) for w in (4, 8)]
# The rowwise amax pass does one atomic per row per tile and one per column per STRIPS tiles. At BF16
# 8192^2 on an H200 the autotuner picks 128x128 tiles at 4 warps (0.057 ms; strips of smaller tiles
# 0.063-0.081); wider tiles and 16 warps never won, so they are not offered.
_ROW_AMAX_CONFIGS = [triton.Config({"BR": br, "BK": bk, "STRIPS": n}, num_warps=w)
                     for br, bk, n, w in ((128, 128, 1, 4), (128, 128, 1, 8), (64, 128, 4, 4), (32, 128, 16, 4),
                                          (32, 256, 8, 4))]


def _tl_dtype(fmt: str):
    return tl.float8e4nv if get_fp8_format(fmt).name == "fp8_e4m3" else tl.float8e5


def _grid_constants(f, *, hw_cast: bool = True) -> dict:
    """Constants of the FP8 format's grid. HW_CAST: cast with Triton's FP32 -> FP8 conversion. PTX (on a
    GPU; Triton's interpreter cannot run it): round to odd in inline PTX, and where HW_CAST is off cast
    by PTX's cvt; off, both are done in Triton operations (rounding onto the grid in FP32).

    The kernels with one scale per tile or tensor do not use Triton's conversion (hw_cast=False) for
    FP32 inputs: 128x128 (whose inputs are FP32 master weights) and tensorwise. There Triton 3.6 on
    Hopper stores x's codes right and x^T's wrong (whole rows of one garbage value), whether x^T's
    codes come from the code tile, its bytes or the transposed input; BF16 inputs and the
    per-row-scaled kernels are exact. The same conversion written as inline PTX (cvt.rn.satfinite) is
    exact, so the fault is Triton's lowering of the conversion, not the transposed store.
    """
    gpu = not _interpreting()
    nvidia = gpu and torch.version.hip is None    # PTX is NVIDIA's; ROCm builds take the Triton operations
    return dict(M=f.mantissa_bits, MIN_NORMAL=f.min_normal,
                MAGIC=2.0 ** (f.min_exponent - f.mantissa_bits + 23), HW_CAST=hw_cast and gpu, PTX=nvidia)


def _interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), read per launch."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _torch_dtype(fmt: str) -> torch.dtype:
    return get_fp8_format(fmt).torch_dtype


@triton.jit
def _scale(amax, FMAX: tl.constexpr, POW2: tl.constexpr, EPS: tl.constexpr, PTX: tl.constexpr):
    """(dequantization scale, its correctly rounded reciprocal) from a group's amax, as quantize.py.

    PTX (an NVIDIA GPU): both divisions as the fast paths of the GPU's correctly rounded div.rn and
    rcp.rn, without their range checks and slow paths: every scale here (amax >= EPS) lies far inside
    the range those paths are exact for, but an infinite one, which a select handles. About a third
    of the instructions, and the 1x128 and rowwise kernels compute a scale for every group each
    thread holds (tests/test_fp8_kernel_scales_cuda.py compares both ways on every FP32 amax). Else
    tl.div_rn, which Triton's interpreter also runs (its FMA is not fused).
    """
    a = tl.maximum(amax, EPS)
    if PTX:
        # a / FMAX as ptxas compiles div.rn by a constant: q = a * RN(1 / FMAX), then one FMA
        # correction with the exact remainder a - q * FMAX (the FCHK it guards this with passes for
        # every finite a here). RN(1 / FMAX) is right through double: FMAX is 7 * 2^k, whose
        # reciprocal's bits repeat forever and are never near an FP32 tie.
        R: tl.constexpr = 1.0 / FMAX
        q = a * R
        s = tl.fma(tl.fma(q, -FMAX, a), R, q)
        infinite = a == float("inf")
        s = tl.where(infinite, a, s)
    else:
        s = tl.div_rn(a, FMAX)
    if POW2:  # round up to a power of two on the bits, as scale_from_amax does
        bits = s.to(tl.int32, bitcast=True)
        s = ((bits + 0x7FFFFF) & -0x800000).to(tl.float32, bitcast=True)
    if PTX:
        # 1 / s: the hardware's approximate reciprocal and one Newton step in FMAs, rcp.rn's fast path
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [s], dtype=tl.float32, is_pure=True,
                                      pack=1)
        inv = tl.fma(y, tl.fma(-s, y, 1.0), y)
        inv = tl.where(infinite, 0.0, inv)      # s is infinite exactly where a is
    else:
        inv = tl.div_rn(1.0, s)
    return s, inv


# x * inv rounded to odd in PTX: truncate (mul.rz), then set the last bit if the FMA's exact error of
# the truncation is nonzero. Five instructions where Triton's form below takes about twice as many: with
# it (and the PTX cast of FP32 inputs) the compute-bound kernels gained half again (at BF16 8192^2 on an
# H200, the tensorwise cast 0.55 -> 0.83 of copy bandwidth, 128x128 0.63 -> 0.92).
_ODD_PRODUCT_PTX = tl.constexpr("""{
.reg .f32 t, e;
.reg .pred inexact;
mul.rz.f32 $0, $1, $2;
neg.f32 t, $0;
fma.rn.f32 e, $1, $2, t;
setp.neu.f32 inexact, e, 0f00000000;
@inexact or.b32 $0, $0, 1;
}""")


@triton.jit
def _odd_product(x, inv, POW2: tl.constexpr, PTX: tl.constexpr):
    """x * inv in FP32, rounded to odd (as quantize.odd_product) unless the scales are powers of 2.

    PTX: the inline-assembly form (GPU); else the same rounding in Triton operations (also the
    interpreter's, which cannot run PTX).
    """
    if POW2:
        return x * inv
    if PTX:
        return tl.inline_asm_elementwise(_ODD_PRODUCT_PTX, "=r,r,r", [x, inv], dtype=tl.float32, is_pure=True,
                                         pack=1)
    # The FMA gives the product's exact error, whose sign says which neighbour of an inexact even p the
    # exact product lies towards. (With power-of-2 scales the product is exact, down to far below FP8's
    # smallest subnormal.)
    p = x * inv
    error = tl.fma(x, inv, -p)
    bits = p.to(tl.int32, bitcast=True)
    inexact_even = (error != 0) & ((bits & 1) == 0) & (p != 0)
    away_from_zero = (error > 0) == (p > 0)
    return tl.where(inexact_even, tl.where(away_from_zero, bits + 1, bits - 1), bits).to(tl.float32, bitcast=True)


@triton.jit
def _codes(x, inv, FMAX: tl.constexpr, POW2: tl.constexpr, OUT: tl.constexpr, M: tl.constexpr,
           MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr, HW_CAST: tl.constexpr, PTX: tl.constexpr):
    v = _odd_product(x, inv, POW2, PTX)
    if not PTX:     # with PTX both casts below are cvt.rn.satfinite, which saturates as this does
        v = tl.minimum(tl.maximum(v, -FMAX), FMAX)
    if HW_CAST:     # the GPU's FP32 -> FP8 conversion rounds to nearest even
        return v.to(OUT)
    if PTX:         # the same conversion, written out in PTX (see _grid_constants)
        return _cast_ptx(v, M).to(OUT, bitcast=True)
    return _round_to_grid(v, M, MIN_NORMAL, MAGIC).to(OUT)    # on the grid already: the cast is exact


# cvt.rn.satfinite.<fp8>x2.f32 d, a, b puts a's code in d's high byte and b's in its low byte; four
# values per call make one 32-bit register of four codes, element 0 in the lowest byte.
_CAST_PTX = """{{
.reg .b16 lo, hi;
cvt.rn.satfinite.{fmt}x2.f32 lo, $2, $1;
cvt.rn.satfinite.{fmt}x2.f32 hi, $4, $3;
mov.b32 $0, {{lo, hi}};
}}"""
_CAST_E4M3_PTX = tl.constexpr(_CAST_PTX.format(fmt="e4m3"))
_CAST_E5M2_PTX = tl.constexpr(_CAST_PTX.format(fmt="e5m2"))


@triton.jit
def _cast_ptx(v, M: tl.constexpr):
    """FP32 -> FP8 codes (as int8) rounded to nearest even, by inline PTX rather than Triton's cast."""
    if M == 3:
        return tl.inline_asm_elementwise(_CAST_E4M3_PTX, "=r,r,r,r,r", [v], dtype=tl.int8, is_pure=True, pack=4)
    return tl.inline_asm_elementwise(_CAST_E5M2_PTX, "=r,r,r,r,r", [v], dtype=tl.int8, is_pure=True, pack=4)


@triton.jit
def _round_to_grid(v, M: tl.constexpr, MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr):
    # Round-to-nearest-even onto the FP8 grid in FP32 arithmetic (as mixprec.formats.round_to), where
    # the hardware cast is not used (see _grid_constants; Triton's CPU interpreter, whose FP8 cast does
    # not round as the GPU's does). Normal range: RNE on the bits below the M kept mantissa bits.
    # Subnormal range: adding MAGIC = 2**(emin - M + 23) rounds |v| to the fixed quantum.
    SHIFT: tl.constexpr = 23 - M
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> SHIFT) & 1
    normal = ((bits + ((1 << (SHIFT - 1)) - 1) + lsb) & -(1 << SHIFT)).to(tl.float32, bitcast=True)
    mag = ((tl.abs(v) + MAGIC) - MAGIC).to(tl.int32, bitcast=True)
    sub = (mag | (bits & -0x80000000)).to(tl.float32, bitcast=True)   # v's sign bit: -0.0 stays -0.0
    return tl.where(tl.abs(v) < MIN_NORMAL, sub, normal)


@triton.jit
def _load_tile(x_ptr, R, K, BR: tl.constexpr, BK: tl.constexpr):
    """This program's (BR, BK) tile of the row-major (R, K) tensor x, in x's dtype (zero outside x)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    return rows, cols, mask, tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_transposed(qt_ptr, qt, rows, cols, mask, R):
    """A tile's codes of x^T (already transposed: (BK, BR)) into the row-major (K, R) codes of x^T."""
    tl.store(qt_ptr + cols[:, None] * R + rows[None, :], qt, mask=tl.trans(mask))


@triton.autotune(configs=_CHUNK_CONFIGS, key=["R", "K"])
@triton.jit
def _quantize_1x128_t_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, R, K,
                             FMAX: tl.constexpr, POW2: tl.constexpr, EPS: tl.constexpr,
                             OUT: tl.constexpr, B: tl.constexpr, M: tl.constexpr, MIN_NORMAL: tl.constexpr,
                             MAGIC: tl.constexpr, HW_CAST: tl.constexpr, PTX: tl.constexpr, CHUNK: tl.constexpr):
    # One program per chunk of a 128x128 tile: a strip of CHUNK rows gives x's codes (each row its own
    # 1x128 scale), a strip of CHUNK columns x^T's (each column its own amax over the tile's 128 rows;
    # its transposed codes are whole 128-byte rows of x^T). Held whole with both code tiles, the tile
    # took 255 registers and spilled (ptxas, sm_90a); walked in a loop of chunks by one program, the
    # chunks' loads waited on each other. A tile's 2 * NC programs are consecutive: its row chunks,
    # then its column chunks. The tile is read twice, yet instructions weighed more (about 20 per value):
    # the fast-path scales of _scale took the kernel from 0.57 to 0.70 of copy bandwidth (BF16 8192^2, H200).
    NC: tl.constexpr = B // CHUNK
    pid_r = tl.program_id(0) // (2 * NC)
    j = tl.program_id(0) % (2 * NC)
    pid_k = tl.program_id(1)
    if j < NC:
        _1x128_row_chunk(x_ptr, q_ptr, s_ptr, R, K, pid_r * B + j * CHUNK, pid_k, FMAX, POW2, EPS, OUT, B,
                         M, MIN_NORMAL, MAGIC, HW_CAST, PTX, CHUNK)
    else:
        _1x128_column_chunk(x_ptr, qt_ptr, st_ptr, R, K, pid_r, pid_k * B + (j - NC) * CHUNK, FMAX,
                            POW2, EPS, OUT, B, M, MIN_NORMAL, MAGIC, HW_CAST, PTX, CHUNK)


@triton.jit
def _1x128_row_chunk(x_ptr, q_ptr, s_ptr, R, K, row0, pid_k, FMAX: tl.constexpr, POW2: tl.constexpr,
                     EPS: tl.constexpr, OUT: tl.constexpr, B: tl.constexpr, M: tl.constexpr,
                     MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr, HW_CAST: tl.constexpr, PTX: tl.constexpr,
                     CHUNK: tl.constexpr):
    """x's codes and 1x128 scales for CHUNK rows (from row0) of the tile in column pid_k."""
    rows = row0 + tl.arange(0, CHUNK)
    cols = pid_k * B + tl.arange(0, B)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s, inv = _scale(tl.max(tl.abs(x), axis=1), FMAX, POW2, EPS, PTX)   # x along K: a scale per row
    tl.store(q_ptr + rows[:, None] * K + cols[None, :],
             _codes(x, inv[:, None], FMAX, POW2, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX), mask=mask)
    tl.store(s_ptr + pid_k * R + rows, s, mask=rows < R)      # (K/B, R) buffer: outer-dim-major


@triton.jit
def _1x128_column_chunk(x_ptr, qt_ptr, st_ptr, R, K, pid_r, col0, FMAX: tl.constexpr, POW2: tl.constexpr,
                        EPS: tl.constexpr, OUT: tl.constexpr, B: tl.constexpr, M: tl.constexpr,
                        MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr, HW_CAST: tl.constexpr, PTX: tl.constexpr,
                        CHUNK: tl.constexpr):
    """x^T's codes and 1x128 scales for CHUNK columns (from col0) of the tile in row pid_r."""
    rows = pid_r * B + tl.arange(0, B)
    cols = col0 + tl.arange(0, CHUNK)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s, inv = _scale(tl.max(tl.abs(x), axis=0), FMAX, POW2, EPS, PTX)   # x^T along R: a scale per column
    tl.store(st_ptr + pid_r * K + cols, s, mask=cols < K)        # (R/B, K) buffer
    qt = tl.trans(_codes(x, inv[None, :], FMAX, POW2, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX))
    _store_transposed(qt_ptr, qt, rows, cols, mask, R)


@triton.autotune(configs=_TILE_CONFIGS, key=["R", "K"])
@triton.jit
def _quantize_128x128_t_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, R, K, NK,
                               FMAX: tl.constexpr, POW2: tl.constexpr, EPS: tl.constexpr,
                               OUT: tl.constexpr, B: tl.constexpr, M: tl.constexpr, MIN_NORMAL: tl.constexpr,
                               MAGIC: tl.constexpr, HW_CAST: tl.constexpr, PTX: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows, cols, mask, x = _load_tile(x_ptr, R, K, B, B)
    x = x.to(tl.float32)
    s, inv = _scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0), FMAX, POW2, EPS, PTX)
    q = _codes(x, inv, FMAX, POW2, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=mask)
    _store_transposed(qt_ptr, tl.trans(q), rows, cols, mask, R)
    tl.store(s_ptr + pid_r * NK + pid_k, s)


@triton.autotune(configs=_AMAX_CONFIGS, key=["R", "K"])
@triton.jit
def _amax_kernel(x_ptr, amax_ptr, R, K, BR: tl.constexpr, BK: tl.constexpr, STRIPS: tl.constexpr):
    # Each program reduces STRIPS tiles down its column of tiles, then makes one atomic: atomics on one
    # address serialise, and one per 128x128 tile (4096 for 8192^2) cost as much as the loads.
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = tl.zeros((BR, BK), dtype=tl.float32)
    for i in range(STRIPS):
        rows = (tl.program_id(0) * STRIPS + i) * BR + tl.arange(0, BR)
        mask = (rows[:, None] < R) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        m = tl.maximum(m, tl.abs(x))
    tl.atomic_max(amax_ptr, tl.max(tl.max(m, axis=1), axis=0), sem="relaxed")   # |x| >= 0: float max is exact


@triton.autotune(configs=_FREE_CONFIGS, key=["R", "K"])
@triton.jit
def _cast_t_kernel(x_ptr, amax_ptr, q_ptr, qt_ptr, s_ptr, R, K,
                   FMAX: tl.constexpr, POW2: tl.constexpr, EPS: tl.constexpr,
                   OUT: tl.constexpr, M: tl.constexpr, MIN_NORMAL: tl.constexpr,
                   MAGIC: tl.constexpr, HW_CAST: tl.constexpr, PTX: tl.constexpr, BR: tl.constexpr,
                   BK: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows, cols, mask, x = _load_tile(x_ptr, R, K, BR, BK)
    s, inv = _scale(tl.load(amax_ptr), FMAX, POW2, EPS, PTX)
    q = _codes(x.to(tl.float32), inv, FMAX, POW2, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=mask)
    # x^T's codes from the transposed input tile, not the transposed code tile: a BF16 tile moves through
    # shared memory faster (0.56 against 0.45 of copy bandwidth on an H200); FP32 inputs take the same path
    qt = _codes(tl.trans(x).to(tl.float32), inv, FMAX, POW2, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX)
    _store_transposed(qt_ptr, qt, rows, cols, mask, R)
    if (pid_r == 0) & (pid_k == 0):
        tl.store(s_ptr, s)


@triton.autotune(configs=_ROW_AMAX_CONFIGS, key=["R", "K"])
@triton.jit
def _row_col_amax_kernel(x_ptr, row_amax_ptr, col_amax_ptr, R, K, BR: tl.constexpr, BK: tl.constexpr,
                         STRIPS: tl.constexpr):
    # Each program reduces STRIPS tiles down its column of tiles. Each tile's rows reduce along K (within
    # a warp); the columns' maxima accumulate elementwise and reduce across the tile's rows (across
    # warps, the dearer reduction) once, before one atomic each. The amaxes are int32 bit patterns:
    # |x| >= 0 orders as its bits, so one integer atomic max is exact (a float one is two, one per
    # sign), whatever order the tiles arrive in. Relaxed: the maxima need no ordering against other
    # memory operations, and relaxed atomics whose result is unused compile to fire-and-forget
    # reductions (REDG) instead of acquire-release ATOMGs, each a fence (0.73 against 0.63 of copy
    # bandwidth on an H200).
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    m = tl.zeros((BR, BK), dtype=tl.float32)
    for i in range(STRIPS):
        rows = (tl.program_id(0) * STRIPS + i) * BR + tl.arange(0, BR)
        mask = (rows[:, None] < R) & (cols[None, :] < K)
        a = tl.abs(tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32))
        tl.atomic_max(row_amax_ptr + rows, tl.max(a, axis=1).to(tl.int32, bitcast=True), mask=rows < R,
                      sem="relaxed")
        m = tl.maximum(m, a)
    tl.atomic_max(col_amax_ptr + cols, tl.max(m, axis=0).to(tl.int32, bitcast=True), mask=cols < K, sem="relaxed")


@triton.autotune(configs=_FREE_CONFIGS, key=["R", "K"])
@triton.jit
def _cast_rowwise_t_kernel(x_ptr, row_amax_ptr, col_amax_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, R, K,
                           FMAX: tl.constexpr, POW2: tl.constexpr, EPS: tl.constexpr,
                           OUT: tl.constexpr, M: tl.constexpr, MIN_NORMAL: tl.constexpr,
                           MAGIC: tl.constexpr, HW_CAST: tl.constexpr, PTX: tl.constexpr, BR: tl.constexpr,
                           BK: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows, cols, mask, x = _load_tile(x_ptr, R, K, BR, BK)
    x = x.to(tl.float32)
    row_s, row_inv = _scale(tl.load(row_amax_ptr + rows, mask=rows < R, other=0.0), FMAX, POW2, EPS, PTX)  # along K
    col_s, col_inv = _scale(tl.load(col_amax_ptr + cols, mask=cols < K, other=0.0), FMAX, POW2, EPS, PTX)  # along R
    q = _codes(x, row_inv[:, None], FMAX, POW2, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q, mask=mask)
    qt = tl.trans(_codes(x, col_inv[None, :], FMAX, POW2, OUT, M, MIN_NORMAL, MAGIC, HW_CAST, PTX))
    _store_transposed(qt_ptr, qt, rows, cols, mask, R)
    if pid_k == 0:      # each scale written once: by the first tile of its row (column)
        tl.store(s_ptr + rows, row_s, mask=rows < R)
    if pid_r == 0:
        tl.store(st_ptr + cols, col_s, mask=cols < K)


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv is a JIT function: called from the host it costs ~5 us, several times per quantize call
    return -(-a // b)


def _grid(r: int, k: int) -> tuple[int, int]:
    return _cdiv(r, _BLOCK), _cdiv(k, _BLOCK)


def _free_grid(r: int, k: int):
    return lambda meta: (_cdiv(r, meta["BR"]), _cdiv(k, meta["BK"]))


# The ops' own library, registered at the dispatcher's level: torch.library.custom_op wraps each call in
# Python checks (aliasing, autograd): 18 us against 5.5 us per call of a trivial op registered this way
# on a development CPU. The ops have no autograd formula: they run inside Float8Linear's autograd.Function.
_LIB = torch.library.Library("mixprec", "FRAGMENT")


def _op(schema: str):
    """Define mixprec::<schema> with the decorated function as its kernel on every device (the
    function checks for CUDA itself; Triton's interpreter runs it on CPU tensors in the tests) and
    return the op, so that callers go through the dispatcher and torch.compile keeps it opaque."""
    def define(fn):
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        return getattr(torch.ops.mixprec, name).default
    return define


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2 or not x.is_cuda:
        raise ValueError(f"Triton FP8 quantization takes a 2-D CUDA tensor, got shape {tuple(x.shape)} on {x.device}")


@_op("fp8_quantize_1x128_t(Tensor x, str fmt, bool power_of_2) -> (Tensor, Tensor, Tensor, Tensor)")
def _quantize_1x128_t_op(x: torch.Tensor, fmt: str, power_of_2: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor, torch.Tensor]:
    _check(x)
    x = x.contiguous()   # a unit inner stride the compiler knows: 16-byte loads
    r, k = x.shape
    f = get_fp8_format(fmt)
    q = torch.empty((r, k), dtype=f.torch_dtype, device=x.device)
    qt = torch.empty((k, r), dtype=f.torch_dtype, device=x.device)
    s = torch.empty((_cdiv(k, _BLOCK), r), dtype=torch.float32, device=x.device)
    st = torch.empty((_cdiv(r, _BLOCK), k), dtype=torch.float32, device=x.device)
    tiles_r, tiles_k = _grid(r, k)
    grid = lambda meta: (tiles_r * 2 * (_BLOCK // meta["CHUNK"]), tiles_k)   # noqa: E731  (a program per chunk)
    _quantize_1x128_t_kernel[grid](x, q, s, qt, st, r, k, FMAX=f.max, POW2=power_of_2, EPS=AMAX_EPS,
                                   OUT=_tl_dtype(fmt), B=_BLOCK, **_grid_constants(f))
    return q, s, qt, st


@torch.library.register_fake("mixprec::fp8_quantize_1x128_t")
def _(x, fmt, power_of_2):
    r, k = x.shape
    dt = _torch_dtype(fmt)
    return (x.new_empty((r, k), dtype=dt), x.new_empty((-(-k // _BLOCK), r), dtype=torch.float32),
            x.new_empty((k, r), dtype=dt), x.new_empty((-(-r // _BLOCK), k), dtype=torch.float32))


@_op("fp8_quantize_128x128_t(Tensor x, str fmt, bool power_of_2) -> (Tensor, Tensor, Tensor)")
def _quantize_128x128_t_op(x: torch.Tensor, fmt: str, power_of_2: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    _check(x)
    x = x.contiguous()   # a unit inner stride the compiler knows: 16-byte loads
    r, k = x.shape
    f = get_fp8_format(fmt)
    q = torch.empty((r, k), dtype=f.torch_dtype, device=x.device)
    qt = torch.empty((k, r), dtype=f.torch_dtype, device=x.device)
    nr, nk = _grid(r, k)
    s = torch.empty((nr, nk), dtype=torch.float32, device=x.device)
    _quantize_128x128_t_kernel[(nr, nk)](x, q, s, qt, r, k, nk, FMAX=f.max, POW2=power_of_2, EPS=AMAX_EPS,
                                         OUT=_tl_dtype(fmt), B=_BLOCK, **_grid_constants(f, hw_cast=False))
    return q, s, qt


@torch.library.register_fake("mixprec::fp8_quantize_128x128_t")
def _(x, fmt, power_of_2):
    r, k = x.shape
    dt = _torch_dtype(fmt)
    return (x.new_empty((r, k), dtype=dt), x.new_empty((-(-r // _BLOCK), -(-k // _BLOCK)), dtype=torch.float32),
            x.new_empty((k, r), dtype=dt))


@_op("fp8_amax(Tensor x) -> Tensor")
def _amax_op(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    x = x.contiguous()   # a unit inner stride the compiler knows: 16-byte loads
    out = torch.zeros((), dtype=torch.float32, device=x.device)
    r, k = x.shape
    _amax_kernel[lambda meta: (_cdiv(r, meta["BR"] * meta["STRIPS"]), _cdiv(k, meta["BK"]))](x, out, r, k)
    return out


@torch.library.register_fake("mixprec::fp8_amax")
def _(x):
    return x.new_empty((), dtype=torch.float32)


@_op("fp8_cast_t(Tensor x, Tensor amax, str fmt, bool power_of_2) -> (Tensor, Tensor, Tensor)")
def _cast_t_op(x: torch.Tensor, amax: torch.Tensor, fmt: str, power_of_2: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
    _check(x)
    x = x.contiguous()   # a unit inner stride the compiler knows: 16-byte loads
    r, k = x.shape
    f = get_fp8_format(fmt)
    q = torch.empty((r, k), dtype=f.torch_dtype, device=x.device)
    qt = torch.empty((k, r), dtype=f.torch_dtype, device=x.device)
    s = torch.empty((), dtype=torch.float32, device=x.device)
    _cast_t_kernel[_free_grid(r, k)](x, amax.float().reshape(()), q, qt, s, r, k, FMAX=f.max,
                                     POW2=power_of_2, EPS=AMAX_EPS, OUT=_tl_dtype(fmt),
                                     **_grid_constants(f, hw_cast=x.element_size() < 4))
    return q, qt, s


@torch.library.register_fake("mixprec::fp8_cast_t")
def _(x, amax, fmt, power_of_2):
    r, k = x.shape
    dt = _torch_dtype(fmt)
    return x.new_empty((r, k), dtype=dt), x.new_empty((k, r), dtype=dt), x.new_empty((), dtype=torch.float32)


@_op("fp8_row_col_amax(Tensor x) -> (Tensor, Tensor)")
def _row_col_amax_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x)
    x = x.contiguous()   # a unit inner stride the compiler knows: 16-byte loads
    r, k = x.shape
    row_amax = torch.zeros(r, dtype=torch.int32, device=x.device)    # the bits of +0.0: max's identity over |x|
    col_amax = torch.zeros(k, dtype=torch.int32, device=x.device)
    grid = lambda meta: (_cdiv(r, meta["BR"] * meta["STRIPS"]), _cdiv(k, meta["BK"]))  # noqa: E731
    _row_col_amax_kernel[grid](x, row_amax, col_amax, r, k)
    return row_amax.view(torch.float32), col_amax.view(torch.float32)


@torch.library.register_fake("mixprec::fp8_row_col_amax")
def _(x):
    return x.new_empty((x.shape[0],), dtype=torch.float32), x.new_empty((x.shape[1],), dtype=torch.float32)


@_op("fp8_cast_rowwise_t(Tensor x, Tensor row_amax, Tensor col_amax, str fmt, bool power_of_2)"
     " -> (Tensor, Tensor, Tensor, Tensor)")
def _cast_rowwise_t_op(x: torch.Tensor, row_amax: torch.Tensor, col_amax: torch.Tensor, fmt: str,
                       power_of_2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x)
    x = x.contiguous()   # a unit inner stride the compiler knows: 16-byte loads
    r, k = x.shape
    f = get_fp8_format(fmt)
    q = torch.empty((r, k), dtype=f.torch_dtype, device=x.device)
    qt = torch.empty((k, r), dtype=f.torch_dtype, device=x.device)
    s = torch.empty((r, 1), dtype=torch.float32, device=x.device)
    st = torch.empty((k, 1), dtype=torch.float32, device=x.device)
    _cast_rowwise_t_kernel[_free_grid(r, k)](x, row_amax.float().contiguous(), col_amax.float().contiguous(),
                                             q, s, qt, st, r, k, FMAX=f.max, POW2=power_of_2, EPS=AMAX_EPS,
                                             OUT=_tl_dtype(fmt), **_grid_constants(f))
    return q, s, qt, st


@torch.library.register_fake("mixprec::fp8_cast_rowwise_t")
def _(x, row_amax, col_amax, fmt, power_of_2):
    r, k = x.shape
    dt = _torch_dtype(fmt)
    return (x.new_empty((r, k), dtype=dt), x.new_empty((r, 1), dtype=torch.float32),
            x.new_empty((k, r), dtype=dt), x.new_empty((k, 1), dtype=torch.float32))


QuantPair = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def quantize_1x128_t(x: torch.Tensor, fmt: str, *, power_of_2: bool = False) -> QuantPair:
    """((q, s), (qT, sT)): x per 1x128 tile along its rows and x^T per 1x128 tile along its rows."""
    q, s, qt, st = _quantize_1x128_t_op(x, fmt, power_of_2)
    return (q, s.t()), (qt, st.t())


def quantize_128x128_t(x: torch.Tensor, fmt: str, *, power_of_2: bool = False) -> QuantPair:
    """((q, s), (qT, s^T)): x per 128x128 block, and the same codes transposed."""
    q, s, qt = _quantize_128x128_t_op(x, fmt, power_of_2)
    return (q, s), (qt, s.t())


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as an FP32 scalar tensor, in one pass."""
    return _amax_op(x)


def quantize_tensor_t(x: torch.Tensor, fmt: str, *, power_of_2: bool = False,
                      amax: torch.Tensor | None = None) -> QuantPair:
    """((q, s), (qT, s)) tensorwise; scale from `amax` if given (delayed scaling), else from x's."""
    if amax is None:
        amax = _amax_op(x)
    q, qt, s = _cast_t_op(x, amax, fmt, power_of_2)
    return (q, s), (qt, s)


def row_col_amax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x| of each row (R,), max |x| of each column (K,)) in FP32, in one pass over x."""
    return _row_col_amax_op(x)


def quantize_rowwise_t(x: torch.Tensor, fmt: str, *, power_of_2: bool = False,
                       amax: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantPair:
    """((q, s), (qT, sT)): x per row (s: (R, 1)) and x^T per row, i.e. x per column (sT: (K, 1)).

    amax: (row amaxes (R,), column amaxes (K,)) to scale from, e.g. row_col_amax(x) computed earlier;
    None: x's own.
    """
    row_amax, col_amax = _row_col_amax_op(x) if amax is None else amax
    q, s, qt, st = _cast_rowwise_t_op(x, row_amax, col_amax, fmt, power_of_2)
    return (q, s), (qt, st)
