"""FP32 master weights for half-precision parameters (apex O2, fp16-true).

The model keeps FP16/BF16 parameters (half the memory, half-precision GEMMs without casts); the
optimizer steps FP32 copies of them, so that updates smaller than half's resolution accumulate;
after each step the masters are copied back into the model.

    backward:  each half param's grad is added (upcast) into its master's .grad, then freed
    step:      inner optimizer steps the masters; masters -> model params (one foreach copy)
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

import torch

_HALF = (torch.float16, torch.bfloat16)


class MasterWeights(torch.optim.Optimizer):
    """Wraps an optimizer built over half-precision parameters so that it steps FP32 masters.

        model = mp.prepare(model, mp.Policy.from_recipe("fp16-true"))
        optimizer = mp.MasterWeights(torch.optim.AdamW(model.parameters(), lr=1e-3))

    It behaves as a torch optimizer (param_groups, state, step, zero_grad, state_dict) whose params
    are the FP32 masters: unscale and clip those (`mp.master_params(optimizer)`); the model's half
    params carry no .grad after backward, their gradient lives on the master.
    """

    # The LossScaler must unscale the masters' grads itself: a fused inner optimizer would look for
    # grad_scale/found_inf on itself, not on this wrapper.
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: torch.optim.Optimizer):
        if isinstance(optimizer, MasterWeights):
            raise ValueError("this optimizer already has master weights")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"MasterWeights wraps a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if optimizer.state:
            raise ValueError("wrap the optimizer in MasterWeights before its first step (its state would "
                             "refer to the half parameters)")
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks: dict = OrderedDict()
        self._optimizer_step_post_hooks: dict = OrderedDict()
        self._model_params: list[torch.Tensor] = []
        self._masters: list[torch.Tensor] = []
        self._hooks = []
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if p.dtype in _HALF:
                    master = p.detach().float().requires_grad_(True)
                    self._model_params.append(p)
                    self._masters.append(master)
                    self._hooks.append(p.register_post_accumulate_grad_hook(_grad_to_master(master)))
                    params.append(master)
                else:
                    params.append(p)
            group["params"] = params

    # The optimizer interface, delegated to the inner optimizer over the masters.
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def __getattr__(self, name: str) -> Any:  # e.g. _step_supports_amp_scaling of fused optimizers
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    @torch.no_grad()
    def step(self, closure=None, **kwargs):
        loss = self.optimizer.step(closure, **kwargs) if closure is not None else self.optimizer.step(**kwargs)
        self.copy_masters_to_model()
        return loss

    @torch.no_grad()
    def copy_masters_to_model(self) -> None:
        if self._masters:
            torch._foreach_copy_(self._model_params, self._masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self._model_params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "masters": [m.detach().clone() for m in self._masters]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        with torch.no_grad():
            for master, saved in zip(self._masters, state_dict["masters"]):
                master.copy_(saved)
        self.copy_masters_to_model()

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("add parameter groups to the inner optimizer before wrapping it")

    def __repr__(self) -> str:
        return f"MasterWeights({self.optimizer!r})"


def _grad_to_master(master: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        grad = param.grad.float()
        if master.grad is None:
            master.grad = grad
        else:
            master.grad.add_(grad)  # gradient accumulation over several backward passes
        param.grad = None
    return hook


def master_params(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The FP32 parameters an optimizer steps (the masters under MasterWeights), for clipping."""
    for group in optimizer.param_groups:
        yield from group["params"]
