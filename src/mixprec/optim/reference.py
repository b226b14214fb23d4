"""The Adam/AdamW update of one parameter in plain PyTorch: the reference the fused kernel matches.

It runs on any device. Every FP32 operation is spelled out in the order the kernel does it
(no fused multiply-adds), so that the moments, and hence their quantization codes, come out bit
for bit the same; only the bias corrections of late steps (an exp) and hence the parameters may
differ by FP32 rounding.

    g = grad / grad_scale                                   (when a loss scaler passes its scale)
    g = g + wd * p                                          (Adam: L2 decay through the gradient)
    m = beta1 * m + (1 - beta1) * g                         (m, v dequantized to FP32 first)
    v = beta2 * v + (1 - beta2) * g * g
    t = step + 1;  bc1 = 1 - beta1**t;  bc2 = 1 - beta2**t     (one_minus_exp(t ln beta), accurate)
    delta = -(lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps) - (lr * wd) * p     (AdamW: decoupled decay)
    p = round(p + delta)      nearest, stochastic, or Kahan-compensated for BF16/FP16 parameters
    m, v -> state layout      (block-quantized codes from these FP32 values; the update used FP32)
    when found_inf != 0: nothing changes, the step count included

Non-finite values stay in their element, whatever the state layout (see `reference_step`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixprec.optim import rounding as rnd
from mixprec.optim.blockwise import quantize_blockwise
from mixprec.optim.codes import get_state_format
from mixprec.optim.state import state_to_moments


@dataclass(frozen=True)
class AdamHyper:
    """One parameter group's hyper-parameters, with the FP32 constants both paths use."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool          # AdamW (True) or Adam with L2 decay (False)
    rounding: str            # "nearest" | "stochastic" | "kahan"
    seed: int

    @property
    def one_minus_beta1(self) -> float:
        return 1.0 - self.beta1

    @property
    def one_minus_beta2(self) -> float:
        return 1.0 - self.beta2

    @property
    def ln_beta1(self) -> float:
        return math.log(self.beta1) if self.beta1 > 0 else -math.inf

    @property
    def ln_beta2(self) -> float:
        return math.log(self.beta2) if self.beta2 > 0 else -math.inf

    @property
    def lr_wd(self) -> float:
        return self.lr * self.weight_decay


def _f32(x: float, like: torch.Tensor) -> torch.Tensor:
    """A Python float as an FP32 0-dim tensor (so every constant is rounded to FP32 once, as in the kernel)."""
    return torch.tensor(x, dtype=torch.float32, device=like.device)


# 1/k! for k = 1..10: expm1's Taylor series, which for |x| <= 1/2 reaches FP32 precision by its 10th term
# (0.5**9 / 10! = 5e-10 relative).
EXPM1_COEFFS = tuple(1.0 / math.factorial(k) for k in range(1, 11))
# Below this x, 1 - e**x >= 0.39: the plain exp loses nothing to cancellation.
SERIES_LIMIT = -0.5


def one_minus_exp(x: torch.Tensor) -> torch.Tensor:
    """1 - e**x for FP32 x <= 0 (the bias correction 1 - beta**t with x = t ln beta), within 2 ulps.

    1 - exp2(t log2 beta) cancels: with beta2 = 0.999 at t = 1, an exp off by one ulp (GPU exp is
    approximate) puts 1e-4 relative error into bc2. Near zero a Horner series in plain FP32 products
    and sums (the kernel's too, bit for bit); below SERIES_LIMIT the exp, where nothing cancels.
        p = c10; p = p x + c9; ...; p = p x + c1;  1 - e**x = -(p x)
    """
    p = _f32(EXPM1_COEFFS[-1], x)
    for c in reversed(EXPM1_COEFFS[:-1]):
        p = p * x + _f32(c, x)
    return torch.where(x > SERIES_LIMIT, -(p * x), 1.0 - torch.exp(x))


def reference_step(param: torch.Tensor, grad: torch.Tensor, state: dict, hp: AdamHyper, *, tensor_id: int,
                   grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    """Update `param` and its `state` in place (state created by state.init_state).

    Non-finite values (a NaN or +-inf gradient element, or a moment that overflows) stay in their element:
    * the parameter takes FP32 Adam's update, element by element: a NaN or +-inf gradient makes its
      element NaN (m / sqrt(v) is inf / inf or NaN), as with FP32 state and torch.optim.AdamW, and the
      NaN stays visible there;
    * FP32 state keeps the element's non-finite moments (as torch.optim.AdamW); BF16 state keeps them too
      (stochastic rounding maps NaN to NaN and +-inf to +-inf);
    * block-quantized state ("int8", "int4", "fp8") stores a non-finite moment as 0 over a block scale of
      the finite values (blockwise.quantize_blockwise), so the new state is bit for bit the state this
      step gives when that element's new moments are 0, and every other element of the block (parameter,
      moments, codes) is exactly what it would be then; that is also what a finite gradient there gives,
      unless that element would have held its block's largest moment. Later steps restart the element's
      moments from 0 (its parameter stays NaN, as with FP32 state).
    Nothing reaches another element: the block absmax is the only place where elements' values meet.
    """
    fmt = get_state_format(state["state_dtype"])
    numel = param.numel()
    g = grad.reshape(-1).float()
    if grad_scale is not None:
        g = g / grad_scale.float()
    p32 = param.detach().reshape(-1).float()
    if not hp.decoupled and hp.weight_decay != 0:
        g = g + p32 * _f32(hp.weight_decay, g)
    m_old, v_old = state_to_moments(state, numel)
    m = m_old * _f32(hp.beta1, g) + g * _f32(hp.one_minus_beta1, g)
    v = v_old * _f32(hp.beta2, g) + (g * g) * _f32(hp.one_minus_beta2, g)

    t = state["step"].float() + 1.0
    bc1 = one_minus_exp(t * _f32(hp.ln_beta1, g))
    bc2 = one_minus_exp(t * _f32(hp.ln_beta2, g))
    step_size = _f32(hp.lr, g) / bc1
    inv_sqrt_bc2 = torch.div(torch.ones_like(bc2), torch.sqrt(bc2))  # one division, as div_rn
    denom = torch.sqrt(v) * inv_sqrt_bc2 + _f32(hp.eps, g)
    delta = -(step_size * (m / denom))
    if hp.decoupled and hp.weight_decay != 0:
        delta = delta - p32 * _f32(hp.lr_wd, g)

    new_param, new_state = _write_back(param, p32, delta, m, v, state, fmt, hp, tensor_id, t)
    if found_inf is not None:  # select on the device: no host sync
        skip = found_inf.reshape(()).to(param.device) != 0
        new_param = torch.where(skip, param.reshape(-1), new_param)
        new_state = {k: torch.where(skip, state[k], v) for k, v in new_state.items()}
        t = torch.where(skip, state["step"], t)
    param.detach().view(-1).copy_(new_param)
    for k, v in new_state.items():
        state[k].copy_(v)
    state["step"].copy_(t)


def _write_back(param, p32, delta, m, v, state, fmt, hp: AdamHyper, tensor_id: int, t):
    """New parameter (flat, param dtype) and new state tensors, before the found_inf select."""
    dtype = param.dtype
    new_state: dict = {}
    step_int = t.to(torch.int64)  # on the device: the random keys need no host sync
    if dtype == torch.float32 or hp.rounding == "nearest":
        new_param = (p32 + delta).to(dtype)
    elif hp.rounding == "stochastic":
        key = rnd.stream_key(hp.seed, tensor_id, step_int, rnd.STREAM_PARAM)
        new_param = rnd.stochastic_round(p32 + delta, dtype, rnd.random_bits(key, p32.numel(), p32.device))
    else:  # kahan
        new_param, comp = rnd.kahan_add(param.detach().reshape(-1), delta, state["kahan_comp"].reshape(-1))
        new_state["kahan_comp"] = comp.view_as(state["kahan_comp"])

    if fmt.quantized:
        for key, x, code in (("exp_avg", m, fmt.m_code), ("exp_avg_sq", v, fmt.v_code)):
            new_state[key + "_codes"], new_state[key + "_absmax"] = quantize_blockwise(x, code, fmt.block)
    elif fmt.name == "bf16":
        # Stochastic rounding keeps beta2 = 0.999's small EMA steps, which round-to-nearest drops (BF16
        # state tracked FP32 AdamW 2.3x closer over 1000 steps this way). One 32-bit number per element:
        # the low half rounds m, the high half v.
        r = rnd.random_bits(rnd.stream_key(hp.seed, tensor_id, step_int, rnd.STREAM_MOMENTS), m.numel(), m.device)
        new_state["exp_avg"] = rnd.stochastic_round(m, torch.bfloat16, r).view_as(state["exp_avg"])
        new_state["exp_avg_sq"] = rnd.stochastic_round(v, torch.bfloat16, r >> 16).view_as(state["exp_avg_sq"])
    else:
        new_state["exp_avg"] = m.view_as(state["exp_avg"])
        new_state["exp_avg_sq"] = v.view_as(state["exp_avg_sq"])
    return new_param, new_state
