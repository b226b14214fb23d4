"""Swapping a model's nn.Linear layers for a low-precision subclass, and back: what fp8/ and int8/ share.

The default filter keeps what DeepSeek-V3 keeps out of low precision, and what cannot gain:

    output head       the last Linear, one named lm_head/head/output/classifier, or one whose weight is
                      tied to an embedding (the most precision-sensitive layer of a language model)
    attention scores  Linear layers on the score path (names with score/logit/softmax/rel_pos/...);
                      the Q, K, V and output projections are converted, as in DeepSeek-V3
    nn.MultiheadAttention internals (its forward reads the projection weights directly)
    routers           MoE gates: a last name part of gate/router/gating, or containing "router"
                      (LLaMA's gate_proj is an MLP projection and is converted)
    small layers      in or out features < min_features: quantization costs more than the GEMM saves
    odd shapes        in or out features not divisible by the GEMM's multiple (16 for FP8's
                      torch._scaled_mm, 8 for INT8's torch._int_mm)

Embeddings and norms are not Linear layers and are never touched.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from torch import nn

HEAD_NAMES = ("lm_head", "head", "output", "classifier")
ROUTER_NAMES = ("gate", "router", "gating")
SCORE_PATH = ("score", "logit", "softmax", "rel_pos", "relative_position", "pos_bias", "alibi")

Rule = Callable[[str, nn.Linear], "str | None"]   # (qualified name, Linear) -> None to convert, or why not
Filter = Callable[[str, nn.Linear], bool]         # a user's filter: True to convert
L = TypeVar("L", bound=nn.Linear)


def keep_rule(model: nn.Module, *, min_features: int, multiple: int, gemm: str) -> Rule:
    """The default filter (module docstring) as a function of (qualified name, Linear); `gemm` names the
    low-precision GEMM in the reason for odd shapes. Takes the whole model to find the output head (last
    Linear, or tied to an embedding) and the children of nn.MultiheadAttention."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    last = linears[-1] if linears else None
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    in_mha = {f"{name}.{child}" if name else child
              for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
              for child, _ in m.named_modules() if child}

    def rule(name: str, linear: nn.Linear) -> str | None:
        leaf = name.rsplit(".", 1)[-1].lower()
        if id(linear.weight) in tied:
            return "output head (weight tied to an embedding)"
        if leaf in HEAD_NAMES:
            return f"output head (named {leaf!r})"
        if name == last and name:   # a bare Linear converted on its own is no model's head
            return "output head (the last Linear)"
        if name in in_mha:
            return "inside nn.MultiheadAttention (its forward reads the weights directly)"
        if any(word in name.lower() for word in SCORE_PATH):
            return "attention score path (kept high precision, as DeepSeek-V3)"
        if leaf in ROUTER_NAMES or "router" in leaf:
            return "router / MoE gate (kept high precision, as DeepSeek-V3)"
        smallest = min(linear.in_features, linear.out_features)
        if smallest < min_features:
            return f"small: min(in, out) = {smallest} < min_features {min_features}"
        if linear.in_features % multiple or linear.out_features % multiple:
            return f"features not divisible by {multiple} ({gemm} GEMMs need it)"
        return None

    return rule


def take_over(cls: type[L], linear: nn.Linear) -> L:
    """An instance of `cls` that takes `linear` over whole: its Parameters (shared, no copy), child modules,
    buffers, hooks and attributes; only the class, and so the forward, changes."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
    new = cls.__new__(cls)
    # own containers: registering a module or buffer on one must not change the other
    new.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in linear.__dict__.items()})
    return new


def swap_linears(model: nn.Module, cls: type[nn.Linear], make: Callable[[nn.Linear], nn.Linear], rule: Rule,
                 filter: Filter | None) -> tuple[nn.Module, list[tuple[str, nn.Linear, str | None]]]:
    """Replace `model`'s eligible nn.Linear layers by make(linear) in place.

    A layer is eligible when it is not already a `cls`, its class keeps nn.Linear's forward (a subclass
    with its own would lose it), and `filter` (if given) or else `rule` accepts it. A Linear shared by two
    parents gets one replacement. Returns (the model: a new one when the root itself is a Linear, and
    (name, the original layer, None if converted / "already" if it was a `cls` / else the reason kept)
    per Linear layer)."""
    decisions: list[tuple[str, nn.Linear, str | None]] = []
    swapped: dict[int, nn.Linear] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, nn.Linear):
            continue
        if isinstance(module, cls):
            decisions.append((name, module, "already"))
            continue
        if type(module).forward is not nn.Linear.forward:
            reason = f"{type(module).__name__} has its own forward (converting would replace it)"
        elif filter is not None:
            reason = None if filter(name, module) else "excluded by the filter"
        else:
            reason = rule(name, module)
        if reason is None:
            model = _replace(model, name, swapped.setdefault(id(module), make(module)))
        decisions.append((name, module, reason))
    return model, decisions


def restore_linears(model: nn.Module, cls: type[nn.Linear], drop: Sequence[str], drop_buffer: Callable[[str], bool]
                    ) -> nn.Module:
    """Turn every `cls` layer of `model` back into an nn.Linear with the same Parameters, children and
    hooks, without the attributes named in `drop` and the buffers `drop_buffer` picks; returns the model
    (a new one when the root itself was converted)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, cls):
            continue
        linear = nn.Linear.__new__(nn.Linear)
        linear.__dict__.update({k: (type(v)(v) if isinstance(v, dict) else v) for k, v in module.__dict__.items()
                                if k not in drop})
        for buffer in [n for n in linear._buffers if drop_buffer(n)]:
            del linear._buffers[buffer]
        model = _replace(model, name, linear)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:   # the root itself: it cannot be replaced in place, the caller gets the new module
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


def decision_table(rows: Sequence, *, converted: Callable[[object], bool], label: str, empty: str) -> str:
    """A table of decisions (objects with name, in_features, out_features, reason): `label` or high, and why."""
    if not rows:
        return empty
    width = max(len(r.name or "<model>") for r in rows)
    lines = [f"{'module':<{width}}  {'in':>6}  {'out':>6}  {'precision':<9}  reason"]
    for r in rows:
        lines.append(f"{r.name or '<model>':<{width}}  {r.in_features:>6}  {r.out_features:>6}  "
                     f"{label if converted(r) else 'high':<9}  {r.reason}")
    n = sum(converted(r) for r in rows)
    lines.append(f"{n} of {len(rows)} Linear layers in {label}")
    return "\n".join(lines)
