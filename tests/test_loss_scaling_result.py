"""Mixed Precision Training (2018)'s central result, on the CPU with emulated FP16.

With the loss multiplied by 2**-30 (gradients far below FP16's smallest subnormal, 2**-24), FP16
without loss scaling flushes the gradients of the layers below the head to zero and stops learning;
dynamic loss scaling brings them back and training matches FP32. Adam is invariant to the gradients'
scale (with eps far below them), so in FP32 the tiny loss trains exactly like the plain one.
"""
import torch
import torch.nn.functional as F

import mixprec as mp
from helpers import MLP
from helpers import regression_task as _task

TINY = 2.0**-30


def _train(recipe, steps=60):
    torch.manual_seed(0)
    policy = mp.Policy.from_recipe(recipe)
    model = mp.prepare(MLP(), policy)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, eps=1e-30)  # eps below the tiny gradients
    # Start high and let backoff find the scale (growth_interval short so the demo stays short).
    scaler = mp.LossScaler.for_policy(policy, init_scale=2.0**64, max_scale=2.0**64, growth_interval=20)
    x, y = _task()
    zero_fractions, losses = [], []
    for step in range(steps):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        with mp.autocast(policy):
            loss = F.mse_loss(model(x[i]), y[i])
        optimizer.zero_grad()
        scaler.scale(loss * TINY).backward()
        below_head = [model.fc1.weight.grad, model.fc2.weight.grad]
        zero_fractions.append(sum((g == 0).sum().item() for g in below_head) / sum(g.numel() for g in below_head))
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    return losses, zero_fractions, scaler


def test_fp16_without_scaling_loses_the_gradients_and_stalls():
    fp32_losses, fp32_zeros, _ = _train("fp32")
    noscale_losses, noscale_zeros, _ = _train("fp16-noscale")
    scaled_losses, scaled_zeros, scaler = _train("fp16-mixed")

    assert max(fp32_zeros) == 0.0
    assert min(noscale_zeros) > 0.99          # nearly every gradient below the head flushed to zero
    assert scaled_zeros[-1] < 0.01            # loss scaling recovers them
    assert scaler.num_skipped_steps > 0       # ... after backing off from overflowing scales
    assert noscale_losses[-1] > 0.9 * noscale_losses[0]                 # stalls
    assert scaled_losses[-1] < 0.2 * scaled_losses[0]                   # trains,
    assert scaled_losses[-1] < 1.5 * fp32_losses[-1]  # near FP32 (it skipped the steps that found the scale)
