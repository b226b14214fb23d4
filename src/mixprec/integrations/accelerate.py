"""mixprec under Hugging Face accelerate: the policy is mixprec's, the rest (DDP/FSDP, devices, data) accelerate's.

    accelerator = Accelerator(mixed_precision="no")
    model, optimizer, loader = mixprec.integrations.accelerate.prepare(
        accelerator, model, optimizer, "fp16-mixed", loader)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)                        # scaled by mixprec's LossScaler
        accelerator.clip_grad_norm_(model.parameters(), 1.0)   # gradients already unscaled
        optimizer.step()                                  # skipped after an overflow
        optimizer.zero_grad()

accelerate has no seam for a third-party precision (its FP8 backends are a closed list), so `prepare` applies
the policy before handing the objects over with mixed_precision="no": `mixprec.integrations.convert` (mp.prepare
and a forward under mp.autocast), FP32 master weights where the policy keeps them, and the optimizer wrapped in a
`MixprecOptimizer` that steps through the policy's LossScaler (see mixprec.integrations._scaling: the loss is
scaled in the backward pass only, gradients are unscaled when the backward pass that syncs them ends).
"""
from __future__ import annotations

from typing import Any

import accelerate
import torch
import torch.nn as nn

from mixprec.integrations._scaling import LossScaling, MixprecOptimizer, find_mixprec_optimizer, guard_factory
from mixprec.integrations.converters import _as_policy, convert
from mixprec.masters import MasterWeights
from mixprec.policy import Policy
from mixprec.scaler import LossScaler

__all__ = ["prepare", "loss_scaler"]


def prepare(accelerator: "accelerate.Accelerator", model: nn.Module, optimizer: torch.optim.Optimizer,
            policy: Policy | str, *others: Any, scaler: LossScaler | None = None, head: str | None = None,
            guard: Any = None) -> tuple:
    """Apply `policy` to `model` and `optimizer`, then `accelerator.prepare(model, optimizer, *others)`.

    Returns what accelerator.prepare returns, in the same order. The accelerator must have
    mixed_precision="no" (its own autocast and GradScaler would run on top of mixprec's). `scaler`
    defaults to `mp.LossScaler.for_policy(policy)` (disabled for BF16 and FP8 recipes); `head` names the
    output head if mp.prepare's guess would be wrong. The optimizer is built over the model's parameters
    before the call, as accelerate expects: FP8 swaps and the "-true" recipes' casts keep the Parameter
    objects, and a "-true" recipe's master weights are made here (mp.MasterWeights: clip
    `mp.master_params(optimizer)`, the FP32 masters, rather than model.parameters()). `guard`: keyword arguments
    of a mp.StabilityGuard (or a guard) that then takes the step: guard.step(loss, scaler=scaler) with the loss
    the model returned (a `loss` output); its state rides in the optimizer's state dict.
    """
    if not isinstance(accelerator, accelerate.Accelerator):
        raise TypeError(f"accelerator must be an accelerate.Accelerator; got {type(accelerator).__name__}")
    if accelerator.mixed_precision != "no":
        raise ValueError(f"Accelerator(mixed_precision={accelerator.mixed_precision!r}) would run accelerate's "
                         "torch.autocast (and, for fp16, its GradScaler) on top of mixprec's policy; create it with "
                         "mixed_precision='no': the policy sets the precision")
    policy = _as_policy(policy)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    if find_mixprec_optimizer(optimizer) is not None:
        raise ValueError("this optimizer was already prepared by mixprec")
    scaling = LossScaling(scaler if scaler is not None else LossScaler.for_policy(policy),
                          is_sync=lambda: accelerator.sync_gradients, guard_factory=guard_factory(model, guard))
    convert(model, policy, head=head, after=scaling.mark)
    if policy.master_weights and not isinstance(optimizer, MasterWeights):
        optimizer = MasterWeights(optimizer)
    return accelerator.prepare(model, MixprecOptimizer(optimizer, scaling), *others)


def loss_scaler(optimizer: Any) -> LossScaler:
    """The LossScaler of an optimizer returned by `prepare` (for its scale and skipped-step counter)."""
    found = find_mixprec_optimizer(optimizer)
    if found is None:
        raise ValueError(f"{type(optimizer).__name__} was not prepared by mixprec.integrations.accelerate.prepare")
    return found.scaler
