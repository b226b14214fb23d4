"""Model converters: a model that carries its policy, for loops mixprec does not own (torchtitan-style
model building, accelerate, the Hugging Face Trainer).

    model = build_model(cfg)
    model = mixprec.integrations.convert(model, "bf16-mixed")   # one line in the model-building step
    loss = loss_fn(model(x), y)                                   # the forward runs under the policy

`convert` is `mp.prepare` (FP8 swaps, the module rules, parameter casts) plus a `PolicyForward` set as the
model's `forward` (an instance attribute, like prepare's PrecisionForward: the class is untouched and
`unconvert` removes it) that runs the class's forward under `mp.autocast(policy)` on the device of the
model's tensors. The loop then needs no autocast block; loss scaling, for the FP16 recipes, stays the
loop's (`mp.LossScaler.for_policy(policy)`), or is taken over by the integrations that own an optimizer
(mixprec.integrations.accelerate, mixprec.integrations.transformers).

In torchtitan's order the call goes where its converters run: after the model is built (on the meta device
or not) and before parallelization and the optimizer, so FP8 swaps are in place when both are made.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from mixprec.context import autocast
from mixprec.policy import Policy
from mixprec.prepare import prepare, preparation, unprepare

__all__ = ["PolicyForward", "convert", "unconvert", "policy_of"]


def _as_policy(policy: Policy | str) -> Policy:
    if isinstance(policy, str):
        return Policy.from_recipe(policy)
    if not isinstance(policy, Policy):
        raise TypeError(f"expected a mixprec Policy or a recipe name; got {type(policy).__name__}")
    return policy


def _device_type(module: nn.Module, args: tuple, kwargs: dict) -> str:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    for param in module.parameters():
        return param.device.type
    return "cpu"


class PolicyForward:
    """A model's forward run under `mp.autocast(policy)` (set as `model.forward` by `convert`).

    `after` (optional) maps the forward's output before it is returned: the integrations that own the
    optimizer use it to mark the outputs for loss scaling. The signature of the wrapped forward is kept
    (`inspect.signature(model.forward)` reads the model's own), since hosts read it: the Hugging Face
    Trainer keeps the dataset columns the forward names.
    """

    def __init__(self, module: nn.Module, policy: Policy, after: Callable[[Any], Any] | None = None):
        self.module, self.policy, self.after = module, policy, after
        self.inner: Callable | None = module.__dict__.get("forward")   # a forward set on the instance before us
        self.__signature__ = inspect.signature(self.inner or type(module).forward.__get__(module))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.policy, device_type=_device_type(self.module, args, kwargs)):
            out = self.inner(*args, **kwargs) if self.inner is not None else \
                type(self.module).forward(self.module, *args, **kwargs)
        return self.after(out) if self.after is not None else out

    def __repr__(self) -> str:
        return f"PolicyForward({type(self.module).__name__}, policy {self.policy.name or self.policy.describe()})"


def convert(model: nn.Module, policy: Policy | str, *, head: str | None = None,
            after: Callable[[Any], Any] | None = None) -> nn.Module:
    """Prepare `model` under `policy` and make its forward run under the policy; returns the model.

    1. `mp.prepare(model, policy, head=head)`: FP8 swaps through the policy's converter (same Parameters),
       the precision table's module rules, parameter casts for the "-true" recipes.
    2. `model.forward = PolicyForward(model, policy)`: `mp.autocast(policy)` around every call.
    Idempotent with the same policy; a different policy is refused (unconvert first).
    """
    policy = _as_policy(policy)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module; got {type(model).__name__}")
    current = model.__dict__.get("forward")
    if isinstance(current, PolicyForward):
        if current.policy != policy:
            raise ValueError(f"model was already converted with {current.policy.name or current.policy}; "
                             f"mixprec.integrations.unconvert it first for {policy.name or policy}")
        if after is not None:
            current.after = after
        return model
    model = prepare(model, policy, head=head)
    model.forward = PolicyForward(model, policy, after)
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """Undo `convert`: the model's own forward, then `mp.unprepare`. Returns the model."""
    current = model.__dict__.get("forward")
    if not isinstance(current, PolicyForward):
        raise ValueError(f"{type(model).__name__} was not converted by mixprec.integrations.convert")
    if current.inner is not None:
        model.forward = current.inner
    else:
        del model.forward
    return unprepare(model)


def policy_of(model: nn.Module) -> Policy | None:
    """The policy a model was prepared (or converted) with, or None."""
    record = preparation(model)
    return record.policy if record is not None else None
