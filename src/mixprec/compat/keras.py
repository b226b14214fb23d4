"""Keras' LossScaleOptimizer for PyTorch, on mixprec's LossScaler."""
from __future__ import annotations

from typing import Any

import torch

from mixprec.scaler import LossScaler

__all__ = ["LossScaleOptimizer"]


class LossScaleOptimizer:
    """Keras' LossScaleOptimizer for PyTorch: an optimizer that scales the loss and skips bad steps.

        opt = mp.LossScaleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        opt.scale_loss(loss).backward()
        opt.step()                           # unscale, skip on inf/NaN (returns None), update the scale
        opt.zero_grad()

    Keras' defaults: initial scale 2**15, doubled after 2000 finite steps, halved on overflow, at least 1.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, dynamic: bool = True, initial_scale: float = 2.0**15,
                 dynamic_growth_steps: int = 2000):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"LossScaleOptimizer wraps a torch.optim.Optimizer; got {type(optimizer).__name__}")
        self.inner_optimizer = optimizer
        self.scaler = LossScaler(init_scale=initial_scale, growth_interval=dynamic_growth_steps, dynamic=dynamic,
                                 min_scale=1.0)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    get_scaled_loss = scale_loss  # the tf.keras name

    def unscale_gradients(self) -> None:
        """Unscale now (e.g. before clipping); step() then uses the unscaled gradients."""
        self.scaler.unscale_(self.inner_optimizer)

    def step(self) -> Any:
        """Unscale, step unless the gradients overflowed, update the scale. Returns what the inner optimizer's
        step returned, None when skipped (LossScaler.step's convention); `self.scaler.num_skipped_steps`
        counts the skipped steps."""
        result = self.scaler.step(self.inner_optimizer)
        self.scaler.update()
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def loss_scale(self) -> float:
        return self.scaler.get_scale()

    @property
    def dynamic(self) -> bool:
        return self.scaler.is_dynamic()

    @property
    def param_groups(self) -> list[dict]:
        return self.inner_optimizer.param_groups

    def state_dict(self) -> dict:
        return {"optimizer": self.inner_optimizer.state_dict(), "loss_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner_optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["loss_scaler"])
