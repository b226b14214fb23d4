"""mixprec as a Lightning precision plugin, for `lightning.Trainer` and `lightning.Fabric`.

    trainer = lightning.Trainer(plugins=[MixprecPrecision("bf16-mixed")], gradient_clip_val=1.0)
    fabric = lightning.Fabric(plugins=[MixprecPrecision("fp8-blockwise")])

Lightning's precision strings are a closed list; it takes any `Precision` instance through `plugins=`.
`MixprecPrecision(policy_or_recipe)` is one, for both hosts:

    convert_module    mp.prepare(module, policy): FP8 swaps, the precision table's module rules, casts
    forward_context   mp.autocast(policy): the table's op rules too, not plain torch.autocast
    backward          the loss scaled by the policy's mp.LossScaler (a pass-through for BF16 and FP8 recipes);
                      Trainer hooks (on_before_backward) see the unscaled loss
    optimizer_step    unscale (before clipping and on_before_optimizer_step, also for optimizers that skip on
                      the device: mixprec's AdamW, torch's fused ones), step unless the gradients overflowed,
                      update the scale
    clipping          on unscaled gradients of the parameters the optimizer steps (mp.master_params)
    state_dict        the scaler's: saved in Trainer checkpoints; for Fabric put the plugin in the saved state

What Lightning's own plugins do not: clipping with an optimizer that unscales in its step (Lightning's
MixedPrecision raises NotImplementedError), the precision table in forward_context, FP8 recipes (Fabric
refuses precision="fp8-blockwise"). `MixprecFSDPPrecision` is the same for Lightning's FSDPStrategy (FSDP1).
`MixprecGuard` and `MixprecDiagnose` are Callbacks for mp.StabilityGuard and mp.diagnose.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.fabric.plugins.precision.fsdp import FSDPPrecision as _FabricFSDPPrecision
from lightning.pytorch.plugins.precision import FSDPPrecision as _TrainerFSDPPrecision
from lightning.pytorch.plugins.precision import Precision as _TrainerPrecision

from mixprec.context import autocast
from mixprec.integrations._optional import require
from mixprec.integrations.converters import _as_policy
from mixprec.masters import MasterWeights, master_params
from mixprec.policy import Policy
from mixprec.prepare import prepare
from mixprec.scaler import LossScaler

__all__ = ["MixprecPrecision", "MixprecFSDPPrecision", "MixprecGuard", "MixprecDiagnose"]

_HALF = (torch.float16, torch.bfloat16)


def _lightning_precision(policy: Policy) -> str:
    """The Lightning precision string nearest the policy (Lightning shows it and sizes models by it)."""
    half = {torch.float16: "16", torch.bfloat16: "bf16"}
    if policy.param_dtype in half:
        return f"{half[policy.param_dtype]}-true"
    if policy.compute_dtype in half or policy.fp8 is not None:
        return f"{half.get(policy.compute_dtype, 'bf16')}-mixed"
    return "32-true"


def _under_trainer(module: Any) -> bool:
    """Whether Lightning's Trainer is calling (it passes the LightningModule it drives), not Fabric."""
    return isinstance(module, pl.LightningModule) and module._trainer is not None


class _MixprecPrecisionBase:
    """The behaviour shared by MixprecPrecision and MixprecFSDPPrecision (see the module docstring)."""

    policy: Policy
    scaler: LossScaler

    def _setup(self, policy: Policy | str, scaler: LossScaler | None, device: str | None, head: str | None,
               process_group: Any = None) -> None:
        self.policy = _as_policy(policy)
        if scaler is not None and not isinstance(scaler, LossScaler):
            raise TypeError(f"scaler must be a mixprec LossScaler; got {type(scaler).__name__}")
        if device not in (None, "cpu", "cuda"):
            raise ValueError(f"Unknown device {device!r}; choose one of: cpu, cuda (None: both, each op on its own)")
        self.scaler = scaler if scaler is not None else LossScaler.for_policy(
            self.policy, **({"process_group": process_group} if process_group is not None else {}))
        self.device, self.head = device, head
        self.precision = _lightning_precision(self.policy)
        self.guard: Any = None               # a mp.StabilityGuard (MixprecGuard sets it): it then takes the step
        self._unscaled: set[int] = set()     # optimizers unscaled since the last backward

    # ---- the model -------------------------------------------------------------------------------------
    def convert_module(self, module: nn.Module) -> nn.Module:
        """mp.prepare(module, policy) (idempotent: Lightning calls it on every fit)."""
        return prepare(module, self.policy, head=self.head)

    def forward_context(self) -> contextlib.AbstractContextManager:
        return autocast(self.policy, device_type=self.device)

    def convert_input(self, data: Any) -> Any:
        return data   # mp.autocast casts where the table says; inputs stay as the data loader gives them

    def convert_output(self, data: Any) -> Any:
        return data

    def tensor_init_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def module_init_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()   # modules are built in FP32; convert_module casts what the policy casts

    # ---- backward --------------------------------------------------------------------------------------
    def pre_backward(self, tensor: torch.Tensor, module: Any) -> Any:
        self._unscaled.clear()      # new gradients: whatever was unscaled before is not what will be stepped
        if _under_trainer(module):
            tensor = _TrainerPrecision.pre_backward(self, tensor, module)   # hooks see the unscaled loss
            return self.scaler.scale(tensor)
        return None

    def backward(self, tensor: torch.Tensor, model: Any, *args: Any, **kwargs: Any) -> None:
        if _under_trainer(model):   # (tensor, model, optimizer, *args): tensor was scaled by pre_backward
            _optimizer, *args = args
            model.backward(tensor, *args, **kwargs)
        else:                        # Fabric: (tensor, module, *args)
            self.scaler.scale(tensor).backward(*args, **kwargs)

    def post_backward(self, tensor: torch.Tensor, module: Any) -> Any:
        if _under_trainer(module):
            return _TrainerPrecision.post_backward(self, tensor, module)
        return None

    # ---- the step --------------------------------------------------------------------------------------
    def _unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler.is_enabled() and id(optimizer) not in self._unscaled:
            self._check_masters(optimizer)
            self.scaler.unscale_(optimizer)
            self._unscaled.add(id(optimizer))

    def _step(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        self._check_masters(optimizer)
        result = self.scaler.step(optimizer, **kwargs)
        self.scaler.update()
        self._unscaled.discard(id(optimizer))
        return result

    def _check_masters(self, optimizer: Any) -> None:
        if not self.policy.master_weights or isinstance(optimizer, MasterWeights):
            return
        if any(p.dtype in _HALF for g in optimizer.param_groups for p in g["params"]):
            raise ValueError(
                f"policy {self.policy.name!r} keeps FP32 master weights, but the optimizer steps the half parameters "
                "directly. With Fabric: model = fabric.setup_module(model), then optimizer = "
                "mp.MasterWeights(torch.optim.AdamW(model.parameters())), then fabric.setup_optimizers(optimizer) "
                "(lightning.Trainer wraps it by itself)")

    def optimizer_step(self, optimizer: Any, model: Any = None, closure: Callable[[], Any] | None = None,
                       **kwargs: Any) -> Any:
        if closure is None:          # Fabric: optimizer.step() of a set-up optimizer
            return self._step(optimizer, **kwargs)
        # Trainer: run the closure (forward and backward), unscale, hooks and clipping, step.
        if not self.scaler.is_enabled() and self.guard is None:
            return _TrainerPrecision.optimizer_step(self, optimizer, model=model, closure=closure, **kwargs)
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError("loss scaling and the LBFGS optimizer are not compatible (its closure runs several "
                            "backward passes per step); use a BF16 recipe or a first-order optimizer")
        closure_result = closure()
        skipped_backward = closure_result is None and model.automatic_optimization
        if not skipped_backward:
            self._unscale(optimizer)
        self._after_closure(model, optimizer)
        if skipped_backward:
            return closure_result
        if self.guard is not None:   # the guard checks loss and gradients, steps and updates the scaler
            self._unscaled.discard(id(optimizer))
            return self.guard.step(closure_result, scaler=self.scaler)
        return self._step(optimizer, **kwargs)

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Fabric's clip_gradients calls this first: unscale (once per iteration), whatever the optimizer."""
        self._unscale(optimizer)

    def clip_gradients(self, optimizer: torch.optim.Optimizer, clip_val: float = 0.0,
                       gradient_clip_algorithm: Any = None) -> None:
        if clip_val and clip_val > 0:
            self._unscale(optimizer)    # manual optimization clips before optimizer_step
        kwargs = {} if gradient_clip_algorithm is None else {"gradient_clip_algorithm": gradient_clip_algorithm}
        super().clip_gradients(optimizer, clip_val, **kwargs)

    def main_params(self, optimizer: torch.optim.Optimizer):
        """The parameters the optimizer steps: the FP32 masters under mp.MasterWeights."""
        return master_params(optimizer)

    def connect(self, model: nn.Module, optimizers: list, lr_schedulers: list) -> tuple:
        """Trainer only: wrap the optimizers in mp.MasterWeights where the policy keeps FP32 masters."""
        if self.policy.master_weights:
            optimizers = [opt if isinstance(opt, MasterWeights) else MasterWeights(opt) for opt in optimizers]
        return model, optimizers, lr_schedulers

    # ---- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.policy.name or self.policy.describe()!r}, {self.scaler!r})"


class MixprecPrecision(_MixprecPrecisionBase, _TrainerPrecision):
    """A Lightning precision plugin that trains under a mixprec policy (Trainer and Fabric).

    Args:
        policy: a mixprec Policy or a recipe name (mp.recipes()).
        scaler: the LossScaler to use (default: mp.LossScaler.for_policy(policy), disabled for BF16/FP8).
        device: "cpu" or "cuda" for mp.autocast, or None (both where CUDA is present, each op on its tensors'
            device); pass "cpu" to get the table's op rules on CPU tensors on a machine with a GPU.
        head: the output head's module name when mp.prepare's guess (tied/named/last Linear) would be wrong.
    """

    def __init__(self, policy: Policy | str = "bf16-mixed", *, scaler: LossScaler | None = None,
                 device: str | None = None, head: str | None = None) -> None:
        self._setup(policy, scaler, device, head)


class MixprecFSDPPrecision(_MixprecPrecisionBase, _TrainerFSDPPrecision, _FabricFSDPPrecision):
    """MixprecPrecision for Lightning's FSDPStrategy (FSDP1) in the Trainer and in Fabric.

    FSDP keeps the parameters FP32 (param_dtype=float32 in its MixedPrecision) and reduces gradients in the
    policy's reduce_dtype (FP32); mp.autocast casts for compute, so the table's FP32 modules (norms, the
    head, embeddings) keep FP32 weights. The cost against Lightning's "bf16-mixed" FSDP plugin: parameters
    are all-gathered in FP32 (twice the bytes). The loss scaler agrees on overflow across ranks
    (process_group="default"). "-true" recipes are refused: FSDP would cast the table's FP32 modules too.
    Gradient clipping by norm is refused as by Lightning's FSDPPrecision (clip through the FSDP module).
    """

    def __init__(self, policy: Policy | str = "bf16-mixed", *, scaler: LossScaler | None = None,
                 device: str | None = None, head: str | None = None) -> None:
        self._setup(policy, scaler, device, head, process_group="default")
        if self.policy.param_dtype != torch.float32:
            raise ValueError(f"MixprecFSDPPrecision takes the recipes with FP32 parameters (the '-mixed' and FP8 "
                             f"ones); {self.policy.name!r} stores them in {self.policy.param_dtype}, which FSDP "
                             "would apply to the modules the precision table keeps in FP32")
        self._desired_input_dtype = torch.float32

    @property
    def mixed_precision_config(self):
        from torch.distributed.fsdp import MixedPrecision
        return MixedPrecision(param_dtype=torch.float32, reduce_dtype=self.policy.reduce_dtype,
                              buffer_dtype=torch.float32)


def _plugin_of(trainer: "pl.Trainer") -> _MixprecPrecisionBase | None:
    plugin = trainer.precision_plugin
    return plugin if isinstance(plugin, _MixprecPrecisionBase) else None


class MixprecGuard(pl.Callback):
    """Runs a mp.StabilityGuard in a lightning.Trainer with MixprecPrecision.

    At fit start it builds `mp.StabilityGuard(pl_module, optimizers, **guard_kwargs)` and hands it to the
    precision plugin, whose optimizer_step then ends with `guard.step(loss, scaler=plugin.scaler)` (the loss
    of the closure, gradients unscaled and clipped by Lightning before) instead of scaler.step and update: the
    guard skips, clips or rolls back and updates the scale. Its state is saved with the Trainer's checkpoints
    (a Callback state). Automatic optimization only. Lightning's loop feeds every batch: batches a rollback
    puts on the guard's skip list are recorded (guard.skip_list()) but fed again. Raises ImportError at
    construction when this mixprec has no mixprec.stability.
    """

    def __init__(self, **guard_kwargs: Any) -> None:
        self.guard_cls = require("mixprec.stability", "StabilityGuard", "MixprecGuard")
        self.guard_kwargs = guard_kwargs
        self.guard: Any = None
        self._pending_state: dict | None = None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        plugin = _plugin_of(trainer)
        if plugin is None:
            raise ValueError(f"MixprecGuard runs through MixprecPrecision; the Trainer's precision plugin is "
                             f"{type(trainer.precision_plugin).__name__}: pass plugins=[MixprecPrecision(...)]")
        if not pl_module.automatic_optimization:
            raise ValueError("MixprecGuard needs automatic optimization; with manual optimization call "
                             "guard.step(loss, scaler=plugin.scaler) in training_step instead of optimizer.step()")
        optimizers = trainer.optimizers
        self.guard = self.guard_cls(pl_module, optimizers[0] if len(optimizers) == 1 else optimizers,
                                    **self.guard_kwargs)
        if self._pending_state:
            self.guard.load_state_dict(self._pending_state)
            self._pending_state = None
        plugin.guard = self.guard

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        plugin = _plugin_of(trainer)
        if plugin is not None and plugin.guard is self.guard:
            self.guard.flush()
            plugin.guard = None

    def state_dict(self) -> dict[str, Any]:
        return self.guard.state_dict() if self.guard is not None else (self._pending_state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start builds the guard: keep the state until then.
        if self.guard is not None:
            self.guard.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict) or None


class MixprecDiagnose(pl.Callback):
    """Runs mp.diagnose(pl_module, batch, loss_fn, **kwargs) at the start of training and every
    `every_n_steps` optimizer steps (0: only at the start); the reports are kept in `self.reports`
    (global step -> DiagnosisReport: print it, .recommend(), .save_html(dir)). `batch` as mp.diagnose reads
    it: (inputs, target) for loss_fn(pl_module(inputs), target). Raises ImportError at construction when this
    mixprec has no mixprec.diagnostics."""

    def __init__(self, batch: Any, loss_fn: Callable, *, every_n_steps: int = 0, **diagnose_kwargs: Any) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0; got {every_n_steps}")
        self.diagnose = require("mixprec.diagnostics", "diagnose", "MixprecDiagnose")
        self.batch, self.loss_fn, self.every_n_steps, self.kwargs = batch, loss_fn, every_n_steps, diagnose_kwargs
        self.reports: dict[int, Any] = {}

    def _run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # mp.diagnose runs on an FP32 copy of the module: the training state is not touched.
        batch = trainer.strategy.batch_to_device(self.batch)
        self.reports[trainer.global_step] = self.diagnose(pl_module, batch, self.loss_fn, **self.kwargs)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step not in self.reports:
            self._run(trainer, pl_module)

