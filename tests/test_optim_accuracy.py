"""Low-bit AdamW against torch.optim.AdamW: parameter tracking, pure-BF16 weight decay, a trained model (CPU)."""
import math

import pytest
import torch
from torch import nn

import mixprec.optim as mo
from tolerances import (OPTIM_4BIT_DEVIATION, OPTIM_8BIT_DEVIATION, OPTIM_8BIT_LOSS_RTOL, OPTIM_BF16_DECAY_RTOL,
                        OPTIM_FP8_DEVIATION)

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: threads only contend


def _task(seed=0):
    """An MLP (every weight >= 4096 elements, so its state is quantized) regressing a random teacher."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 16))
    teacher = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16))
    x = torch.randn(4096, 64)
    y = teacher(x).detach() + 0.1 * torch.randn(4096, 16)
    return net, x, y


def _deviation_vs_torch(state_dtype: str, steps: int = 100) -> float:
    """|theta - theta_torch| / (sum over steps of |torch's update|), on the quantized tensors.

    Both optimizers get the same gradients: minibatch gradients of the MLP at torch AdamW's parameters.
    """
    net, x, y = _task()
    ours = [p.detach().clone().requires_grad_() for p in net.parameters()]
    ref_opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    opt = mo.AdamW(ours, lr=1e-3, weight_decay=0.01, state_dtype=state_dtype)
    ref = list(net.parameters())
    big = [i for i, p in enumerate(ref) if p.numel() >= 4096]
    gen = torch.Generator().manual_seed(1)
    path = 0.0
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        net.zero_grad()
        ((net(x[idx]) - y[idx]) ** 2).mean().backward()
        for p, q in zip(ref, ours):
            q.grad = p.grad.clone()
        before = [ref[i].detach().clone() for i in big]
        ref_opt.step()
        opt.step()
        path += math.sqrt(sum((ref[i] - b).square().sum().item() for i, b in zip(big, before)))
    deviation = math.sqrt(sum((ref[i] - ours[i]).square().sum().item() for i in big))
    return deviation / path


@pytest.mark.parametrize("state_dtype,limit", [("int8", OPTIM_8BIT_DEVIATION), ("fp8", OPTIM_FP8_DEVIATION),
                                               ("int4", OPTIM_4BIT_DEVIATION)])
def test_low_bit_state_tracks_torch_adamw(state_dtype, limit):
    dev = _deviation_vs_torch(state_dtype)
    assert dev <= limit, f"{state_dtype}: deviation {dev:.4f} of the total movement"
    # and the measure can fail: BF16 state (8 mantissa bits) must do much better than 8-bit codes
    if state_dtype == "int8":
        assert _deviation_vs_torch("bf16") < dev / 3


def test_pure_bf16_weight_decay_needs_stochastic_rounding_or_kahan():
    exact = (1 - 1e-3 * 0.1) ** 1000  # 0.904833
    for rounding in ("nearest", "stochastic", "kahan"):
        w = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = mo.AdamW([w], lr=1e-3, weight_decay=0.1, rounding=rounding, state_dtype="fp32")
        for _ in range(1000):
            w.grad = torch.zeros_like(w)
            opt.step()
        if rounding == "nearest":  # the failure: 1 - 1e-4 rounds back to 1.0 every step
            assert torch.all(w == 1.0)
        elif rounding == "stochastic":  # unbiased per element; the mean over 4096 elements is tight
            assert w.float().mean().item() == pytest.approx(exact, rel=OPTIM_BF16_DECAY_RTOL)
            assert w.float().std().item() > 0  # really stochastic: elements took different paths
        else:  # Kahan: deterministic, every element on the exact curve
            assert torch.allclose(w.float(), torch.full_like(w.float(), exact), rtol=OPTIM_BF16_DECAY_RTOL)


def _train(state_dtype: str | None, steps: int = 300) -> float:
    net, x, y = _task(seed=3)
    if state_dtype is None:
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01)
    else:
        opt = mo.AdamW(net.parameters(), lr=2e-3, weight_decay=0.01, state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        opt.zero_grad()
        ((net(x[idx]) - y[idx]) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        return ((net(x) - y) ** 2).mean().item()


def test_small_model_with_8bit_adamw_reaches_fp32_loss():
    fp32 = _train(None)
    int8 = _train("int8")
    assert int8 == pytest.approx(fp32, rel=OPTIM_8BIT_LOSS_RTOL), (fp32, int8)
    assert fp32 < 0.5 * _initial_loss()  # it did train


def _initial_loss() -> float:
    net, x, y = _task(seed=3)
    with torch.no_grad():
        return ((net(x) - y) ** 2).mean().item()
