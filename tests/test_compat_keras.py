"""Keras-style LossScaleOptimizer (mixprec.compat.keras)."""
import torch
import torch.nn.functional as F

import mixprec as mp
from helpers import MLP
from helpers import regression_task as _task


def test_keras_loss_scale_optimizer():
    torch.manual_seed(0)
    model = MLP()
    opt = mp.compat.keras.LossScaleOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), initial_scale=2.0**15,
                                dynamic_growth_steps=2)
    x, y = _task()
    losses = []
    for step in range(6):
        with mp.autocast("fp16-mixed"):
            loss = F.mse_loss(model(x[:64]), y[:64])
        opt.zero_grad()
        opt.scale_loss(loss).backward()
        opt.step()
        losses.append(loss.item())
    assert opt.loss_scale == 2.0**18  # doubled every 2 finite steps
    assert losses[-1] < losses[0]


def test_keras_step_returns_what_the_optimizer_returns_and_none_when_skipped():
    class ReportingSGD(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            return "stepped"

    torch.manual_seed(0)
    model = MLP()
    opt = mp.compat.keras.LossScaleOptimizer(ReportingSGD(model.parameters(), lr=0.05), initial_scale=2.0**10)
    x, y = _task()
    for step in range(3):
        opt.zero_grad()
        opt.scale_loss(F.mse_loss(model(x[:64]), y[:64])).backward()
        if step == 1:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        assert opt.step() == (None if step == 1 else "stepped")
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) == (step == 1)
    assert opt.scaler.num_skipped_steps == 1 and opt.loss_scale == 2.0**9
