"""Hand-written attention with the precision table's row applied: scores, softmax and scores@V in FP32."""
from __future__ import annotations

import math

import torch

from mixprec._tensors import is_logical_fp16, logical_dtype, to_fp16_values, to_fp32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              mask: torch.Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
              training: bool = True) -> torch.Tensor:
    """softmax(q @ k^T * scale + mask) @ v with the scores, the softmax and scores@V in FP32.

    For hand-written attention (the table's row: scores@V and its softmax in FP32, to avoid overflow
    and error accumulation in large models). q, k, v: (..., T, head_dim); `mask` is a boolean
    (True = attend) or additive float mask broadcastable to (..., Tq, Tk). The result returns in the
    inputs' dtype. Fused SDPA/flash kernels keep the softmax and the accumulation in FP32 on chip and
    are the fast alternative; this is the explicit path, and the reference for it.
    """
    out_dtype = logical_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        q32, k32, v32 = to_fp32(q), to_fp32(k), to_fp32(v)
        scores = (q32 @ k32.transpose(-2, -1)) * scale
        if causal:
            tq, tk = scores.shape[-2], scores.shape[-1]
            keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
            scores = scores.masked_fill(~keep, float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0 and training:
            probs = torch.nn.functional.dropout(probs, p=dropout_p)
        out = probs @ v32
    if out_dtype == torch.float16 and is_logical_fp16(q):
        return to_fp16_values(out)
    return out.to(out_dtype)
