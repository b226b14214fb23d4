"""A Triton INT8 GEMM that applies the dequantization scales in its epilogue.

    out[i, j] = ((float32(sum_k qa[i, k] * qb[j, k]) * sa[i]) * sb[j]).to(out_dtype)

the definition of mixprec.int8.gemm, computed in one kernel: the int32 accumulator never leaves the
registers, where torch._int_mm writes it (4 bytes per output element) for separate kernels to read back,
scale and cast. Each product is an IEEE FP32 multiply rounded to nearest even, in the definition's
order, and the cast to BF16/FP16 rounds to nearest even, so the result equals the emulation bit for bit
(tests/test_int8_kernels.py in Triton's interpreter, tests/test_int8_cuda.py on a GPU).

Both operands are K-major (a (M, K) and b (N, K), rows contiguous): the layout INT8 tensor-core
instructions read on Hopper (wgmma) and Ampere (mma), so neither is transposed on its way in.
The entry point is a torch.library op, so torch.compile keeps the kernel as an opaque call.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles for the GEMMs of a transformer's linear layers (M = tokens in the thousands, N and K in the
# thousands); autotuned once per (M, N, K), which repeat every step of training.
_GEMM_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in ((128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 4, 4),
                             (128, 128, 128, 8, 4), (128, 256, 64, 8, 4), (64, 128, 128, 4, 4))
]


@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _int8_mm_nt_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, c_ptr, M, N, K: tl.constexpr,
                       SA_ROWWISE: tl.constexpr, SB_ROWWISE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # K is a compile-time constant (a model has a handful): the trip count is known, and where BK divides
    # K the loads need no mask along it
    # grouped ordering: GROUP_M row tiles share each column tile of b while it is in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    a_tile = a_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
    b_tile = b_ptr + cols[None, :].to(tl.int64) * K + ks[:, None]      # b^T's (BK, BN) tile, K-major
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    for step in range(0, tl.cdiv(K, BK)):
        if K % BK == 0:   # the common case: no mask along K
            a = tl.load(a_tile, mask=rows[:, None] < M, other=0)
            b = tl.load(b_tile, mask=cols[None, :] < N, other=0)
        else:
            k_in = (step * BK + ks) < K
            a = tl.load(a_tile, mask=(rows[:, None] < M) & k_in[None, :], other=0)
            b = tl.load(b_tile, mask=k_in[:, None] & (cols[None, :] < N), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_tile += BK
        b_tile += BK

    if SA_ROWWISE:
        sa = tl.load(sa_ptr + rows, mask=rows < M, other=0.0)[:, None]
    else:
        sa = tl.load(sa_ptr)
    if SB_ROWWISE:
        sb = tl.load(sb_ptr + cols, mask=cols < N, other=0.0)[None, :]
    else:
        sb = tl.load(sb_ptr)
    out = (acc.to(tl.float32) * sa) * sb
    c_tile = c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(c_tile, out.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_LIB = torch.library.Library("mixprec", "FRAGMENT")
_LIB.define("int8_mm_nt(Tensor a, Tensor b, Tensor sa, Tensor sb, ScalarType out_dtype) -> Tensor")


def _int8_mm_nt(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"the Triton INT8 GEMM takes int8 codes, got {a.dtype} and {b.dtype}")
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"the Triton INT8 GEMM takes a (M, K) and b (N, K); got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    sa, sb = sa.float().contiguous(), sb.float().contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if out.numel() == 0 or k == 0:   # nothing to launch; an empty sum is zero
        return out.zero_()
    grid = lambda meta: (_cdiv(m, meta["BM"]) * _cdiv(n, meta["BN"]),)  # noqa: E731
    _int8_mm_nt_kernel[grid](a, b, sa, sb, out, m, n, k, SA_ROWWISE=sa.dim() > 0, SB_ROWWISE=sb.dim() > 0)
    return out


_LIB.impl("int8_mm_nt", _int8_mm_nt, "CompositeExplicitAutograd")
int8_mm_nt = torch.ops.mixprec.int8_mm_nt.default


@torch.library.register_fake("mixprec::int8_mm_nt")
def _(a, b, sa, sb, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)
