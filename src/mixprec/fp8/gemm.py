"""The FP8 GEMM every Float8Linear product reduces to: A @ B^T with both operands quantized along K.

A is (M, K) and B is (N, K), both row-major with K contiguous, each with a scale of one of the
granularities of mixprec.fp8.quantize taken along K (tensorwise, rowwise, 1x128, 128x128). This is
the layout torch._scaled_mm wants (a row-major, b = B.t() column-major), so the three GEMMs of a
linear layer are

    forward   y  = x   @ W^T   mm_nt(x,    W)      x: (M, K), W: (N, K)
    dgrad     dx = dy  @ W     mm_nt(dy,   W^T)    W^T stored (K, N)
    wgrad     dW = dy^T @ x    mm_nt(dy^T, x^T)    dy^T stored (N, M), x^T stored (K, M)

Scale layouts torch._scaled_mm accepts (torch 2.11 with CUDA 13; it refuses 128x128 x 128x128):
tensorwise x tensorwise, rowwise x rowwise, 1x128 x 128x128, 128x128 x 1x128, 1x128 x 1x128. The
1x128 scales are passed outer-dim-major (the (M, K/128) scale of A with strides (1, M)); 128x128
scales row-major with the count of K tiles a multiple of 4 (cuBLAS pads its scale rows to 4), so K is
zero-padded to 512 when a 128x128 operand takes part (tests/test_fp8_gemm.py checks the layouts).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mixprec.fp8.quantize import dequantize

_BLOCKWISE = ("1x128", "128x128")


class Operand(NamedTuple):
    """An FP8 GEMM operand: codes (R, K), its scale along K, and the scale's granularity."""

    q: torch.Tensor
    scale: torch.Tensor
    granularity: str


def mm_nt(a: Operand, b: Operand, *, out_dtype: torch.dtype, backend: str, fast_accum: bool = False,
          block_size: int = 128) -> torch.Tensor:
    """(a.q * a.scale) @ (b.q * b.scale)^T in `out_dtype`, on the "emulate" or "cublas"/"triton" backend.

    fast_accum: let the tensor cores accumulate without periodic FP32 promotion (faster, less exact;
    torch._scaled_mm's use_fast_accum). Ignored by emulate, which accumulates in FP32.
    """
    if backend == "emulate":
        a_hat = dequantize(a.q, a.scale, block_size=block_size)
        b_hat = dequantize(b.q, b.scale, block_size=block_size)
        return (a_hat @ b_hat.t()).to(out_dtype)
    return _scaled_mm_nt(a, b, out_dtype, fast_accum, block_size)


def _pad_k(q: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the codes along K to a multiple (zeros add nothing to the dot products)."""
    k = q.shape[1]
    if k % multiple == 0:
        return q
    # constant padding has no FP8 kernel: pad the bytes (0x00 is +0.0 in both FP8 formats)
    return F.pad(q.view(torch.uint8), (0, multiple - k % multiple)).view(q.dtype)


def _scaled_mm_nt(a: Operand, b: Operand, out_dtype: torch.dtype, fast_accum: bool, block: int) -> torch.Tensor:
    n = b.q.shape[0]
    if n % 16 or a.q.shape[1] != b.q.shape[1]:
        raise ValueError(f"FP8 GEMMs need B's rows (the output features) divisible by 16 and matching K; got "
                         f"A {tuple(a.q.shape)}, B {tuple(b.q.shape)}; use backend='emulate' for such shapes")
    blockwise = a.granularity in _BLOCKWISE
    if blockwise and block != 128:
        raise ValueError(f"torch._scaled_mm scales blocks of 128; got block_size {block}; use backend='emulate'")
    # cuBLASLt needs K % 16. Blockwise scales cover whole 128-wide tiles of K, and with a 128x128 operand
    # cuBLAS wants the count of K tiles a multiple of 4 (its scale rows are padded to 4; PyTorch checks
    # that stride), so K is padded to 512 there: zero codes add nothing, their padded scales are 1.
    multiple = 16 if not blockwise else 4 * block if "128x128" in (a.granularity, b.granularity) else block
    qa, qb = _pad_k(a.q.contiguous(), multiple), _pad_k(b.q.contiguous(), multiple)
    k_tiles = qa.shape[1] // block
    sa, sb = _scale_layout(a, is_b=False, k_tiles=k_tiles), _scale_layout(b, is_b=True, k_tiles=k_tiles)
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype, use_fast_accum=fast_accum)


def _scale_layout(op: Operand, *, is_b: bool, k_tiles: int) -> torch.Tensor:
    """The scale in the shape and strides torch._scaled_mm checks (for b it checks scale_b.t()).

    k_tiles: blockwise scales get columns of 1.0 up to this many tiles of (padded) K.
    """
    s, g = op.scale.float(), op.granularity
    if g == "tensorwise":
        return s.reshape(())
    if g == "rowwise":
        return s.reshape(1, -1) if is_b else s.reshape(-1, 1).contiguous()
    if g in _BLOCKWISE and s.shape[1] < k_tiles:
        s = F.pad(s, (0, k_tiles - s.shape[1]), value=1.0)
    if g == "1x128":
        # outer-dim-major: the (R, K/128) scale has strides (1, R), i.e. it is the transpose of a
        # contiguous (K/128, R) tensor; b passes that contiguous tensor itself
        st = s.t().contiguous()
        return st if is_b else st.t()
    if g == "128x128":
        s = s.contiguous()
        return s.t() if is_b else s
    raise ValueError(f"Unknown granularity {g!r} for an FP8 GEMM operand")
