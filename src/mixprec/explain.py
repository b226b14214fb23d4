"""mp.explain: the precision table as text, for a policy and (optionally) a prepared model."""
from __future__ import annotations

import torch.nn as nn

from mixprec import rules
from mixprec.policy import Policy
from mixprec.prepare import find_roles, plan_of, preparation, prepare


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _dtype(d) -> str:
    return {None: "-"}.get(d, str(d).replace("torch.", "")) if d is None or hasattr(d, "is_floating_point") else str(d)


def explain(policy: Policy | str, model: nn.Module | None = None) -> str:
    """What runs in which precision under `policy`: the rules, and with a model, each module.

    With an unprepared model, it shows what prepare() would do (on a copy, the model is untouched).
    """
    if isinstance(policy, str):
        policy = Policy.from_recipe(policy)
    compute = _dtype(policy.compute_dtype)
    lines = [f"policy {policy.name or ''}: {policy.describe()}", ""]

    def precision_text(p: rules.Precision | None) -> str:
        if p is None or p is rules.Precision.HALF:
            return compute if policy.autocast_enabled else "fp32"
        return p.describe()

    if policy.fp32_rules:
        rows = [[r.what, precision_text(r.precision), r.why] for r in rules.module_rules()]
        rows += [[r.what, precision_text(r.precision), r.why] for r in rules.op_rules()]
        lines.append(_table(["module / op", "precision", "why"], rows))
    else:
        lines.append("precision table off: everything computes in " + compute)
    if model is not None:
        if preparation(model) is None:
            import copy
            model = prepare(copy.deepcopy(model), policy)
        roles = find_roles(model)
        rows = []
        for p in plan_of(model):
            if not p.name:
                continue
            if p.precision is None and p.param_dtype is None:
                continue  # containers and parameter-free modules with no rule follow autocast
            rows.append([p.name, p.kind, p.role or roles.get(p.name) or "", precision_text(p.precision),
                         _dtype(p.param_dtype)])
        lines += ["", _table(["module", "class", "role", "computes in", "params"], rows)]
        for converter in preparation(model).policy.converters:
            lines += ["", converter.describe_model(model)]
    return "\n".join(lines)
