"""DiagnosisReport: what mp.diagnose found, per module and tensor kind; a terminal table sorted by risk,
a JSON for machines, an HTML page with figures (mixprec.diagnostics.html) and the policy it recommends.

Risk of a row (one module, one tensor kind), the table's sort key:

    risk = 1000 * (inf/NaN in FP32)
         + max over the non-FP8 formats of (100 * overflow + underflow)       (fractions of all values)
         + max over the FP8 formats of the underflow left after 1x128 what-if scaling
         + the fraction of values an INT8 rowwise what-if quantizes to zero (when computed)
         + (SQNR threshold - local SQNR) / 10 where a module's own SQNR falls below its threshold
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mixprec.diagnostics.collect import TensorStats
from mixprec.diagnostics.recommend import RecommendedPolicy, policy_to_dict, recommend, save_policy, sqnr_threshold
from mixprec.diagnostics.stats import KINDS
from mixprec.policy import Policy

__all__ = ["DiagnosisReport", "ModuleDiagnosis", "RangeShift", "range_shifts"]

KIND_LABELS = {"activations": "act", "activation_grads": "act grad", "weights": "weight", "weight_grads": "w grad"}


@dataclass
class ModuleDiagnosis:
    """One module: its four tensor kinds (None where it has none) and its SQNR under the policy.

    compute:       how it computed under the policy ("fp8", "bf16", "fp16", or a row of the table such as
                   "fp32->in"); None without a policy.
    sqnr_db:       its output under the policy (the model run end to end) against FP32, in dB.
    sqnr_local_db: its own loss of precision: the module alone under the policy on the FP32 inputs (leaf
                   modules only).
    """

    name: str
    cls: str
    leaf: bool = True
    compute: str | None = None
    sqnr_db: float | None = None
    sqnr_local_db: float | None = None
    activations: TensorStats | None = None
    activation_grads: TensorStats | None = None
    weights: TensorStats | None = None
    weight_grads: TensorStats | None = None

    @property
    def display_name(self) -> str:
        return self.name or "<model>"

    def kinds(self) -> dict[str, TensorStats]:
        return {k: getattr(self, k) for k in KINDS if getattr(self, k) is not None}

    @property
    def amax(self) -> float | None:
        """The activations' amax (the issue's "amax" column)."""
        return self.activations.amax if self.activations is not None else None

    def sqnr_below_threshold(self, threshold_db: float | None = None) -> bool:
        if self.sqnr_local_db is None or self.compute is None:
            return False
        limit = threshold_db if threshold_db is not None else sqnr_threshold(self.compute)
        return limit is not None and self.sqnr_local_db < limit

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "class": self.cls, "leaf": self.leaf, "compute": self.compute,
                "sqnr_db": _num(self.sqnr_db), "sqnr_local_db": _num(self.sqnr_local_db),
                "kinds": {k: s.to_dict() for k, s in self.kinds().items()}}


def _num(v: float | None) -> float | str | None:
    """JSON has no inf or NaN: they are written as strings."""
    if v is None or math.isfinite(v):
        return v
    return str(v)


def _pct(v: float) -> str:
    if v == 0:
        return "0"
    p = 100 * v
    if p < 0.01:
        return "<.01"
    return f"{p:.2g}" if p < 10 else f"{p:.0f}"


def _db(v: float) -> str:
    return f"{v:.0f}" if math.isfinite(v) else ("inf" if v > 0 else "-")


def _short(fmt: str) -> str:
    return fmt.replace("fp8_", "")


@dataclass
class Row:
    module: ModuleDiagnosis
    kind: str
    stats: TensorStats
    risk: float
    why: str


def _risk(layer: ModuleDiagnosis, kind: str, s: TensorStats, formats: tuple[str, ...]) -> tuple[float, str]:
    score, why = 0.0, []
    nonfinite = s.formats[next(iter(s.formats))]["nonfinite"] if s.formats else 0.0
    if nonfinite:
        score += 1000
        why.append(f"inf/NaN in FP32 ({_pct(nonfinite)}%)")
    worst, worst_why = 0.0, ""
    for f in formats:
        if f.startswith("fp8"):
            continue
        fr = s.formats[f]
        v = 100 * fr["overflow"] + fr["underflow"]
        if v > worst:
            worst = v
            worst_why = f"{f} overflow {_pct(fr['overflow'])}%" if fr["overflow"] else f"{f} underflow {_pct(fr['underflow'])}%"
    if worst:
        score += worst
        why.append(worst_why)
    if s.fp8_scaling:
        fp8 = [(s.fp8_scaling["1x128"][f]["underflow"], f) for f in formats if f in s.fp8_scaling["1x128"]]
        if fp8:
            u, f = max(fp8)
            if u:
                score += u
                why.append(f"{_short(f)} 1x128 underflow {_pct(u)}%")
    if s.int8_scaling:
        z = s.int8_scaling["rowwise"]["zero"]
        if z:
            score += z
            why.append(f"int8 rowwise zero {_pct(z)}%")
    if kind == "activations" and layer.sqnr_below_threshold():
        limit = sqnr_threshold(layer.compute)
        score += (limit - layer.sqnr_local_db) / 10
        why.append(f"SQNR {layer.sqnr_local_db:.1f} dB < {limit:.0f} dB in {layer.compute}")
    return score, "; ".join(why)


@dataclass
class DiagnosisReport:
    """The result of mp.diagnose (or of a DiagnosisMonitor).

    layers:     module name -> ModuleDiagnosis, in the model's order ("" is the model itself).
    formats:    the floating-point formats reported (the INT8 what-if, when computed, is in each
                TensorStats.int8_scaling: see `int8`); loss_scale: the scale the gradients carry (None: 1);
    policy:     the policy SQNR was measured under (None: none); loss: the FP32 loss of the batch.
    audit:      the precision audit (mixprec.diagnostics.audit.AuditReport), when asked for.
    """

    layers: dict[str, ModuleDiagnosis]
    formats: tuple[str, ...]
    loss_scale: float | None = None
    policy: Policy | None = None
    loss: float | None = None
    device: str = "cpu"
    audit: Any = None
    samples: int = 1     # forward/backward passes gathered (a monitor's sampled steps)
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- rows and risk ---------------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        """Every (module, kind) row, highest risk first (ties in the model's order)."""
        rows = []
        for layer in self.layers.values():
            for kind, s in layer.kinds().items():
                risk, why = _risk(layer, kind, s, self.formats)
                rows.append(Row(layer, kind, s, risk, why))
        order = {id(r): i for i, r in enumerate(rows)}
        return sorted(rows, key=lambda r: (-r.risk, order[id(r)]))

    def kind_counts(self, kind: str) -> list[int] | None:
        """Bucket counts of one tensor kind summed over the model (activations of leaf modules only:
        a container's output is one of its children's)."""
        total: list[int] | None = None
        for layer in self.layers.values():
            s = getattr(layer, kind)
            if s is None or (kind.startswith("activation") and not layer.leaf):
                continue
            total = list(s.counts) if total is None else [a + b for a, b in zip(total, s.counts)]
        return total

    @property
    def int8(self) -> bool:
        """Whether the INT8 what-if was computed (formats with "int8", or an INT8 policy)."""
        return any(s.int8_scaling for layer in self.layers.values() for s in layer.kinds().values())

    def __iter__(self) -> Iterator[ModuleDiagnosis]:
        return iter(self.layers.values())

    # ---- recommendation ------------------------------------------------------------------------------
    def recommend(self, **options: Any) -> RecommendedPolicy:
        """The Policy these ranges call for (see mixprec.diagnostics.recommend.recommend for options)."""
        return recommend(self, **options)

    # ---- text ------------------------------------------------------------------------------------------
    def header(self) -> str:
        parts = [f"loss {self.loss:.4g} (FP32)" if self.loss is not None else None,
                 f"gradients of loss x {self.loss_scale:g}" if self.loss_scale else None,
                 f"policy {self.policy.name or self.policy.describe()}" if self.policy is not None else "no policy (no SQNR)",
                 f"{self.samples} sampled steps" if self.samples != 1 else None, f"device {self.device}"]
        return "mixprec diagnosis: " + ", ".join(p for p in parts if p)

    def table(self, top: int | None = 30) -> str:
        """The rows sorted by risk: amax, smallest non-zero, under/subnormal/overflow % per format, FP8
        what-if (1x128 underflow %, spread of the scales in bits), INT8 what-if (SQNR rowwise/tensorwise,
        % quantized to zero rowwise), SQNR (end to end / module alone)."""
        rows = self.rows()
        shown = rows if top is None else rows[:top]
        fp8 = [f for f in self.formats if f.startswith("fp8")]
        header = ["module", "kind", "amax", "min>0"] + [f"{_short(f)} u/s/o%" for f in self.formats]
        if fp8:
            header += [f"{_short(f)}@1x128 u%" for f in fp8] + ["spread"]
        int8 = self.int8
        if int8:
            header += ["int8 SQNR r/t", "int8@row 0%"]
        header += ["SQNR dB", "risk"]
        body = []
        for r in shown:
            s = r.stats
            cells = [r.module.display_name, KIND_LABELS[r.kind], f"{s.amax:.3g}",
                     f"{s.min_nonzero:.3g}" if s.min_nonzero is not None else "-"]
            for f in self.formats:
                fr = s.formats[f]
                cells.append(f"{_pct(fr['underflow'])}/{_pct(fr['subnormal'])}/{_pct(fr['overflow'])}")
            if fp8:
                w = s.fp8_scaling
                cells += [_pct(w["1x128"][f]["underflow"]) if w else "-" for f in fp8]
                cells.append(f"{w['1x128']['scale_spread_bits']:.0f}b" if w else "-")
            if int8:
                i8 = s.int8_scaling
                cells += [f"{_db(i8['rowwise']['sqnr_db'])}/{_db(i8['tensorwise']['sqnr_db'])}" if i8 else "-",
                          _pct(i8["rowwise"]["zero"]) if i8 else "-"]
            sq = ""
            if r.kind == "activations" and r.module.sqnr_db is not None:
                sq = f"{r.module.sqnr_db:.1f}"
                if r.module.sqnr_local_db is not None:
                    sq += f" / {r.module.sqnr_local_db:.1f}"
            cells += [sq, r.why]
            body.append(cells)
        lines = [self.header(), _format_table(header, body)]
        if top is not None and len(rows) > top:
            lines.append(f"... {len(rows) - top} more rows (report.table(top=None), or the HTML/JSON report)")
        lines.append("u/s/o: % of values that flush to zero / become subnormal / overflow; spread: log2 of the "
                     "largest over the smallest 1x128 scale; SQNR: end to end / module alone")
        if int8:
            lines.append("int8 SQNR r/t: dB of the tensor quantized to INT8 per row / per tensor (absmax/127); "
                         "int8@row 0%: % of values that are non-zero but get rowwise INT8 code 0")
        if self.audit is not None:
            flagged = self.audit.flagged("mixprec")
            lines.append(f"precision audit: {len(flagged)} op(s) of the table ran in half precision under "
                         f"mp.autocast, {len(self.audit.flagged('autocast'))} under torch.autocast")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"DiagnosisReport({len(self.layers)} modules, formats={self.formats})"

    # ---- machine-readable -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        try:
            recommendation = policy_to_dict(self.recommend())
        except ValueError as e:   # nothing to recommend from (no gradients)
            recommendation = {"error": str(e)}
        return {"formats": list(self.formats), "loss_scale": self.loss_scale, "loss": _num(self.loss),
                "policy": policy_to_dict(self.policy) if self.policy is not None else None,
                "device": self.device, "samples": self.samples,
                "layers": [layer.to_dict() for layer in self.layers.values()],
                "risk": [{"module": r.module.name, "kind": r.kind, "risk": r.risk, "why": r.why}
                         for r in self.rows() if r.risk > 0],
                "recommendation": recommendation,
                "audit": self.audit.to_dict() if self.audit is not None else None}

    def to_json(self, path: str | Path | None = None, **dump: Any) -> str:
        """The report as JSON (written to `path` too when given)."""
        text = json.dumps(self.to_dict(), **({"indent": 1} | dump))
        if path is not None:
            Path(path).write_text(text)
        return text

    def save_html(self, directory: str | Path) -> Path:
        """report.html with a PNG per tensor kind and per-layer range plots (matplotlib) in `directory`;
        without matplotlib the page has the tables only and says how to get the figures."""
        from mixprec.diagnostics.html import save_html
        return save_html(self, directory)

    def save(self, directory: str | Path, *, top: int | None = None) -> dict[str, Any]:
        """Everything in `directory`: report.txt, report.json, report.html (+ PNGs), recommended_policy.json.
        Returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Any] = {"table": directory / "report.txt", "json": directory / "report.json"}
        paths["table"].write_text(self.table(top=top) + "\n")
        self.to_json(paths["json"])
        paths["html"] = self.save_html(directory)
        paths["images"] = sorted(directory.glob("*.png"))
        try:
            paths["policy"] = save_policy(self.recommend(), directory / "recommended_policy.json")
        except ValueError:
            pass
        return paths

    def diff(self, other: "DiagnosisReport", top: int = 10) -> list["RangeShift"]:
        return range_shifts(self, other, top=top)


@dataclass(frozen=True)
class RangeShift:
    """How one (module, kind)'s range moved from one diagnosis to another (e.g. a larger batch)."""

    module: str
    kind: str
    log2_amax_shift: float      # log2(amax_other / amax_base)
    log2_min_shift: float       # the same for the smallest non-zero magnitude
    underflow_shift: dict[str, float]   # per format: other's fraction - base's
    overflow_shift: dict[str, float]

    @property
    def size(self) -> float:
        frac = sum(abs(v) for v in self.underflow_shift.values()) + 100 * sum(abs(v) for v in self.overflow_shift.values())
        return abs(self.log2_amax_shift) + abs(self.log2_min_shift) + 10 * frac

    def __str__(self) -> str:
        moved = [f"amax {self.log2_amax_shift:+.1f} bits", f"min>0 {self.log2_min_shift:+.1f} bits"]
        moved += [f"{_short(f)} underflow {100 * v:+.2g}%" for f, v in self.underflow_shift.items() if abs(v) >= 1e-4]
        moved += [f"{_short(f)} overflow {100 * v:+.2g}%" for f, v in self.overflow_shift.items() if v]
        return f"{self.module or '<model>'} {KIND_LABELS[self.kind]}: " + ", ".join(moved)


def _log2_shift(a: float | None, b: float | None) -> float:
    if not a or not b or a <= 0 or b <= 0:
        return 0.0
    return math.log2(b / a)


def range_shifts(base: DiagnosisReport, other: DiagnosisReport, top: int | None = 10) -> list[RangeShift]:
    """The (module, kind) rows whose ranges moved most from `base` to `other` (largest first): for
    `mixprec compare --batch-sizes`, the ops whose ranges a larger batch moves."""
    shifts = []
    for name, layer in base.layers.items():
        theirs = other.layers.get(name)
        if theirs is None:
            continue
        for kind, s in layer.kinds().items():
            t = getattr(theirs, kind)
            if t is None:
                continue
            formats = [f for f in base.formats if f in other.formats]
            shifts.append(RangeShift(
                name, kind, _log2_shift(s.amax, t.amax), _log2_shift(s.min_nonzero, t.min_nonzero),
                {f: t.formats[f]["underflow"] - s.formats[f]["underflow"] for f in formats},
                {f: t.formats[f]["overflow"] - s.formats[f]["overflow"] for f in formats}))
    shifts.sort(key=lambda r: -r.size)
    return shifts if top is None else shifts[:top]


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
