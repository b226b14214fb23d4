"""The 2018 paper's underflow measure, from one probe step.

Mixed Precision Training (Micikevicius et al., 2018) counted activation-gradient values that become
zero in FP16: in Multibox SSD 67 % did, which is why it scales the loss. The probe here runs one
forward and backward pass in FP32 (no autocast) on a training batch, records the gradient of every
leaf module's output (the activation gradients) and of every parameter, and counts the values that
are nonzero in FP32 but round to zero in FP16 (|g| < 2**-25, half FP16's smallest subnormal) -
without scaling (the paper's measure, for any recipe: what FP16 would lose), and, for a recipe that
computes in FP16, multiplied by that recipe's loss scale (what its FP16 backward does lose).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.fp8.linear import Float8Linear


@dataclass(frozen=True)
class UnderflowCounts:
    """Fractions of gradient values (of all values counted) that FP16 flushes to zero."""

    activation_grads: float                 # no scaling: the paper's measure
    activation_grads_scaled: float | None   # after multiplying by the loss scale; None: no FP16 scale given
    weight_grads: float
    weight_grads_scaled: float | None
    scale: float | None
    n_activation_values: int


def _flushes_to_zero(g: torch.Tensor, scale: float) -> tuple[int, int]:
    """(values nonzero in FP32 whose FP16 rounding of g*scale is zero, values)."""
    g = g.detach().float()
    lost = (g != 0) & ((g * scale).to(torch.float16) == 0)
    return int(lost.sum()), g.numel()


def _fraction(grads: list[torch.Tensor], scale: float) -> float:
    lost = total = 0
    for g in grads:
        n_lost, n = _flushes_to_zero(g, scale)
        lost, total = lost + n_lost, total + n
    return lost / total if total else float("nan")


def _without_fp8(model: nn.Module) -> nn.Module:
    """The model with each Float8Linear (which quantizes whatever autocast says) replaced by an
    nn.Linear holding the same weights, so that the probe's backward is FP32 throughout."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Float8Linear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = module.weight, module.bias   # the copy's own Parameters
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
    return model


def probe_underflow(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_factor: float = 1.0,
                    scale: float | None = None) -> UnderflowCounts:
    """Count FP16 gradient underflow of `model` on batch (x, y) in one FP32 forward/backward.

    `scale`: the loss scale of a recipe that computes in FP16 (1.0 for unscaled FP16); None leaves the
    scaled fractions out. Works on an FP32 copy (the model, its BatchNorm statistics and its grads are
    left untouched).
    """
    probe = _without_fp8(copy.deepcopy(model)).float().train()
    activation_grads: list[torch.Tensor] = []

    def keep_output_grad(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda g: activation_grads.append(g.detach()))

    leaves = [m for m in probe.modules() if not list(m.children())]
    handles = [m.register_forward_hook(keep_output_grad) for m in leaves]
    try:
        for p in probe.parameters():
            p.grad = None
        with torch.autocast(x.device.type, enabled=False):
            logits = probe(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1)) * loss_factor
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    weight_grads = [p.grad for p in probe.parameters() if p.grad is not None]
    return UnderflowCounts(
        activation_grads=_fraction(activation_grads, 1.0),
        activation_grads_scaled=None if scale is None else _fraction(activation_grads, scale),
        weight_grads=_fraction(weight_grads, 1.0),
        weight_grads_scaled=None if scale is None else _fraction(weight_grads, scale),
        scale=scale,
        n_activation_values=sum(g.numel() for g in activation_grads))
