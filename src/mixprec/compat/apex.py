"""apex.amp's API: `initialize`, `scale_loss`, `master_params`, `state_dict`, `load_state_dict`.

    model, optimizer = mp.initialize(model, optimizer, opt_level="O1")
    with mp.scale_loss(loss, optimizer) as scaled_loss:
        scaled_loss.backward()
    optimizer.step()          # skipped by itself after an overflow; the scale backs off

What `initialize` does, visibly:
- each model is prepared (`mp.prepare`) and its `forward` becomes an `AutocastForward` (an instance
  attribute wrapping the class's forward in `mp.autocast(policy)`; `del model.forward` undoes it);
- each optimizer comes back as an `AmpOptimizer` that wraps it (and FP32 master weights under O2);
  its `step` steps through the one LossScaler that all optimizers of the call share;
- under O2/O3 the models' state_dict() holds FP32 values, as apex's does: the master weights where
  there are masters (exact), else the half values upcast; loading such a state dict sets the masters.

One iteration ends when every optimizer whose gradients `scale_loss` unscaled has stepped: then the
shared scale is updated, once, from all of their inf checks. So several losses and optimizers (GANs,
multi-task loops) each unscale their own gradients exactly once, and the scale grows or backs off
once per iteration.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

from mixprec.context import autocast
from mixprec.masters import MasterWeights, master_params
from mixprec.policy import LossScale, Policy
from mixprec.prepare import prepare
from mixprec.scaler import LossScaler

__all__ = ["AmpOptimizer", "AutocastForward", "initialize", "load_state_dict", "master_params", "scale_loss",
           "state_dict"]

_HALF = (torch.float16, torch.bfloat16)


class AutocastForward:
    """A model's forward run under `mp.autocast(policy)`; set by initialize() as `model.forward`."""

    def __init__(self, module: nn.Module, policy: Policy):
        self.module, self.policy = module, policy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.policy):
            return type(self.module).forward(self.module, *args, **kwargs)

    def __repr__(self) -> str:
        return f"AutocastForward({type(self.module).__name__}, policy {self.policy.name})"


class _Iteration:
    """The scaler the optimizers of one initialize() share, and which of them still have to step."""

    def __init__(self, scaler: LossScaler):
        self.scaler = scaler
        self.unscaled: set[int] = set()    # ids of inner optimizers unscaled and not yet stepped

    def stepped(self, optimizer: torch.optim.Optimizer) -> None:
        self.unscaled.discard(id(optimizer))
        if not self.unscaled:
            self.scaler.update()


class AmpOptimizer(torch.optim.Optimizer):
    """An optimizer returned by initialize(): steps through the shared LossScaler.

    `step()` unscales (unless scale_loss did), skips the step if the gradients overflowed, and ends
    the iteration once every unscaled optimizer has stepped. Everything else (param_groups, state,
    zero_grad, state_dict) is the wrapped optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, iteration: _Iteration):
        self.optimizer = optimizer
        self._iteration = iteration
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def scaler(self) -> LossScaler:
        return self._iteration.scaler

    def __getattr__(self, name: str) -> Any:
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def step(self, closure=None):
        if closure is not None:
            raise RuntimeError("optimizer.step(closure) is not supported after mp.initialize(): the gradients must "
                               "be checked for overflow before the step. Call the closure's backward through "
                               "mp.scale_loss, then optimizer.step()")
        try:
            return self._iteration.scaler.step(self.optimizer)
        finally:
            self._iteration.stepped(self.optimizer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"AmpOptimizer({self.optimizer!r})"


_last_scalers: list[LossScaler] = []   # apex's amp.state_dict() is global: the scaler of the last initialize()


def initialize(models: nn.Module | list[nn.Module], optimizers: torch.optim.Optimizer | list | None = None, *,
               opt_level: str = "O1", dtype: torch.dtype = torch.float16, loss_scale: LossScale | None = None,
               master_weights: bool | None = None, **scaler_kwargs: Any):
    """apex.amp.initialize: apply an opt level (O0-O3) to models and optimizers.

    loss_scale: "dynamic", a float (static), or None for the opt level's default. Models are changed
    in place (and returned); optimizers come back as AmpOptimizer (over MasterWeights where the opt
    level keeps FP32 masters of half parameters). Each model and optimizer can be initialized once.
    `dtype` is the half type (ignored by O0, which is FP32). `scaler_kwargs` go to LossScaler.
    """
    overrides: dict[str, Any] = {}
    if loss_scale is not None:
        overrides["loss_scale"] = loss_scale
    if master_weights is not None:
        overrides["master_weights"] = master_weights
    policy = Policy.from_opt_level(opt_level, dtype=dtype, **overrides)
    model_list = list(models) if isinstance(models, (list, tuple)) else [models]
    opt_list = [] if optimizers is None else (list(optimizers) if isinstance(optimizers, (list, tuple))
                                              else [optimizers])
    for m in model_list:
        if not isinstance(m, nn.Module):
            raise TypeError(f"initialize takes nn.Modules as models; got {type(m).__name__}")
        if isinstance(m.__dict__.get("forward"), AutocastForward):
            raise RuntimeError(f"{type(m).__name__} was already initialized; initialize() each model once")
    for o in opt_list:
        if isinstance(o, AmpOptimizer):
            raise RuntimeError(f"{type(o.optimizer).__name__} was already initialized; initialize() each optimizer "
                               "once")
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"initialize takes torch optimizers; got {type(o).__name__}")
    for m in model_list:
        prepare(m, policy)
        m.forward = AutocastForward(m, policy)
    iteration = _Iteration(LossScaler.for_policy(policy, **scaler_kwargs))
    wrapped = []
    for o in opt_list:
        if policy.master_weights and any(p.dtype in _HALF for g in o.param_groups for p in g["params"]):
            o = MasterWeights(o)
        wrapped.append(AmpOptimizer(o, iteration))
    masters: dict[int, torch.Tensor] = {}
    for o in wrapped:
        if isinstance(o.optimizer, MasterWeights):
            masters.update(o.optimizer.master_of())
    for m in model_list:
        if any(p.dtype in _HALF for p in m.parameters()):
            _fp32_state_dict(m, masters)
    _last_scalers[:] = [iteration.scaler]
    out_models = model_list if isinstance(models, (list, tuple)) else model_list[0]
    if optimizers is None:
        return out_models
    return out_models, (wrapped if isinstance(optimizers, (list, tuple)) else wrapped[0])


def _fp32_state_dict(model: nn.Module, masters: dict[int, torch.Tensor]) -> None:
    """model.state_dict() in FP32 (the masters' values where there are some); loading sets the masters."""
    def save_hook(module, state, prefix, local_metadata):
        params = {prefix + name: p for name, p in module.named_parameters(remove_duplicate=False)}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dtype in _HALF:
                param = params.get(key)
                master = masters.get(id(param)) if param is not None else None
                state[key] = master.detach() if master is not None else value.float()

    def load_hook(module, state, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        with torch.no_grad():
            for name, param in module.named_parameters(remove_duplicate=False):
                value, master = state.get(prefix + name), masters.get(id(param))
                if master is not None and isinstance(value, torch.Tensor) and value.shape == master.shape:
                    master.copy_(value)

    model.register_state_dict_post_hook(save_hook)
    model.register_load_state_dict_pre_hook(load_hook)


@contextlib.contextmanager
def scale_loss(loss: torch.Tensor, optimizers: torch.optim.Optimizer | list, *,
               delay_unscale: bool = False) -> Iterator[torch.Tensor]:
    """Yield loss * scale for backward; on exit unscale the gradients (check them for inf/NaN).

    For gradient accumulation, pass delay_unscale=True on every micro-batch but the last.
    """
    opt_list = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    for o in opt_list:
        if not isinstance(o, AmpOptimizer):
            raise RuntimeError("scale_loss() needs an optimizer returned by mp.initialize(); call "
                               "model, optimizer = mp.initialize(model, optimizer, opt_level=...) first")
    if isinstance(loss, torch.Tensor) and not loss.is_floating_point():
        raise TypeError(f"scale_loss needs a floating-point loss; got {loss.dtype}")
    yield opt_list[0].scaler.scale(loss)
    if delay_unscale:
        return
    for o in opt_list:
        iteration = o._iteration
        if id(o.optimizer) in iteration.unscaled:
            raise RuntimeError("the gradients were already unscaled this iteration; pass delay_unscale=True to "
                               "scale_loss for every accumulation micro-batch but the last")
        iteration.scaler.unscale_(o.optimizer)
        if iteration.scaler.is_enabled():
            iteration.unscaled.add(id(o.optimizer))


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
