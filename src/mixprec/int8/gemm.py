"""The INT8 GEMM every Int8Linear product reduces to: A @ B^T with both operands quantized along K.

A is (M, K) and B is (N, K), K last, each with a rowwise ((rows, 1)) or tensorwise (()) FP32 scale.
The three GEMMs of a linear layer y = x W^T, with x (M, K), W (N, K), dy (M, N):

    output       y  = x    @ W^T     mm_nt(x,    W)       scaled along K (in_features)
    grad_input   dx = dy   @ W       mm_nt(dy,   W^T)     scaled along N (out_features)
    grad_weight  dW = dy^T @ x       mm_nt(dy^T, x^T)     scaled along M (tokens)

The definition, which every backend computes bit for bit (the GPU kernel's, torch._int_mm's):

    acc = sum_k qa[i, k] * qb[j, k]           exactly, in int32 (|acc| <= 127**2 * K < 2**31: K <= MAX_K)
    out = (float32(acc) * sa[i]) * sb[j]      FP32, round to nearest even at each step, in this order
    out = out.to(out_dtype)

`accumulate` returns float32(acc); `mm_nt` applies the scales.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mixprec.int8.quantize import QMAX

# int32 accumulation cannot overflow while 127**2 * K < 2**31 (codes are symmetric, |q| <= 127)
MAX_K = (2 ** 31 - 1) // QMAX ** 2
# FP32 sums of at most this many products of codes (|q| <= 128, so |product| <= 2**14) stay integers of
# magnitude <= 2**24, all exact in FP32 whatever the summation order, FMA or blocking of the GEMM
EXACT_FP32_TERMS = 1024
_CODE_DTYPES = (torch.int8, torch.float32)


class Operand(NamedTuple):
    """An INT8 GEMM operand: codes (R, K) and their FP32 scale along K, shape (R, 1) or ().

    The codes are int8, or FP32 holding the same integers (quantize.float_codes: what emulate reads)."""

    q: torch.Tensor
    scale: torch.Tensor


def accumulate(a: torch.Tensor, b: torch.Tensor, *, backend: str) -> torch.Tensor:
    """float32(a @ b^T accumulated exactly in int32): a (M, K) and b (N, K) codes -> (M, N) FP32.

    The codes are int8, or FP32 tensors holding integers in [-128, 127] (quantize.float_codes).

    emulate: FP32 GEMMs of the codes over chunks of EXACT_FP32_TERMS along K (exact: see above; also
    under TF32 or BF16 "fast FP32" GEMM modes, which keep 8-bit codes and their FP32 sums exact), the
    chunks summed in float64 (exact below 2**53), then rounded to FP32 once, as int32 -> FP32 rounds.
    int_mm: torch._int_mm on zero-padded operands (see _int_mm_nt).
    """
    if a.dtype not in _CODE_DTYPES or b.dtype not in _CODE_DTYPES:
        raise TypeError(f"accumulate takes INT8 codes (int8, or FP32 integers); got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"accumulate takes a (M, K) and b (N, K); got {tuple(a.shape)} and {tuple(b.shape)}")
    k = a.shape[1]
    _check_k(k)
    if backend == "int_mm":
        return _int_mm_nt(a.to(torch.int8), b.to(torch.int8)).float()
    if backend != "emulate":
        raise ValueError(f"Unknown INT8 backend {backend!r}; choose one of: emulate, int_mm")
    af, bf = a.float(), b.float()
    if k <= EXACT_FP32_TERMS:
        return af @ bf.t()
    acc = None
    for start in range(0, k, EXACT_FP32_TERMS):
        part = (af[:, start:start + EXACT_FP32_TERMS] @ bf[:, start:start + EXACT_FP32_TERMS].t()).double()
        acc = part if acc is None else acc.add_(part)
    return acc.float()


def _check_k(k: int) -> None:
    if k > MAX_K:
        raise ValueError(f"an INT8 GEMM over K = {k} terms could overflow its int32 accumulator "
                         f"(127**2 * K >= 2**31 past K = {MAX_K}); keep this layer in high precision")


def _int_mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T in int32 through torch._int_mm, whose rules (M > 16, K and N multiples of 8) are met by
    zero padding: zero rows and columns add nothing, and the padding is sliced off the result.
    a is passed row-major and b column-major (b^T of a contiguous (N, K)): cuBLASLt's INT8 layout."""
    m, k = a.shape
    n = b.shape[0]
    pad_k = -k % 8
    pad_m = max(17 - m, 0)
    pad_n = -n % 8
    a = a.contiguous()
    b = b.contiguous()
    if pad_k or pad_m:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_k, 0, pad_n))
    out = torch._int_mm(a, b.t())
    return out[:m, :n] if (pad_m or pad_n) else out


def mm_nt(a: Operand, b: Operand, *, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """(a.q * a.scale) @ (b.q * b.scale)^T in `out_dtype`, computed as the module docstring defines.

    backend: "emulate" or "int_mm" (accumulate, then the scaling in PyTorch ops), or "triton" (one
    kernel that scales before it writes; int8 codes only)."""
    if backend == "triton":
        from mixprec.int8 import _kernels   # imports triton: only where that backend runs

        _check_k(a.q.shape[1])
        return _kernels.int8_mm_nt(a.q, b.q, a.scale, b.scale, out_dtype)
    acc = accumulate(a.q, b.q, backend=backend)
    sb = b.scale.reshape(1, -1) if b.scale.dim() else b.scale
    return (acc * a.scale * sb).to(out_dtype)
