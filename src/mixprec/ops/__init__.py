"""Explicit ops for what autocast cannot place by itself: hand-written attention, the output head and the loss.

    y = mp.ops.attention(q, k, v, causal=True)                      # FP32 scores, softmax and scores@V
    loss = mp.ops.head_cross_entropy(hidden, model.lm_head, target)  # FP32 head output and loss, fused
    loss = mp.ops.cross_entropy(logits, target)                      # FP32 loss on any logits
"""
import torch.nn.functional as F

from mixprec.ops.attention import attention
from mixprec.ops.head_loss import cross_entropy, head_cross_entropy, linear_fp32_output

__all__ = ["attention", "cross_entropy", "head_cross_entropy", "linear_fp32_output"]

# How mp.autocast runs a function whose table row says FP32, where mixprec has its own implementation.
FP32_IMPLEMENTATIONS = {F.cross_entropy: cross_entropy}
