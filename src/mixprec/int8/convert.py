"""convert: swap a model's nn.Linear layers for Int8Linear, keeping the sensitive ones in high precision.

The default filter is FP8's (mixprec._linear_swap), so a model converts the same layers under fp8-* and
int8-* recipes; only the shape rule differs (torch._int_mm needs in and out features divisible by 8, FP8's
torch._scaled_mm 16). Embeddings and norms are not Linear layers and are never touched. The decisions are
recorded on the model (`describe(model)` prints them, with the outlier fallback's counts when it is on).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mixprec._linear_swap import Filter, Rule, decision_table, keep_rule, restore_linears, swap_linears
from mixprec.int8.config import MATMULS, Int8Config
from mixprec.int8.linear import Int8Linear

SHAPE_MULTIPLE = 8   # torch._int_mm: K and N multiples of 8


@dataclass(frozen=True)
class Int8Decision:
    """What convert did with one Linear layer, and why."""

    name: str
    in_features: int
    out_features: int
    int8: bool
    reason: str


def default_filter(model: nn.Module, config: Int8Config) -> Rule:
    """The default rule as a function (qualified name, Linear) -> None to convert, or the reason to keep.

    Takes the whole model to find the output head (last Linear, or tied to an embedding) and the
    children of nn.MultiheadAttention.
    """
    return keep_rule(model, min_features=config.min_features, multiple=SHAPE_MULTIPLE, gemm="INT8")


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
    model, swaps = swap_linears(model, Int8Linear, lambda linear: Int8Linear.from_linear(linear, config),
                                default_filter(model, config), filter)
    converted = f"converted ({config.recipe}; INT8 {'/'.join(config.int8_matmuls) or 'none'})"
    decisions = [Int8Decision(name, m.in_features, m.out_features, reason in (None, "already"),
                              {None: converted, "already": "already INT8"}.get(reason, reason))
                 for name, m, reason in swaps]
    model._mixprec_int8_report = Int8Report(decisions)
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """Turn every Int8Linear of `model` back into an nn.Linear with the same Parameters, children and
    hooks (the outlier counters are dropped); returns the model (a new one for a root layer)."""
    model = restore_linears(model, Int8Linear, ("config", "_backend"),
                            lambda buffer: buffer == "int8_outlier_counts")
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
    return decision_table(rows, converted=lambda r: r.int8, label="INT8",
                          empty="no INT8 conversion recorded (call mixprec.int8.convert first)")
