"""The output head's fused cross entropy (mixprec.head_loss) equals the op-by-op FP32 path."""
import pytest
import torch
import torch.nn.functional as F

import mixprec as mp
from mixprec import head_loss
from mixprec.ops import linear_fp32_output
from tolerances import FP32_ORDER_RTOL, HEAD_LOSS_GRAD_RTOL


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _head_and_loss(device, fused, reduction="mean", ignore_index=-100, dtype=torch.bfloat16):
    torch.manual_seed(0)
    x = (torch.randn(64, 32, device=device) * 2).requires_grad_()
    w = (torch.randn(1000, 32, device=device) / 4).requires_grad_()
    target = torch.randint(0, 1000, (64,), device=device)
    target[::7] = ignore_index
    logits = linear_fp32_output(x, w, None, dtype)
    if fused:
        head = head_loss._head_of(logits)
        assert head is not None
        loss = head_loss._HeadCrossEntropy.apply(head.x, head.weight, logits.detach(), target, head.xh, head.wh,
                                                 ignore_index, reduction)
    else:
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_head_loss_equals_op_by_op(reduction, dtype):
    ref = _head_and_loss("cpu", fused=False, reduction=reduction, dtype=dtype)
    got = _head_and_loss("cpu", fused=True, reduction=reduction, dtype=dtype)
    assert _rel(got[0], ref[0]) <= FP32_ORDER_RTOL
    assert got[1].dtype == ref[1].dtype and got[2].dtype == ref[2].dtype == torch.float32
    assert _rel(got[1], ref[1]) <= HEAD_LOSS_GRAD_RTOL
    assert _rel(got[2], ref[2]) <= HEAD_LOSS_GRAD_RTOL


def test_only_an_unchanged_reshape_of_the_head_output_is_fused():
    x, w = torch.randn(2, 8, 16), torch.randn(50, 16)
    logits = linear_fp32_output(x, w, None, torch.bfloat16)
    assert head_loss._head_of(logits.flatten(0, 1)) is not None
    assert head_loss._head_of(logits) is None  # 3-D: F.cross_entropy's class dim would be dim 1
    assert head_loss._head_of(logits.flatten(0, 1)[1:]) is None  # a slice is other rows
    assert head_loss._head_of(logits.flatten(0, 1) / 2) is None  # a new tensor (temperature)
    logits.add_(1.0)
    assert head_loss._head_of(logits.flatten(0, 1)) is None  # changed in place since the GEMM


def test_the_cpu_runs_op_by_op():
    """The fused path is a CUDA speed path: on the CPU mp.autocast leaves F.cross_entropy to the rules."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 40))
    model = mp.prepare(model, "bf16-mixed")
    x, y = torch.randn(8, 16), torch.randint(0, 40, (8,))
    with mp.autocast("bf16-mixed"):
        loss = F.cross_entropy(model(x), y)
    assert loss.grad_fn.name() != "_HeadCrossEntropyBackward"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_kernels_equal_the_reference(dtype):
    torch.manual_seed(0)
    logits = torch.randn(300, 50304, device="cuda") * 8
    target = torch.randint(0, 50304, (300,), device="cuda")
    target[::5] = -100
    lse, loss = head_loss._triton_forward(logits, target, -100)
    ref_lse, ref_loss = head_loss.reference_forward(logits, target, -100)
    assert _rel(lse, ref_lse) <= FP32_ORDER_RTOL and _rel(loss, ref_loss) <= FP32_ORDER_RTOL
    row_grad = torch.tensor(0.37, device="cuda")
    got = head_loss._triton_backward(logits, ref_lse, target, row_grad, -100, dtype)
    ref = head_loss.reference_backward(logits, ref_lse, target, row_grad, -100, dtype)
    assert _rel(got, ref) <= HEAD_LOSS_GRAD_RTOL


@pytest.mark.cuda
def test_gpt_step_on_cuda_takes_the_fused_path_and_matches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(300, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 300, bias=False))
    model = mp.prepare(model.cuda(), "bf16-mixed")
    idx = torch.randint(0, 300, (4, 32), device="cuda")
    grads = []
    for fused in (True, False):
        model.zero_grad()
        with mp.autocast("bf16-mixed"):
            logits = model(idx)
            loss = F.cross_entropy(logits.flatten(0, 1) if fused else logits.flatten(0, 1) * 1.0, idx.flatten())
        assert (loss.grad_fn.name() == "_HeadCrossEntropyBackward") == fused
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert _rel(a, b) <= HEAD_LOSS_GRAD_RTOL


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fp32_logits_of_unknown_origin_equal_f_cross_entropy(reduction):
    torch.manual_seed(0)
    logits = (torch.randn(64, 500) * 4).requires_grad_()
    target = torch.randint(0, 500, (64,))
    target[::9] = -100
    got = head_loss._CrossEntropy.apply(logits, target, -100, reduction)
    (grad,) = torch.autograd.grad(got, logits)
    ref = F.cross_entropy(logits, target, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert _rel(got.detach(), ref.detach()) <= FP32_ORDER_RTOL
    assert _rel(grad, ref_grad) <= FP32_ORDER_RTOL
