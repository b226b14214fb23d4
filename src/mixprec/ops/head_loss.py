"""The output head and the loss, as the precision table wants them: half GEMM inputs, FP32 logits and loss.

    logits = linear_fp32_output(x, W, b, dtype)    x, W rounded to dtype; FP32 accumulation and output
    loss = cross_entropy(logits, target)           F.cross_entropy on FP32 values (one read of the logits
                                                   on CUDA, with Triton)
    loss = head_cross_entropy(x, head, target)     both at once, without the FP32 round trips:

Computed op by op, the FP32 head and loss cost two full FP32 passes over the (tokens x vocab) logits
that a BF16 head does not pay: the loss's backward writes an FP32 gradient of the logits, and the
head's half GEMMs need it cast to half. `head_cross_entropy` is one autograd function: its forward
runs the head GEMM and keeps one log-sum-exp per row; its backward writes the logits' gradient once,
in the GEMM's half dtype, and runs the head's two GEMMs (one backward per GEMM). Same math, all of
it in FP32 up to that final rounding.

With `chunk_rows`, the forward takes the rows a chunk at a time and computes the gradients right away
(the backward only scales them by the incoming gradient): at most one chunk of FP32 logits exists at a
time and none is kept, so the (tokens x vocab) logits cost no memory at all. The logits' gradient is
taken unnormalised (softmax - onehot, in [-1, 1]) so that it does not underflow in FP16; the weight
and input gradients accumulate in FP32 and are scaled in FP32 in the backward.

The fused gradients come from kernels that record no graph. Where a backward must build one
(create_graph=True: gradient penalties, Hessian-vector products), the functions recompute their gradients
with ops autograd can differentiate, from the same half operands; `chunk_rows`, which keeps no operands for
the backward, raises there rather than leave the second-order terms out.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixprec._tensors import to_fp32

_HALF = (torch.float16, torch.bfloat16)


def _gemm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b for half inputs with FP32 accumulation, returned in out_dtype."""
    if a.is_cuda and out_dtype == torch.float32 and a.dtype in _HALF:
        return torch.mm(a, b, out_dtype=torch.float32)  # cuBLAS: half inputs, FP32 output, no rounding
    if a.is_cuda or (a.dtype == torch.bfloat16 and out_dtype == torch.bfloat16):
        return (a @ b).to(out_dtype)
    # CPU: half values are exact in FP32, so an FP32 GEMM is the half GEMM with an FP32 accumulator
    # (and avoids PyTorch's slow FP16 CPU kernels).
    return (a.float() @ b.float()).to(out_dtype)


def _gemm_accumulate(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """total += a @ b in FP32 (a @ b where total is None); on CUDA cuBLAS adds onto total inside the GEMM
    (in place: out of place, addmm first copies total into its result)."""
    if total is None:
        return _gemm(a, b, torch.float32)
    if a.is_cuda and a.dtype in _HALF:
        return torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    return total.add_(_gemm(a, b, torch.float32))


def _half_operands(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype):
    # Autocast off: real half tensors, also when FP16 is emulated, so the backward's GEMMs see half values.
    # The casts keep their graph (the functions return no gradient for them) for a create_graph backward.
    with torch.autocast(x.device.type, enabled=False):
        return x.reshape(-1, x.shape[-1]).to(dtype), weight.to(dtype)


def _graph_gradients(loss_of_fp32, grad, xh, wh, bias, ctx):
    """The gradients to x, W and b for a backward with create_graph=True: the same FP32 math on the saved
    half operands, by ops autograd can differentiate again (the kernels' gradients carry no graph)."""
    def differentiable(t):   # FP32, with a graph (a leaf of its own where t has none: a frozen input)
        t = t.float()
        return t if t.requires_grad else t.detach().requires_grad_()
    with torch.autocast(xh.device.type, enabled=False):
        xf, wf = differentiable(xh), differentiable(wh)
        bf = differentiable(bias) if bias is not None else None
        wrt = [xf, wf] if bf is None else [xf, wf, bf]
        grads = torch.autograd.grad(loss_of_fp32(xf, wf, bf), wrt, grad, create_graph=True)
    wanted = ctx.needs_input_grad
    grad_x = grads[0].to(ctx.x_dtype).reshape(ctx.x_shape) if wanted[0] else None
    grad_w = grads[1].to(ctx.w_dtype) if wanted[1] else None
    grad_b = grads[2].to(ctx.w_dtype) if bias is not None and wanted[2] else None
    return grad_x, grad_w, grad_b


class _HalfInputsFP32Output(torch.autograd.Function):
    """y = x W^T + b with x, W rounded to the compute dtype, FP32 accumulation and an FP32 result."""

    @staticmethod
    def forward(ctx, x, weight, bias, xh, wh):
        with torch.autocast(x.device.type, enabled=False):
            out = _gemm(xh, wh.t(), torch.float32)
            if bias is not None:
                out = out + bias.float()
        ctx.save_for_backward(xh, wh, bias)
        ctx.x_dtype, ctx.w_dtype, ctx.x_shape = x.dtype, weight.dtype, x.shape
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xh, wh, bias = ctx.saved_tensors
        g32 = grad.reshape(-1, grad.shape[-1])
        if torch.is_grad_enabled():
            return *_graph_gradients(F.linear, g32, xh, wh, bias, ctx), None, None
        gh = g32.to(xh.dtype)
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = _gemm(gh, wh, xh.dtype).to(ctx.x_dtype).reshape(ctx.x_shape)  # a half activation gradient
            grad_w = _gemm(gh.t(), xh, torch.float32).to(ctx.w_dtype)  # FP32 master gradient
            grad_b = g32.float().sum(0).to(ctx.w_dtype) if bias is not None else None
        return grad_x, grad_w, grad_b, None, None


def linear_fp32_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       compute_dtype: torch.dtype) -> torch.Tensor:
    """The output head's rule: its weights stay FP32 (master copy), its GEMM runs at half speed, and the
    logits are not rounded to half before the loss's exp."""
    xh, wh = _half_operands(x, weight, compute_dtype)
    return _HalfInputsFP32Output.apply(x, weight, bias, xh, wh)


# ---- the loss on FP32 logits --------------------------------------------------------------------------
def _triton():
    """The Triton kernels, where they can run (imported on first use: importing mixprec imports no Triton)."""
    from mixprec.ops import _triton_cross_entropy
    return _triton_cross_entropy if _triton_cross_entropy.available() else None


def _kernels(logits):
    """The Triton kernels for these logits, or None for the PyTorch reference (any device but CUDA)."""
    return _triton() if logits.is_cuda else None


def row_logsumexp_loss(logits, target, ignore_index):
    """Per row: log-sum-exp of the logits and the loss lse - logit[target] (0 where ignored)."""
    kernels = _kernels(logits)
    if kernels is not None:
        return kernels.forward(logits, target, ignore_index)
    lse = torch.logsumexp(logits.float(), dim=-1)
    keep = target != ignore_index
    picked = logits.float().gather(1, torch.where(keep, target, 0)[:, None])[:, 0]
    return lse, torch.where(keep, lse - picked, 0.0)


def softmax_grad(logits, lse, target, row_grad, ignore_index, out_dtype):
    """(softmax(logits) - onehot(target)) * row_grad, rows with an ignored target zero, in out_dtype.
    row_grad: a 0-d tensor (one factor for every row) or one factor per row."""
    kernels = _kernels(logits)
    if kernels is not None:
        return kernels.backward(logits, lse, target, row_grad, ignore_index, out_dtype)
    keep = target != ignore_index
    grad = torch.exp(logits.float() - lse[:, None])
    grad.scatter_add_(1, torch.where(keep, target, 0)[:, None], -torch.ones_like(lse)[:, None])
    return (grad * torch.where(keep, row_grad, 0.0)[:, None]).to(out_dtype)


def row_loss_and_softmax_grad(logits, target, ignore_index, out_dtype):
    """row_logsumexp_loss's loss and softmax_grad's gradient for a factor of one, in one pass where fused."""
    kernels = _kernels(logits)
    if kernels is not None:
        return kernels.loss_and_grad(logits, target, ignore_index, out_dtype)
    lse, row_loss = row_logsumexp_loss(logits, target, ignore_index)
    return row_loss, softmax_grad(logits, lse, target, torch.ones((), device=logits.device), ignore_index, out_dtype)


def _reduce(row_loss, target, ignore_index, reduction):
    valid = (target != ignore_index).sum()
    loss = row_loss.sum()
    # mean: 0/0 = nan with every target ignored, as F.cross_entropy gives
    return (loss / valid if reduction == "mean" else loss), valid


def _row_grad(grad_loss, valid, reduction):
    return grad_loss.float() / valid if reduction == "mean" else grad_loss.float()


class _CrossEntropy(torch.autograd.Function):
    """CE(logits, target) for FP32 logits: one read forward, FP32 gradient."""

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
        if torch.is_grad_enabled():   # create_graph: the same gradient from ops autograd can differentiate
            with torch.autocast(logits.device.type, enabled=False):
                loss = F.cross_entropy(logits, target, ignore_index=ctx.ignore_index, reduction=ctx.reduction)
                return torch.autograd.grad(loss, logits, grad_loss, create_graph=True)[0], None, None, None
        grad = softmax_grad(logits, lse, target, _row_grad(grad_loss, valid, ctx.reduction), ctx.ignore_index,
                            torch.float32)
        return grad, None, None, None


def _simple_case(target, weight, size_average, reduce, reduction, label_smoothing) -> bool:
    """The cases the fused functions cover: class indices, no class weights or smoothing, mean or sum."""
    return (weight is None and size_average is None and reduce is None and label_smoothing == 0.0
            and reduction in ("mean", "sum") and target.dim() == 1 and target.dtype == torch.int64)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average=None, ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """F.cross_entropy with the table's loss row applied: FP32 input and compute.

    What mp.autocast makes of F.cross_entropy, also where its function mode does not run
    (op_rules="autocast", or outside mp.autocast). On CUDA with Triton, 2-D logits take a fused path
    that reads them once; everything else runs F.cross_entropy on FP32 values.
    """
    with torch.autocast(input.device.type, enabled=False):
        logits = to_fp32(input)
        if (input.dim() == 2 and logits.requires_grad and not torch.compiler.is_compiling()
                and _simple_case(target, weight, size_average, reduce, reduction, label_smoothing)
                and _kernels(logits) is not None):
            return _CrossEntropy.apply(logits, target, ignore_index, reduction)
        return F.cross_entropy(logits, target, weight, size_average, ignore_index, reduce, reduction,
                               label_smoothing)


class _HeadCrossEntropy(torch.autograd.Function):
    """loss(x, W, b) = CE(x_h W_h^T + b, target), logits in FP32; gradients to x, W and b."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, xh, wh, ignore_index, reduction):
        with torch.autocast(x.device.type, enabled=False):
            logits = _gemm(xh, wh.t(), torch.float32)
            if bias is not None:
                logits = logits + bias.float()
            lse, row_loss = row_logsumexp_loss(logits, target, ignore_index)
        loss, valid = _reduce(row_loss, target, ignore_index, reduction)
        ctx.save_for_backward(logits, lse, target, xh, wh, valid, bias)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        ctx.x_dtype, ctx.w_dtype, ctx.x_shape = x.dtype, weight.dtype, x.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, target, xh, wh, valid, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            def loss_of(xf, wf, bf):
                return F.cross_entropy(F.linear(xf, wf, bf), target, ignore_index=ctx.ignore_index,
                                       reduction=ctx.reduction)
            return *_graph_gradients(loss_of, grad_loss, xh, wh, bias, ctx), None, None, None, None, None
        row_grad = _row_grad(grad_loss, valid, ctx.reduction)
        grad_x = grad_w = grad_b = None
        if bias is not None:   # the bias gradient sums the FP32 logits' gradient (a bias head is rare: one FP32 copy)
            g32 = softmax_grad(logits, lse, target, row_grad, ctx.ignore_index, torch.float32)
            grad_b = g32.sum(0).to(ctx.w_dtype) if ctx.needs_input_grad[2] else None
            gh = g32.to(xh.dtype)
        else:   # the logits' gradient written once, in the GEMMs' half dtype (FP32 for an FP32 head)
            gh = softmax_grad(logits, lse, target, row_grad, ctx.ignore_index, xh.dtype)
        with torch.autocast(gh.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = _gemm(gh, wh, xh.dtype).to(ctx.x_dtype).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:   # FP32 accumulation and output: the master gradient
                grad_w = _gemm(gh.t(), xh, torch.float32).to(ctx.w_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """_HeadCrossEntropy with the gradients computed in the forward, `chunk_rows` rows at a time."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, xh, wh, ignore_index, reduction, chunk_rows):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        rows, dev = xh.shape[0], xh.device
        f32 = torch.float32
        grad_x = torch.empty(xh.shape, dtype=f32, device=dev) if need_x else None
        grad_w = None
        grad_b = torch.zeros(wh.shape[0], dtype=f32, device=dev) if need_b else None
        total = torch.zeros((), dtype=f32, device=dev)
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, rows, chunk_rows):
                xc, tc = xh[start:start + chunk_rows], target[start:start + chunk_rows]
                logits = _gemm(xc, wh.t(), f32)
                if bias is not None:
                    logits = logits + bias.float()
                if not (need_x or need_w or need_b):
                    total += row_logsumexp_loss(logits, tc, ignore_index)[1].sum()
                    continue
                row_loss, gh = row_loss_and_softmax_grad(logits, tc, ignore_index, f32 if need_b else xh.dtype)
                total += row_loss.sum()
                del logits
                if need_b:
                    grad_b += gh.sum(0)
                    gh = gh.to(xh.dtype)
                if need_x:
                    grad_x[start:start + chunk_rows] = _gemm(gh, wh, f32)
                if need_w:
                    grad_w = _gemm_accumulate(grad_w, gh.t(), xc)
        if need_w and grad_w is None:  # no rows
            grad_w = torch.zeros(wh.shape, dtype=f32, device=dev)
        valid = (target != ignore_index).sum()
        loss = total / valid if reduction == "mean" else total
        ctx.save_for_backward(grad_x, grad_w, grad_b, valid)
        ctx.reduction, ctx.x_dtype, ctx.w_dtype, ctx.x_shape = reduction, x.dtype, weight.dtype, x.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():   # the gradients were taken in the forward, without a graph
            raise RuntimeError("head_cross_entropy with chunk_rows has no second derivative (a backward with "
                               "create_graph=True); use chunk_rows=None there")
        grad_x, grad_w, grad_b, valid = ctx.saved_tensors
        coef = _row_grad(grad_loss, valid, ctx.reduction)   # FP32: dloss/dlogits = coef * (softmax - onehot)
        out_x = None
        if grad_x is not None:   # scaled and rounded to the activation dtype in one pass
            out_x = torch.mul(grad_x, coef, out=torch.empty_like(grad_x, dtype=ctx.x_dtype)).reshape(ctx.x_shape)
        out_w = (grad_w * coef).to(ctx.w_dtype) if grad_w is not None else None
        out_b = (grad_b * coef).to(ctx.w_dtype) if grad_b is not None else None
        return out_x, out_w, out_b, None, None, None, None, None, None


def head_cross_entropy(hidden: torch.Tensor, head: nn.Linear | torch.Tensor, target: torch.Tensor, *,
                       ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                       compute_dtype: torch.dtype | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """cross_entropy(head(hidden), target) with the output head's and the loss's rows of the table, fused.

    hidden: (..., d) activations before the head; head: an nn.Linear (or its weight, (vocab, d));
    target: class indices of hidden's leading shape. The head GEMM takes its inputs in `compute_dtype`
    (default: the autocast dtype of hidden's device when autocast is on, else hidden's dtype) and
    accumulates in FP32; logits, log-sum-exp and loss are FP32; the head's weight gradient comes out
    in FP32 accumulation. Label smoothing falls back to the op-by-op path (same precision).
    chunk_rows: compute the loss and its gradients this many rows at a time in the forward, keeping no
    logits (see the module docstring); the backward then only scales. None: one pass, the FP32 logits kept
    for the backward.
    """
    if isinstance(head, torch.Tensor):
        weight, bias = head, None
    elif isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor):
        weight, bias = head.weight, getattr(head, "bias", None)
    else:
        raise TypeError(f"head must be an nn.Linear or its weight tensor; got {type(head).__name__}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Unknown reduction {reduction!r}; choose one of: mean, sum")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden has {hidden.shape[-1]} features; the head takes {weight.shape[-1]}")
    if compute_dtype is None:
        device = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    flat_target = target.reshape(-1)
    if flat_target.numel() != hidden.numel() // hidden.shape[-1]:
        raise ValueError(f"target has {flat_target.numel()} entries for {hidden.numel() // hidden.shape[-1]} "
                         f"rows of hidden (shape {tuple(hidden.shape)})")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer or None; got {chunk_rows!r}")
    if label_smoothing != 0.0 or flat_target.dtype != torch.int64:
        logits = linear_fp32_output(hidden, weight, bias, compute_dtype)
        return cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_target, ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing)
    xh, wh = _half_operands(hidden, weight, compute_dtype)
    if chunk_rows is not None:
        return _ChunkedHeadCrossEntropy.apply(hidden, weight, bias, flat_target, xh, wh, ignore_index, reduction,
                                              chunk_rows)
    return _HeadCrossEntropy.apply(hidden, weight, bias, flat_target, xh, wh, ignore_index, reduction)
