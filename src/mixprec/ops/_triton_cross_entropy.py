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
    def _forward_kernel(logits_ptr, target_ptr, lse_ptr, loss_ptr, n_cols: tl.constexpr, stride, ignore_index,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        lse = _row_logsumexp(base, n_cols, BLOCK)
        target = tl.load(target_ptr + row)
        keep = target != ignore_index
        picked = tl.load(base + tl.where(keep, target, 0))
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(keep, lse - picked, 0.0))

    @triton.jit
    def _loss_and_grad_kernel(logits_ptr, target_ptr, loss_ptr, grad_ptr, n_cols: tl.constexpr, stride,
                              grad_stride, ignore_index, BLOCK: tl.constexpr):
        # The forward and backward kernels in one program per row: the second read of the row comes
        # mostly from L2 instead of a second pass over all logits in memory.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        lse = _row_logsumexp(base, n_cols, BLOCK)
        target = tl.load(target_ptr + row)
        keep = target != ignore_index
        picked = tl.load(base + tl.where(keep, target, 0))
        tl.store(loss_ptr + row, tl.where(keep, lse - picked, 0.0))
        scale = tl.where(keep, 1.0, 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x = tl.load(base + cols, mask=inside, other=0.0)
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(grad_ptr + row * grad_stride + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _backward_kernel(logits_ptr, lse_ptr, target_ptr, row_grad_ptr, row_grad_stride, grad_ptr,
                         n_cols: tl.constexpr, stride, grad_stride, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(target_ptr + row)
        keep = target != ignore_index
        scale = tl.where(keep, tl.load(row_grad_ptr + row * row_grad_stride), 0.0)
        lse = tl.load(lse_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x = tl.load(logits_ptr + row * stride + cols, mask=inside, other=0.0)
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(grad_ptr + row * grad_stride + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=inside)

    def forward(logits, target, ignore_index):
        rows, cols = logits.shape
        lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
        loss = torch.empty_like(lse)
        _forward_kernel[(rows,)](logits, target, lse, loss, cols, logits.stride(0), ignore_index,
                                 BLOCK=4096, num_warps=16)
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
        rows, cols = logits.shape
        loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
        grad = torch.empty(rows, cols, device=logits.device, dtype=out_dtype)
        _loss_and_grad_kernel[(rows,)](logits, target, loss, grad, cols, logits.stride(0), grad.stride(0),
                                       ignore_index, BLOCK=4096, num_warps=16)
        return loss, grad
