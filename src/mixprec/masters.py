"""FP32 master weights for half-precision parameters (apex O2, fp16-true).

The model keeps FP16/BF16 parameters (half the memory, half-precision GEMMs without casts); the
optimizer steps FP32 copies of them, so that updates smaller than half's resolution accumulate;
after each step the masters are copied back into the model.

    backward:  autograd accumulates half gradients in the model's param.grad, as for any model, so
               model.zero_grad(), gradient accumulation and DDP's all-reduce act on them unchanged
    sync:      master.grad = param.grad (upcast), when the optimizer or a loss scaler first reads the
               gradients after they changed (unscale_, step, master_params)
    step:      the inner optimizer steps the masters; masters -> model params (one foreach copy)

Under FSDP2 do not use MasterWeights: keep the parameters FP32 and let `fully_shard`'s
MixedPrecisionPolicy(param_dtype=half, reduce_dtype=float32) cast them for compute; its sharded FP32
parameters are the master weights.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Iterator

import torch

_HALF = (torch.float16, torch.bfloat16)


class MasterWeights(torch.optim.Optimizer):
    """Wraps an optimizer built over half-precision parameters so that it steps FP32 masters.

        model = mp.prepare(model, mp.Policy.from_recipe("fp16-true"))
        optimizer = mp.MasterWeights(torch.optim.AdamW(model.parameters(), lr=1e-3))

    It behaves as a torch optimizer (param_groups, state, step, zero_grad, state_dict) whose params
    are the FP32 masters: unscale and clip those (`mp.master_params(optimizer)`). The half
    parameters keep their gradients in param.grad; the masters' .grad follow them (see the module
    docstring), so zeroing through the model or the optimizer both work.

    state_dict() is the inner optimizer's (a plain torch optimizer over FP32 parameters loads it)
    plus the FP32 master values under "master_weights".
    """

    # The LossScaler must unscale the masters' grads itself: a fused inner optimizer would look for
    # grad_scale/found_inf on itself, not on this wrapper.
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: torch.optim.Optimizer):
        if isinstance(optimizer, MasterWeights):
            raise ValueError("this optimizer already has master weights")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"MasterWeights wraps a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if optimizer.state:
            raise ValueError("wrap the optimizer in MasterWeights before its first step (its state would "
                             "refer to the half parameters)")
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks: dict = OrderedDict()
        self._optimizer_step_post_hooks: dict = OrderedDict()
        self._model_params: list[torch.Tensor] = []
        self._masters: list[torch.Tensor] = []
        # (weak reference, version) of the param.grad last copied: not its id(), which a new gradient allocated
        # after zero_grad(set_to_none=True) can reuse, making a fresh gradient look already copied
        self._synced: list[tuple[weakref.ref, int] | None] = []
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if _is_dtensor(p):
                    raise TypeError("MasterWeights does not shard: under FSDP2 keep the parameters FP32 and use "
                                    "fully_shard's MixedPrecisionPolicy(param_dtype=..., reduce_dtype=torch.float32), "
                                    "whose sharded FP32 parameters are the master weights")
                if p.dtype in _HALF:
                    master = p.detach().float().requires_grad_(True)
                    self._model_params.append(p)
                    self._masters.append(master)
                    self._synced.append(None)
                    params.append(master)
                else:
                    params.append(p)
            group["params"] = params

    # The optimizer interface, delegated to the inner optimizer over the masters.
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def __getattr__(self, name: str) -> Any:  # e.g. attributes schedulers or users read
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Copy the model's half gradients into the masters' FP32 .grad where they changed since the
        last copy (by identity and version, so gradients unscaled on the master are not overwritten)."""
        for i, (param, master) in enumerate(zip(self._model_params, self._masters)):
            grad = param.grad
            if grad is None:
                master.grad = None
                self._synced[i] = None
                continue
            synced = self._synced[i]
            if synced is not None and synced[0]() is grad and synced[1] == grad._version and master.grad is not None:
                continue
            if master.grad is None or master.grad.shape != grad.shape:
                master.grad = grad.float()
            else:
                master.grad.copy_(grad)
            self._synced[i] = (weakref.ref(grad), grad._version)

    @torch.no_grad()
    def step(self, closure=None, **kwargs):
        self.sync_grads()
        loss = self.optimizer.step(closure, **kwargs) if closure is not None else self.optimizer.step(**kwargs)
        self.copy_masters_to_model()
        return loss

    @torch.no_grad()
    def copy_masters_to_model(self) -> None:
        if self._masters:
            torch._foreach_copy_(self._model_params, self._masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for i, p in enumerate(self._model_params):
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
            self._synced[i] = None

    def state_dict(self) -> dict:
        return {**self.optimizer.state_dict(), "master_weights": [m.detach().clone() for m in self._masters]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict() of a MasterWeights or of the plain inner optimizer (the masters are then
        taken from the model's current parameters)."""
        inner = {k: v for k, v in state_dict.items() if k != "master_weights"}
        self.optimizer.load_state_dict(inner)
        masters = state_dict.get("master_weights")
        with torch.no_grad():
            if masters is None:
                for master, param in zip(self._masters, self._model_params):
                    master.copy_(param)
                return
            if len(masters) != len(self._masters):
                raise ValueError(f"the state dict holds {len(masters)} master weights; this optimizer has "
                                 f"{len(self._masters)} half-precision parameters")
            for master, saved in zip(self._masters, masters):
                master.copy_(saved)
        self.copy_masters_to_model()

    def set_masters(self, values: dict[int, torch.Tensor]) -> None:
        """Set masters from FP32 values keyed by the id() of their model parameter (a loaded checkpoint)."""
        with torch.no_grad():
            for param, master in zip(self._model_params, self._masters):
                if id(param) in values:
                    master.copy_(values[id(param)])

    def master_of(self) -> dict[int, torch.Tensor]:
        """id() of each half model parameter -> its FP32 master."""
        return {id(p): m for p, m in zip(self._model_params, self._masters)}

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("add parameter groups to the inner optimizer before wrapping it")

    def __repr__(self) -> str:
        return f"MasterWeights({self.optimizer!r})"


def _is_dtensor(p: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(p, DTensor)


def master_params(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    """The FP32 parameters an optimizer steps (the masters under MasterWeights), for clipping; their
    gradients are brought up to date first."""
    sync = getattr(optimizer, "sync_grads", None)
    if callable(sync):
        sync()
    for group in optimizer.param_groups:
        yield from group["params"]
