"""The APIs users know from the literature: apex.amp's initialize/scale_loss and Keras' LossScaleOptimizer.

    model, optimizer = mp.initialize(model, optimizer, opt_level="O1")
    with mp.scale_loss(loss, optimizer) as scaled_loss:
        scaled_loss.backward()
    optimizer.step()          # skipped by itself after an overflow; the scale backs off

Underneath: `initialize` is prepare() + an autocast-wrapped forward + MasterWeights (O2) + one
LossScaler; `scale_loss` scales, and on exit unscales the gradients (so they can be clipped before
`step`, as in apex); the optimizer's `step` steps or skips, then updates the scale.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import torch
import torch.nn as nn

from mixprec.autocast import autocast
from mixprec.masters import MasterWeights
from mixprec.policy import LossScale, Policy
from mixprec.prepare import prepare
from mixprec.scaler import LossScaler

_ATTR = "_mixprec_amp"


class _AmpState:
    """What initialize() attached to one optimizer."""

    def __init__(self, scaler: LossScaler, policy: Policy):
        self.scaler = scaler
        self.policy = policy
        self.unscaled = False      # scale_loss already unscaled this iteration's gradients
        self.stepping = False      # inside our step(): scaler.step calls optimizer.step again


_last_scalers: list[LossScaler] = []


class _AutocastForward:
    """Mixed into an initialize()d model's class: its forward runs under mp.autocast(policy)."""

    def forward(self, *args, **kwargs):
        with autocast(self._mixprec_amp_policy):
            return super().forward(*args, **kwargs)


_autocast_classes: dict[type, type] = {}


def _autocast_class(cls: type) -> type:
    if cls not in _autocast_classes:
        _autocast_classes[cls] = type(cls.__name__, (_AutocastForward, cls), {"__module__": cls.__module__})
    return _autocast_classes[cls]


def initialize(models: nn.Module | list[nn.Module], optimizers: torch.optim.Optimizer | list | None = None, *,
               opt_level: str = "O1", dtype: torch.dtype = torch.float16, loss_scale: LossScale | None = None,
               master_weights: bool | None = None, **scaler_kwargs: Any):
    """apex.amp.initialize: apply an opt level (O0-O3) to models and optimizers.

    loss_scale: "dynamic", a float (static), or None for the opt level's default. Models are changed
    in place (returned too); optimizers with half parameters get FP32 master weights (O2) and come back
    wrapped. Each model and optimizer can be initialized once. `scaler_kwargs` go to LossScaler.
    """
    overrides: dict[str, Any] = {}
    if loss_scale is not None:
        overrides["loss_scale"] = loss_scale
    if master_weights is not None:
        overrides["master_weights"] = master_weights
    policy = Policy.from_opt_level(opt_level, dtype=dtype, **overrides)
    model_list = models if isinstance(models, (list, tuple)) else [models]
    opt_list = [] if optimizers is None else (optimizers if isinstance(optimizers, (list, tuple)) else [optimizers])
    for m in model_list:
        if isinstance(m, _AutocastForward):
            raise RuntimeError(f"{type(m).__name__} was already initialized; initialize() each model once")
    for o in opt_list:
        if hasattr(o, _ATTR):
            raise RuntimeError(f"{type(o).__name__} was already initialized; initialize() each optimizer once")
    for m in model_list:
        prepare(m, policy)
        m.__class__ = _autocast_class(type(m))
        m._mixprec_amp_policy = policy
    scaler = LossScaler.for_policy(policy, **scaler_kwargs)
    wrapped = []
    for o in opt_list:
        if policy.master_weights and any(p.dtype in (torch.float16, torch.bfloat16)
                                         for g in o.param_groups for p in g["params"]):
            o = MasterWeights(o)
        setattr(o, _ATTR, _AmpState(scaler, policy))
        o.step = types.MethodType(_amp_step, o)
        wrapped.append(o)
    _last_scalers[:] = [scaler]
    out_models = model_list if isinstance(models, (list, tuple)) else model_list[0]
    if optimizers is None:
        return out_models
    return out_models, (wrapped if isinstance(optimizers, (list, tuple)) else wrapped[0])


def _amp_step(self, *args, **kwargs):
    state: _AmpState = getattr(self, _ATTR)
    if state.stepping:  # called back by scaler.step(): run the real step
        return type(self).step(self, *args, **kwargs)
    state.stepping = True
    try:
        ran = state.scaler.step(self, *args, **kwargs)
        state.scaler.update()
    finally:
        state.stepping = False
        state.unscaled = False
    return ran


@contextlib.contextmanager
def scale_loss(loss: torch.Tensor, optimizers: torch.optim.Optimizer | list, *,
               delay_unscale: bool = False) -> Iterator[torch.Tensor]:
    """Yield loss * scale for backward; on exit unscale the gradients (check them for inf/NaN).

    For gradient accumulation, pass delay_unscale=True on every micro-batch but the last.
    """
    opt_list = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    states = []
    for o in opt_list:
        state = getattr(o, _ATTR, None)
        if state is None:
            raise RuntimeError("scale_loss() needs an optimizer returned by mp.initialize(); call "
                               "model, optimizer = mp.initialize(model, optimizer, opt_level=...) first")
        states.append(state)
    if isinstance(loss, torch.Tensor) and not loss.is_floating_point():
        raise TypeError(f"scale_loss needs a floating-point loss; got {loss.dtype}")
    scaler = states[0].scaler
    yield scaler.scale(loss)
    if delay_unscale:
        return
    for o, state in zip(opt_list, states):
        if state.unscaled:
            raise RuntimeError("the gradients were already unscaled this iteration; pass delay_unscale=True to "
                               "scale_loss for every accumulation micro-batch but the last")
        state.scaler.unscale_(o)
        state.unscaled = True


def state_dict() -> dict:
    """apex.amp.state_dict: the loss scaler state of the last initialize(), for checkpoints."""
    return {f"loss_scaler{i}": s.state_dict() for i, s in enumerate(_last_scalers)}


def load_state_dict(state: dict) -> None:
    """apex.amp.load_state_dict: restore what state_dict() returned (after initialize())."""
    if not _last_scalers:
        raise RuntimeError("load_state_dict() needs mp.initialize() to have been called first")
    for i, s in enumerate(_last_scalers):
        key = f"loss_scaler{i}"
        if key not in state:
            raise ValueError(f"state has no {key!r}; it holds: {', '.join(state) or 'nothing'}")
        s.load_state_dict(state[key])


class LossScaleOptimizer:
    """Keras' LossScaleOptimizer for PyTorch: an optimizer that scales the loss and skips bad steps.

        opt = mp.LossScaleOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        opt.scale_loss(loss).backward()
        opt.step()                           # unscale, skip on inf/NaN, update the scale
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

    def step(self) -> torch.Tensor:
        ran = self.scaler.step(self.inner_optimizer)
        self.scaler.update()
        return ran

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
