"""The precision table as data: which modules and ops compute in FP32, and why.

Two kinds of rules:
- module rules: matched against each submodule of a model by `mp.prepare` (class, class name,
  or role: embedding / output head), and applied by swapping in a small subclass that runs the
  module's forward under the rule;
- op rules: matched against torch functions by `mp.autocast`'s function mode (softmax, losses,
  functional norms), identically on every device.

Users extend or override the table: `keep_fp32(...)`, `allow_half(...)`, `register_norm(...)`.
Later registrations take precedence over earlier ones and over the built-in table.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BUILTIN_MODULE_RULES", "BUILTIN_OP_RULES", "CUDA_AUTOCAST_EXCEPTIONS", "ModuleRule", "OpRule", "Precision",
           "allow_half", "keep_fp32", "module_rules", "op_rules", "op_table", "register_norm", "reset",
           "rule_for_module", "user_op_rules"]


class Precision(enum.Enum):
    """How a matched module or op computes."""

    FP32 = "fp32"                  # inputs upcast, FP32 compute, FP32 output
    FP32_CAST_BACK = "fp32->in"    # inputs upcast, FP32 compute, output cast back to the input's dtype
    FP32_OUTPUT = "half->fp32"     # GEMM inputs in the compute dtype, FP32 accumulation and FP32 output
    FP32_IN_KERNEL = "fp32-kernel"  # half in and out: the kernel itself computes in FP32 (no casts needed)
    HALF = "half"                  # the policy's compute dtype (autocast's lower-precision list)

    def describe(self) -> str:
        return {
            Precision.FP32: "FP32 compute and output",
            Precision.FP32_IN_KERNEL: "FP32 compute inside the kernel",
            Precision.FP32_CAST_BACK: "FP32 compute, output cast back",
            Precision.FP32_OUTPUT: "FP32 weights; half GEMM inputs, FP32 accumulate and output",
            Precision.HALF: "compute dtype (half)",
        }[self]


# A module matcher sees (qualified name, module, role); role is "embedding", "head", "keep_fp32" or None,
# decided by prepare() from the model's structure.
ModuleMatcher = Callable[[str, nn.Module, "str | None"], bool]


@dataclass(frozen=True)
class ModuleRule:
    """A row of the table for modules: what it matches, how it computes, and why."""

    what: str
    matches: ModuleMatcher
    precision: Precision
    why: str
    evidence: str = ""     # FP32_IN_KERNEL: where PyTorch's kernels accumulate in FP32


@dataclass(frozen=True)
class OpRule:
    """A row of the table for torch functions (forward ops)."""

    what: str
    functions: tuple[Callable, ...]
    precision: Precision
    why: str
    evidence: str = ""


def _is_instance(*classes: type) -> ModuleMatcher:
    return lambda name, module, role: isinstance(module, classes)


def _has_role(expected: str) -> ModuleMatcher:
    return lambda name, module, role: role == expected


_NORM_NAME = re.compile(r"Norm(\d*[dD])?$")


def _is_hand_written_norm(name: str, module: nn.Module, role: str | None) -> bool:
    """A normalization by what it is, whatever library wrote it (LlamaRMSNorm, T5LayerNorm, apex's
    FusedRMSNorm, timm's LayerNorm2d, ...): a class named *Norm with only 1-D (per-feature) or scalar
    parameters of its own and no children that hold parameters."""
    if isinstance(module, _NORMS) or not _NORM_NAME.search(type(module).__name__):
        return False
    if any(True for child in module.children() for _ in child.parameters()):
        return False
    return all(p.dim() <= 1 for p in module.parameters(recurse=False))


# Built-in norms whose PyTorch kernels compute in FP32 from half inputs: the rule holds without casts.
_FP32_KERNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)
_NORMS = (*_FP32_KERNEL_NORMS, nn.LocalResponseNorm)
_SENSITIVE_RNNS = (nn.RNN, nn.GRU, nn.RNNCell, nn.GRUCell)
NORM_KERNEL_EVIDENCE = (
    "layer_norm: T_ACC = acc_type<T> in aten/src/ATen/native/cuda/layer_norm_kernel.cu, opmath_t in "
    "cpu/layer_norm_kernel.cpp; group_norm: T_ACC in cuda/group_norm_kernel.cu, opmath_t in "
    "cpu/group_norm_kernel.cpp; batch_norm: accscalar_t in cuda/Normalization.cuh, cuDNN's float "
    "statistics, opmath_t in cpu/batch_norm_kernel.cpp; rms_norm: input.to(opmath) in layer_norm.cpp "
    "(and acc types in the fused CUDA kernel); instance_norm runs batch_norm. With FP32 parameters (as "
    "prepare keeps them) on half inputs; CUDA kernels that refuse mixed dtypes are on torch.autocast's FP32 "
    "list, and mp.autocast's intercept mode upcasts them")

BUILTIN_MODULE_RULES: tuple[ModuleRule, ...] = (
    ModuleRule("LayerNorm, BatchNorm, GroupNorm, InstanceNorm, nn.RMSNorm", _is_instance(*_FP32_KERNEL_NORMS),
               Precision.FP32_IN_KERNEL, "variance is a sum: FP16 overflows and drifts", NORM_KERNEL_EVIDENCE),
    ModuleRule("LocalResponseNorm", _is_instance(nn.LocalResponseNorm), Precision.FP32_CAST_BACK,
               "a sum of squares, computed in the input's dtype by its composite implementation"),
    ModuleRule("hand-written norms (a class named *Norm with per-feature parameters)", _is_hand_written_norm,
               Precision.FP32_CAST_BACK, "mean of squares / variance is a sum"),
    ModuleRule("modules the model keeps in FP32 (Hugging Face's _keep_in_fp32_modules)", _has_role("keep_fp32"),
               Precision.FP32, "the model's authors found them unstable in half precision"),
    ModuleRule("token and position embeddings", _has_role("embedding"), Precision.FP32,
               "most precision-sensitive layers of an LLM (first layer)"),
    ModuleRule("output head (last Linear, or named by the user)", _has_role("head"), Precision.FP32_OUTPUT,
               "most precision-sensitive layer of an LLM; logits feed exp in the loss"),
    ModuleRule("RNN, GRU (and their cells)", _is_instance(*_SENSITIVE_RNNS), Precision.FP32,
               "recurrence accumulates error"),
    ModuleRule("nn.MultiheadAttention", _is_instance(nn.MultiheadAttention), Precision.FP32,
               "with need_weights=True its softmax and scores@V run as plain ops inside one call; called with "
               "need_weights=False it runs fused SDPA (FP32 inside the kernel) and stays in half precision"),
    ModuleRule("LSTM", _is_instance(nn.LSTM, nn.LSTMCell), Precision.HALF, "LSTM cells tolerate BF16/FP16"),
    ModuleRule("Linear, Conv, pooling, activations", _is_instance(nn.Linear, nn.modules.conv._ConvNd),
               Precision.HALF, "GEMMs with FP32 accumulation are not precision sensitive"),
)

_LOSSES = (F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
           F.binary_cross_entropy, F.binary_cross_entropy_with_logits, F.kl_div, F.poisson_nll_loss,
           F.gaussian_nll_loss, F.cosine_embedding_loss, F.hinge_embedding_loss, F.margin_ranking_loss,
           F.multilabel_margin_loss, F.multilabel_soft_margin_loss, F.multi_margin_loss, F.soft_margin_loss,
           F.triplet_margin_loss, F.ctc_loss)

BUILTIN_OP_RULES: tuple[OpRule, ...] = (
    OpRule("softmax, log_softmax", (torch.softmax, F.softmax, torch.Tensor.softmax, torch.log_softmax,
                                    F.log_softmax, torch.Tensor.log_softmax, torch.special.softmax,
                                    torch.special.log_softmax, F.softmin),
           Precision.FP32, "exp over/underflows; the denominator is a sum"),
    OpRule("losses (cross entropy, MSE, BCE, KL, ...)", _LOSSES, Precision.FP32,
           "log/exp and reductions need FP32 input and compute"),
    OpRule("functional norms (layer_norm, group_norm, batch_norm, rms_norm, instance_norm)",
           (F.layer_norm, F.group_norm, F.batch_norm, F.rms_norm, F.instance_norm),
           Precision.FP32_IN_KERNEL, "variance / mean of squares is a sum", NORM_KERNEL_EVIDENCE),
    OpRule("logsumexp, cumsum, norm", (torch.logsumexp, torch.Tensor.logsumexp, torch.cumsum,
                                       torch.Tensor.cumsum, torch.norm, torch.linalg.vector_norm),
           Precision.FP32, "long sums and exp lose bits in half"),
)


# Built-in op rules that torch.autocast's CUDA lists do not compute in FP32 (the precision-table tests check
# every other function of the table against those lists on a GPU). Elsewhere they agree, up to the output
# dtype of the functional norms: FP32 under torch.autocast, cast back to the input's under the rule
# (batch_norm and instance_norm are not upcast there: their CUDA kernels keep the statistics in FP32).
CUDA_AUTOCAST_EXCEPTIONS: dict[Callable, str] = {
    F.cross_entropy: "its log_softmax runs in half precision for half logits (use mp.ops.cross_entropy)",
    F.binary_cross_entropy: "raises under torch.autocast (binary_cross_entropy_with_logits is safe)",
    F.gaussian_nll_loss: "partly in half precision (input - target)",
    F.multilabel_soft_margin_loss: "partly in half precision (its log-sigmoid)",
    F.ctc_loss: "not cast: runs on the half log-probabilities as given",
}


class _Registry:
    """User rules, newest first; consulted before the built-in table. The op table is rebuilt here, on
    every change, so that an autocast block looks functions up without rebuilding it."""

    def __init__(self) -> None:
        self.module_rules: list[ModuleRule] = []
        self.op_rules: list[OpRule] = []
        self.table: dict[Callable, OpRule] = {}
        self.user_table: dict[Callable, OpRule] = {}
        self._rebuild()

    def add_module_rule(self, rule: ModuleRule) -> None:
        self.module_rules.insert(0, rule)

    def add_op_rule(self, rule: OpRule) -> None:
        self.op_rules.insert(0, rule)
        self._rebuild()

    def clear(self) -> None:
        self.module_rules.clear()
        self.op_rules.clear()
        self._rebuild()

    def _rebuild(self) -> None:
        self.table = _first_match([*self.op_rules, *BUILTIN_OP_RULES])
        self.user_table = _first_match(self.op_rules)


def _first_match(rules: list[OpRule]) -> dict[Callable, OpRule]:
    table: dict[Callable, OpRule] = {}
    for rule in rules:
        for fn in rule.functions:
            table.setdefault(fn, rule)
    return table


_registry = _Registry()


def _matcher_for(target) -> tuple[str, ModuleMatcher]:
    if isinstance(target, type) and issubclass(target, nn.Module):
        return target.__name__, _is_instance(target)
    if isinstance(target, str):  # a qualified module name in the model ("lm_head", "blocks.0.attn")
        return f"module named {target!r}", lambda name, module, role: name == target
    if callable(target):
        return getattr(target, "__name__", repr(target)), target
    raise TypeError(f"a rule target must be an nn.Module class, a module name or a matcher function; "
                    f"got {target!r}")


def keep_fp32(*targets, why: str = "registered by the user", cast_back: bool = False) -> None:
    """Compute these in FP32 from now on.

    A target is an nn.Module subclass, a qualified module name ("lm_head"), a matcher
    `fn(name, module, role) -> bool`, or a torch function (softmax-like op). With `cast_back`,
    module outputs return in the input's dtype (the norm behaviour).
    """
    precision = Precision.FP32_CAST_BACK if cast_back else Precision.FP32
    for target in targets:
        if _is_torch_function(target):
            _registry.add_op_rule(OpRule(getattr(target, "__name__", repr(target)), (target,), precision, why))
        else:
            what, matcher = _matcher_for(target)
            _registry.add_module_rule(ModuleRule(what, matcher, precision, why))


def allow_half(*targets, why: str = "registered by the user") -> None:
    """Let these run in the compute dtype even where the table says FP32 (an override)."""
    for target in targets:
        if _is_torch_function(target):
            _registry.add_op_rule(OpRule(getattr(target, "__name__", repr(target)), (target,), Precision.HALF, why))
        else:
            what, matcher = _matcher_for(target)
            _registry.add_module_rule(ModuleRule(what, matcher, Precision.HALF, why))


def register_norm(*classes: type) -> None:
    """Treat these hand-written normalization classes like LayerNorm: FP32 compute, output cast back."""
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_norm takes nn.Module classes; got {cls!r}")
        _registry.add_module_rule(ModuleRule(cls.__name__, _is_instance(cls), Precision.FP32_CAST_BACK,
                                             "normalization registered by the user"))


def reset() -> None:
    """Forget every user rule (back to the built-in table)."""
    _registry.clear()


def _is_torch_function(target) -> bool:
    module = getattr(target, "__module__", "") or ""
    owner = getattr(target, "__objclass__", None)  # Tensor methods are descriptors of TensorBase
    return callable(target) and not isinstance(target, type) and (
        module.startswith("torch") or (isinstance(owner, type) and issubclass(torch.Tensor, owner)))


def module_rules() -> list[ModuleRule]:
    """User rules first (newest first), then the built-in table."""
    return [*_registry.module_rules, *BUILTIN_MODULE_RULES]


def op_rules() -> list[OpRule]:
    return [*_registry.op_rules, *BUILTIN_OP_RULES]


def user_op_rules() -> list[OpRule]:
    """The op rules registered with keep_fp32 / allow_half (newest first)."""
    return list(_registry.op_rules)


def rule_for_module(name: str, module: nn.Module, role: str | None) -> ModuleRule | None:
    """The first rule that matches this module, or None (the module follows autocast)."""
    for rule in module_rules():
        if rule.matches(name, module, role):
            return rule
    return None


def op_table(*, builtin: bool = True) -> dict[Callable, OpRule]:
    """torch function -> the rule that governs it (first match wins); user rules only with builtin=False."""
    return _registry.table if builtin else _registry.user_table
