"""The output head and the loss (mixprec.ops.head_loss): the fused head_cross_entropy equals the op-by-op
FP32 path (head with FP32 output, then F.cross_entropy on FP32 logits), on the CPU and on CUDA."""
import pytest
import torch
import torch.nn.functional as F

import mixprec as mp
from mixprec.ops import head_loss
from helpers import relative_error
from tolerances import CHUNKED_HEAD_LOSS_GRAD_RTOL, FP32_ORDER_RTOL, GRADIENT_PENALTY_RTOL, HEAD_LOSS_GRAD_RTOL


def _head_and_loss(device, fused, reduction="mean", ignore_index=-100, dtype=torch.bfloat16, bias=False,
                   chunk_rows=None, scale=1.0):
    torch.manual_seed(0)
    x = (torch.randn(4, 16, 32, device=device) * 2).requires_grad_()
    head = torch.nn.Linear(32, 1000, bias=bias, device=device)
    target = torch.randint(0, 1000, (4, 16), device=device)
    target[:, ::7] = ignore_index
    if fused:
        loss = mp.ops.head_cross_entropy(x, head, target, ignore_index=ignore_index, reduction=reduction,
                                         compute_dtype=dtype, chunk_rows=chunk_rows)
    else:
        logits = mp.ops.linear_fp32_output(x, head.weight, head.bias, dtype)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=ignore_index, reduction=reduction)
    (loss * scale).backward()
    return [loss.detach(), x.grad] + [p.grad for p in head.parameters()]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 10])   # 64 rows: six chunks and a partial one
def test_fused_head_loss_equals_op_by_op(device, reduction, dtype, bias, chunk_rows):
    ref = _head_and_loss(device, fused=False, reduction=reduction, dtype=dtype, bias=bias)
    got = _head_and_loss(device, fused=True, reduction=reduction, dtype=dtype, bias=bias, chunk_rows=chunk_rows)
    assert relative_error(got[0], ref[0]) <= FP32_ORDER_RTOL
    rtol = HEAD_LOSS_GRAD_RTOL if chunk_rows is None else CHUNKED_HEAD_LOSS_GRAD_RTOL[str(dtype)[6:]]
    for g, r in zip(got[1:], ref[1:]):
        assert g.dtype == r.dtype == torch.float32
        assert relative_error(g, r) <= rtol


@pytest.mark.parametrize("scale", [2.0 ** -20, 2.0 ** 16])
def test_chunked_gradients_survive_a_loss_scale_in_fp16(scale):
    """The chunked forward computes the logits' gradient before it knows the incoming one (a loss scale):
    unnormalised in FP16, scaled in FP32 afterwards, it neither underflows nor overflows."""
    ref = _head_and_loss("cpu", fused=False, dtype=torch.float16)   # unscaled: nothing lost in FP16
    got = _head_and_loss("cpu", fused=True, dtype=torch.float16, chunk_rows=16, scale=scale)
    for g, r in zip(got[1:], ref[1:]):
        assert torch.isfinite(g).all() and relative_error(g / scale, r) <= CHUNKED_HEAD_LOSS_GRAD_RTOL["float16"]


def test_chunked_keeps_no_logits():
    """With chunk_rows nothing of size rows x vocab is saved for the backward."""
    rows, d, vocab = 64, 32, 1000
    x = torch.randn(rows, d, requires_grad=True)
    head = torch.nn.Linear(d, vocab, bias=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = mp.ops.head_cross_entropy(x, head, torch.randint(0, vocab, (rows,)), chunk_rows=16,
                                         compute_dtype=torch.bfloat16)
    assert saved and max(saved) == vocab * d < rows * vocab   # the weight's gradient is the largest
    loss.backward()
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
        mp.ops.head_cross_entropy(x, head, torch.randint(0, vocab, (rows,)), chunk_rows=0)


def test_one_backward_per_gemm():
    x = torch.randn(8, 16, requires_grad=True)
    head = torch.nn.Linear(16, 40, bias=False)
    loss = mp.ops.head_cross_entropy(x, head, torch.randint(0, 40, (8,)), compute_dtype=torch.bfloat16)
    assert loss.grad_fn.name() == "_HeadCrossEntropyBackward"
    # x and W directly, and the casts to the half operands (no gradient unless a backward builds a graph)
    assert {n.name() for n, _ in loss.grad_fn.next_functions if n is not None} == {
        "torch::autograd::AccumulateGrad", "ToCopyBackward0"}


def test_the_compute_dtype_follows_autocast():
    x = torch.randn(8, 16)
    head = torch.nn.Linear(16, 40, bias=False)
    target = torch.randint(0, 40, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = mp.ops.head_cross_entropy(x, head, target)
    assert torch.equal(under, mp.ops.head_cross_entropy(x, head, target, compute_dtype=torch.bfloat16))
    assert not torch.equal(under, mp.ops.head_cross_entropy(x, head, target))   # FP32 outside autocast


def test_bad_input_names_the_problem():
    x, head = torch.randn(8, 16), torch.nn.Linear(16, 40)
    with pytest.raises(ValueError, match="choose one of: mean, sum"):
        mp.ops.head_cross_entropy(x, head, torch.zeros(8, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match="12 features; the head takes 16"):
        mp.ops.head_cross_entropy(torch.randn(8, 12), head, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="target has 4 entries"):
        mp.ops.head_cross_entropy(x, head, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="nn.Linear"):
        mp.ops.head_cross_entropy(x, "lm_head", torch.zeros(8, dtype=torch.long))


def test_label_smoothing_takes_the_op_by_op_path():
    torch.manual_seed(0)
    x, head, target = torch.randn(8, 16), torch.nn.Linear(16, 40), torch.randint(0, 40, (8,))
    got = mp.ops.head_cross_entropy(x, head, target, label_smoothing=0.1, compute_dtype=torch.bfloat16)
    ref = F.cross_entropy(mp.ops.linear_fp32_output(x, head.weight, head.bias, torch.bfloat16), target,
                          label_smoothing=0.1)
    assert torch.equal(got, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_kernels_equal_the_reference(dtype):
    from mixprec.ops import _triton_cross_entropy as kernels
    torch.manual_seed(0)
    logits = torch.randn(300, 50304, device="cuda") * 8
    target = torch.randint(0, 50304, (300,), device="cuda")
    target[::5] = -100
    lse, loss = kernels.forward(logits, target, -100)
    ref_lse, ref_loss = head_loss.row_logsumexp_loss(logits.cpu(), target.cpu(), -100)
    assert relative_error(lse.cpu(), ref_lse) <= FP32_ORDER_RTOL
    assert relative_error(loss.cpu(), ref_loss) <= FP32_ORDER_RTOL
    row_grad = torch.tensor(0.37, device="cuda")
    got = kernels.backward(logits, lse, target, row_grad, -100, dtype)
    ref = head_loss.softmax_grad(logits.cpu(), lse.cpu(), target.cpu(), row_grad.cpu(), -100, dtype)
    assert relative_error(got.cpu(), ref) <= HEAD_LOSS_GRAD_RTOL
    fused_loss, fused_grad = kernels.loss_and_grad(logits, target, -100, dtype)
    ref = head_loss.softmax_grad(logits.cpu(), lse.cpu(), target.cpu(), torch.tensor(1.0), -100, dtype)
    assert relative_error(fused_loss.cpu(), ref_loss) <= FP32_ORDER_RTOL
    assert fused_grad.dtype == dtype and relative_error(fused_grad.cpu(), ref) <= HEAD_LOSS_GRAD_RTOL


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_on_any_logits_equals_f_cross_entropy(device, reduction):
    torch.manual_seed(0)
    logits = (torch.randn(64, 500, device=device) * 4).requires_grad_()
    target = torch.randint(0, 500, (64,), device=device)
    target[::9] = -100
    got = mp.ops.cross_entropy(logits.bfloat16(), target, reduction=reduction)
    (grad,) = torch.autograd.grad(got, logits)
    ref = F.cross_entropy(logits.bfloat16().float(), target, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert got.dtype == torch.float32
    assert relative_error(got.detach(), ref.detach()) <= FP32_ORDER_RTOL
    assert relative_error(grad, ref_grad) <= FP32_ORDER_RTOL


def _penalised_gradients(loss_fn, dtype, bias, frozen_x=False):
    """Gradients to x, W (and b) of loss + ||dloss/dx||^2 (with x frozen: of loss + ||dloss/dW||^2), the
    second term through create_graph=True."""
    torch.manual_seed(0)
    x = torch.randn(24, 16, requires_grad=not frozen_x)
    head = torch.nn.Linear(16, 40, bias=bias)
    target = torch.randint(0, 40, (24,))
    target[::5] = -100
    loss = loss_fn(x, head, target, dtype)
    params = list(head.parameters())
    (penalised,) = torch.autograd.grad(loss, head.weight if frozen_x else x, create_graph=True)
    return torch.autograd.grad(loss + penalised.pow(2).sum(), params if frozen_x else [x, *params])


def _reference_loss(x, head, target, dtype):
    """The same math op by op: operands rounded to dtype (gradients pass the rounding straight through), FP32
    GEMM and loss."""
    xr, wr = x.to(dtype).float(), head.weight.to(dtype).float()
    return F.cross_entropy(F.linear(xr, wr, head.bias), target)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen_x", [False, True])
@pytest.mark.parametrize("path", ["head_cross_entropy", "linear_fp32_output", "cross_entropy_kernel"])
def test_a_gradient_penalty_differentiates_through_the_head_and_loss(dtype, bias, frozen_x, path):
    """A backward with create_graph=True (a gradient penalty) gets the second-order terms: the kernels'
    gradients carry no graph, so the functions recompute them there with differentiable ops. Without that,
    the penalty's gradient to the head's weight was 14% off in BF16."""
    def fused(x, head, target, dtype):
        if path == "head_cross_entropy":
            return mp.ops.head_cross_entropy(x, head, target, compute_dtype=dtype)
        logits = mp.ops.linear_fp32_output(x, head.weight, head.bias, dtype)
        if path == "linear_fp32_output":
            return F.cross_entropy(logits, target)
        return head_loss._CrossEntropy.apply(logits, target, -100, "mean")   # the CUDA kernels' function
    got = _penalised_gradients(fused, dtype, bias, frozen_x)
    ref = _penalised_gradients(_reference_loss, dtype, bias, frozen_x)
    for g, r in zip(got, ref):
        assert relative_error(g, r) <= GRADIENT_PENALTY_RTOL[str(dtype)[6:]]


def test_the_chunked_loss_refuses_a_second_derivative():
    """chunk_rows keeps no operands for the backward: a create_graph backward fails loudly instead of
    dropping the penalty's second-order terms."""
    x = torch.randn(16, 8, requires_grad=True)
    head = torch.nn.Linear(8, 10, bias=False)
    loss = mp.ops.head_cross_entropy(x, head, torch.randint(0, 10, (16,)), compute_dtype=torch.float32,
                                     chunk_rows=4)
    with pytest.raises(RuntimeError, match="no second derivative.*chunk_rows=None"):
        torch.autograd.grad(loss, x, create_graph=True)
