"""Loss scaling inside loops mixprec does not own (the Hugging Face Trainer, a user's accelerate loop).

Those loops call `loss.backward()` (through accelerate) on the loss as they computed it, clip the gradients
with `accelerator.clip_grad_norm_`, then `optimizer.step()`. accelerate unscales only its own GradScaler,
and only under mixed_precision="fp16", which also runs its torch.autocast. So mixprec scales, unscales and
skips by itself, at three points it owns, without changing a line of the loop:

    forward   every floating output of the model that requires grad (the loss a Hugging Face model computes,
              the logits, ...) passes through `_ScaleGrad`: identity forward, and the backward multiplies the
              incoming gradient by the scale S. Each path from a loss to the parameters crosses exactly one
              such mark, so by linearity this is the same as scaling the loss, whatever loss the loop computes
              from the outputs (a loss computed from parameters outside the model's forward is not scaled)
    backward  when the backward pass of the step that syncs gradients ends (after DDP's reduction, whose
              callback is queued earlier), `scaler.unscale_(optimizer)`: gradients are divided by S and the
              inf check recorded, on the device; clipping and grad-norm logging then see true gradients;
              micro-steps of gradient accumulation that do not sync keep their scaled sums, as with GradScaler
    step      `MixprecOptimizer.step()`: `scaler.step(optimizer)` (skips after an overflow; mixprec's AdamW and
              torch's fused optimizers skip on the device) and `scaler.update()`

The scale does not move within an accumulation window (update() runs at the step), so scaled micro-batch
gradients add up exactly. The reported loss is the unscaled one: `_ScaleGrad` changes only the backward.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.autograd import Variable

from mixprec.integrations._optional import require
from mixprec.scaler import LossScaler

_STATE_KEY = "mixprec_loss_scaler"
_GUARD_KEY = "mixprec_guard"


class _ScaleGrad(torch.autograd.Function):
    """y = x; dL/dx = S * dL/dy (S: the scaler's current scale, read on the device)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scaling: "LossScaling") -> torch.Tensor:
        ctx.scaling = scaling
        # A copy for a loss (hosts scale it in place: the Trainer's `loss *= ...`), a view for a large output
        # such as logits (no copy; a view cannot be modified in place afterwards).
        return x.clone() if x.dim() == 0 else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scaling = ctx.scaling
        scaling._backward_started()
        return grad * scaling.scaler.scale_tensor.to(grad.device), None


def _map_outputs(fn: Callable[[torch.Tensor], torch.Tensor], out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out) if out.is_floating_point() and out.requires_grad else out
    if isinstance(out, Mapping):
        if hasattr(out, "__setitem__") and type(out) is not dict:   # a Hugging Face ModelOutput: keep its class
            for key in list(out.keys()):
                out[key] = _map_outputs(fn, out[key])
            return out
        return {k: _map_outputs(fn, v) for k, v in out.items()}
    if isinstance(out, (list, tuple)) and not hasattr(out, "_fields"):
        return type(out)(_map_outputs(fn, v) for v in out)
    return out


class LossScaling:
    """The forward mark, the end-of-backward unscale and the state of one model + optimizer pair.

    is_sync: whether the current backward is the last of an accumulation window (accelerate's
    `sync_gradients`); gradients are unscaled only then.
    """

    def __init__(self, scaler: LossScaler, is_sync: Callable[[], bool] | None = None,
                 guard_factory: Callable[[torch.optim.Optimizer], Any] | None = None):
        if not isinstance(scaler, LossScaler):
            raise TypeError(f"scaler must be a mixprec LossScaler; got {type(scaler).__name__}")
        self.scaler = scaler
        self.is_sync = is_sync or (lambda: True)
        self.optimizer: torch.optim.Optimizer | None = None   # the inner optimizer, set by MixprecOptimizer
        self.last_loss: torch.Tensor | None = None             # the last `loss` output, detached (for the guard)
        # A mp.StabilityGuard, made for the inner optimizer when the MixprecOptimizer is (guard_factory)
        self.guard: Any = None
        self.guard_factory = guard_factory
        self._queued = False

    # ---- forward ---------------------------------------------------------------------------------------
    def mark(self, out: Any) -> Any:
        """Mark a forward's outputs for loss scaling (PolicyForward's `after`)."""
        loss = out.get("loss") if isinstance(out, Mapping) else None
        if isinstance(loss, torch.Tensor):
            self.last_loss = loss.detach()
        if not self.scaler.is_enabled() or not torch.is_grad_enabled():
            return out
        self._queued = False          # a forward starts a new backward (a failed one left nothing behind)
        return _map_outputs(self._mark_tensor, out)

    def _mark_tensor(self, t: torch.Tensor) -> torch.Tensor:
        if self.scaler.scale_tensor is None:
            # The scaler keeps its state on the device of the first loss it scales: give it one.
            self.scaler.scale(torch.ones((), device=t.device))
            if not self.scaler.is_enabled():
                return t
        return _ScaleGrad.apply(t, self)

    # ---- backward --------------------------------------------------------------------------------------
    def _backward_started(self) -> None:
        if self._queued:
            return
        self._queued = True
        # Queued from inside a callback so that it runs after every callback queued during the backward pass
        # (DDP's, which writes the reduced gradients, is queued when its first bucket is ready).
        Variable._execution_engine.queue_callback(
            lambda: Variable._execution_engine.queue_callback(self._backward_ended))

    def _backward_ended(self) -> None:
        self._queued = False
        if self.is_sync():
            if self.optimizer is None:
                raise RuntimeError("loss scaling has no optimizer to unscale: wrap it in MixprecOptimizer")
            self.scaler.unscale_(self.optimizer)


class MixprecOptimizer(torch.optim.Optimizer):
    """An optimizer that steps through a LossScaler: step() = scaler.step(inner) + scaler.update().

    Everything else (param_groups, state, zero_grad) is the inner optimizer's. state_dict() is the inner
    one's plus the scaler's state under "mixprec_loss_scaler" (and a guard's under "mixprec_guard"), so the
    host's own optimizer checkpoint (the Trainer's optimizer.pt, accelerate's save_state) carries them;
    load_state_dict() takes them back and also loads a plain inner optimizer's state dict.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaling: LossScaling):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"MixprecOptimizer wraps a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if isinstance(optimizer, MixprecOptimizer):
            raise ValueError("this optimizer is already a MixprecOptimizer")
        self.optimizer = optimizer
        self.scaling = scaling
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}
        scaling.optimizer = optimizer
        if scaling.guard is None and scaling.guard_factory is not None:
            scaling.guard = scaling.guard_factory(optimizer)

    @property
    def scaler(self) -> LossScaler:
        return self.scaling.scaler

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    def __getattr__(self, name: str) -> Any:
        if name in ("optimizer", "scaling"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def step(self, closure: Callable | None = None) -> Any:
        """scaler.step(inner) then scaler.update(); returns what the inner step returned, None when skipped.
        With a guard: guard.step(last loss, scaler=scaler), which steps the inner optimizer and updates the
        scaler itself (and returns its GuardStep)."""
        if closure is not None:
            raise RuntimeError("MixprecOptimizer.step takes no closure: the loss scaler checks the gradients "
                               "before the step")
        if self.scaling.guard is not None:
            return self.scaling.guard.step(self.scaling.last_loss, scaler=self.scaler)
        result = self.scaler.step(self.optimizer)
        self.scaler.update()
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        state = {**self.optimizer.state_dict(), _STATE_KEY: self.scaler.state_dict()}
        if self.scaling.guard is not None:
            state[_GUARD_KEY] = self.scaling.guard.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        inner = {k: v for k, v in state_dict.items() if k not in (_STATE_KEY, _GUARD_KEY)}
        self.optimizer.load_state_dict(inner)
        scaler_state = state_dict.get(_STATE_KEY)
        if scaler_state and self.scaler.is_enabled():
            self.scaler.load_state_dict(scaler_state)
        guard_state = state_dict.get(_GUARD_KEY)
        if guard_state and self.scaling.guard is not None:
            self.scaling.guard.load_state_dict(guard_state)

    def __repr__(self) -> str:
        return f"MixprecOptimizer({self.optimizer!r}, {self.scaler!r})"


def find_mixprec_optimizer(optimizer: Any) -> MixprecOptimizer | None:
    """The MixprecOptimizer inside host wrappers (accelerate's AcceleratedOptimizer), or None."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, MixprecOptimizer):
            return optimizer
        optimizer = optimizer.__dict__.get("optimizer")
        seen += 1
    return None


def guard_factory(model: Any, guard: Any) -> Callable | None:
    """guard (None, a mp.StabilityGuard's keyword arguments, or a guard) -> a factory of it for an optimizer."""
    if guard is None:
        return None
    if isinstance(guard, dict):
        guard_cls = require("mixprec.stability", "StabilityGuard", "guard=")
        return lambda optimizer: guard_cls(model, optimizer, **guard)
    return lambda optimizer: guard
