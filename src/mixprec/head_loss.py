"""Cross entropy on the output head's FP32 logits without the FP32 round trips (CUDA).

The precision table keeps the head's output and the loss in FP32. Computed op by op, that costs two
full FP32 passes over the (tokens x vocab) logits that torch.autocast's BF16 path does not pay: the
log_softmax writes an FP32 copy of the logits, its backward writes an FP32 gradient, and the head's
half GEMMs then need that gradient cast to half. When `F.cross_entropy` gets logits straight from a
bias-free head that `mp.prepare` set up, the loss is computed here instead: the forward reads the logits once
and keeps one log-sum-exp per row; the backward writes the logits' gradient once, in the GEMM's half
dtype, and runs the head's GEMMs itself. Same math, all of it in FP32 up to that final rounding.

Logits that cannot be traced to the head (a compiled model's: the head ran inside the graph) still
get the one-read forward; their gradient is FP32 there, as autograd requires for FP32 logits. Taken
only for the common case (2-D FP32 logits on CUDA, no class weights or label smoothing, reduction
mean or sum); everything else runs op by op as before.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU reference path needs no Triton
    triton = None


class HeadOutput:
    """What a head GEMM leaves on its logits for a fused loss: its inputs, and the logits' version."""

    def __init__(self, logits, x, weight, xh, wh):
        self.version = logits._version
        self.x, self.weight, self.xh, self.wh = x, weight, xh, wh


# Off: F.cross_entropy always runs op by op (for debugging, and for traces of aten ops, which cannot see
# inside the Triton kernels).
ENABLED = True
# The latest head output, held weakly: what it needs lives on the logits and dies with them.
_last_logits = lambda: None  # noqa: E731


def remember_head(logits, x, weight, xh, wh) -> None:
    global _last_logits
    logits._mixprec_head = HeadOutput(logits, x, weight, xh, wh)
    _last_logits = weakref.ref(logits)


def _head_of(logits: torch.Tensor) -> HeadOutput | None:
    """The head output `logits` is a plain reshape of, unchanged since the GEMM wrote it, or None."""
    out = _last_logits()
    if (out is None or logits.dim() != 2 or not logits.is_contiguous() or logits.numel() != out.numel()
            or logits.untyped_storage().data_ptr() != out.untyped_storage().data_ptr()
            or logits.storage_offset() != out.storage_offset() or out._version != out._mixprec_head.version):
        return None
    return out._mixprec_head


def fused_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                        reduction="mean", label_smoothing=0.0):
    """F.cross_entropy's result through the head-fused path, or None where it does not apply."""
    if (weight is not None or size_average is not None or reduce is not None or label_smoothing != 0.0
            or reduction not in ("mean", "sum") or not input.is_cuda or triton is None
            or input.dtype != torch.float32 or not input.requires_grad or torch.compiler.is_compiling()
            or target.dim() != 1 or target.dtype != torch.int64):
        return None
    head = _head_of(input)
    if head is None or head.xh.shape[0] != input.shape[0]:
        return _CrossEntropy.apply(input, target, ignore_index, reduction)
    return _HeadCrossEntropy.apply(head.x, head.weight, input.detach(), target, head.xh, head.wh,
                                   ignore_index, reduction)


def _reduce(row_loss, target, ignore_index, reduction):
    valid = (target != ignore_index).sum()
    loss = row_loss.sum()
    # mean: 0/0 = nan with every target ignored, as F.cross_entropy gives
    return (loss / valid if reduction == "mean" else loss), valid


class _CrossEntropy(torch.autograd.Function):
    """CE(logits, target) for FP32 logits of unknown origin: one read forward, FP32 gradient."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction):
        lse, row_loss = row_logsumexp_loss(logits, target, ignore_index)
        loss, valid = _reduce(row_loss, target, ignore_index, reduction)
        ctx.save_for_backward(logits, lse, target, valid)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, target, valid = ctx.saved_tensors
        row_grad = grad_loss.float() / valid if ctx.reduction == "mean" else grad_loss.float()
        return softmax_grad(logits, lse, target, row_grad, ctx.ignore_index, torch.float32), None, None, None


class _HeadCrossEntropy(torch.autograd.Function):
    """loss(x, W) = CE(logits, target) with logits = x_h W_h^T given (FP32); gradients to x and W."""

    @staticmethod
    def forward(ctx, x, weight, logits, target, xh, wh, ignore_index, reduction):
        lse, row_loss = row_logsumexp_loss(logits, target, ignore_index)
        loss, valid = _reduce(row_loss, target, ignore_index, reduction)
        ctx.save_for_backward(logits, lse, target, xh, wh, valid)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        ctx.x_dtype, ctx.w_dtype, ctx.x_shape = x.dtype, weight.dtype, x.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, target, xh, wh, valid = ctx.saved_tensors
        row_grad = grad_loss.float() / valid if ctx.reduction == "mean" else grad_loss.float()
        gh = softmax_grad(logits, lse, target, row_grad, ctx.ignore_index, xh.dtype)
        grad_x = grad_w = None
        with torch.autocast(gh.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = (gh @ wh).to(ctx.x_dtype).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:  # FP32 accumulation and output: the master gradient
                grad_w = torch.mm(gh.t(), xh, out_dtype=torch.float32) if gh.is_cuda else gh.t().float() @ xh.float()
                grad_w = grad_w.to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None, None, None, None


def row_logsumexp_loss(logits, target, ignore_index):
    """Per row: log-sum-exp of the logits and the loss lse - logit[target] (0 where ignored)."""
    if logits.is_cuda and triton is not None:
        return _triton_forward(logits, target, ignore_index)
    return reference_forward(logits, target, ignore_index)


def softmax_grad(logits, lse, target, row_grad, ignore_index, out_dtype):
    """(softmax(logits) - onehot(target)) * row_grad, rows with an ignored target zero, in out_dtype."""
    if logits.is_cuda and triton is not None:
        return _triton_backward(logits, lse, target, row_grad, ignore_index, out_dtype)
    return reference_backward(logits, lse, target, row_grad, ignore_index, out_dtype)


def reference_forward(logits, target, ignore_index):
    lse = torch.logsumexp(logits.float(), dim=-1)
    keep = target != ignore_index
    picked = logits.float().gather(1, torch.where(keep, target, 0)[:, None])[:, 0]
    return lse, torch.where(keep, lse - picked, 0.0)


def reference_backward(logits, lse, target, row_grad, ignore_index, out_dtype):
    keep = target != ignore_index
    grad = torch.exp(logits.float() - lse[:, None])
    grad.scatter_add_(1, torch.where(keep, target, 0)[:, None], -torch.ones_like(lse)[:, None])
    return (grad * torch.where(keep, row_grad, 0.0)[:, None]).to(out_dtype)


if triton is not None:
    @triton.jit
    def _forward_kernel(logits_ptr, target_ptr, lse_ptr, loss_ptr, n_cols: tl.constexpr, stride, ignore_index,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        running_max = tl.full([BLOCK], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):  # online softmax: one read of the row
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf"))
            new_max = tl.maximum(running_max, x)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - safe) + tl.exp(x - safe)
            running_max = new_max
        row_max = tl.max(running_max, 0)
        total = tl.sum(running_sum * tl.exp(running_max - row_max), 0)
        lse = row_max + tl.log(total)
        target = tl.load(target_ptr + row)
        keep = target != ignore_index
        picked = tl.load(base + tl.where(keep, target, 0))
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(keep, lse - picked, 0.0))

    @triton.jit
    def _backward_kernel(logits_ptr, lse_ptr, target_ptr, row_grad_ptr, grad_ptr, n_cols: tl.constexpr, stride,
                         grad_stride, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(target_ptr + row)
        keep = target != ignore_index
        scale = tl.where(keep, tl.load(row_grad_ptr), 0.0)
        lse = tl.load(lse_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x = tl.load(logits_ptr + row * stride + cols, mask=inside, other=0.0)
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(grad_ptr + row * grad_stride + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=inside)

    def _triton_forward(logits, target, ignore_index):
        rows, cols = logits.shape
        lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
        loss = torch.empty_like(lse)
        _forward_kernel[(rows,)](logits, target, lse, loss, cols, logits.stride(0), ignore_index,
                                 BLOCK=4096, num_warps=16)
        return lse, loss

    def _triton_backward(logits, lse, target, row_grad, ignore_index, out_dtype):
        rows, cols = logits.shape
        grad = torch.empty(rows, cols, device=logits.device, dtype=out_dtype)
        _backward_kernel[(rows,)](logits, lse, target, row_grad.reshape(1), grad, cols, logits.stride(0),
                                  grad.stride(0), ignore_index, BLOCK=4096, num_warps=16)
        return grad

