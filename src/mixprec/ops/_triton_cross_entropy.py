"""Triton kernels of the FP32 cross entropy (mixprec.ops.head_loss): one read of the logits forward, one
write of their gradient backward. Imported only on CUDA; head_loss.py holds the reference they match."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # head_loss falls back to its PyTorch reference
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _row_logsumexp(base, n_cols: tl.constexpr, BLOCK: tl.constexpr):
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
        return row_max + tl.log(total)

    @triton.jit
    def _write_row_grad(base, grad_row, lse, target, scale, n_cols: tl.constexpr, BLOCK: tl.constexpr):
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x = tl.load(base + cols, mask=inside, other=0.0)
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(grad_row + cols, (g * scale).to(grad_row.dtype.element_ty), mask=inside)

    @triton.jit
    def _forward_kernel(logits_ptr, target_ptr, lse_ptr, loss_ptr, grad_ptr, n_cols: tl.constexpr, stride,
                        grad_stride, ignore_index, BLOCK: tl.constexpr, WITH_GRAD: tl.constexpr):
        # WITH_GRAD: also the gradient for a factor of one, in the same program, so that the row's second
        # read comes mostly from L2 instead of a second pass over all logits in memory.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        lse = _row_logsumexp(base, n_cols, BLOCK)
        target = tl.load(target_ptr + row)
        keep = target != ignore_index
        picked = tl.load(base + tl.where(keep, target, 0))
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(keep, lse - picked, 0.0))
        if WITH_GRAD:
            _write_row_grad(base, grad_ptr + row * grad_stride, lse, target, tl.where(keep, 1.0, 0.0), n_cols, BLOCK)

    @triton.jit
    def _backward_kernel(logits_ptr, lse_ptr, target_ptr, row_grad_ptr, row_grad_stride, grad_ptr,
                         n_cols: tl.constexpr, stride, grad_stride, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(target_ptr + row)
        keep = target != ignore_index
        scale = tl.where(keep, tl.load(row_grad_ptr + row * row_grad_stride), 0.0)
        _write_row_grad(logits_ptr + row * stride, grad_ptr + row * grad_stride, tl.load(lse_ptr + row), target,
                        scale, n_cols, BLOCK)

    def forward(logits, target, ignore_index):
        lse, loss, _ = _launch_forward(logits, target, ignore_index, None)
        return lse, loss

    def backward(logits, lse, target, row_grad, ignore_index, out_dtype):
        """row_grad: one factor for every row (one element) or one per row."""
        rows, cols = logits.shape
        row_grad = row_grad.reshape(-1)
        if row_grad.numel() not in (1, rows):
            raise ValueError(f"row_grad must hold 1 or {rows} (one per row) values; got {row_grad.numel()}")
        grad = torch.empty(rows, cols, device=logits.device, dtype=out_dtype)
        _backward_kernel[(rows,)](logits, lse, target, row_grad, 0 if row_grad.numel() == 1 else 1, grad, cols,
                                  logits.stride(0), grad.stride(0), ignore_index, BLOCK=4096, num_warps=16)
        return grad

    def loss_and_grad(logits, target, ignore_index, out_dtype):
        """forward's loss and backward's gradient for a factor of one, in one kernel."""
        _, loss, grad = _launch_forward(logits, target, ignore_index, out_dtype)
        return loss, grad

    def _launch_forward(logits, target, ignore_index, grad_dtype):
        rows, cols = logits.shape
        lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
        loss = torch.empty_like(lse)
        grad = None if grad_dtype is None else torch.empty(rows, cols, device=logits.device, dtype=grad_dtype)
        # without a gradient, lse stands in for grad_ptr: WITH_GRAD=False compiles the store away
        _forward_kernel[(rows,)](logits, target, lse, loss, lse if grad is None else grad, cols, logits.stride(0),
                                 0 if grad is None else grad.stride(0), ignore_index, BLOCK=4096, num_warps=16,
                                 WITH_GRAD=grad is not None)
        return lse, loss, grad
