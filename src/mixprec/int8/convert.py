"""convert: swap a model's nn.Linear layers for Int8Linear, keeping the sensitive ones in high precision.

The default filter is FP8's (mixprec.fp8.convert), rule for rule, so a model converts the same layers
under fp8-* and int8-* recipes. It is written out here because int8/ imports only formats and _tensors
(DESIGN.md's import rule); a shared leaf would be a new unit for the import rule to place and a change to
fp8/ as well, for some 30 lines of rules. tests/test_int8_convert.py checks that the two filters decide
alike, which keeps the copies from drifting. Kept in high precision:

    output head       the last Linear, one named lm_head/head/output/classifier, or one whose weight is
                      tied to an embedding (the most precision-sensitive layer of a language model)
    attention scores  Linear layers on the score path (names with score/logit/softmax/rel_pos/...);
                      the Q, K, V and output projections are converted
    nn.MultiheadAttention internals (its forward reads the projection weights directly)
    routers           MoE gates: a last name part of gate/router/gating, or containing "router"
    small layers      in or out features < config.min_features: quantization costs more than it saves
    odd shapes        in or out features not divisible by 8 (torch._int_mm's rule for K and N; FP8's
                      torch._scaled_mm needs 16, the one place the two filters differ)

Embeddings and norms are not Linear layers and are never touched. The decisions are recorded on the
model (`describe(model)` prints them, with the outlier fallback's counts when it is on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from mixprec.int8.config import MATMULS, Int8Config
from mixprec.int8.linear import Int8Linear

_HEAD_NAMES = ("lm_head", "head", "output", "classifier")
_ROUTER_NAMES = ("gate", "router", "gating")
_SCORE_PATH = ("score", "logit", "softmax", "rel_pos", "relative_position", "pos_bias", "alibi")
SHAPE_MULTIPLE = 8   # torch._int_mm: K and N multiples of 8

Filter = Callable[[str, nn.Linear], bool]


@dataclass(frozen=True)
class Int8Decision:
    """What convert did with one Linear layer, and why."""

    name: str
    in_features: int
    out_features: int
    int8: bool
    reason: str


def default_filter(model: nn.Module, config: Int8Config) -> Callable[[str, nn.Linear], str | None]:
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
        if linear.in_features % SHAPE_MULTIPLE or linear.out_features % SHAPE_MULTIPLE:
            return f"features not divisible by {SHAPE_MULTIPLE} (INT8 GEMMs need it)"
        return None

    return rule


def convert(model: nn.Module, config: Int8Config | None = None, filter: Filter | None = None) -> nn.Module:
    """Swap `model`'s nn.Linear layers for Int8Linear in place and return the model.

    config: the INT8 recipe (default Int8Config(): rowwise, all three matmuls, backend auto).
    filter: (qualified name, Linear) -> True to convert; replaces the default filter (see
            `default_filter`, which callers can wrap). Idempotent: layers already in INT8 stay as they are.
    The decisions land in `model._mixprec_int8_report`; `describe(model)` prints them. An nn.Linear
    passed as the model comes back as a new Int8Linear (it cannot be replaced in place) that keeps its
    children. Linear subclasses with a forward of their own (Float8Linear too) are never converted.
    """
    config = config if config is not None else Int8Config()
    if not isinstance(config, Int8Config):
        raise TypeError(f"config must be a mixprec.int8.Int8Config, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    rule = default_filter(model, config)
    decisions: list[Int8Decision] = []
    swapped: dict[int, Int8Linear] = {}   # a Linear shared by two parents gets one Int8Linear
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, nn.Linear):
            continue
        if isinstance(module, Int8Linear):
            decisions.append(Int8Decision(name, module.in_features, module.out_features, True, "already INT8"))
            continue
        if type(module).forward is not nn.Linear.forward:
            reason = f"{type(module).__name__} has its own forward (converting would replace it)"
        elif filter is not None:
            reason = None if filter(name, module) else "excluded by the filter"
        else:
            reason = rule(name, module)
        if reason is None:
            new = swapped.setdefault(id(module), Int8Linear.from_linear(module, config))
            if name:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, new)
            else:   # the root itself: it cannot be replaced in place, the caller gets the new module
                model = new
        converted = f"converted ({config.recipe}; INT8 {'/'.join(config.int8_matmuls) or 'none'})"
        decisions.append(Int8Decision(name, module.in_features, module.out_features, reason is None,
                                      reason or converted))
    model._mixprec_int8_report = Int8Report(decisions)
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """Turn every Int8Linear of `model` back into an nn.Linear with the same Parameters, children and
    hooks (the outlier counters are dropped); returns the model (a new one for a root layer)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, Int8Linear):
            continue
        linear = nn.Linear.__new__(nn.Linear)
        linear.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()
                                if k not in ("config", "_int8_capable")})
        linear._buffers.pop("int8_outlier_counts", None)
        if name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)
        else:
            model = linear
    model.__dict__.pop("_mixprec_int8_report", None)
    return model


class Int8Report(list):
    """The list of Int8Decision that convert records; prints as a table."""

    def __str__(self) -> str:
        return _table(self)


def report(model: nn.Module) -> Int8Report:
    """The decisions the last `convert` recorded on `model` (empty if it was never converted)."""
    return Int8Report(getattr(model, "_mixprec_int8_report", []))


def outliers(model: nn.Module, *, reset: bool = False) -> dict[str, dict[str, tuple[int, int]]]:
    """How often the outlier fallback triggered: per Int8Linear with a threshold, per matmul
    (output, grad_input, grad_weight), (operand rows computed in 16 bits, operand rows quantized).

    Reads the counters from the device (one sync); reset=True zeroes them after reading.
    """
    result = {}
    for name, module in model.named_modules():
        counts = module.outlier_counts if isinstance(module, Int8Linear) else None
        if counts is None:
            continue
        values = counts.tolist()
        result[name] = {matmul: (int(v[0]), int(v[1])) for matmul, v in zip(MATMULS, values)}
        if reset:
            counts.zero_()
    return result


def describe(model: nn.Module) -> str:
    """A table of the model's Linear layers: INT8 or kept in high precision, and why; then, where the
    outlier fallback is on, how often it triggered."""
    text = _table(report(model))
    counts = outliers(model)
    if counts:
        lines = ["", "outlier fallback (operand rows computed in 16 bits / rows quantized):"]
        width = max(len(n or "<model>") for n in counts)
        for name, per in counts.items():
            cells = "  ".join(f"{m} {f}/{t} ({100 * f / t:.2f}%)" if t else f"{m} -" for m, (f, t) in per.items())
            lines.append(f"{name or '<model>':<{width}}  {cells}")
        text += "\n".join(lines)
    return text


def _table(rows: list[Int8Decision]) -> str:
    if not rows:
        return "no INT8 conversion recorded (call mixprec.int8.convert first)"
    width = max(len(r.name or "<model>") for r in rows)
    lines = [f"{'module':<{width}}  {'in':>6}  {'out':>6}  {'precision':<9}  reason"]
    for r in rows:
        lines.append(f"{r.name or '<model>':<{width}}  {r.in_features:>6}  {r.out_features:>6}  "
                     f"{'INT8' if r.int8 else 'high':<9}  {r.reason}")
    n = sum(r.int8 for r in rows)
    lines.append(f"{n} of {len(rows)} Linear layers in INT8")
    return "\n".join(lines)
