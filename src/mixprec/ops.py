"""Ops that autocast cannot place by itself: hand-written attention, the output head's GEMM, the loss."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mixprec import emulation, head_loss
from mixprec.context import logical_dtype, to_fp32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              mask: torch.Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
              training: bool = True) -> torch.Tensor:
    """softmax(q @ k^T * scale + mask) @ v with the scores, the softmax and scores@V in FP32.

    For hand-written attention (the precision table's row: scores@V and its softmax in FP32, to avoid
    overflow and error accumulation in large models). q, k, v: (..., T, head_dim); `mask` is a boolean
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
    if out_dtype == torch.float16 and emulation.is_logical_fp16(q):
        return emulation.to_fp16_values(out)
    return out.to(out_dtype)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.cross_entropy with the table's loss row applied: FP32 input and compute.

    What mp.autocast's function mode makes of F.cross_entropy, also where the mode does not run
    (op_rules="autocast", or outside mp.autocast): logits straight from a head mp.prepare set up take
    mixprec.head_loss's fused path on CUDA, everything else F.cross_entropy on FP32 values.
    """
    if input.is_cuda and head_loss.ENABLED:
        fused = head_loss.fused_cross_entropy(input, target, **kwargs)
        if fused is not None:
            return fused
    with torch.autocast(input.device.type, enabled=False):
        return F.cross_entropy(to_fp32(input), target, **kwargs)


def _gemm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b for half inputs with FP32 accumulation, returned in out_dtype."""
    if a.is_cuda and out_dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)  # cuBLAS: half inputs, FP32 output, no rounding
    if a.is_cuda or (a.dtype == torch.bfloat16 and out_dtype == torch.bfloat16):
        return (a @ b).to(out_dtype)
    # CPU: half values are exact in FP32, so an FP32 GEMM is the half GEMM with an FP32 accumulator
    # (and avoids PyTorch's slow FP16 CPU kernels).
    return (a.float() @ b.float()).to(out_dtype)


class _HalfInputsFP32Output(torch.autograd.Function):
    """y = x W^T + b with x, W rounded to the compute dtype, FP32 accumulation and an FP32 result.

    The output head's rule: its weights stay FP32 (master copy), its GEMM runs at half speed, and
    the logits are not rounded to half before the loss's exp.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, xh, wh):
        with torch.autocast(x.device.type, enabled=False):
            out = _gemm(xh, wh.t(), torch.float32)
            if bias is not None:
                out = out + bias.float()
        ctx.save_for_backward(xh, wh)
        ctx.has_bias = bias is not None
        ctx.x_dtype, ctx.w_dtype, ctx.x_shape = x.dtype, weight.dtype, x.shape
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xh, wh = ctx.saved_tensors
        g32 = grad.reshape(-1, grad.shape[-1])
        gh = g32.to(xh.dtype)
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = _gemm(gh, wh, xh.dtype).to(ctx.x_dtype).reshape(ctx.x_shape)  # a half activation gradient
            grad_w = _gemm(gh.t(), xh, torch.float32).to(ctx.w_dtype)  # FP32 master gradient
            grad_b = g32.float().sum(0).to(ctx.w_dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None


def linear_fp32_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       compute_dtype: torch.dtype) -> torch.Tensor:
    """A Linear whose GEMM inputs are half and whose accumulation and output are FP32."""
    # With autocast off, mp.autocast's mode leaves these casts alone: real half tensors, also when FP16
    # is emulated, so that the backward's half GEMMs see half gradients.
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        xh = x.reshape(-1, x.shape[-1]).to(compute_dtype)
        wh = weight.to(compute_dtype)
    logits = _HalfInputsFP32Output.apply(x, weight, bias, xh, wh)
    if bias is None and not torch.compiler.is_compiling():  # see mixprec.head_loss
        head_loss.remember_head(logits, x, weight, xh, wh)
    return logits
