"""GLM-130B's embedding gradient shrink.

GLM-130B (Zeng et al., 2022) found most loss spikes began in the embedding layer's gradient and shrank it:
y = y * a + y.detach() * (1 - a) on the embedding output (a = 0.1), which scales the gradient reaching the
embedding by a and changes nothing else. Here the forward is the identity itself (that sum rounds y in FP32:
y*a + y*(1-a) need not equal y bit for bit), and the backward multiplies the incoming gradient by a.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from mixprec._tensors import is_logical_fp16, map_tensors, mark


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times alpha backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.alpha, None


def scale_grad(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x unchanged in the forward pass; its gradient multiplied by alpha in the backward pass."""
    if not x.requires_grad:
        return x
    y = _ScaleGrad.apply(x, alpha)
    return mark(y) if is_logical_fp16(x) else y   # an emulated-FP16 value stays one


def shrink_embedding_grad(module: nn.Module, alpha: float = 0.1) -> RemovableHandle:
    """Scale the gradient flowing into `module` (an embedding) by alpha, leaving its output and every other
    gradient unchanged (GLM-130B: alpha = 0.1). A forward hook on the module; returns its handle
    (`handle.remove()` undoes it). Works under torch.compile (an autograd.Function, traced without a break).

        handle = mp.shrink_embedding_grad(model.tok_emb, alpha=0.1)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"shrink_embedding_grad takes an nn.Module (the embedding); got {type(module).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 < alpha <= 1) or math.isnan(alpha):
        raise ValueError(f"alpha must be in (0, 1] (GLM-130B used 0.1; 1 changes nothing); got {alpha!r}")
    alpha = float(alpha)

    def hook(mod: nn.Module, args, output):
        return map_tensors(lambda t: scale_grad(t, alpha), output)

    return module.register_forward_hook(hook)
