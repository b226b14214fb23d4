"""mp.prepare: apply a Policy to a model (module rules, parameter casts, FP8 swaps)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from mixprec import emulation, rules
from mixprec.context import logical_dtype, map_tensors, to_fp32
from mixprec.ops import linear_fp32_output
from mixprec.policy import Policy
from mixprec.rules import Precision

_HEAD_NAMES = ("lm_head", "head", "output", "out_proj_vocab", "classifier", "fc_out", "decoder")


@dataclass(frozen=True)
class ModulePlan:
    """What prepare decided for one module (shown by mp.explain)."""

    name: str
    kind: str
    role: str | None
    precision: Precision | None
    why: str
    param_dtype: torch.dtype | None


def _module_device_type(module: nn.Module, args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    for p in module.parameters():
        return p.device.type
    return "cpu"


def _is_plain_fp32(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not emulation.is_logical_fp16(x)


class _RuleModule:
    """Mixed into a module's class by prepare(): runs its forward under its precision rule."""

    _mixprec_precision: Precision

    def forward(self, *args, **kwargs):
        if self.__dict__.get("_mixprec_bypass"):  # inside functional_call from _mixprec_half_forward
            return super().forward(*args, **kwargs)
        precision = self._mixprec_precision
        if (precision in (Precision.FP32, Precision.FP32_CAST_BACK) and not self._mixprec_autocast_off
                and len(args) == 1 and not kwargs and _is_plain_fp32(args[0])):
            return super().forward(args[0])  # FP32 in, FP32 weights, no autocast op inside: FP32 throughout
        device_type = _module_device_type(self, args)
        if precision is Precision.FP32_OUTPUT:
            return self._mixprec_head_forward(device_type, *args, **kwargs)
        if precision is Precision.HALF:
            return self._mixprec_half_forward(device_type, *args, **kwargs)
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        in_dtype = logical_dtype(first) if first is not None else torch.float32
        args, kwargs = map_tensors(to_fp32, args), map_tensors(to_fp32, kwargs)
        if self._mixprec_autocast_off:
            with torch.autocast(device_type, enabled=False):
                out = super().forward(*args, **kwargs)
        else:  # FP32 inputs and weights already keep every op of a norm or an embedding in FP32
            out = super().forward(*args, **kwargs)
        if precision is Precision.FP32_CAST_BACK and in_dtype != torch.float32:
            if emulation.is_logical_fp16(first):
                return map_tensors(emulation.to_fp16_values, out)
            return map_tensors(lambda t: t.to(in_dtype), out)
        return out

    def _mixprec_head_forward(self, device_type, x, *args, **kwargs):
        compute = self._mixprec_compute_dtype
        if (isinstance(self, nn.Linear) and not args and not kwargs and compute in (torch.float16, torch.bfloat16)
                and torch.is_autocast_enabled(device_type)):
            return linear_fp32_output(x, self.weight, self.bias, compute)
        with torch.autocast(device_type, enabled=False):  # not a plain Linear, or no autocast: all FP32
            return super().forward(to_fp32(x), *map_tensors(to_fp32, args), **map_tensors(to_fp32, kwargs))

    def _mixprec_half_forward(self, device_type, *args, **kwargs):
        """Modules the table allows in half (LSTM): run them in the compute dtype on every device."""
        if not torch.is_autocast_enabled(device_type) or self._mixprec_compute_dtype == torch.float32:
            return super().forward(*args, **kwargs)
        emulate = device_type == "cpu" and self._mixprec_emulate_fp16
        cast = emulation.to_fp16_values if emulate else (lambda t: t.to(self._mixprec_compute_dtype))
        params = {n: cast(p) for n, p in self.named_parameters()}
        self._mixprec_bypass = True  # functional_call calls forward again: let it reach the original
        try:
            with torch.autocast(device_type, enabled=False):
                out = functional_call(self, params, tuple(map_tensors(cast, args)), map_tensors(cast, kwargs))
        finally:
            self._mixprec_bypass = False
        return map_tensors(emulation.to_fp16_values, out) if emulate else out


_rule_classes: dict[tuple[type, Precision], type] = {}


def _wrap_class(cls: type, precision: Precision) -> type:
    key = (cls, precision)
    if key not in _rule_classes:
        # Same name as the original so printing and name-based rules ("RMSNorm") see no difference.
        _rule_classes[key] = type(cls.__name__, (_RuleModule, cls),
                                  {"_mixprec_precision": precision, "__module__": cls.__module__})
    return _rule_classes[key]


def original_class(module: nn.Module) -> type:
    cls = type(module)
    return cls.__mro__[2] if issubclass(cls, _RuleModule) else cls


def find_roles(model: nn.Module, head: str | None = None) -> dict[str, str]:
    """Module name -> "embedding" or "head".

    Embeddings: every nn.Embedding / nn.EmbeddingBag (token and position). Head: the module the user
    names; else a Linear tied to an embedding's weight; else a Linear named like a head; else the last
    Linear registered.
    """
    modules = dict(model.named_modules())
    roles = {n: "embedding" for n, m in modules.items() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    if head is not None:
        if head not in modules:
            raise ValueError(f"No module named {head!r} in the model; its Linear layers are: "
                             + ", ".join(n for n, m in modules.items() if isinstance(m, nn.Linear)))
        roles[head] = "head"
        return roles
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear) and n]
    if not linears:
        return roles
    embedding_weights = {id(modules[n].weight) for n in roles}
    tied = [n for n, m in linears if id(m.weight) in embedding_weights]
    named = [n for n, m in linears if n.split(".")[-1] in _HEAD_NAMES]
    roles[(tied or named or [linears[-1][0]])[-1]] = "head"
    return roles


def prepare(model: nn.Module, policy: Policy | str, *, head: str | None = None) -> nn.Module:
    """Apply a policy to a model in place and return it.

    1. FP8: when policy.fp8 is set, large Linear layers become Float8Linear (mixprec.fp8.convert).
    2. Module rules (mixprec.rules): norms, embeddings, the output head, RNN/GRU compute in FP32;
       LSTM in the compute dtype; each matched module's class gains the rule's forward.
    3. Parameters of modules not kept in FP32 are cast to policy.param_dtype.
    Idempotent: preparing again with the same policy changes nothing.
    """
    if isinstance(policy, str):
        policy = Policy.from_recipe(policy)
    if not isinstance(policy, Policy):
        raise TypeError(f"prepare takes a mixprec Policy or a recipe name; got {type(policy).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare takes an nn.Module; got {type(model).__name__}")
    params = list(model.parameters())
    if not any(p.is_floating_point() for p in params):
        raise ValueError(f"{type(model).__name__} has no floating-point parameters to train in mixed precision "
                         f"(found {len(params)} parameters of dtypes {sorted({str(p.dtype) for p in params})})")
    previous = getattr(model, "_mixprec_policy", None)
    if previous is not None:
        if previous == policy:
            return model
        raise ValueError(f"model was already prepared with {previous.name or previous}; prepare a fresh model "
                         f"for {policy.name or policy}")
    if policy.fp8 is not None:
        from mixprec.fp8 import convert
        convert(model, policy.fp8)

    roles = find_roles(model, head)
    emulate = policy.compute_dtype == torch.float16 and policy.cpu_fp16 == "emulate"
    plan: list[ModulePlan] = []
    keep_fp32: set[int] = set()
    half_modules: list[nn.Module] = []
    for name, module in model.named_modules():
        role = roles.get(name)
        rule = rules.rule_for_module(name, module, role) if policy.fp32_rules else None
        if rule is not None and rule.precision is not Precision.HALF:
            keep_fp32.update(id(p) for p in module.parameters())
        else:
            half_modules.append(module)
        if rule is not None and _needs_wrapper(module, rule.precision):
            module.__class__ = _wrap_class(type(module), rule.precision)
            module._mixprec_compute_dtype = policy.compute_dtype
            module._mixprec_emulate_fp16 = emulate
            module._mixprec_autocast_off = _runs_autocast_ops(module, rule)
        plan.append(ModulePlan(name, original_class(module).__name__, role,
                               rule.precision if rule else None, rule.why if rule else "",
                               None))
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(policy.param_dtype) if t.is_floating_point() and id(t) not in keep_fp32 else t

    # Parameters and floating buffers (BatchNorm's running statistics), as model.half() casts them;
    # through _apply, so that a module keeping some state in FP32 (Float8Linear's amax histories) can.
    for module in half_modules:
        module._apply(cast, recurse=False)
    model._mixprec_plan = [
        ModulePlan(p.name, p.kind, p.role, p.precision, p.why, _param_dtype(model.get_submodule(p.name)))
        for p in plan]
    model._mixprec_policy = policy
    return model


def _needs_wrapper(module: nn.Module, precision: Precision) -> bool:
    if isinstance(module, _RuleModule):
        return False
    if precision is Precision.HALF:  # Linear/Conv follow autocast by themselves; LSTM needs the wrapper
        return isinstance(module, (nn.LSTM, nn.LSTMCell)) or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
    return True


_AUTOCAST_LOWERED = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)


def _runs_autocast_ops(module: nn.Module, rule: rules.ModuleRule) -> bool:
    """Whether an FP32 rule must switch autocast off inside the module.

    Built-in norms and embeddings on FP32 inputs run no op that autocast lowers to half, and an
    autocast-off region inside a compiled graph splits fusions (measured: ~4% of a GPT step), so they
    skip it. Modules with GEMMs inside (RNNs, attention, the head, anything a user registers) need it.
    """
    if rule not in rules.BUILTIN_MODULE_RULES or rule.precision is Precision.FP32_OUTPUT:
        return True
    return any(isinstance(m, _AUTOCAST_LOWERED) for m in module.modules())


def _param_dtype(module: nn.Module) -> torch.dtype | None:
    own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
    return own[0].dtype if own else None


def plan_of(model: nn.Module) -> list[ModulePlan]:
    """The per-module decisions of the last prepare() (empty if the model was not prepared)."""
    return list(getattr(model, "_mixprec_plan", []))
