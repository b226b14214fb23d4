"""The policy a diagnosis recommends, and policy files (`mixprec train --policy FILE`).

    recommend(report):
        grad_amax  = the largest gradient magnitude (activation and weight gradients), unscaled
        fp16 scale = 2**k, the largest k with grad_amax * 2**k < 65520 (FP16's overflow edge), less margin_bits
        bf16 risk  = values past BF16's range, gradients flushing to zero in BF16, or modules whose own SQNR
                     under a BF16 policy falls below the threshold
        recipe     = the one asked for; else the policy diagnosed; else bf16-mixed, unless BF16 is at risk:
                     fp16-mixed where FP16 holds the forward and the scaled gradients, else fp32
        loss scale = the FP16 scale (static) where the recipe computes in FP16, else the recipe's own
        keep lists = leaf modules whose SQNR alone under the diagnosed policy is below the threshold of
                     their compute format: out of FP8 where they ran in FP8, FP32 where they ran in half

The result is a Policy (a RecommendedPolicy) that mp.prepare applies as it is: the keep lists travel as
one more model converter (ModuleOverrides) ahead of the FP8 one. save_policy / load_policy write and
read it as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixprec.diagnostics.stats import edges
from mixprec.policy import Policy
from mixprec.prepare import PrecisionForward
from mixprec.rules import ModuleRule, Precision

if TYPE_CHECKING:
    from mixprec.diagnostics.report import DiagnosisReport

__all__ = ["HighPrecisionLinear", "ModuleOverrides", "RecommendedPolicy", "load_policy", "policy_from_dict",
           "policy_to_dict", "recommend", "save_policy", "sqnr_threshold"]


def _nominal_sqnr_db(mantissa_bits: int) -> float:
    """SQNR of rounding to m mantissa bits (relative error uniform within half an ulp): 10 log10(12 * 4**m)."""
    return 10 * math.log10(12 * 4.0 ** mantissa_bits)


# A module's own SQNR is flagged 15 dB (5.6x in RMS error) below what rounding one operand to its compute
# format gives (~3 dB more for two rounded operands, the rest a margin for cancellation in sums).
SQNR_MARGIN_DB = 15.0
# INT8 rowwise: 10 log10(12 * 127**2) = 52.9 dB less a Gaussian row's crest factor (~4, 12 dB), as for one
# operand of a floating-point format above, less the same margin: ~25.9 dB
SQNR_THRESHOLDS_DB = {"fp8": _nominal_sqnr_db(3) - SQNR_MARGIN_DB,       # E4M3: ~13.9 dB
                      "int8": 10 * math.log10(12 * 127 ** 2) - 20 * math.log10(4) - SQNR_MARGIN_DB,
                      "bf16": _nominal_sqnr_db(7) - SQNR_MARGIN_DB,      # ~37.9 dB
                      "fp16": _nominal_sqnr_db(10) - SQNR_MARGIN_DB}     # ~56 dB
BF16_UNDERFLOW_TOLERANCE = 1e-3   # a fraction of gradient values flushing to zero in BF16 worth a warning


def sqnr_threshold(compute: str | None) -> float | None:
    """The SQNR (dB) below which a module computing in `compute` ("fp8", "int8", "bf16", "fp16") is flagged."""
    return SQNR_THRESHOLDS_DB.get(compute or "")


# ---- keeping named modules out of FP8 / in FP32: a model converter ------------------------------------------
class HighPrecisionLinear(nn.Linear):
    """An nn.Linear kept out of FP8 (a forward of its own, which mixprec.fp8.convert never converts);
    it follows autocast like any Linear. ModuleOverrides.revert_model makes it an nn.Linear again."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)


def _match_fp32(name: str, module: nn.Module, role: str | None) -> bool:
    return False   # the rule is attached to named modules by ModuleOverrides, never matched by prepare


_KEEP_FP32_RULE = ModuleRule("kept in FP32 by a diagnosis (its SQNR under the policy)", _match_fp32,
                             Precision.FP32, "its own SQNR under the policy fell below the threshold")


@dataclass(frozen=True)
class ModuleOverrides:
    """A model converter (Policy.converters) for a recommended policy: named Linear layers out of FP8
    (HighPrecisionLinear), named modules computing in FP32 (a PrecisionForward with an FP32 row,
    autocast off inside). Runs before the FP8 converter; mp.unprepare undoes it."""

    keep_fp32: tuple[str, ...] = ()
    keep_out_of_fp8: tuple[str, ...] = ()

    def _modules(self, model: nn.Module) -> dict[str, nn.Module]:
        modules = dict(model.named_modules())
        missing = [n for n in (*self.keep_fp32, *self.keep_out_of_fp8) if n not in modules]
        if missing:
            raise ValueError(f"The policy names modules this model does not have: {', '.join(missing)}; its "
                             f"modules are: {', '.join(n for n in modules if n)}")
        return modules

    def convert_model(self, model: nn.Module) -> nn.Module:
        modules = self._modules(model)
        for name in (*self.keep_out_of_fp8, *self.keep_fp32):   # a module kept in FP32 is kept out of FP8 too
            module = modules[name]
            if type(module) is nn.Linear:
                module.__class__ = HighPrecisionLinear
        for name in self.keep_fp32:
            module = modules[name]
            if not isinstance(module.__dict__.get("forward"), PrecisionForward):
                module.forward = PrecisionForward(module, _KEEP_FP32_RULE, autocast_off=True)
        return model

    def describe_model(self, model: nn.Module) -> str:
        lines = [f"kept in FP32 by the diagnosis: {', '.join(self.keep_fp32) or '-'}",
                 f"kept out of FP8 by the diagnosis: {', '.join(self.keep_out_of_fp8) or '-'}"]
        return "\n".join(lines)

    def revert_model(self, model: nn.Module) -> nn.Module:
        modules = dict(model.named_modules())
        for name in (*self.keep_out_of_fp8, *self.keep_fp32):
            module = modules.get(name)
            if type(module) is HighPrecisionLinear:
                module.__class__ = nn.Linear
        for name in self.keep_fp32:
            module = modules.get(name)
            forward = module.__dict__.get("forward") if module is not None else None
            if isinstance(forward, PrecisionForward) and forward.rule is _KEEP_FP32_RULE:
                if forward.inner is not None:
                    module.forward = forward.inner
                else:
                    del module.forward
        return model


@dataclass(frozen=True, kw_only=True)
class RecommendedPolicy(Policy):
    """A Policy with what a diagnosis found: modules to keep in FP32 or out of FP8 (applied by mp.prepare
    through ModuleOverrides), whether BF16 is at risk, the FP16 loss scale and the reasons."""

    keep_fp32: tuple[str, ...] = ()
    keep_out_of_fp8: tuple[str, ...] = ()
    bf16_at_risk: bool = False
    fp16_loss_scale: float | None = None
    reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("keep_fp32", "keep_out_of_fp8", "reasons"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} must be a sequence of strings; got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.keep_fp32 and self.param_dtype != torch.float32:
            raise ValueError(f"keep_fp32 needs FP32 parameters (a '-mixed' recipe); param_dtype is {self.param_dtype}")

    @property
    def converters(self) -> tuple:
        base = Policy.converters.fget(self)
        if self.keep_fp32 or self.keep_out_of_fp8:
            return (ModuleOverrides(self.keep_fp32, self.keep_out_of_fp8), *base)
        return base

    def describe(self) -> str:
        parts = [super().describe()]
        if self.keep_fp32:
            parts.append(f"FP32: {', '.join(self.keep_fp32)}")
        if self.keep_out_of_fp8:
            parts.append(f"out of FP8: {', '.join(self.keep_out_of_fp8)}")
        if self.bf16_at_risk:
            parts.append("BF16 at risk")
        return ", ".join(parts)

    def base_policy(self) -> Policy:
        """The plain Policy underneath (no keep lists)."""
        return Policy(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Policy)})


# ---- recommend -----------------------------------------------------------------------------------------
def _largest_scale_exponent(amax: float, margin_bits: int) -> int:
    """The largest k with amax * 2**k < FP16's overflow edge (exact: scaling by 2**k is exact)."""
    edge = edges("fp16").overflow_from
    k = math.floor(math.log2(edge / amax))
    while amax * 2.0 ** (k + 1) < edge:
        k += 1
    while amax * 2.0 ** k >= edge:
        k -= 1
    return k - margin_bits


def _underflow_after_scaling(report: "DiagnosisReport", shift: float) -> float:
    """Fraction of non-zero gradient values under FP16's zero edge (2**-25) once multiplied by 2**shift,
    from the log2 histograms (exact up to values at the edge itself)."""
    below = total = 0
    for kind in ("activation_grads", "weight_grads"):
        counts = report.kind_counts(kind)
        if counts is None:
            continue
        from mixprec.diagnostics.stats import histogram
        h = histogram(counts)
        for e, c in zip(h["exponents"], h["counts"]):
            total += c
            if e + 1 + shift <= -25:
                below += c
    return below / total if total else 0.0


def _computes_fp16(policy: Policy) -> bool:
    return torch.float16 in (policy.compute_dtype, policy.param_dtype)


def recommend(report: "DiagnosisReport", *, recipe: str | None = None, sqnr_threshold_db: float | None = None,
              margin_bits: int = 0) -> RecommendedPolicy:
    """The Policy a diagnosis calls for (the algorithm is in the module docstring).

    recipe:            the recipe to start from (default: the diagnosed policy's, else chosen from the ranges).
    sqnr_threshold_db: one threshold for every module (default: per compute format, SQNR_THRESHOLDS_DB).
    margin_bits:       a smaller FP16 loss scale by this many powers of two (headroom for later batches).
    """
    grads = [s for layer in report.layers.values() for s in (layer.activation_grads, layer.weight_grads) if s]
    scale_used = report.loss_scale or 1.0
    reasons: list[str] = []
    grad_amax = max((s.amax for s in grads), default=0.0) / scale_used
    fp16_scale = None
    fp16_underflow = 0.0
    if grad_amax > 0:
        k = _largest_scale_exponent(grad_amax, margin_bits)
        fp16_scale = 2.0 ** k
        fp16_underflow = _underflow_after_scaling(report, k - math.log2(scale_used))
        scale_reason = (f"largest gradient {grad_amax:.3g}: loss scale 2^{k} keeps FP16 gradients under 65504"
                        + (f"; {100 * fp16_underflow:.2g}% of gradient values still flush to zero" if fp16_underflow
                           else ""))
    leaves = [layer for layer in report.layers.values() if layer.leaf]
    act_overflow = [layer.display_name for layer in leaves if layer.activations is not None
                    and layer.activations.formats["fp16"]["overflow"] > 0]
    if act_overflow:
        reasons.append(f"activations overflow FP16 in {', '.join(act_overflow[:5])}")

    bf16_reasons = []
    for layer in report.layers.values():
        for kind, s in layer.kinds().items():
            fr = s.formats["bf16"]
            if fr["overflow"] > 0:
                bf16_reasons.append(f"{layer.display_name} {kind} overflow BF16")
            elif kind.endswith("grads") and fr["underflow"] > BF16_UNDERFLOW_TOLERANCE:
                bf16_reasons.append(f"{layer.display_name} {kind}: {100 * fr['underflow']:.2g}% flush to zero in BF16")
    measured = report.policy
    if measured is not None and measured.compute_dtype == torch.bfloat16:
        low = [layer.display_name for layer in leaves if layer.compute == "bf16"
               and layer.sqnr_below_threshold(sqnr_threshold_db)]
        if low:
            bf16_reasons.append(f"SQNR below the BF16 threshold in {', '.join(low[:5])}")
    bf16_at_risk = bool(bf16_reasons)
    reasons += bf16_reasons[:10]

    if recipe is not None:
        base = Policy.from_recipe(recipe)
    elif measured is not None:
        base = measured.base_policy() if isinstance(measured, RecommendedPolicy) else measured
    elif not bf16_at_risk:
        base = Policy.from_recipe("bf16-mixed")
    elif fp16_scale is not None and not act_overflow and fp16_underflow < 0.01:
        base = Policy.from_recipe("fp16-mixed")
    else:
        base = Policy.from_recipe("fp32")
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Policy)}
    if fp16_scale is not None:
        if _computes_fp16(base):
            fields["loss_scale"] = fp16_scale
            reasons.insert(0, scale_reason)
        else:
            reasons.insert(0, f"(for FP16: {scale_reason})")

    keep_fp32: list[str] = []
    keep_out_of_fp8: list[str] = []
    if measured is not None:
        for layer in leaves:
            if not layer.sqnr_below_threshold(sqnr_threshold_db):
                continue
            if layer.compute == "fp8" and base.fp8 is not None:
                keep_out_of_fp8.append(layer.name)
            elif layer.compute in ("bf16", "fp16") and base.autocast_enabled:
                keep_fp32.append(layer.name)
    if keep_fp32 and base.param_dtype != torch.float32:
        reasons.append(f"{', '.join(keep_fp32)} would need FP32 compute, which needs FP32 parameters: use a "
                       f"'-mixed' recipe")
        keep_fp32 = []
    for name in keep_out_of_fp8:
        reasons.append(f"{name}: SQNR in FP8 below {sqnr_threshold_db or SQNR_THRESHOLDS_DB['fp8']:.0f} dB, kept out of FP8")
    for name in keep_fp32:
        reasons.append(f"{name}: SQNR in half precision below the threshold, kept in FP32")
    return RecommendedPolicy(**fields, keep_fp32=tuple(keep_fp32), keep_out_of_fp8=tuple(keep_out_of_fp8),
                             bf16_at_risk=bf16_at_risk, fp16_loss_scale=fp16_scale, reasons=tuple(reasons))


# ---- policy files ----------------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_EXTRA_FIELDS = ("keep_fp32", "keep_out_of_fp8", "bf16_at_risk", "fp16_loss_scale", "reasons")
FILE_FORMAT = "mixprec-policy/1"


def _config_classes() -> dict[str, type]:
    """Policy fields that hold a config dataclass (fp8: Float8Config, ...), read off Policy's annotations so
    that a config added to Policy is written and read without a change here."""
    classes = {}
    for name, hint in typing.get_type_hints(Policy).items():
        for arg in typing.get_args(hint) or (hint,):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                classes[name] = arg
    return classes


def _config_to_dict(config: Any) -> dict[str, Any]:
    # fields that take part in equality: the recipe's settings (Float8Config.extra, a scratch dict, is not one)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init and f.compare}


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """A Policy (or RecommendedPolicy) as plain JSON-able values."""
    d: dict[str, Any] = {"format": FILE_FORMAT}
    for f in dataclasses.fields(policy):
        value = getattr(policy, f.name)
        if isinstance(value, torch.dtype):
            value = _DTYPE_NAMES[value]
        elif dataclasses.is_dataclass(value):
            value = _config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        d[f.name] = value
    return d


def policy_from_dict(d: dict[str, Any], *, source: str = "policy") -> Policy:
    """The Policy of policy_to_dict (a RecommendedPolicy where it has keep lists or findings)."""
    if d.get("format") != FILE_FORMAT:
        raise ValueError(f"{source}: not a mixprec policy file (format {d.get('format')!r}, expected {FILE_FORMAT!r})")
    known = {f.name for f in dataclasses.fields(RecommendedPolicy)}
    unknown = set(d) - known - {"format"}
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}; valid keys: {', '.join(sorted(known))}")
    kwargs = {k: v for k, v in d.items() if k != "format"}
    for k in ("param_dtype", "compute_dtype", "reduce_dtype"):
        if k in kwargs:
            if kwargs[k] not in _DTYPES:
                raise ValueError(f"{source}: {k} {kwargs[k]!r} is not one of: {', '.join(_DTYPES)}")
            kwargs[k] = _DTYPES[kwargs[k]]
    for k, cls in _config_classes().items():
        if kwargs.get(k) is not None:
            if not isinstance(kwargs[k], dict):
                raise ValueError(f"{source}: {k} must be null or an object of {cls.__name__}'s fields")
            kwargs[k] = cls(**kwargs[k])
    for k in ("keep_fp32", "keep_out_of_fp8", "reasons"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    if not any(kwargs.get(k) for k in _EXTRA_FIELDS):
        return Policy(**{k: v for k, v in kwargs.items() if k not in _EXTRA_FIELDS})
    return RecommendedPolicy(**kwargs)


def save_policy(policy: Policy, path: str | Path) -> Path:
    """Write a Policy as a JSON file (what `mixprec train --policy FILE` reads); returns the path."""
    if not isinstance(policy, Policy):
        raise TypeError(f"save_policy takes a mixprec Policy; got {type(policy).__name__}")
    path = Path(path)
    path.write_text(json.dumps(policy_to_dict(policy), indent=1) + "\n")
    return path


def load_policy(path: str | Path) -> Policy:
    """Read a policy file written by save_policy (or report.save); ValueError names what is wrong."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"No policy file at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a policy file holds a JSON object")
    try:
        return policy_from_dict(d, source=str(path))
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None
