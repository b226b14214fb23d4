"""The optimizer of a training run: `--optim` (AdamW and where its moments live) and `--rounding`.

    adamw        FP32 moments. torch.optim.AdamW (fused on CUDA) wherever the update is not rounded on
                 its own; mixprec's AdamW where half parameters are updated in place with stochastic or
                 Kahan rounding, which torch's AdamW does not do
    adamw-bf16   mixprec.optim.AdamW(state_dtype="bf16"), and likewise -int8, -int4, -fp8

Rounding is how a BF16/FP16 parameter takes its FP32 update, and so applies only to a recipe whose half
parameters the optimizer updates in place (bf16-true). There, "nearest" loses every update under half
an ulp: a BF16 weight of 1.0 (ulp 2**-7 above it, 2**-8 below) never moves for a decay of lr*wd = 2e-4
per step. So bf16-true defaults to "stochastic" (unbiased: the decay accumulates in expectation).
fp16-true keeps FP32 master weights (mp.MasterWeights): the optimizer steps those, the FP16 copy is
rounded to nearest from them after each step, and small updates accumulate in the masters; no rounding
mode applies. Every other recipe keeps FP32 parameters.
"""
from __future__ import annotations

import torch

import mixprec as mp

OPTIMS = ("adamw", "adamw-bf16", "adamw-int8", "adamw-int4", "adamw-fp8")
ROUNDINGS = ("nearest", "stochastic", "kahan")
_HALF = (torch.float16, torch.bfloat16)


def rounds_in_place(policy: mp.Policy) -> bool:
    """Whether the optimizer updates half-precision parameters directly (no FP32 master weights)."""
    return policy.param_dtype in _HALF and not policy.master_weights


def default_rounding(policy: mp.Policy) -> str:
    """Stochastic where half parameters are updated in place, else nearest (which then changes nothing)."""
    return "stochastic" if rounds_in_place(policy) else "nearest"


def check_rounding(rounding: str | None, policy: mp.Policy, recipe: str) -> None:
    """Raise ValueError for an unknown rounding, or one given for a recipe whose updates are not rounded."""
    if rounding is None:
        return
    if rounding not in ROUNDINGS:
        raise ValueError(f"Unknown rounding {rounding!r}; choose one of: {', '.join(ROUNDINGS)}")
    if not rounds_in_place(policy):
        kept = "FP32 master weights of its FP16 parameters" if policy.master_weights else "FP32 parameters"
        raise ValueError(f"--rounding applies to BF16/FP16 parameters updated in place (bf16-true); recipe "
                         f"{recipe} keeps {kept}, so its updates are not rounded: drop --rounding")


def effective_rounding(rounding: str | None, policy: mp.Policy) -> str:
    return default_rounding(policy) if rounding is None else rounding


def uses_torch_adamw(optim: str, rounding: str | None, policy: mp.Policy) -> bool:
    return optim == "adamw" and not (rounds_in_place(policy) and effective_rounding(rounding, policy) != "nearest")


def build_optimizer(groups: list[dict], *, optim: str, rounding: str | None, policy: mp.Policy,
                    device: torch.device, lr: float, betas: tuple[float, float], eps: float,
                    seed: int) -> torch.optim.Optimizer:
    """The optimizer of `optim` (one of OPTIMS) over parameter groups, wrapped in mp.MasterWeights when
    the policy keeps master weights. `seed` seeds stochastic rounding (saved in the state dict)."""
    if optim not in OPTIMS:
        raise ValueError(f"Unknown optim {optim!r}; choose one of: {', '.join(OPTIMS)}")
    rounding = effective_rounding(rounding, policy)
    if uses_torch_adamw(optim, rounding, policy):
        # fused on CUDA: one kernel, and it skips overflowed steps on the device (no sync)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")
    else:
        state_dtype = "fp32" if optim == "adamw" else optim.removeprefix("adamw-")
        optimizer = mp.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, state_dtype=state_dtype,
                                   rounding=rounding, seed=seed)
    return mp.MasterWeights(optimizer) if policy.master_weights else optimizer


def describe(optim: str, rounding: str | None, policy: mp.Policy) -> str:
    """One line: which AdamW, its moments, and how half parameters take the update."""
    if uses_torch_adamw(optim, rounding, policy):
        text = "torch.optim.AdamW (FP32 moments)"
    else:
        state = "FP32" if optim == "adamw" else optim.removeprefix("adamw-").upper()
        text = f"mixprec.optim.AdamW ({state} moments)"
    if policy.master_weights:
        return text + " on FP32 master weights"
    if rounds_in_place(policy):
        return text + f", {effective_rounding(rounding, policy)} rounding of the half parameters"
    return text
