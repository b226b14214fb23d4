"""What the command line and the stability guard call: one function each, so that wiring is one line.

    mixprec diagnose --model gpt [--recipe R] [--loss-scale S] --out DIR
        -> run_cli_diagnosis(model, batch, loss_fn, DIR, policy=R, loss_scale=S)
    mixprec compare --batch-sizes 16,64,256
        -> describe_range_shifts({16: report16, 64: report64, 256: report256})
    StabilityGuard, when it fires
        -> event_diagnosis(model, batch, loss_fn)   (a compact, JSON-able dict for the event)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from mixprec.diagnostics.report import DiagnosisReport, range_shifts
from mixprec.diagnostics.run import DEFAULT_FORMATS, diagnose
from mixprec.diagnostics.stats import KINDS, fractions, tensor_counts
from mixprec.policy import Policy

__all__ = ["describe_range_shifts", "event_diagnosis", "run_cli_diagnosis"]


def run_cli_diagnosis(model: nn.Module, batch: Any, loss_fn: Callable | None, out_dir: str | Path, *,
                      policy: Policy | str | None = None, loss_scale: float | None = None,
                      formats: tuple[str, ...] = DEFAULT_FORMATS, audit: bool = True, top: int = 25,
                      echo: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """`mixprec diagnose`: diagnose, write everything into out_dir, print the table and where to look.

    Writes report.txt (the table), report.json, report.html with hist_<kind>.png and ranges_<kind>.png
    (matplotlib), recommended_policy.json (for `mixprec train --policy FILE`) and, with a policy and
    audit=True, the precision audit inside the report. Returns {"table", "json", "html", "images",
    "policy": paths, "report": the DiagnosisReport}.
    """
    report = diagnose(model, batch, loss_fn, formats=formats, loss_scale=loss_scale, policy=policy,
                      audit=audit and policy is not None)
    out_dir = Path(out_dir)
    paths = report.save(out_dir)
    paths["report"] = report
    if echo is not None:
        echo(report.table(top=top))
        if report.audit is not None:
            echo("")
            echo(str(report.audit))
        try:
            rec = report.recommend()
            echo("")
            echo(f"recommended: {rec.describe()}")
            for reason in rec.reasons:
                echo(f"  - {reason}")
        except ValueError:
            pass
        echo("")
        echo(f"wrote {paths['html']} (open it: figures and every layer), {paths['json']}, {paths['table']}")
        if "policy" in paths:
            echo(f"recommended policy: {paths['policy']} (mixprec train --policy {paths['policy']})")
        if not paths["images"]:
            from mixprec.diagnostics.html import PLOT_HINT
            echo(PLOT_HINT)
    return paths


def describe_range_shifts(reports: Mapping[Any, DiagnosisReport], top: int = 10) -> str:
    """For `mixprec compare --batch-sizes`: per report after the first, the (module, kind) rows whose ranges
    moved most from the first (e.g. the smallest batch), largest first."""
    items = list(reports.items())
    if len(items) < 2:
        return "one diagnosis: nothing to compare"
    base_label, base = items[0]
    lines = []
    for label, report in items[1:]:
        lines.append(f"{label} against {base_label}: ranges that moved most")
        for shift in range_shifts(base, report, top=top):
            lines.append(f"  {shift}")
    return "\n".join(lines)


def event_diagnosis(model: nn.Module, batch: Any = None, loss_fn: Callable | None = None, *, top: int = 5,
                    formats: tuple[str, ...] = ("fp16", "bf16")) -> dict[str, Any]:
    """A compact diagnosis for a stability event (a loss spike, a non-finite gradient): JSON-able.

    With a batch and loss_fn: a quick mp.diagnose of that batch (no SQNR, no FP8 what-if) and its riskiest
    rows. Without: the weights and the gradients in .grad right now (the step that fired), per module:
    non-finite values, amax, and FP16/BF16 overflow and underflow.
    """
    if batch is not None:
        report = diagnose(model, batch, loss_fn, formats=formats, fp8_scaling=False, sqnr=False)
        rows = [r for r in report.rows() if r.risk > 0][:top]
        return {"source": "diagnose", "loss": report.loss,
                "risky": [{"module": r.module.name, "kind": r.kind, "amax": r.stats.amax, "why": r.why} for r in rows],
                "largest": _largest(report, top)}
    model = getattr(model, "_orig_mod", model)
    out: dict[str, Any] = {"source": "parameters", "nonfinite_grads": [], "largest_grads": []}
    amaxes = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is None or not p.grad.is_floating_point():
                continue
            g = p.grad.detach()
            counts = tensor_counts(g)
            amaxes.append((name, torch.where(torch.isfinite(g), g.abs(), 0).amax(), counts))
    if not amaxes:
        return out
    values = torch.stack([a.double() for _, a, _ in amaxes]).cpu().tolist()
    all_counts = torch.stack([c for _, _, c in amaxes]).cpu()
    for (name, _, _), amax, counts in zip(amaxes, values, all_counts):
        fr = {f: fractions(counts, f) for f in formats}
        first = fr[formats[0]]
        if first["nonfinite"]:
            out["nonfinite_grads"].append({"param": name, "fraction": first["nonfinite"]})
        out["largest_grads"].append({"param": name, "amax": amax, **{
            f: {"overflow": v["overflow"], "underflow": v["underflow"]} for f, v in fr.items()}})
    out["largest_grads"].sort(key=lambda d: -d["amax"] if math.isfinite(d["amax"]) else -math.inf)
    out["largest_grads"] = out["largest_grads"][:top]
    return out


def _largest(report: DiagnosisReport, top: int) -> list[dict[str, Any]]:
    rows = [(layer.name, kind, s.amax) for layer in report.layers.values() for kind, s in layer.kinds().items()
            if kind in KINDS]
    rows.sort(key=lambda r: -r[2])
    return [{"module": n, "kind": k, "amax": a} for n, k, a in rows[:top]]
