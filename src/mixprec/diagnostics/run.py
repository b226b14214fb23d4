"""mp.diagnose: one FP32 forward and backward with hooks, and the model under a policy against it (SQNR).

    report = mp.diagnose(model, batch, loss_fn, formats=("fp16", "bf16", "fp8_e4m3", "fp8_e5m2"),
                         loss_scale=None, policy=None)

1. An FP32 copy of the model (the model itself is left as it is: its grads, BatchNorm statistics and
   preparation) runs forward and backward on the batch with autocast off; hooks count every module's
   activations, activation gradients, weights and weight gradients (mixprec.diagnostics.collect). With
   `loss_scale` the backward starts from loss * loss_scale, so gradients are what a scaled FP16
   backward would hold.
2. With a policy (or a model mp.prepare'd with one): a prepared copy runs the same batch under
   mp.autocast(policy), with the same random state (dropout masks agree), and each module's output is
   compared with the FP32 one:

       sqnr_db       = 10 log10(sum(ref**2) / sum((out - ref)**2))    the model under the policy end to end
       sqnr_local_db = the same for a leaf module run alone under the policy on the FP32 run's inputs, cast
                       to the dtype its input had under the policy: that module's own loss of precision

   Sums are over every call and floating output of the module, in FP64.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from mixprec._tensors import is_logical_fp16, map_tensors, to_fp16_values
from mixprec.context import autocast as mp_autocast
from mixprec.diagnostics.collect import Collector, floating_leaves, plain
from mixprec.diagnostics.report import DiagnosisReport, ModuleDiagnosis
from mixprec.diagnostics.stats import KINDS, split_formats
from mixprec.formats import get_format
from mixprec.policy import Policy
from mixprec.prepare import plan_of, preparation, prepare, unprepare
from mixprec.rules import Precision

__all__ = ["DEFAULT_FORMATS", "diagnose", "forward_and_loss", "fp32_copy", "policy_of"]

DEFAULT_FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")


def forward_and_loss(model: nn.Module, batch: Any, loss_fn: Callable | None) -> tuple[Any, torch.Tensor | None]:
    """Run a batch the way mp.diagnose reads it:

        (inputs, target)  -> loss_fn(model(inputs), target)   (inputs a tuple: model(*inputs))
        dict              -> loss_fn(model(**batch), batch)
        tensor            -> loss_fn(model(batch))
        loss_fn None      -> the model's output is the loss (or has it as .loss)
    """
    if isinstance(batch, dict):
        out = model(**batch)
        target: tuple = (batch,)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        out = model(*x) if isinstance(x, (tuple, list)) else model(x)
        target = (y,)
    elif isinstance(batch, torch.Tensor):
        out = model(batch)
        target = ()
    else:
        raise TypeError(f"batch must be (inputs, target), a dict of inputs or a tensor; got {type(batch).__name__}")
    if loss_fn is None:   # the model returns the loss, or an output holding it (Hugging Face's .loss)
        loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
        loss = loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None
    else:
        loss = loss_fn(out, *target)
    return out, loss


def _device_of(model: nn.Module, batch: Any) -> torch.device:
    for t in torch.utils._pytree.tree_leaves(batch):
        if isinstance(t, torch.Tensor):
            return t.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)   # a torch.compile'd model: its eager module


def fp32_copy(model: nn.Module) -> nn.Module:
    """A copy of the model in plain FP32 (unprepared, FP8 layers back to nn.Linear, parameters FP32)."""
    ref = copy.deepcopy(_unwrap(model))
    if preparation(ref) is not None:
        ref = unprepare(ref)
    return ref.float()


def policy_of(model: nn.Module) -> Policy | None:
    record = preparation(_unwrap(model))
    return record.policy if record is not None else None


class _Outputs:
    """The FP32 run's outputs per module (and leaf modules' inputs), call by call."""

    def __init__(self, model: nn.Module, leaves_only_inputs: bool = True) -> None:
        self.model = model
        self.outputs: dict[str, list[list[torch.Tensor]]] = {}
        self.inputs: dict[str, list[tuple[Any, dict]]] = {}
        self.handles: list[Any] = []
        seen: set[int] = set()
        for name, module in model.named_modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            self.handles.append(module.register_forward_hook(self._out(name)))
            if not list(module.children()):
                self.handles.append(module.register_forward_pre_hook(self._in(name), with_kwargs=True))

    def _out(self, name: str) -> Callable:
        def hook(module, args, output):
            with plain():
                self.outputs.setdefault(name, []).append([t.detach().clone() for t in floating_leaves(output)])
        return hook

    def _in(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            with plain():
                clone = lambda t: t.detach().clone()  # noqa: E731
                self.inputs.setdefault(name, []).append((map_tensors(clone, args), map_tensors(clone, kwargs)))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Sqnr:
    """Compares a policy run's module outputs with the FP32 run's, call by call, on the device."""

    def __init__(self, model: nn.Module, ref: _Outputs) -> None:
        self.ref = ref
        self.signal: dict[str, torch.Tensor] = {}
        self.noise: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.input_kinds: dict[str, list[list[str]]] = {}   # leaf -> per call, per floating input
        self.handles: list[Any] = []
        seen: set[int] = set()
        for name, module in model.named_modules():
            if id(module) in seen or name not in ref.outputs:
                continue
            seen.add(id(module))
            self.handles.append(module.register_forward_hook(self._out(name)))
            if name in ref.inputs:
                self.handles.append(module.register_forward_pre_hook(self._in(name), with_kwargs=True))

    def _in(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            kinds = ["fp16-emulated" if is_logical_fp16(t) else str(t.dtype) for t in floating_leaves((args, kwargs))]
            self.input_kinds.setdefault(name, []).append(kinds)
        return hook

    def _out(self, name: str) -> Callable:
        def hook(module, args, output):
            i = self.calls.get(name, 0)
            self.calls[name] = i + 1
            refs = self.ref.outputs[name]
            if i < len(refs):
                with plain():
                    accumulate(self.signal, self.noise, name, refs[i], floating_leaves(output))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def accumulate(signal: dict, noise: dict, name: str, refs: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    """Add sum(ref**2) and sum((out - ref)**2) (FP64, on the device) of paired outputs of the same shape."""
    for r, o in zip(refs, outs):
        if r.shape != o.shape:
            continue
        r64, o64 = r.double(), o.detach().double()
        s, n = r64.square().sum(), (o64 - r64).square().sum()
        signal[name] = signal[name] + s if name in signal else s
        noise[name] = noise[name] + n if name in noise else n


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB; inf where the outputs agree exactly, nan for an all-zero reference."""
    if noise == 0:
        return math.inf if signal > 0 else math.nan
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _cast_like(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "fp16-emulated":
        return to_fp16_values(t)
    dtype = getattr(torch, kind.replace("torch.", ""), None)
    return t.to(dtype) if isinstance(dtype, torch.dtype) and dtype != t.dtype else t


def _local_sqnr(pol: nn.Module, ref: _Outputs, tracker: _Sqnr, policy: Policy, device: torch.device) -> dict[str, float]:
    """Each leaf module of the policy copy run alone on the FP32 run's inputs (cast as under the policy)."""
    signal: dict[str, torch.Tensor] = {}
    noise: dict[str, torch.Tensor] = {}
    modules = dict(pol.named_modules())
    for name, calls in ref.inputs.items():
        module = modules.get(name)
        kinds_per_call = tracker.input_kinds.get(name, [])
        if module is None or isinstance(module, nn.modules.dropout._DropoutNd):   # a new mask: nothing to compare
            continue
        for i, (args, kwargs) in enumerate(calls):
            kinds = iter(kinds_per_call[i] if i < len(kinds_per_call) else [])
            args, kwargs = (map_tensors(lambda t, k=kinds: _cast_like(t, next(k, str(t.dtype))), a)
                            for a in (args, kwargs))
            with torch.no_grad(), mp_autocast(policy, device_type=device.type):
                out = module(*args, **kwargs)
            with plain(device.type):
                accumulate(signal, noise, name, ref.outputs[name][i], floating_leaves(out))
    return _to_db(signal, noise)


def _to_db(signal: dict[str, torch.Tensor], noise: dict[str, torch.Tensor]) -> dict[str, float]:
    names = list(signal)
    if not names:
        return {}
    values = torch.stack([torch.stack([signal[n], noise[n]]).cpu() for n in names]).tolist()
    return {n: sqnr_db(s, e) for n, (s, e) in zip(names, values)}


def _compute_labels(pol: nn.Module, policy: Policy) -> dict[str, str]:
    """How each module computes under the policy: fp8, a row of the table, or the compute dtype."""
    compute = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(policy.compute_dtype, "fp32")
    labels = {}
    for p in plan_of(pol):
        module = pol.get_submodule(p.name) if p.name else pol
        kind = type(module).__name__
        if kind == "Float8Linear" or kind.startswith("Int8"):   # the policy's converters (by name: no fp8/ import)
            labels[p.name] = "fp8" if kind == "Float8Linear" else "int8"
        elif p.precision is None or p.precision is Precision.HALF:
            labels[p.name] = compute
        else:
            labels[p.name] = p.precision.value
    return labels


def diagnose(model: nn.Module, batch: Any, loss_fn: Callable | None, formats: tuple[str, ...] = DEFAULT_FORMATS,
             loss_scale: float | None = None, policy: Policy | str | None = None, *, fp8_scaling: bool = True,
             sqnr: bool = True, audit: bool = False,
             modules: Callable[[str, nn.Module], bool] | None = None) -> DiagnosisReport:
    """Where the model's values under- and overflow in each format, and what a policy does to its outputs.

    model:       any nn.Module (prepared, FP8-converted or compiled ones too); it is not modified.
    batch:       (inputs, target), a dict or a tensor: see `forward_and_loss`.
    loss_fn:     the loss (see `forward_and_loss`); None when the model returns it.
    formats:     formats to report (mixprec.formats names); the FP8 ones get what-if scaling statistics;
                 "int8" adds the INT8 what-if (SQNR and values quantized to zero, rowwise and tensorwise),
                 which an INT8 policy (int8-rowwise, int8-switchback) adds by itself.
    loss_scale:  gradients are those of loss * loss_scale (what a scaled FP16 backward holds).
    policy:      a Policy or recipe name to compare with FP32 (SQNR per module); default the policy the
                 model was prepared with, else none.
    fp8_scaling: compute the FP8 what-if scaling statistics (a few passes per tensor).
    sqnr:        run the model under the policy for SQNR (needs a policy).
    audit:       also run the precision audit (mixprec.diagnostics.audit) under the policy.
    modules:     a predicate (name, module) -> bool choosing the modules to gather (default all).
    Returns a DiagnosisReport: print it, .layers, .recommend(), .save_html(dir), .to_json().
    """
    formats, int8 = split_formats(formats)
    formats = tuple(get_format(f).name for f in formats)
    if loss_scale is not None and not (isinstance(loss_scale, (int, float)) and 0 < loss_scale < math.inf):
        raise ValueError(f"loss_scale must be a positive finite number or None; got {loss_scale!r}")
    if isinstance(policy, str):
        policy = Policy.from_recipe(policy)
    if policy is None:
        policy = policy_of(model)
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy must be a mixprec Policy, a recipe name or None; got {type(policy).__name__}")
    int8 = int8 or (policy is not None and policy.int8 is not None)
    device = _device_of(model, batch)
    ref = fp32_copy(model)
    was_training = ref.training
    fp8_formats = tuple(f for f in formats if f.startswith("fp8"))
    collector = Collector(ref, fp8_formats=fp8_formats, whatif=fp8_scaling, modules=modules, int8=int8)
    want_sqnr = sqnr and policy is not None
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(device) if rng_devices else None
        outputs = _Outputs(ref) if want_sqnr else None
        try:
            with collector, torch.autocast(device.type, enabled=False):
                _, loss = forward_and_loss(ref, batch, loss_fn)
                if loss is None or not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise ValueError("loss_fn must return a scalar tensor (the model's output is not a loss)")
                loss_value = loss.detach()
                (loss * loss_scale if loss_scale is not None else loss).backward()
                collector.add_parameters()
        finally:
            if outputs is not None:
                outputs.remove()
        stats = collector.read()
        sqnr_cum: dict[str, float] = {}
        sqnr_local: dict[str, float] = {}
        labels: dict[str, str] = {}
        if want_sqnr:
            del ref   # the policy copy is made from the model again (its FP32 weights, unchanged)
            pol = prepare(fp32_copy(model), policy)
            pol.train(was_training)
            labels = _compute_labels(pol, policy)
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, device)
            tracker = _Sqnr(pol, outputs)
            try:
                with torch.no_grad(), mp_autocast(policy, device_type=device.type):
                    forward_and_loss(pol, batch, None)
            finally:
                tracker.remove()
            sqnr_cum = _to_db(tracker.signal, tracker.noise)
            sqnr_local = _local_sqnr(pol, outputs, tracker, policy, device)
            del pol, outputs
    layers: dict[str, ModuleDiagnosis] = {}
    for name, cls in collector.classes.items():
        kinds = {kind: stats.get((name, kind)) for kind in KINDS}
        if not any(kinds.values()) and name not in sqnr_cum:
            continue
        layers[name] = ModuleDiagnosis(name=name, cls=cls, leaf=name in collector.leaves, compute=labels.get(name),
                                       sqnr_db=sqnr_cum.get(name), sqnr_local_db=sqnr_local.get(name), **kinds)
    report = DiagnosisReport(layers=layers, formats=formats, loss_scale=loss_scale, policy=policy,
                             loss=float(loss_value), device=str(device))
    if audit and policy is not None:
        from mixprec.diagnostics.audit import audit as run_audit
        report.audit = run_audit(model, batch, policy, loss_fn=loss_fn)
    return report
