"""An experiment: a Triton FP8 GEMM for DeepSeek-V3's blockwise scales, against torch._scaled_mm (cuBLAS).

    C = (A * sa) @ (B * sb)^T      A: (M, K), B: (N, K) FP8 row-major, both scaled along K per 128

Each program computes a (BM, BN) tile of C: per 128-wide slice of K, a tensor-core product of the codes
added to an FP32 accumulator times the slice's scales (sa[i] * sb[j]), DeepSeek-V3's promotion every 128
of K; UNROLL slices are multiplied before their promotions (fewer waits on the tensor cores, more
registers). A and B are read through TMA descriptors. Scales: sa[m, kb] at sa + kb * sa_kb + m * sa_m;
sb[n, kb] at sb + kb * sb_kb + (n // B_GROUP) * sb_n (B_GROUP 1: 1x128 tiles, the weight gradient;
128: 128x128 blocks, the forward and input-gradient weights).

Not in the library: on the H200 it ran at 0.51-0.64 of cuBLAS (benchmarks/results/fp8.md, session 8),
because the promotion's multiply-adds do not overlap the tensor cores. probe_fp8.py tgemm times it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

BLOCK_K = 128    # the scale tile: one promotion per 128 of K


def _set_boxes(args):
    # TMA's box is the program's tile: set on the descriptors for each config the autotuner runs
    args["a_desc"].block_shape = [args["BM"], BLOCK_K]
    args["b_desc"].block_shape = [args["BN"], BLOCK_K]


def _config(bm: int, bn: int, warps: int, stages: int, unroll: int = 1, ws: bool = False) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8, "UNROLL": unroll, "WS": ws}, num_warps=warps,
                         num_stages=stages, pre_hook=_set_boxes)


# session 8, call 1 (the 16384x4096 weight gradient, ms): 128x128 at 8 warps 0.99 (3 stages), 1.00 (4);
# 128x256/8 1.03; 64x256/4 1.17; 256x128/8 1.37; 128x64/4 (5 stages) 1.36; 128x128/4 2.33 (spills).
# Call 2: tiles small enough for two or three programs per SM (one's promotion beside another's
# products), and two slices per promotion.
CONFIGS = [_config(128, 128, 8, 3), _config(64, 128, 4, 3), _config(64, 128, 4, 4), _config(128, 64, 4, 3),
           _config(64, 256, 4, 2), _config(128, 128, 8, 2), _config(128, 128, 8, 3, unroll=2),
           _config(64, 128, 4, 3, unroll=2), _config(128, 64, 4, 3, unroll=2)]
# Triton's automatic warp specialization (documented for Blackwell; Triton 3.6 has a Hopper pass): timed
# config by config only, as it may not compile
WARP_SPECIALIZED = [_config(128, 128, 8, 3, ws=True), _config(128, 128, 4, 3, ws=True),
                    _config(64, 128, 4, 3, ws=True)]


@triton.jit
def _tile_of(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of C for program pid: programs go in groups of GROUP_M row tiles, so
    that neighbours share B's tiles in L2."""
    tiles_m, tiles_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    width = GROUP_M * tiles_n
    first_m = (pid // width) * GROUP_M
    group = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % width) % group, (pid % width) // group


@triton.jit
def _slice(a_desc, b_desc, sa_ptrs, sb_ptrs, rm, rn, M, N, K, k0, sa_kb, sb_kb, BM: tl.constexpr,
           BN: tl.constexpr, BK: tl.constexpr, pid_m, pid_n):
    """The product of one 128-wide slice of K and its scales' outer product (zero past K)."""
    kb = k0 // BK
    a = a_desc.load([pid_m * BM, k0])
    b = b_desc.load([pid_n * BN, k0])
    sa = tl.load(sa_ptrs + kb * sa_kb, mask=(rm < M) & (k0 < K), other=0.0)
    sb = tl.load(sb_ptrs + kb * sb_kb, mask=(rn < N) & (k0 < K), other=0.0)
    return tl.dot(a, b.T), sa[:, None] * sb[None, :]


@triton.autotune(configs=CONFIGS, key=["M", "N", "K", "B_GROUP"])
@triton.jit
def mm_blockwise_kernel(a_desc, b_desc, sa_ptr, sb_ptr, c_ptr, M, N, K, sa_kb, sa_m, sb_kb, sb_n,
                        B_GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        GROUP_M: tl.constexpr, UNROLL: tl.constexpr, WS: tl.constexpr):
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    sa_ptrs = sa_ptr + rm * sa_m
    sb_ptrs = sb_ptr + (rn // B_GROUP) * sb_n
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in tl.range(0, K, UNROLL * BK, warp_specialize=WS):
        p0, s0 = _slice(a_desc, b_desc, sa_ptrs, sb_ptrs, rm, rn, M, N, K, k0, sa_kb, sb_kb, BM, BN, BK,
                        pid_m, pid_n)
        if UNROLL == 2:
            p1, s1 = _slice(a_desc, b_desc, sa_ptrs, sb_ptrs, rm, rn, M, N, K, k0 + BK, sa_kb, sb_kb, BM, BN,
                            BK, pid_m, pid_n)
            acc += p0 * s0 + p1 * s1
        else:
            acc += p0 * s0
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


def mm_blockwise_nt(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor, *, b_block: bool,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """(qa * sa) @ (qb * sb)^T for FP8 codes qa (M, K), qb (N, K), K a multiple of 16 (TMA's alignment).

    sa: (M, ceil(K/128)) 1x128 scales of A, any strides (K-tile-major is the fast layout);
    sb: (N, ceil(K/128)) 1x128 scales of B, or with b_block (ceil(N/128), ceil(K/128)) 128x128 scales.
    """
    m, k = qa.shape
    n = qb.shape[0]
    assert qb.shape[1] == k and k % 16 == 0, (qa.shape, qb.shape)
    qa, qb = qa.contiguous(), qb.contiguous()
    c = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    box = [BLOCK_K, BLOCK_K]     # replaced per config by _set_boxes
    a_desc = TensorDescriptor(qa, list(qa.shape), list(qa.stride()), box)
    b_desc = TensorDescriptor(qb, list(qb.shape), list(qb.stride()), list(box))
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)   # noqa: E731
    mm_blockwise_kernel[grid](a_desc, b_desc, sa, sb, c, m, n, k, sa.stride(1), sa.stride(0), sb.stride(1),
                              sb.stride(0), B_GROUP=BLOCK_K if b_block else 1, BK=BLOCK_K)
    return c


@triton.autotune(configs=[c for c in CONFIGS if c.kwargs["UNROLL"] == 1], key=["M", "N", "K"])
@triton.jit
def _mm_one_scale_kernel(a_desc, b_desc, c_ptr, M, N, K, scale, BM: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, GROUP_M: tl.constexpr, UNROLL: tl.constexpr, WS: tl.constexpr):
    # the kernel above with one scale for the whole product: the tensor cores accumulate across K
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        acc = tl.dot(a_desc.load([pid_m * BM, k0]), b_desc.load([pid_n * BN, k0]).T, acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], (acc * scale).to(c_ptr.dtype.element_ty), mask=mask)


def mm_one_scale_nt(qa: torch.Tensor, qb: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """scale * qa @ qb^T: the ceiling of mm_blockwise_nt without its per-slice promotion."""
    m, k = qa.shape
    n = qb.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    a_desc = TensorDescriptor(qa, list(qa.shape), list(qa.stride()), [BLOCK_K, BLOCK_K])
    b_desc = TensorDescriptor(qb, list(qb.shape), list(qb.stride()), [BLOCK_K, BLOCK_K])
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)   # noqa: E731
    _mm_one_scale_kernel[grid](a_desc, b_desc, c, m, n, k, scale, BK=BLOCK_K)
    return c
