"""convert: swap a model's nn.Linear layers for Float8Linear, keeping the sensitive ones in high precision.

The default filter keeps what DeepSeek-V3 keeps out of FP8, and what cannot gain:

    output head       the last Linear, one named lm_head/head/output/classifier, or one whose weight is
                      tied to an embedding (the most precision-sensitive layer of a language model)
    attention scores  Linear layers on the score path (names with score/logit/softmax/rel_pos/...);
                      the Q, K, V and output projections do run in FP8, as in DeepSeek-V3
    nn.MultiheadAttention internals (its forward reads the projection weights directly)
    routers           MoE gates: a last name part of gate/router/gating, or containing "router"
                      (LLaMA's gate_proj is an MLP projection and is converted)
    small layers      in or out features < config.min_features: quantization costs more than the
                      FP8 GEMM saves
    odd shapes        in or out features not divisible by 16 (torch._scaled_mm's requirement)

Embeddings and norms are not Linear layers and are never touched. The decisions are recorded on the
model (`describe(model)` prints them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from mixprec.fp8.config import Float8Config
from mixprec.fp8.linear import Float8Linear

_HEAD_NAMES = ("lm_head", "head", "output", "classifier")
_ROUTER_NAMES = ("gate", "router", "gating")
_SCORE_PATH = ("score", "logit", "softmax", "rel_pos", "relative_position", "pos_bias", "alibi")

Filter = Callable[[str, nn.Linear], bool]


@dataclass(frozen=True)
class Fp8Decision:
    """What convert did with one Linear layer, and why."""

    name: str
    in_features: int
    out_features: int
    fp8: bool
    reason: str


def default_filter(model: nn.Module, config: Float8Config) -> Callable[[str, nn.Linear], str | None]:
    """The default rule as a function (qualified name, Linear) -> None to convert, or the reason to keep.

    Takes the whole model to find the output head (last Linear, or tied to an embedding) and the
    children of nn.MultiheadAttention.
    """
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    last = linears[-1] if linears else None
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    in_mha = {f"{name}.{child}" if name else child
              for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
              for child, _ in m.named_modules() if child}

    def rule(name: str, linear: nn.Linear) -> str | None:
        leaf = name.rsplit(".", 1)[-1].lower()
        lowered = name.lower()
        if id(linear.weight) in tied:
            return "output head (weight tied to an embedding)"
        if leaf in _HEAD_NAMES:
            return f"output head (named {leaf!r})"
        if name == last and name:   # a bare Linear converted on its own is no model's head
            return "output head (the last Linear)"
        if name in in_mha:
            return "inside nn.MultiheadAttention (its forward reads the weights directly)"
        if any(word in lowered for word in _SCORE_PATH):
            return "attention score path (kept high precision, as DeepSeek-V3)"
        if leaf in _ROUTER_NAMES or "router" in leaf:
            return "router / MoE gate (kept high precision, as DeepSeek-V3)"
        smallest = min(linear.in_features, linear.out_features)
        if smallest < config.min_features:
            return f"small: min(in, out) = {smallest} < min_features {config.min_features}"
        if linear.in_features % 16 or linear.out_features % 16:
            return "features not divisible by 16 (FP8 GEMMs need it)"
        return None

    return rule


def convert(model: nn.Module, config: Float8Config | None = None, filter: Filter | None = None) -> nn.Module:
    """Swap `model`'s nn.Linear layers for Float8Linear in place and return the model.

    config: the FP8 recipe (default Float8Config(): blockwise, backend auto).
    filter: (qualified name, Linear) -> True to convert; replaces the default filter (see
            `default_filter`, which callers can wrap). Idempotent: layers already in FP8 stay as they are.
    The decisions land in `model._mixprec_fp8_report`; `describe(model)` prints them. An nn.Linear
    passed as the model comes back as a new Float8Linear (it cannot be replaced in place) that keeps
    its children. Linear subclasses with a forward of their own are never converted.
    """
    config = config if config is not None else Float8Config()
    if not isinstance(config, Float8Config):
        raise TypeError(f"config must be a mixprec.fp8.Float8Config, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    rule = default_filter(model, config)
    decisions: list[Fp8Decision] = []
    swapped: dict[int, Float8Linear] = {}   # a Linear shared by two parents gets one Float8Linear
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, nn.Linear):
            continue
        if isinstance(module, Float8Linear):
            decisions.append(Fp8Decision(name, module.in_features, module.out_features, True, "already FP8"))
            continue
        if type(module).forward is not nn.Linear.forward:
            reason = f"{type(module).__name__} has its own forward (converting would replace it)"
        elif filter is not None:
            reason = None if filter(name, module) else "excluded by the filter"
        else:
            reason = rule(name, module)
        if reason is None:
            new = swapped.setdefault(id(module), Float8Linear.from_linear(module, config))
            if name:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, new)
            else:   # the root itself: it cannot be replaced in place, the caller gets the new module
                model = new
        decisions.append(Fp8Decision(name, module.in_features, module.out_features, reason is None,
                                     reason or f"converted ({config.recipe})"))
    model._mixprec_fp8_report = Fp8Report(decisions)
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """Turn every Float8Linear of `model` back into an nn.Linear with the same Parameters, children and
    hooks (delayed scaling's amax histories are dropped); returns the model (a new one for a root layer)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, Float8Linear):
            continue
        linear = nn.Linear.__new__(nn.Linear)
        linear.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()
                                if k not in ("config", "_fp8_capable")})
        for history in [n for n in linear._buffers if n.startswith("amax_history_")]:
            del linear._buffers[history]
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)
        else:
            model = linear
    model.__dict__.pop("_mixprec_fp8_report", None)
    return model


class Fp8Report(list):
    """The list of Fp8Decision that convert records; prints as a table."""

    def __str__(self) -> str:
        return _table(self)


def report(model: nn.Module) -> Fp8Report:
    """The decisions the last `convert` recorded on `model` (empty if it was never converted)."""
    return Fp8Report(getattr(model, "_mixprec_fp8_report", []))


def describe(model: nn.Module) -> str:
    """A table of the model's Linear layers: FP8 or kept in high precision, and why."""
    return _table(report(model))


def _table(rows: list[Fp8Decision]) -> str:
    if not rows:
        return "no FP8 conversion recorded (call mixprec.fp8.convert first)"
    width = max(len(r.name or "<model>") for r in rows)
    lines = [f"{'module':<{width}}  {'in':>6}  {'out':>6}  {'precision':<9}  reason"]
    for r in rows:
        lines.append(f"{r.name or '<model>':<{width}}  {r.in_features:>6}  {r.out_features:>6}  "
                     f"{'FP8' if r.fp8 else 'high':<9}  {r.reason}")
    n = sum(r.fp8 for r in rows)
    lines.append(f"{n} of {len(rows)} Linear layers in FP8")
    return "\n".join(lines)
