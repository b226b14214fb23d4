"""mp.prepare and mp.unprepare: apply a Policy to a model (converters, module rules, parameter casts).

What prepare changes, all of it visible and undone by unprepare:
- the policy's converters (its FP8 config) swap layers (nn.Linear -> Float8Linear);
- a module that a row of the table governs gets a `PrecisionForward` as its `forward` (an instance
  attribute: the class, its name and isinstance checks are untouched);
- parameters and floating buffers of modules not kept in FP32 are cast to policy.param_dtype;
- one record on the model, `model._mixprec_preparation`: the policy, the plan (what each module
  became, for mp.explain) and the original dtypes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.func import functional_call

from mixprec import _comm, rules
from mixprec._tensors import is_logical_fp16, logical_dtype, map_tensors, to_fp16_values, to_fp32
from mixprec.context import active_policy
from mixprec.ops import linear_fp32_output
from mixprec.policy import Policy
from mixprec.rules import Precision

_HALF = (torch.float16, torch.bfloat16)
_HEAD_NAMES = ("lm_head", "head", "output", "out_proj_vocab", "classifier", "fc_out", "decoder")
_RECORD = "_mixprec_preparation"


@dataclass(frozen=True)
class ModulePlan:
    """What prepare decided for one module (shown by mp.explain)."""

    name: str
    kind: str
    role: str | None
    precision: Precision | None
    why: str
    param_dtype: torch.dtype | None


@dataclass
class Preparation:
    """The record prepare keeps on a model."""

    policy: Policy
    plan: list[ModulePlan]
    original_dtypes: dict[str, torch.dtype] = field(default_factory=dict)   # parameter/buffer name -> dtype


def _device_type(module: nn.Module, args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    for p in module.parameters():
        return p.device.type
    return "cpu"


def _is_plain_fp32(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not is_logical_fp16(x)


def _needs_weights(args: tuple, kwargs: dict) -> bool:
    """nn.MultiheadAttention's need_weights (its fifth parameter, default True): False takes the fused SDPA path."""
    return bool(kwargs.get("need_weights", args[4] if len(args) > 4 else True))


class PrecisionForward:
    """A module's forward run under its row of the table.

    FP32 / FP32_CAST_BACK: inputs upcast, the module's forward in FP32 (autocast off where the module
        runs GEMMs), the output cast back to the input's dtype for FP32_CAST_BACK;
    FP32_OUTPUT (the output head): half GEMM inputs, FP32 accumulation and logits;
    HALF (LSTM): the module's parameters and inputs in the compute dtype on every device.
    The compute dtype is torch.autocast's for the input's device, read at each call.
    """

    def __init__(self, module: nn.Module, rule: rules.ModuleRule, autocast_off: bool):
        self.module, self.rule, self.autocast_off = module, rule, autocast_off
        self.inner: Callable | None = module.__dict__.get("forward")   # a forward set on the instance before us

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        precision = self.rule.precision
        if isinstance(self.module, nn.MultiheadAttention) and not _needs_weights(args, kwargs):
            return self._call(*args, **kwargs)   # fused SDPA: its softmax and scores@V accumulate in FP32
        if (precision in (Precision.FP32, Precision.FP32_CAST_BACK) and not self.autocast_off
                and len(args) == 1 and not kwargs and _is_plain_fp32(args[0])):
            return self._call(args[0])  # FP32 in, FP32 weights, no autocast op inside: FP32 throughout
        device_type = _device_type(self.module, args)
        if precision is Precision.FP32_OUTPUT:
            return self._head(device_type, *args, **kwargs)
        if precision is Precision.HALF:
            return self._half(device_type, *args, **kwargs)
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        in_dtype = logical_dtype(first) if first is not None else torch.float32
        args, kwargs = map_tensors(to_fp32, args), map_tensors(to_fp32, kwargs)
        if self.autocast_off:
            with torch.autocast(device_type, enabled=False):
                out = self._call(*args, **kwargs)
        else:  # FP32 inputs and weights already keep every op of a norm or an embedding in FP32
            out = self._call(*args, **kwargs)
        if precision is Precision.FP32_CAST_BACK and in_dtype != torch.float32:
            if is_logical_fp16(first):
                return map_tensors(to_fp16_values, out)
            return map_tensors(lambda t: t.to(in_dtype), out)
        return out

    def _head(self, device_type: str, x, *args, **kwargs):
        module = self.module
        if (isinstance(module, nn.Linear) and not args and not kwargs and torch.is_autocast_enabled(device_type)
                and torch.get_autocast_dtype(device_type) in _HALF):
            return linear_fp32_output(x, module.weight, module.bias, torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):  # not a plain Linear, or no autocast: all FP32
            return self._call(to_fp32(x), *map_tensors(to_fp32, args), **map_tensors(to_fp32, kwargs))

    def _half(self, device_type: str, *args, **kwargs):
        # Inside functional_call below autocast is off: the cast parameters are in place, run as they are.
        if not torch.is_autocast_enabled(device_type) or torch.get_autocast_dtype(device_type) not in _HALF:
            return self._call(*args, **kwargs)
        compute = torch.get_autocast_dtype(device_type)
        policy = active_policy()
        emulate = policy is not None and policy.emulates_fp16(device_type)
        cast = to_fp16_values if emulate else (lambda t: t.to(compute))
        params = {n: cast(p) for n, p in self.module.named_parameters()}
        with torch.autocast(device_type, enabled=False):
            out = functional_call(self.module, params, tuple(map_tensors(cast, args)), map_tensors(cast, kwargs))
        return map_tensors(to_fp16_values, out) if emulate else out

    def __repr__(self) -> str:
        return f"PrecisionForward({type(self.module).__name__}, {self.rule.precision.describe()}: {self.rule.what})"


def find_roles(model: nn.Module, head: str | None = None) -> dict[str, str]:
    """Module name -> "embedding", "head" or "keep_fp32".

    Embeddings: every nn.Embedding / nn.EmbeddingBag (token and position). Head: the module the user
    names; else a Linear tied to an embedding's weight; else a Linear named like a head; else the last
    Linear registered. Also "embedding": a module whose own parameters are all embeddings by name
    (pos_embed, position_embeddings, cls_token: ViT's). keep_fp32: modules a Hugging Face model lists in
    `_keep_in_fp32_modules`.
    """
    modules = dict(model.named_modules())
    roles = {n: "embedding" for n, m in modules.items() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    if head is not None:
        if head not in modules:
            raise ValueError(f"No module named {head!r} in the model; its Linear layers are: "
                             + ", ".join(n for n, m in modules.items() if isinstance(m, nn.Linear)))
        roles[head] = "head"
    else:
        linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear) and n]
        if linears:
            embedding_weights = {id(modules[n].weight) for n in roles}
            tied = [n for n, m in linears if id(m.weight) in embedding_weights]
            named = [n for n, m in linears if n.split(".")[-1] in _HEAD_NAMES]
            roles[(tied or named or [linears[-1][0]])[-1]] = "head"
    # Embeddings held as bare parameters (ViT's position embeddings and class token) make their module one
    # where that module is the embedding stage (a patch projection at most). A module that also runs the
    # network's blocks (torchvision's ViT Encoder, timm's VisionTransformer) is not run in FP32 whole:
    # adding an FP32 parameter to half activations promotes to FP32 by itself (prepare keeps it FP32).
    for name, module in modules.items():
        if name not in roles and _is_embedding_stage(module):
            roles[name] = "embedding"
    # Hugging Face models name modules to keep in FP32 (matched against the parts of a module's name)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for name in modules:
        if name and name not in roles and keep.intersection(name.split(".")):
            roles[name] = "keep_fp32"
    return roles


_TOKEN_PARAMETERS = ("cls_token", "class_token", "mask_token", "reg_token", "dist_token", "distillation_token",
                     "register_tokens")


def _is_embedding_parameter(name: str) -> bool:
    return "embed" in name or name in _TOKEN_PARAMETERS


def _embedding_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The module's own floating parameters named like embeddings (pos_embed, cls_token, ...)."""
    return [p for n, p in module.named_parameters(recurse=False)
            if p.is_floating_point() and _is_embedding_parameter(n)]


def _is_embedding_stage(module: nn.Module) -> bool:
    """Own floating parameters that are all embeddings, and at most one GEMM layer inside (a patch projection)."""
    own = [n for n, p in module.named_parameters(recurse=False) if p.is_floating_point()]
    return (bool(own) and all(_is_embedding_parameter(n) for n in own)
            and sum(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in module.modules()) <= 1)


def prepare(model: nn.Module, policy: Policy | str, *, head: str | None = None) -> nn.Module:
    """Apply a policy to a model in place and return it.

    1. The policy's converters: with policy.fp8, large Linear layers become Float8Linear.
    2. Module rules (mixprec.rules): norms, embeddings, the output head, RNN/GRU compute in FP32; LSTM
       in the compute dtype; each governed module's forward becomes a PrecisionForward.
    3. Parameters and floating buffers of modules not kept in FP32 are cast to policy.param_dtype.
    Idempotent: preparing again with the same policy changes nothing. `mp.unprepare` undoes it.
    A model with half parameters (the -true recipes) has half values in its state_dict(); for an FP32
    checkpoint take the master weights (MasterWeights.state_dict()["master_weights"]) or upcast.

    Data parallel: prepare the model, then wrap it. On a DistributedDataParallel module, prepare prepares
    the wrapped module and registers the comm hook that averages gradients in policy.reduce_dtype where
    DDP's default would not (half gradients: mp.distributed.fp32_allreduce_hook). Under FSDP2 shard the
    prepared model with mp.distributed.shard_model(model, policy): it gives every module the table keeps in
    FP32 its own group and MixedPrecisionPolicy, so each group has one parameter dtype.
    """
    if isinstance(policy, str):
        policy = Policy.from_recipe(policy)
    if not isinstance(policy, Policy):
        raise TypeError(f"prepare takes a mixprec Policy or a recipe name; got {type(policy).__name__}")
    if _comm.is_ddp(model):
        return _prepare_ddp(model, policy, head)
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare takes an nn.Module; got {type(model).__name__}")
    _refuse_sharded(model, policy)
    params = list(model.parameters())
    if not any(p.is_floating_point() for p in params):
        raise ValueError(f"{type(model).__name__} has no floating-point parameters to train in mixed precision "
                         f"(found {len(params)} parameters of dtypes {sorted({str(p.dtype) for p in params})})")
    previous = model.__dict__.get(_RECORD)
    if previous is not None:
        if previous.policy == policy:
            return model
        raise ValueError(f"model was already prepared with {previous.policy.name or previous.policy}; prepare a "
                         f"fresh model (or mp.unprepare it first) for {policy.name or policy}")
    original_dtypes = {n: t.dtype for n, t in _named_tensors(model)}
    for converter in policy.converters:
        model = converter.convert_model(model)

    roles = find_roles(model, head)
    plan: list[tuple[str, nn.Module, str | None, rules.ModuleRule | None]] = []
    keep_fp32: set[int] = set()
    half_modules: list[nn.Module] = []
    for name, module in model.named_modules():
        role = roles.get(name)
        rule = rules.rule_for_module(name, module, role) if policy.fp32_rules else None
        if rule is not None and rule.precision is not Precision.HALF:
            keep_fp32.update(id(p) for p in module.parameters())
            keep_fp32.update(id(b) for b in module.buffers())
        else:
            half_modules.append(module)
            if policy.fp32_rules:   # bare embedding parameters of a module that is more than its embeddings
                keep_fp32.update(id(p) for p in _embedding_parameters(module))
        if rule is not None and _needs_wrapper(module, rule.precision):
            module.forward = PrecisionForward(module, rule, _runs_autocast_ops(module, rule))
        plan.append((name, module, role, rule))

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(policy.param_dtype) if t.is_floating_point() and id(t) not in keep_fp32 else t

    # Parameters and floating buffers (BatchNorm's running statistics), as model.half() casts them;
    # through _apply, so that a module keeping some state in FP32 (Float8Linear's amax histories) can.
    for module in half_modules:
        module._apply(cast, recurse=False)
    model.__dict__[_RECORD] = Preparation(
        policy, [ModulePlan(name, type(module).__name__, role, rule.precision if rule else None,
                            rule.why if rule else "", _param_dtype(module)) for name, module, role, rule in plan],
        original_dtypes)
    return model


# ---- data parallel wrappers (mixprec.distributed builds on these) ---------------------------------------
def _prepare_ddp(ddp: nn.Module, policy: Policy, head: str | None) -> nn.Module:
    inner = ddp.module
    if preparation(inner) is None:
        changed = sorted({f"{p.dtype}" for p in inner.parameters() if p.is_floating_point()} - {"torch.float32"})
        if policy.param_dtype != torch.float32 or changed:
            raise ValueError(
                f"mp.prepare on a DistributedDataParallel module whose model is not prepared yet: policy "
                f"{policy.name or policy.describe()!r} stores parameters in {policy.param_dtype}"
                + (f" and the model holds {', '.join(changed)} parameters" if changed else "")
                + ", and DDP built its gradient buckets in the dtypes it found at wrapping time (casting now would "
                  "leave gradients unsynchronized). Prepare first, then wrap: model = DDP(mp.prepare(model, policy)); "
                  "then mp.prepare(model, policy) registers the reduction hook.")
    prepare(inner, policy, head=head)
    _comm.register_reduce_hook(ddp, policy.reduce_dtype)
    return ddp


def _refuse_sharded(model: nn.Module, policy: Policy) -> None:
    """prepare after fully_shard would cast or swap FSDP2's sharded parameters behind its back."""
    if not torch.distributed.is_available() or (policy.param_dtype == torch.float32 and not policy.converters):
        return
    from torch.distributed.tensor import DTensor
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(f"mp.prepare on a model already sharded (its parameters are DTensors): policy "
                         f"{policy.name or policy.describe()!r} would cast or swap FSDP2's parameters. Prepare first, "
                         "then shard: mp.distributed.shard_model(mp.prepare(model, policy), policy)")


def unprepare(model: nn.Module) -> nn.Module:
    """Undo prepare(): the modules' own forwards, the converters' swaps (Float8Linear -> nn.Linear) and
    the parameters' and buffers' original dtypes (values as trained, cast). Returns the model."""
    record = model.__dict__.pop(_RECORD, None)
    if record is None:
        raise ValueError(f"{type(model).__name__} was not prepared by mp.prepare: nothing to undo")
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, PrecisionForward):
            if forward.inner is not None:
                module.forward = forward.inner
            else:
                del module.forward
    for converter in reversed(record.policy.converters):
        model = converter.revert_model(model)
    wanted = {id(t): record.original_dtypes[n] for n, t in _named_tensors(model) if n in record.original_dtypes}

    def restore(t: torch.Tensor) -> torch.Tensor:
        dtype = wanted.get(id(t))
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t

    for module in model.modules():
        module._apply(restore, recurse=False)
    return model


def _named_tensors(model: nn.Module):
    return itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))


def _needs_wrapper(module: nn.Module, precision: Precision) -> bool:
    if isinstance(module.__dict__.get("forward"), PrecisionForward) or precision is Precision.FP32_IN_KERNEL:
        return False
    if precision is Precision.HALF:  # Linear/Conv follow autocast by themselves; LSTM needs the wrapper
        return isinstance(module, (nn.LSTM, nn.LSTMCell)) or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
    return True


_AUTOCAST_LOWERED = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention)


def _runs_autocast_ops(module: nn.Module, rule: rules.ModuleRule) -> bool:
    """Whether an FP32 rule must switch autocast off inside the module.

    Built-in norms and embeddings on FP32 inputs run no op that autocast lowers to half, and an
    autocast-off region inside a compiled graph splits fusions, so they skip it. Modules with GEMMs
    inside (RNNs, attention, the head, anything a user registers) need it.
    """
    if rule not in rules.BUILTIN_MODULE_RULES or rule.precision is Precision.FP32_OUTPUT:
        return True
    return any(isinstance(m, _AUTOCAST_LOWERED) for m in module.modules())


def _param_dtype(module: nn.Module) -> torch.dtype | None:
    own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
    return own[0].dtype if own else None


def preparation(model: nn.Module) -> Preparation | None:
    """The record of prepare() on this model, or None."""
    return model.__dict__.get(_RECORD)


def plan_of(model: nn.Module) -> list[ModulePlan]:
    """The per-module decisions of prepare() (empty if the model was not prepared)."""
    record = preparation(model)
    return list(record.plan) if record is not None else []
