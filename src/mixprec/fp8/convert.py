"""convert: swap a model's nn.Linear layers for Float8Linear, keeping the sensitive ones in high precision.

The default filter (mixprec._linear_swap, shared with INT8) keeps what DeepSeek-V3 keeps out of FP8 and
what cannot gain: the output head, the attention score path, nn.MultiheadAttention's internals, MoE
routers, layers with in or out features below config.min_features, and shapes torch._scaled_mm cannot
take (features not divisible by 16). Embeddings and norms are not Linear layers and are never touched.
The decisions are recorded on the model (`describe(model)` prints them).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mixprec._linear_swap import Filter, Rule, decision_table, keep_rule, restore_linears, swap_linears
from mixprec.fp8.config import Float8Config
from mixprec.fp8.linear import Float8Linear

SHAPE_MULTIPLE = 16   # torch._scaled_mm: K and N multiples of 16


@dataclass(frozen=True)
class Fp8Decision:
    """What convert did with one Linear layer, and why."""

    name: str
    in_features: int
    out_features: int
    fp8: bool
    reason: str


def default_filter(model: nn.Module, config: Float8Config) -> Rule:
    """The default rule as a function (qualified name, Linear) -> None to convert, or the reason to keep.

    Takes the whole model to find the output head (last Linear, or tied to an embedding) and the
    children of nn.MultiheadAttention.
    """
    return keep_rule(model, min_features=config.min_features, multiple=SHAPE_MULTIPLE, gemm="FP8")


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
    model, swaps = swap_linears(model, Float8Linear, lambda linear: Float8Linear.from_linear(linear, config),
                                default_filter(model, config), filter)
    decisions = [Fp8Decision(name, m.in_features, m.out_features, reason in (None, "already"),
                             {None: f"converted ({config.recipe})", "already": "already FP8"}.get(reason, reason))
                 for name, m, reason in swaps]
    model._mixprec_fp8_report = Fp8Report(decisions)
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """Turn every Float8Linear of `model` back into an nn.Linear with the same Parameters, children and
    hooks (delayed scaling's amax histories are dropped); returns the model (a new one for a root layer)."""
    model = restore_linears(model, Float8Linear, ("config", "_fp8_capable"),
                            lambda buffer: buffer.startswith("amax_history_"))
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
    return decision_table(rows, converted=lambda r: r.fp8, label="FP8",
                          empty="no FP8 conversion recorded (call mixprec.fp8.convert first)")
