"""Acting on the device: a step that is a no-op where a device flag says skip, moment resets, gradient clipping.

How a skip avoids a host sync. The optimizer step always runs (whether to call it would be a Python decision,
i.e. a sync); its effect is prevented or undone by selects on the device:

* found_inf (optimizers that skip on the device: torch's fused Adam/AdamW/SGD/Adagrad, mixprec.optim.AdamW,
  which set `_step_supports_amp_scaling`): the guard sets `optimizer.found_inf` to the skip flag, the
  GradScaler protocol. The kernel leaves parameters, moments, block scales/codes and step counts as they
  were (torch's fused step adds 1 and subtracts found_inf; mixprec's AdamW selects its old state). Cost:
  nothing beyond the step.
* select (any other optimizer, e.g. torch's default foreach AdamW): copy what the step changes (the
  parameters that have gradients and their state tensors) on the device, step, then write
  `torch.where(skip, copy, new)` back. A NaN gradient poisons only the discarded `new`; a flag multiply
  would keep it (NaN * 0 = NaN). State the step creates for a parameter (its first step) is set to zeros,
  torch's initial state. Cost: one extra copy of the stepped parameters and state in memory, and a read
  of it plus two passes (where, copy) per step; on CUDA, prefer fused=True.
  An optimizer keeping state on another device than the flag (torch's non-capturable AdamW on CUDA keeps
  `step` on the CPU) cannot be selected on the device: the guard then reads the flag once per step (a
  sync) and warns once; pass fused=True or capturable=True.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from typing import Any

import torch

from mixprec.masters import MasterWeights


@functools.cache
def _step_takes_no_grad_scaler(cls: type) -> bool:
    return "grad_scaler" not in inspect.signature(cls.step).parameters


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether optimizer.step() reads a `found_inf` attribute and skips on the device (GradScaler's protocol)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and _step_takes_no_grad_scaler(type(optimizer))


class ProtectedStep:
    """optimizer.step() that changes nothing where the device flag `skip` is True."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.inner = optimizer.optimizer if isinstance(optimizer, MasterWeights) else optimizer
        self.mode = "found_inf" if supports_found_inf(self.inner) else "select"
        self._warned = False

    def stepped_params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def step(self, skip: torch.Tensor) -> None:
        if self.mode == "found_inf":
            self.inner.found_inf = skip.to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.inner.found_inf
            return
        params = self.stepped_params()
        state = self.optimizer.state
        targets = list(params)
        fresh = []
        for p in params:
            if p in state and state[p]:
                targets.extend(v for v in state[p].values() if isinstance(v, torch.Tensor))
            else:
                fresh.append(p)
        if any(t.device != skip.device for t in targets):
            self._step_with_host_flag(skip, targets, fresh)
            return
        copies = [t.clone() for t in targets]
        self.optimizer.step()
        with torch.no_grad():
            for t, c in zip(targets, copies):
                t.copy_(torch.where(skip, c, t))
            for p in fresh:   # state created by this step: zeros (torch's initial state) where skipped
                for v in state[p].values():
                    if isinstance(v, torch.Tensor) and v.device == skip.device:
                        v.copy_(torch.where(skip, torch.zeros((), dtype=v.dtype, device=v.device), v))
        if isinstance(self.optimizer, MasterWeights):
            self.optimizer.copy_masters_to_model()

    def _step_with_host_flag(self, skip: torch.Tensor, targets: list[torch.Tensor], fresh: list) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"StabilityGuard: {type(self.inner).__name__} keeps optimizer state on another device than "
                          "its parameters (torch's non-capturable optimizers keep 'step' on the CPU), so a skip cannot "
                          "be selected on the device: the guard reads its flag once per step (a host sync). Build the "
                          "optimizer with fused=True (skips inside its kernel) or capturable=True.",
                          RuntimeWarning, stacklevel=4)
        if bool(skip.item()):
            for p in fresh:
                self.optimizer.state.pop(p, None)
            return
        self.optimizer.step()


def reset_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], mask: torch.Tensor) -> None:
    """Zero the optimizer state (moments, step counts, block scales) of params[k] where mask[k] (SPAM's reset).

    Floating-point state only: block-quantized moments read as 0 once their absmax scale is 0, and integer codes
    stay. A Kahan compensation buffer is a rounding residue of the parameter, not a moment: it stays. State on
    another device than the mask (a CPU step count) stays too."""
    with torch.no_grad():
        for k, p in enumerate(params):
            st = optimizer.state.get(p)
            if not st:
                continue
            m = mask[k]
            for key, v in st.items():
                if (isinstance(v, torch.Tensor) and v.is_floating_point() and key != "kahan_comp"
                        and v.device == m.device):
                    v.copy_(torch.where(m, torch.zeros((), dtype=v.dtype, device=v.device), v))


def scale_grads_(params: list[torch.Tensor], coef: torch.Tensor) -> None:
    """grad *= coef for every gradient (one foreach multiply per device and dtype), as clip_grads_with_norm_."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = p.grad._values() if p.grad.is_sparse else p.grad
            groups.setdefault((g.device, g.dtype), []).append(g)
    with torch.no_grad():
        for (device, _), grads in groups.items():
            torch._foreach_mul_(grads, coef.to(device, non_blocking=True))


@contextlib.contextmanager
def lowered_lr(optimizers: list[torch.optim.Optimizer], factor: float | None):
    """Multiply every group's lr by factor for the enclosed step, then put back the values that were there (so a
    scheduler that sets lr itself never sees the lowered value)."""
    if factor is None:
        yield
        return
    saved = [[g["lr"] for g in o.param_groups] for o in optimizers]
    for o in optimizers:
        for g in o.param_groups:
            g["lr"] = g["lr"] * factor
    try:
        yield
    finally:
        for o, lrs in zip(optimizers, saved):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr


def update_scaler(scaler: Any, keep: torch.Tensor) -> torch.Tensor:
    """scaler.update(), then its device state (scale, trackers, counters) put back where `keep` (a guard fault:
    the skipped batch never happened for the scale schedule either). Returns the scale this iteration used."""
    before = {k: v.clone() for k, v in scaler.device_state().items()}
    scaler.update()
    with torch.no_grad():
        for k, v in scaler.device_state().items():
            v.copy_(torch.where(keep, before[k], v))
    return before["scale"]
