"""Launching the fused Adam kernel: bucketing tensors, the pointer and program tables, step counts.

Per `step` and parameter group: tensors are bucketed by (parameter dtype, gradient dtype, state
layout, rounding, 16-byte alignment), each bucket is one launch of _triton_kernel.fused_adam_kernel
(a model whose tensor sizes are multiples of 16 and whose tensors all have low-bit state gets one). The tables live on
the GPU; they are rebuilt only when an address changes (new gradient tensors) and uploaded from
pinned memory without blocking, so a step does not wait for the GPU. After the launch the per-tensor
step counts advance by 1 - found_inf in one foreach op (no host sync).
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from mixprec.optim import rounding as rnd
from mixprec.optim.codes import Minifloat, NativeFloat8, get_state_format
from mixprec.optim.reference import AdamHyper

# Program tile: ROWS quantization blocks (1024 values for either block size): 8 values per
# thread for each of the two halves at 4 warps, i.e. 16-byte loads of FP32 parameters and gradients.
_TILE = 1024
_NUM_WARPS = 4


@functools.cache
def triton_available() -> bool:
    """True when triton imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.uint8: tl.uint8, torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}[dtype]


def _code_args(code) -> tuple[int, int, bool, float, float]:
    """(exponent bits, mantissa bits, subnormals, max value, lowest value) of a code for the kernel."""
    if isinstance(code, Minifloat):
        return code.exp_bits, code.man_bits, code.subnormals, code.max_value, -code.max_value
    if isinstance(code, NativeFloat8):
        return 0, 0, False, code.max_value, (-code.max_value if code.signed else code.min_value)
    return 0, 0, False, 1.0, -1.0


def _aligned(p: torch.Tensor, grad: torch.Tensor, state: dict) -> bool:
    """Whether the kernel may use 16-byte vector accesses: numel and every address divisible by 16.

    (Tensors of other sizes go to a launch of their own, with element-wise masks.)
    """
    if p.numel() % 16 or p.data_ptr() % 16 or grad.data_ptr() % 16:
        return False
    return all(t.data_ptr() % 16 == 0 for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A table onto the device; pinned + non_blocking, so the upload does not wait for the GPU."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class FusedAdamLauncher:
    """Builds (and caches) the tables of each bucket and launches the fused kernel."""

    def __init__(self) -> None:
        self._ptr_cache: dict[tuple, tuple[tuple, torch.Tensor]] = {}
        self._prog_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def invalidate(self) -> None:
        """Forget every table (after load_state_dict replaced the state tensors)."""
        self._ptr_cache.clear()
        self._prog_cache.clear()

    def step(self, params: list[torch.Tensor], states: list[dict], tensor_ids: list[int], hp: AdamHyper, *,
             grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
             grads: list[torch.Tensor] | None = None) -> None:
        """Update `params` (all on one CUDA device) and their states with `grads` (default: each p.grad;
        a sharded parameter passes its local shard and its gradient's)."""
        if grads is None:
            grads = [p.grad for p in params]
        buckets: dict[tuple, list[int]] = {}
        for i, (p, g, st) in enumerate(zip(params, grads, states)):
            rounding = hp.rounding if p.dtype != torch.float32 else "nearest"
            key = (p.device, p.dtype, g.dtype, st["state_dtype"], rounding, _aligned(p, g, st))
            buckets.setdefault(key, []).append(i)
        for key, idx in buckets.items():
            self._launch(key, [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx],
                         [tensor_ids[i] for i in idx], hp, grad_scale, found_inf)
        steps = [st["step"] for st in states]
        if found_inf is None:
            torch._foreach_add_(steps, 1.0)
        else:
            # A list of the same 0-dim tensor, as torch's fused AdamW does: the (list, Tensor) overload
            # synchronizes with the host (torch 2.11; test_optim_kernel's sync-debug test guards this).
            increment = 1.0 - found_inf.to(steps[0].device, torch.float32).reshape(())
            torch._foreach_add_(steps, [increment] * len(steps))

    def _tables(self, key, params, grads, states, tensor_ids, seed):
        device = params[0].device
        fmt = get_state_format(key[3])
        m_name, v_name = ("exp_avg_codes", "exp_avg_sq_codes") if fmt.quantized else ("exp_avg", "exp_avg_sq")
        rows = []
        for p, g, st in zip(params, grads, states):
            absmax = ((st["exp_avg_absmax"].data_ptr(), st["exp_avg_sq_absmax"].data_ptr())
                      if fmt.quantized else (0, 0))
            comp = st["kahan_comp"].data_ptr() if "kahan_comp" in st else 0
            rows.append((p.data_ptr(), g.data_ptr(), st[m_name].data_ptr(), st[v_name].data_ptr(),
                         *absmax, st["step"].data_ptr(), comp))
        rows_t = tuple(rows)
        cached = self._ptr_cache.get(key)
        if cached is None or cached[0] != rows_t:
            cached = (rows_t, _upload(torch.tensor(rows, dtype=torch.int64), device))
            self._ptr_cache[key] = cached

        numels = tuple(p.numel() for p in params)
        prog_key = (device, numels, tuple(tensor_ids), seed)
        progs = self._prog_cache.get(prog_key)
        if progs is None:
            counts = torch.tensor([math.ceil(n / _TILE) for n in numels])
            prog_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
            first = torch.cumsum(counts, 0) - counts
            prog_start = (torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)) * _TILE
            bases = [rnd.tensor_base_key(seed, t) for t in tensor_ids]
            progs = tuple(_upload(x, device) for x in (torch.tensor(numels, dtype=torch.int64), torch.tensor(bases),
                                                       prog_tensor, prog_start.to(torch.int64)))
            self._prog_cache[prog_key] = progs
        return cached[1], progs

    def _launch(self, key, params, grads, states, tensor_ids, hp: AdamHyper, grad_scale, found_inf) -> None:
        from mixprec.optim._triton_kernel import (ROUND_KAHAN, ROUND_NEAREST, ROUND_STOCHASTIC, STATE_DENSE_BF16,
                                                STATE_DENSE_F32, STATE_FP8, STATE_MINIFLOAT, fused_adam_kernel)
        device, p_dtype, g_dtype, state_dtype, rounding, aligned = key
        fmt = get_state_format(state_dtype)
        ptrs, (numels, bases, prog_tensor, prog_start) = self._tables(key, params, grads, states, tensor_ids, hp.seed)
        if fmt.quantized:
            state = STATE_FP8 if isinstance(fmt.m_code, NativeFloat8) else STATE_MINIFLOAT
            m_dtype = states[0]["exp_avg_codes"].dtype
            v_dtype = states[0]["exp_avg_sq_codes"].dtype
        else:
            state = STATE_DENSE_BF16 if fmt.name == "bf16" else STATE_DENSE_F32
            m_dtype = v_dtype = states[0]["exp_avg"].dtype
        m_exp, m_man, m_sub, m_max, m_low = _code_args(fmt.m_code)
        v_exp, v_man, v_sub, v_max, v_low = _code_args(fmt.v_code)
        block = fmt.block
        dummy = prog_start  # any device pointer: unused when HAS_GRAD_SCALE / HAS_FOUND_INF is False
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            fused_adam_kernel[(prog_tensor.numel(),)](
                ptrs, numels, bases, prog_tensor, prog_start,
                grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
                hp.lr, hp.beta1, hp.one_minus_beta1, hp.beta2, hp.one_minus_beta2, hp.ln_beta1, hp.ln_beta2,
                hp.eps, hp.weight_decay, hp.lr_wd,
                P_DT=_tl_dtype(p_dtype), G_DT=_tl_dtype(g_dtype), M_DT=_tl_dtype(m_dtype), V_DT=_tl_dtype(v_dtype),
                STATE=state, PACK4=fmt.bits == 4,
                M_EXP=m_exp, M_MAN=m_man, M_SUB=m_sub, M_MAX=m_max, M_LOW=m_low,
                V_EXP=v_exp, V_MAN=v_man, V_SUB=v_sub, V_MAX=v_max, V_LOW=v_low,
                ROUNDING={"nearest": ROUND_NEAREST, "stochastic": ROUND_STOCHASTIC, "kahan": ROUND_KAHAN}[rounding],
                DECOUPLED=hp.decoupled, HAS_WD=hp.weight_decay != 0,
                HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, ALIGNED=aligned,
                BLOCK=block, ROWS=_TILE // block, num_warps=_NUM_WARPS, enable_fp_fusion=False,
            )
