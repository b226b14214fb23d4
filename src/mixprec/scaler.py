"""LossScaler: torch.amp.GradScaler's API and guard rails, plus hysteresis, scale bounds, static scaling,
a BF16 pass-through, overflow counters and a cross-rank found_inf.

One iteration (the same calls as GradScaler):

    scaler.scale(loss).backward()      # loss * S; the gradients come out multiplied by S
    scaler.unscale_(opt)               # optional, before clipping: grads *= 1/S, found_inf = any(!finite)
    scaler.step(opt)                   # skips opt.step() if found_inf; returns what opt.step() returns, None if skipped
    scaler.update()                    # computes the next S on the device

The scale update (dynamic=True), all on the device, per update() call with f = any optimizer overflowed:

    if f:   growth_tracker = 0;  hysteresis_tracker -= 1
            if hysteresis_tracker <= 0:  S = max(S * backoff_factor, min_scale)
    else:   growth_tracker += 1
            if growth_tracker == growth_interval:
                growth_tracker = 0;  hysteresis_tracker = hysteresis
                S = min(S * growth_factor, max_scale)  unless that is inf (kept, as GradScaler does)

That is Megatron-LM's DynamicGradScaler rule (and DeepSpeed's default): the hysteresis tracker is refilled
only when the scale grows, so after `hysteresis` overflows every further overflow backs off until
`growth_interval` clean iterations in a row have passed. `consecutive_hysteresis=True` refills it after
every finite iteration instead (DeepSpeed's option of that name): the scale then backs off only after
`hysteresis` overflows in a row. With hysteresis=1, min_scale=0 and max_scale=inf this is exactly
torch.amp.GradScaler (same FP64 products rounded to FP32, same trackers).

Host syncs: scale(), unscale_(), update() and step() of a fused-capable optimizer (torch's
`fused=True` Adam/AdamW/SGD/Adagrad, which skip on the device) never read a device value. step() of any
other optimizer reads found_inf once, because whether to call opt.step() is a Python decision (GradScaler
does the same). get_scale(), state_dict() and the counters read on purpose; the min_scale warning reads one
counter every `warn_interval` update() calls.

What step() returns is GradScaler's convention: what optimizer.step() returned, or None when the step was
skipped. An optimizer that skips on the device returns the same thing either way (whether it skipped is known
on the device only, as with GradScaler). Whether steps ran stays on the device as the counter of skipped
iterations, `num_skipped_steps` (updated by update(); read with one sync, when asked).
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Union

import torch

__all__ = ["LossScaler"]

Losses = Union[torch.Tensor, list, tuple]
_READY, _UNSCALED, _STEPPED = "ready", "unscaled", "stepped"
_FP16_GRAD_MESSAGE = (
    "Attempting to unscale FP16 gradients. Unscaling FP16 gradients in place loses the small values loss "
    "scaling exists to keep: give the optimizer FP32 parameters (mixed precision) or FP32 master weights "
    "(Policy(master_weights=True), apex opt level O2), or, for pure FP16 (apex O3), a static loss scale of 1.")


@dataclass
class _OptimizerState:
    """Where one optimizer is in the current iteration, and what its inf check found."""

    stage: str = _READY
    found_inf: torch.Tensor | None = None       # FP32 0-dim on the scale's device; 1.0 means overflow


class LossScaler:
    """Scales the loss so FP16 gradients keep their small values; skips steps whose gradients overflowed.

    Args:
        init_scale:      the first scale (2**16, as GradScaler, apex and DeepSpeed start).
        growth_factor:   multiplies the scale after `growth_interval` finite iterations in a row (> 1).
        backoff_factor:  multiplies the scale when an overflow backs it off (between 0 and 1).
        growth_interval: finite iterations in a row before the scale grows.
        hysteresis:      overflows absorbed before the scale backs off (Megatron/DeepSpeed; 1 = GradScaler).
        min_scale:       the scale never backs off below this (1: below it scaling shrinks gradients;
                         0 turns the floor off, as GradScaler).
        max_scale:       growth stops here (2**24, apex's cap: larger scales only overflow; inf turns it off).
        dynamic:         False keeps the scale at `init_scale` (static scaling); overflowing steps are still
                         skipped and counted.
        enabled:         False makes every method a pass-through (scale returns the loss, step calls
                         opt.step() and returns what it returns).
        process_group:   None: found_inf stays local (enough under DDP, whose averaged gradients already carry
                         any rank's inf). "default" (the default group) or a ProcessGroup: found_inf is
                         all-reduced with MAX so every rank skips together (sharded optimizers, FSDP, model
                         parallelism).
        consecutive_hysteresis: refill the hysteresis tracker after every finite iteration (DeepSpeed's option)
                         rather than only when the scale grows (Megatron's rule, the default).
        warn_interval:   every this many update() calls the scaler reads its counters (one host sync) and
                         warns if steps kept overflowing at min_scale (or at a static scale) meanwhile.

    BF16: its exponent range is FP32's, so scaling a BF16 loss does nothing useful. If the first loss given to
    scale() is bfloat16, or scale() runs inside a bfloat16 autocast region of the loss's device, or
    `for_policy` gets a BF16 policy that asks for a loss scale, the scaler warns once and turns itself off
    (is_enabled() becomes False and every method passes through). An FP32 loss computed under BF16 autocast
    and scaled outside the region cannot be told apart from FP32 training; scaling it is harmless.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, hysteresis: int = 1, min_scale: float = 1.0,
                 max_scale: float = 2.0**24, dynamic: bool = True, enabled: bool = True,
                 process_group: Any = None, *, consecutive_hysteresis: bool = False,
                 warn_interval: int = 100) -> None:
        _check_number("init_scale", init_scale, lambda v: 0 < v < math.inf, "a positive finite number")
        _check_number("growth_factor", growth_factor, lambda v: 1 < v < math.inf, "a finite number > 1")
        _check_number("backoff_factor", backoff_factor, lambda v: 0 < v < 1, "a number between 0 and 1")
        _check_int("growth_interval", growth_interval)
        _check_int("hysteresis", hysteresis)
        _check_int("warn_interval", warn_interval)
        _check_number("min_scale", min_scale, lambda v: 0 <= v < math.inf, "a finite number >= 0")
        _check_number("max_scale", max_scale, lambda v: v > 0, "a positive number (inf turns the cap off)")
        if dynamic and not min_scale <= init_scale <= max_scale:
            raise ValueError(f"init_scale={init_scale!r} must lie within [min_scale, max_scale] = "
                             f"[{min_scale!r}, {max_scale!r}]")
        if not (process_group is None or process_group == "default" or _is_process_group(process_group)):
            raise TypeError(f"process_group must be None, 'default' or a torch.distributed ProcessGroup; "
                            f"got {process_group!r}")
        self._enabled = bool(enabled)
        self._dynamic = bool(dynamic)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._hysteresis = int(hysteresis)
        self._consecutive_hysteresis = bool(consecutive_hysteresis)
        self._min_scale = float(min_scale)
        self._max_scale = float(max_scale)
        self._process_group = process_group
        self._warn_interval = int(warn_interval)
        # Device state, created by the first scale() on the loss's device (values kept here until then).
        self._init = {"scale": float(init_scale), "growth": 0, "hysteresis": self._hysteresis,
                      "skipped": 0, "at_min": 0}
        self._scale: torch.Tensor | None = None            # FP32, like GradScaler's
        self._growth_tracker: torch.Tensor | None = None   # int32: finite iterations in a row
        self._hysteresis_tracker: torch.Tensor | None = None
        self._num_skipped: torch.Tensor | None = None      # int64: iterations with an overflow
        self._num_at_min: torch.Tensor | None = None       # int64: of those, ones that could not back off
        self._per_optimizer: dict[int, _OptimizerState] = {}
        self._updates_since_check = 0
        self._reported_at_min = 0
        self._passthrough_reason: str | None = None
        self._static_scale: float | None = float(init_scale)   # the host's copy while the scale is static

    # ---- construction from a Policy --------------------------------------------------------------------
    @classmethod
    def for_policy(cls, policy: Any, **overrides: Any) -> "LossScaler":
        """The scaler a mixprec Policy asks for: loss_scale "dynamic" -> dynamic scaling with the defaults,
        "none" -> enabled=False, a number -> static scaling at that scale. `overrides` go to the constructor.
        A BF16 policy (no FP16 anywhere) that asks for a scale gets a disabled scaler and a one-time notice."""
        from mixprec.policy import Policy
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a mixprec.Policy; got {type(policy).__name__}")
        if policy.loss_scale == "none":
            kwargs: dict[str, Any] = {"enabled": False}
        elif policy.loss_scale == "dynamic":
            kwargs = {}
        else:
            kwargs = {"dynamic": False, "init_scale": float(policy.loss_scale)}
        kwargs.update(overrides)
        scaler = cls(**kwargs)
        dtypes = (policy.param_dtype, policy.compute_dtype)
        if scaler._enabled and torch.bfloat16 in dtypes and torch.float16 not in dtypes:
            scaler._pass_through(f"policy {policy.name or policy.describe()!r} computes in bfloat16")
        return scaler

    # ---- the iteration ---------------------------------------------------------------------------------
    def scale(self, outputs: Losses) -> Losses:
        """Multiply a loss (or a list/tuple of them, nested) by the current scale; returns the same structure.

        Never syncs. The first call puts the scaler's state on the loss's device."""
        if not self._enabled:
            return outputs
        first = _first_tensor(outputs)
        if self._scale is None:
            if first.dtype == torch.bfloat16:
                self._pass_through("the loss is bfloat16")
                return outputs
            device_type = first.device.type
            if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16:
                self._pass_through(f"scale() runs inside a bfloat16 autocast region on {device_type}")
                return outputs
            self._lazy_init(first.device)
        per_device: dict[torch.device, torch.Tensor] = {}

        def apply(value):
            if isinstance(value, torch.Tensor):
                if not value.is_floating_point():
                    raise TypeError(f"scale() takes floating-point losses; got a {value.dtype} tensor")
                if value.device not in per_device:
                    per_device[value.device] = self._scale.to(value.device, non_blocking=True)
                return value * per_device[value.device]
            if isinstance(value, (list, tuple)):
                return type(value)(apply(v) for v in value)
            raise TypeError(f"scale() takes tensors and (nested) lists/tuples of them; got {type(value).__name__}")
        return apply(outputs)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place and record whether any is inf/NaN.

        Call it before touching gradients (clipping, norms); at most once per optimizer per iteration.
        Fused unscale + inf check (torch._amp_foreach_non_finite_check_and_unscale_) per device and dtype;
        no host sync. With a process group found_inf is all-reduced (MAX) here."""
        if not self._enabled:
            return
        self._require_scale("unscale_")
        state = self._state(optimizer)
        if state.stage == _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update(); "
                               "call it at most once per optimizer per iteration")
        if state.stage == _STEPPED:
            raise RuntimeError("unscale_() is being called after step(); call unscale_() before step() "
                               "(e.g. to clip), and update() at the end of the iteration")
        # The reciprocal in FP64, rounded once to FP32, as GradScaler does: unscaled grads then match it bitwise.
        inv_scale = self._scale.double().reciprocal().float()
        _sync_master_grads(optimizer)
        self._record(state, _unscale_grads_(optimizer, inv_scale, allow_fp16=self._unit_static_scale()))
        state.stage = _UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (unless unscale_ was called), then run optimizer.step(*args, **kwargs) unless the gradients
        overflowed. Returns what optimizer.step returned, or None when the step was skipped (GradScaler's
        convention). An optimizer that skips on the device (torch's fused ones, mixprec.optim.AdamW) is always
        called, so its return value comes back whether or not it skipped; `num_skipped_steps` counts the skips
        without a sync per step. Disabled: optimizer.step(*args, **kwargs)'s return value. Closures are not
        supported while enabled."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs or (args and callable(args[0])):
            raise RuntimeError("Closure use is not supported by LossScaler: it must check the gradients before "
                               "the step. Call scaler.scale(loss).backward() yourself, then scaler.step(optimizer)")
        self._require_scale("step")
        state = self._state(optimizer)
        if state.stage == _STEPPED:
            raise RuntimeError("step() has already been called on this optimizer since the last update(); call "
                               "scaler.update() once per iteration, after stepping every optimizer")
        _sync_master_grads(optimizer)
        if _takes_found_inf(optimizer):
            # The optimizer unscales and skips inside its own kernel: pass the scale and found_inf, no sync.
            if state.stage == _READY:
                self._record(state, _unscale_grads_(optimizer, torch.ones_like(self._scale), allow_fp16=True))
            optimizer.grad_scale = self._scale if state.stage == _READY else None
            optimizer.found_inf = state.found_inf
            try:
                result = optimizer.step(*args, **kwargs)
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        else:
            if state.stage == _READY:
                self.unscale_(optimizer)
            result = None
            if not state.found_inf.item():     # the one host read: a Python branch needs a Python bool
                result = optimizer.step(*args, **kwargs)
        state.stage = _STEPPED
        return result

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """End the iteration: compute the next scale on the device from every optimizer's found_inf (one
        backoff however many optimizers overflowed), or set `new_scale` (a number or a 1-element tensor)."""
        if not self._enabled:
            return
        self._require_scale("update")
        found = [s.found_inf for s in self._per_optimizer.values() if s.found_inf is not None]
        if not found and new_scale is None:
            raise RuntimeError("update() found no inf checks since the last update(); call scaler.step(optimizer) "
                               "(or unscale_) for each optimizer first")
        if not found:
            found_inf = torch.zeros_like(self._scale)
        else:   # 1.0 where some optimizer overflowed (max: one backoff however many did)
            found_inf = found[0] if len(found) == 1 else torch.stack(found).amax()
        overflow = found_inf > 0
        # The scale can no longer back off: dynamic at min_scale, or static. Those overflows are counted apart.
        stuck = overflow & (self._scale <= self._min_scale) if self._dynamic else overflow
        self._num_skipped += overflow
        self._num_at_min += stuck
        if new_scale is not None:
            self._set_scale(new_scale)
        elif self._dynamic and self._hysteresis == 1 and not self._consecutive_hysteresis:
            # GradScaler's rule: its fused update, then the bounds (a few launches less per step: an eager
            # loop bound by the host pays for each). With hysteresis 1 the tracker has nothing to absorb.
            torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf, self._growth_factor,
                                     self._backoff_factor, self._growth_interval)
            if self._min_scale > 0 or self._max_scale < math.inf:
                self._scale.clamp_(min=self._min_scale, max=self._max_scale)
        elif self._dynamic:
            self._update_scale(overflow)
        self._per_optimizer = {}
        self._updates_since_check += 1
        if self._updates_since_check >= self._warn_interval:
            self._updates_since_check = 0
            self._warn_if_stuck()

    # ---- state and settings ----------------------------------------------------------------------------
    def get_scale(self) -> float:
        """The current scale as a Python float (a host sync); 1.0 when disabled."""
        if not self._enabled:
            return 1.0
        return self._init["scale"] if self._scale is None else float(self._scale.item())

    @property
    def scale_tensor(self) -> torch.Tensor | None:
        """The current scale as a 0-dim FP32 device tensor (no sync); None before the first scale()."""
        return self._scale

    def found_inf(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """This iteration's overflow check for `optimizer`: a 0-dim FP32 device tensor, 1.0 where its gradients
        held an inf/NaN (no sync); None when unscale_/step has not checked it since the last update(), or when
        the scaler is disabled."""
        state = self._per_optimizer.get(id(optimizer))
        return None if not self._enabled or state is None else state.found_inf

    def device_state(self) -> dict[str, torch.Tensor]:
        """The live device tensors of the scale schedule (scale, trackers, counters), by name; {} before the first
        scale() or when disabled. No sync: a caller may copy them to restore them later (mixprec.stability's skip
        and rollback write back copies they took, in place)."""
        if not self._enabled or self._scale is None:
            return {}
        return {"scale": self._scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker, "num_skipped_steps": self._num_skipped,
                "num_overflows_at_min_scale": self._num_at_min}

    def is_enabled(self) -> bool:
        """Whether the scaler scales (False when built disabled or turned off for BF16)."""
        return self._enabled

    def is_dynamic(self) -> bool:
        return self._dynamic

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        _check_number("growth_factor", new_factor, lambda v: 1 < v < math.inf, "a finite number > 1")
        self._growth_factor = float(new_factor)

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        _check_number("backoff_factor", new_factor, lambda v: 0 < v < 1, "a number between 0 and 1")
        self._backoff_factor = float(new_factor)

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        _check_int("growth_interval", new_interval)
        self._growth_interval = int(new_interval)

    @property
    def num_skipped_steps(self) -> int:
        """Iterations in which some optimizer's gradients overflowed and its step was skipped (a host sync).
        Counted on the device by update(): compare it across update() to learn whether an iteration skipped."""
        return self._read("_num_skipped", "skipped")

    @property
    def num_overflows_at_min_scale(self) -> int:
        """Of those, iterations whose scale could not back off: already at min_scale, or static (a host sync)."""
        return self._read("_num_at_min", "at_min")

    def stats(self) -> dict[str, float | int]:
        """The scale, trackers and counters as Python numbers (host syncs; for logging, not every step)."""
        return {"scale": self.get_scale(), "growth_tracker": self._read("_growth_tracker", "growth"),
                "hysteresis_tracker": self._read("_hysteresis_tracker", "hysteresis"),
                "num_skipped_steps": self.num_skipped_steps,
                "num_overflows_at_min_scale": self.num_overflows_at_min_scale}

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state as Python numbers (take it after update()). GradScaler's five keys come first,
        so GradScaler can load it and it can load GradScaler's; {} when disabled."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._read("_growth_tracker", "growth"),
                "hysteresis": self._hysteresis, "_hysteresis_tracker": self._read("_hysteresis_tracker", "hysteresis"),
                "consecutive_hysteresis": self._consecutive_hysteresis, "min_scale": self._min_scale,
                "max_scale": self._max_scale, "dynamic": self._dynamic,
                "num_skipped_steps": self.num_skipped_steps,
                "num_overflows_at_min_scale": self.num_overflows_at_min_scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state_dict() (ours or torch.amp.GradScaler's); a no-op when disabled."""
        if not self._enabled:
            return
        if not state_dict:
            raise RuntimeError("The state dict is empty: it was probably saved from a disabled scaler")
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._hysteresis = int(state_dict.get("hysteresis", self._hysteresis))
        self._consecutive_hysteresis = bool(state_dict.get("consecutive_hysteresis", self._consecutive_hysteresis))
        self._min_scale = float(state_dict.get("min_scale", self._min_scale))
        self._max_scale = float(state_dict.get("max_scale", self._max_scale))
        self._dynamic = bool(state_dict.get("dynamic", self._dynamic))
        self._init = {"scale": float(state_dict["scale"]), "growth": int(state_dict["_growth_tracker"]),
                      "hysteresis": int(state_dict.get("_hysteresis_tracker", self._hysteresis)),
                      "skipped": int(state_dict.get("num_skipped_steps", 0)),
                      "at_min": int(state_dict.get("num_overflows_at_min_scale", 0))}
        self._reported_at_min = self._init["at_min"]
        self._static_scale = self._init["scale"]
        if self._scale is not None:
            self._lazy_init(self._scale.device)

    def __repr__(self) -> str:
        if not self._enabled:
            return f"LossScaler(enabled=False{', ' + self._passthrough_reason if self._passthrough_reason else ''})"
        kind = "dynamic" if self._dynamic else "static"
        return (f"LossScaler({kind}, scale={self._init['scale'] if self._scale is None else '<on device>'}, "
                f"growth={self._growth_factor}/{self._growth_interval}, backoff={self._backoff_factor}, "
                f"hysteresis={self._hysteresis}, bounds=[{self._min_scale}, {self._max_scale}])")

    # ---- internals -------------------------------------------------------------------------------------
    def _lazy_init(self, device: torch.device) -> None:
        """Create the device state from self._init, or refill it in place (tensors handed out stay live)."""
        for name, key, dtype in (("_scale", "scale", torch.float32), ("_growth_tracker", "growth", torch.int32),
                                 ("_hysteresis_tracker", "hysteresis", torch.int32),
                                 ("_num_skipped", "skipped", torch.int64), ("_num_at_min", "at_min", torch.int64)):
            if getattr(self, name) is None:
                setattr(self, name, torch.full((), self._init[key], dtype=dtype, device=device))
            else:
                getattr(self, name).fill_(self._init[key])

    def _require_scale(self, method: str) -> None:
        if self._scale is None:
            raise RuntimeError(f"{method}() was called before scale(): call scaler.scale(loss).backward() "
                               "earlier in the iteration")

    def _state(self, optimizer: torch.optim.Optimizer) -> _OptimizerState:
        return self._per_optimizer.setdefault(id(optimizer), _OptimizerState())

    def _record(self, state: _OptimizerState, found_inf_per_device: dict) -> None:
        """Combine the per-device found_inf onto the scale's device and share it across ranks."""
        found = [f.to(self._scale.device, non_blocking=True) for f in found_inf_per_device.values()]
        # Max, not sum: torch's fused optimizers skip only when found_inf is exactly 1.0.
        if len(found) == 1:
            found_inf = found[0]
        else:
            found_inf = torch.stack(found).amax() if found else torch.zeros_like(self._scale)
        if self._process_group is not None:
            import torch.distributed as dist
            group = None if self._process_group == "default" else self._process_group
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
        state.found_inf = found_inf

    def _update_scale(self, overflow: torch.Tensor) -> None:
        """The rule in the module docstring, as device arithmetic (no branch on a device value)."""
        # Products in FP64 then rounded to FP32, as torch._amp_update_scale_ does, so factors like 0.3 agree.
        wide = torch.float64 if self._scale.device.type != "mps" else torch.float32   # MPS has no FP64
        scale = self._scale
        hysteresis = torch.where(overflow, self._hysteresis_tracker - 1, self._hysteresis_tracker)
        backed_off = (scale.to(wide) * self._backoff_factor).float().clamp(min=self._min_scale)
        next_count = self._growth_tracker + 1
        # >= rather than GradScaler's ==: a growth_interval lowered mid-run still lets the scale grow.
        grow = ~overflow & (next_count >= self._growth_interval)
        grown = (scale.to(wide) * self._growth_factor).float().clamp(max=self._max_scale)
        grown = torch.where(torch.isfinite(grown), grown, scale)          # never grow into inf
        new_scale = torch.where(overflow & (hysteresis <= 0), backed_off, torch.where(grow, grown, scale))
        refill = ~overflow if self._consecutive_hysteresis else grow
        self._hysteresis_tracker.copy_(torch.where(refill, torch.full_like(hysteresis, self._hysteresis), hysteresis))
        self._growth_tracker.copy_(torch.where(overflow | grow, torch.zeros_like(next_count), next_count))
        self._scale.copy_(new_scale)

    def _set_scale(self, new_scale: float | torch.Tensor) -> None:
        if isinstance(new_scale, torch.Tensor):
            if new_scale.numel() != 1 or new_scale.requires_grad:
                raise ValueError(f"new_scale must be a number or a 1-element tensor without grad; got a tensor of "
                                 f"shape {tuple(new_scale.shape)}, requires_grad={new_scale.requires_grad}")
            self._scale.copy_(new_scale.reshape(()))
            self._static_scale = None   # unknown on the host without a sync
        else:
            _check_number("new_scale", new_scale, lambda v: 0 < v < math.inf, "a positive finite number")
            self._scale.fill_(float(new_scale))
            self._static_scale = float(new_scale)

    def _unit_static_scale(self) -> bool:
        """A static scale of 1 (apex O3's): unscaling multiplies by 1, exact in any dtype, FP16 included."""
        return not self._dynamic and self._static_scale == 1.0

    def _warn_if_stuck(self) -> None:
        at_min = self.num_overflows_at_min_scale
        if at_min > self._reported_at_min:
            where = f"at min_scale={self._min_scale:g}" if self._dynamic else f"at the static scale {self.get_scale():g}"
            warnings.warn(
                f"LossScaler: {at_min - self._reported_at_min} iteration(s) since the last check overflowed {where} "
                f"and were skipped ({at_min} in all, {self.num_skipped_steps} skipped steps in all). The scale cannot "
                "go lower, so the inf/NaN gradients come from elsewhere: a diverged model, a bad batch, or an FP16 "
                "overflow in the forward pass. Check the loss and activations (mp.diagnose).",
                RuntimeWarning, stacklevel=3)
            self._reported_at_min = at_min

    def _read(self, name: str, init_key: str) -> int:
        tensor = getattr(self, name)
        return self._init[init_key] if tensor is None else int(tensor.item())

    def _pass_through(self, reason: str) -> None:
        self._enabled = False
        self._passthrough_reason = reason
        warnings.warn(f"LossScaler turned itself off: {reason}. BF16 has FP32's exponent range (max 3.39e38), so "
                      "its gradients do not underflow the way FP16's do and loss scaling does nothing useful; "
                      "scale() now returns the loss unchanged and step() just calls optimizer.step().",
                      UserWarning, stacklevel=3)


def _unscale_grads_(optimizer: torch.optim.Optimizer, inv_scale: torch.Tensor,
                    allow_fp16: bool) -> dict[torch.device, torch.Tensor]:
    """Multiply every gradient of `optimizer` by inv_scale in place; return found_inf (FP32, 1.0 = some value
    was inf/NaN) per device. One fused foreach call per (device, dtype) group."""
    groups: dict[torch.device, dict[torch.dtype, list[torch.Tensor]]] = {}
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not allow_fp16 and param.grad.dtype == torch.float16:
                    raise ValueError(_FP16_GRAD_MESSAGE)
                grad = param.grad
                if grad.is_sparse:
                    # Duplicate indices are summed by coalesce(); in FP16 that sum can overflow, so check it.
                    if grad.dtype == torch.float16:
                        param.grad = grad = grad.coalesce()
                    grad = grad._values()
                groups.setdefault(grad.device, {}).setdefault(grad.dtype, []).append(grad)
        found_inf_per_device = {}
        for device, by_dtype in groups.items():
            found_inf = torch.zeros((), dtype=torch.float32, device=device)
            device_inv_scale = inv_scale.to(device, non_blocking=True)
            for grads in by_dtype.values():
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, device_inv_scale)
            found_inf_per_device[device] = found_inf
    return found_inf_per_device


def _sync_master_grads(optimizer: torch.optim.Optimizer) -> None:
    """Bring FP32 master gradients up to date with the model's (mixprec.masters.MasterWeights)."""
    sync = getattr(optimizer, "sync_grads", None)
    if callable(sync):
        sync()


def _takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Optimizers that read `grad_scale`/`found_inf` attributes and skip on the device (torch's fused ones).
    Old-style ones that want a `grad_scaler` argument get the generic path instead."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    return _step_takes_no_grad_scaler(type(optimizer))


@functools.cache
def _step_takes_no_grad_scaler(cls: type) -> bool:
    return "grad_scaler" not in inspect.signature(cls.step).parameters


def _first_tensor(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, (list, tuple)):
        for value in outputs:
            if isinstance(value, (torch.Tensor, list, tuple)):
                try:
                    return _first_tensor(value)
                except TypeError:
                    continue
    raise TypeError(f"scale() takes a tensor or a (nested) list/tuple of tensors; got {type(outputs).__name__}"
                    + (" with no tensor in it" if isinstance(outputs, (list, tuple)) else ""))


def _is_process_group(value: Any) -> bool:
    try:
        import torch.distributed as dist
        return isinstance(value, dist.ProcessGroup)
    except (ImportError, AttributeError):
        return False


def _check_number(name: str, value: Any, ok, valid: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise ValueError(f"{name} must be {valid}; got {value!r}")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
