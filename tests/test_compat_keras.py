"""Keras-style LossScaleOptimizer (mixprec.compat.keras)."""
import torch
import torch.nn.functional as F

import mixprec as mp
from small_models import MLP
from small_models import regression_task as _task


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
