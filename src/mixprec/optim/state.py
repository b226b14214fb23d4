"""Per-parameter optimizer state: its layout for each state_dtype, creation, and conversion.

Keys (torch.optim.AdamW's names where the meaning is the same, so its checkpoints load):
    step                        FP32 0-dim tensor on the parameter's device (steps taken)
    state_dtype                 the layout below, as a string
    exp_avg, exp_avg_sq         dense moments: FP32, or BF16 for state_dtype "bf16"
    exp_avg_codes/_absmax,
    exp_avg_sq_codes/_absmax    block-quantized moments (blockwise.py) for "int8", "int4", "fp8"
    kahan_comp                  rounding loss of a BF16/FP16 parameter (rounding="kahan")
"""
from __future__ import annotations

import torch

from mixprec.optim.blockwise import dequantize_blockwise, quantize_blockwise
from mixprec.optim.codes import StateFormat, get_state_format

# Below this many elements a tensor keeps FP32 state (bitsandbytes and torchao use the same cut):
# biases and norm weights are a sliver of the memory, and their scales would cost a block each.
DEFAULT_MIN_QUANT_NUMEL = 4096


def effective_format(param: torch.Tensor, state_dtype: str, min_quant_numel: int) -> StateFormat:
    """The layout a parameter gets: `state_dtype`, or FP32 for tensors under `min_quant_numel`."""
    fmt = get_state_format(state_dtype)
    if fmt.name != "fp32" and param.numel() < min_quant_numel:
        return get_state_format("fp32")
    return fmt


def needs_kahan(param: torch.Tensor, rounding: str) -> bool:
    return rounding == "kahan" and param.dtype in (torch.bfloat16, torch.float16)


def init_state(param: torch.Tensor, fmt: StateFormat, rounding: str) -> dict:
    """Fresh (zero) state of a parameter in layout `fmt`."""
    state: dict = {"step": torch.zeros((), dtype=torch.float32, device=param.device), "state_dtype": fmt.name}
    zeros = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
    state.update(moments_to_state(zeros, zeros, fmt, param))
    if needs_kahan(param, rounding):
        state["kahan_comp"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
    return state


def moments_to_state(m: torch.Tensor, v: torch.Tensor, fmt: StateFormat, param: torch.Tensor) -> dict:
    """Store FP32 moments (flat) in layout `fmt` (round-to-nearest for BF16 and the codes)."""
    if not fmt.quantized:
        dtype = torch.bfloat16 if fmt.name == "bf16" else torch.float32
        return {"exp_avg": m.to(dtype).view_as(param).clone(), "exp_avg_sq": v.to(dtype).view_as(param).clone()}
    out = {}
    for key, x, code in (("exp_avg", m, fmt.m_code), ("exp_avg_sq", v, fmt.v_code)):
        out[key + "_codes"], out[key + "_absmax"] = quantize_blockwise(x, code, fmt.block)
    return out


def state_to_moments(state: dict, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 moments (flat) of a state in whatever layout its `state_dtype` says."""
    fmt = get_state_format(state.get("state_dtype", "fp32"))
    if not fmt.quantized:
        return state["exp_avg"].reshape(-1).float(), state["exp_avg_sq"].reshape(-1).float()
    m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], fmt.m_code, fmt.block, numel)
    v = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], fmt.v_code, fmt.block, numel)
    return m, v


def convert_state(state: dict, param: torch.Tensor, fmt: StateFormat, rounding: str) -> dict:
    """Bring a loaded state (any layout, e.g. an FP32 checkpoint of torch.optim.AdamW) into `fmt`."""
    if "exp_avg" not in state and "exp_avg_codes" not in state:  # no moments yet: nothing to convert
        return state
    state.setdefault("state_dtype", "fp32")
    step = state.get("step", torch.zeros(()))
    step = torch.as_tensor(step, dtype=torch.float32).to(param.device).reshape(())
    if state["state_dtype"] != fmt.name:
        m, v = state_to_moments(state, param.numel())
        for key in list(state):
            if key.startswith("exp_avg"):
                del state[key]
        state.update(moments_to_state(m, v, fmt, param))
        state["state_dtype"] = fmt.name
    state["step"] = step
    if needs_kahan(param, rounding):
        comp = state.get("kahan_comp")
        state["kahan_comp"] = (torch.zeros_like(param) if comp is None
                               else comp.to(device=param.device, dtype=param.dtype))
    else:
        state.pop("kahan_comp", None)
    return state


def state_bytes(state: dict) -> int:
    """Bytes of the moments (codes, scales, dense moments) of one parameter's state."""
    return sum(v.numel() * v.element_size() for k, v in state.items()
               if k.startswith("exp_avg") and isinstance(v, torch.Tensor))
