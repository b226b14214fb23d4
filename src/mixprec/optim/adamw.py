"""AdamW and Adam with FP32, BF16, 8-bit, 4-bit or FP8 moments, for FP32 or pure BF16/FP16 parameters.

    opt = mp.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1,
                         state_dtype="int8",          # fp32 | bf16 | int8 | int4 | fp8
                         rounding="stochastic")       # nearest | stochastic | kahan (BF16/FP16 params)

Every parameter group may override `state_dtype`, `rounding` and `min_quant_numel`. On CUDA with
Triton the whole group is updated by one fused kernel launch per (parameter dtype, layout); elsewhere
by the pure-PyTorch reference (reference.py), which the kernel matches. Like torch's fused
optimizers it takes a loss scaler's `grad_scale` and `found_inf` device tensors (keyword arguments of
`step`, or the attributes torch.amp.GradScaler sets): gradients are divided by the scale inside the
update, and when found_inf is non-zero nothing is written, with no host sync.

Sharded parameters (FSDP2's DTensors) are stepped through their local shards, and their state dict holds
DTensors that torch.distributed.checkpoint reshards (sharded.py); `materialize_state()` creates the state
a checkpoint loads into, so loading needs no optimizer step first.
"""
from __future__ import annotations

from typing import Any, Iterable, Literal

import torch

from mixprec.optim import _launcher as kernels
from mixprec.optim import sharded
from mixprec.optim.codes import STATE_FORMATS
from mixprec.optim.reference import AdamHyper, reference_step
from mixprec.optim.state import DEFAULT_MIN_QUANT_NUMEL, convert_state, effective_format, init_state, state_bytes

StateDtype = Literal["fp32", "bf16", "int8", "int4", "fp8"]
Rounding = Literal["nearest", "stochastic", "kahan"]
Backend = Literal["auto", "triton", "torch"]

STATE_DTYPES: tuple[str, ...] = tuple(STATE_FORMATS)
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic", "kahan")
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
# Group keys that describe the state's layout: a checkpoint's values do not override the optimizer's
# (loading an FP32-state checkpoint into an 8-bit optimizer converts the state instead).
_LAYOUT_KEYS = ("state_dtype", "rounding", "min_quant_numel")


def _check_choice(what: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; choose one of: {', '.join(choices)}")


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with a choice of moment storage and parameter rounding.

    Args:
        params: parameters or parameter groups (groups may override any keyword below).
        lr, betas, eps, weight_decay: as torch.optim.AdamW (floats).
        state_dtype: how the moments are stored: "fp32" (8 B/param), "bf16" (4, stochastically
            rounded), "int8" (2.03, block-quantized non-linear codes), "int4" (1.06), "fp8"
            (2.03, E4M3 moments). Tensors under `min_quant_numel` elements keep FP32. A NaN or inf
            gradient element makes its own parameter NaN, as torch.optim.AdamW does, and nothing else:
            low-bit state stores such a moment as 0 and scales each block by its finite values only.
        rounding: how a BF16/FP16 parameter takes the FP32 update: "nearest" (loses updates under
            half an ulp), "stochastic" (unbiased, seeded), "kahan" (a compensation buffer, +2 B/param).
            FP32 parameters ignore it.
        seed: seed of the stochastic rounding (reproducible runs; saved in the state dict).
        min_quant_numel: smaller tensors keep FP32 state.
        backend: "auto" (the Triton kernel for CUDA tensors when Triton is installed, else the
            reference), "triton" (required), or "torch" (always the reference).
    """

    _step_supports_amp_scaling = True
    _decoupled = True

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 state_dtype: StateDtype = "fp32", rounding: Rounding = "nearest", seed: int = 0,
                 min_quant_numel: int = DEFAULT_MIN_QUANT_NUMEL, backend: Backend = "auto") -> None:
        _check_choice("backend", backend, BACKENDS)
        if backend == "triton" and not kernels.triton_available():
            raise ValueError("backend='triton' needs the triton package and a CUDA GPU; use backend='auto' or 'torch'")
        self.backend = backend
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=state_dtype,
                        rounding=rounding, seed=seed, min_quant_numel=min_quant_numel)
        super().__init__(params, defaults)
        self._launcher = kernels.FusedAdamLauncher()

    def add_param_group(self, param_group: dict) -> None:
        """Add a group, checking its choices and parameters (see the class docstring)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_choice("state_dtype", group["state_dtype"], STATE_DTYPES)
        _check_choice("rounding", group["rounding"], ROUNDINGS)
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if isinstance(lr, torch.Tensor):
            raise TypeError("mixprec AdamW takes lr as a float (it is a kernel argument); got a Tensor")
        if not (lr >= 0 and eps >= 0 and wd >= 0 and 0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"Invalid hyper-parameters lr={lr}, betas={(b1, b2)}, eps={eps}, weight_decay={wd}: "
                             "need lr, eps, weight_decay >= 0 and 0 <= beta < 1")
        for p in group["params"]:
            if torch.is_complex(p):
                raise TypeError("mixprec AdamW does not support complex parameters "
                                f"(got {p.dtype}); pass torch.view_as_real(p) or use torch.optim.AdamW")
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError(f"mixprec AdamW updates float32, bfloat16 or float16 parameters, not {p.dtype}")

    def _hyper(self, group: dict) -> AdamHyper:
        b1, b2 = group["betas"]
        return AdamHyper(lr=float(group["lr"]), beta1=float(b1), beta2=float(b2), eps=float(group["eps"]),
                         weight_decay=float(group["weight_decay"]), decoupled=self._decoupled,
                         rounding=group["rounding"], seed=int(group["seed"]))

    def _tensor_ids(self) -> dict[int, int]:
        """Each parameter's index in the optimizer (the state dict's numbering; keys the random streams)."""
        ids, n = {}, 0
        for group in self.param_groups:
            for p in group["params"]:
                ids.setdefault(id(p), n)
                n += 1
        return ids

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | None = None,
             found_inf: torch.Tensor | None = None):
        """One update of every parameter that has a gradient.

        grad_scale / found_inf: device tensors of a loss scaler (default: the attributes
        torch.amp.GradScaler sets on optimizers with `_step_supports_amp_scaling`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        ids = self._tensor_ids()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            hp = self._hyper(group)
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("mixprec AdamW does not support sparse gradients; "
                                       "use torch.optim.SparseAdam, or dense gradients (sparse=False)")
                if p not in self.state or not self.state[p]:
                    self.state[p] = self._fresh_state(p, group)
            # A sharded (DTensor) parameter steps through its local shard: no DTensor op in the update.
            local = {p: (sharded.local(p), sharded.local(p.grad)) for p in params}
            fused = [p for p in params if self._use_kernel(p)]
            if fused:
                self._launcher.step([local[p][0] for p in fused], [self.state[p] for p in fused],
                                    [ids[id(p)] for p in fused], hp, grad_scale=grad_scale, found_inf=found_inf,
                                    grads=[local[p][1] for p in fused])
            for p in params:
                if not self._use_kernel(p):
                    reference_step(local[p][0], local[p][1], self.state[p], hp, tensor_id=ids[id(p)],
                                   grad_scale=grad_scale, found_inf=found_inf)
        return loss

    def _fresh_state(self, p: torch.Tensor, group: dict) -> dict:
        # The layout follows the whole parameter's size (a DTensor's numel is global): every shard, and every
        # number of shards, chooses the same layout.
        fmt = effective_format(p, group["state_dtype"], group["min_quant_numel"])
        return init_state(sharded.local(p), fmt, group["rounding"])

    @torch.no_grad()
    def materialize_state(self) -> None:
        """Create the (zero) state of every parameter that has none yet, as the first step would, without
        stepping: a checkpoint (torch.distributed.checkpoint loads into existing tensors) then loads into it."""
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self.state or not self.state[p]:
                    self.state[p] = self._fresh_state(p, group)

    def state_dict(self) -> dict:
        """torch.optim's state dict; a sharded parameter's state tensors are DTensors (sharded.py's layout)."""
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in enumerate(params):
            if index in sd["state"] and sharded.is_dtensor(p):
                sd["state"][index] = sharded.to_saved(sd["state"][index], p)
        return sd

    def _use_kernel(self, p: torch.Tensor) -> bool:
        if self.backend == "torch" or not p.is_cuda:
            return False
        return kernels.triton_available()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of this optimizer or of torch.optim.AdamW/Adam, converting the state layout.

        Tensors keep their saved dtypes (torch's loader would cast them to the parameter's dtype);
        layout choices (state_dtype, rounding, min_quant_numel) stay this optimizer's, and state saved
        in another layout (e.g. FP32 moments) is converted to it. A sharded parameter's state, saved on any
        number of shards, is brought to this parameter's shard (sharded.from_saved).
        """
        saved_state = {k: dict(v) for k, v in state_dict["state"].items()}
        before = [{k: g[k] for k in self.defaults if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for group, old in zip(self.param_groups, before):
            for k, v in old.items():
                if k in _LAYOUT_KEYS or k not in group:
                    group[k] = v
        # Saved states are keyed as the saved groups list their parameters (indices; names under DCP).
        saved_keys = [key for g in state_dict["param_groups"] for key in g["params"]]
        for key, p in zip(saved_keys, params):
            if key not in saved_state:
                continue
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            fmt = effective_format(p, group["state_dtype"], group["min_quant_numel"])
            saved = saved_state[key]
            if sharded.is_dtensor(p) or "shards" in saved or any(sharded.is_dtensor(v) for v in saved.values()):
                self.state[p] = sharded.from_saved(saved, p, fmt, group["rounding"])
                continue
            state = {k: (v.to(p.device, copy=True) if isinstance(v, torch.Tensor) else v) for k, v in saved.items()}
            self.state[p] = convert_state(state, p, fmt, group["rounding"])
        self._launcher.invalidate()

    def state_bytes(self) -> int:
        """Bytes held by the moments (codes, block scales, dense moments) of every parameter."""
        return sum(state_bytes(s) for s in self.state.values())


class Adam(AdamW):
    """Adam with L2 weight decay (added to the gradient), with AdamW's storage and rounding choices."""

    _decoupled = False

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
