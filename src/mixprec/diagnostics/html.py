"""The diagnosis as an HTML page with figures: a log2 magnitude histogram per tensor kind with each format's
range drawn under it (the 2018 mixed precision paper's figure) and a range plot per kind, one line per
layer. matplotlib is optional (pip install 'mixprec[plot]'); it is imported here only, through its
object API (no pyplot, no global state), and without it the page holds the tables and says so.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixprec.diagnostics.recommend import RecommendedPolicy
from mixprec.diagnostics.stats import KINDS, histogram
from mixprec.formats import get_format

if TYPE_CHECKING:
    from mixprec.diagnostics.report import DiagnosisReport

__all__ = ["plot_histogram", "plot_ranges", "save_html"]

KIND_TITLES = {"activations": "activations", "activation_grads": "activation gradients", "weights": "weights",
               "weight_grads": "weight gradients"}
COLORS = {"fp16": "#d62728", "bf16": "#1f77b4", "fp8_e4m3": "#2ca02c", "fp8_e5m2": "#9467bd", "fp32": "#7f7f7f"}
MAX_RANGE_ROWS = 80
PLOT_HINT = "Figures need matplotlib: pip install 'mixprec[plot]' (or pip install matplotlib)"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _format_span(name: str) -> tuple[float, float, float]:
    """log2 of (smallest subnormal, smallest normal, largest value)."""
    f = get_format(name)
    return math.log2(f.min_subnormal), math.log2(f.min_normal), math.log2(f.max)


def _scale_note(report: "DiagnosisReport", kind: str) -> str:
    return f" (loss x {report.loss_scale:g})" if report.loss_scale and kind.endswith("grads") else ""


def plot_histogram(report: "DiagnosisReport", kind: str, path: str | Path) -> Path | None:
    """The log2 magnitude histogram of one tensor kind over the model, with each format's subnormal band
    and normal range drawn beneath it (a strip per format) and their edges over it. None: no data."""
    counts = report.kind_counts(kind)
    if counts is None or sum(counts) == 0:
        return None
    h = histogram(counts)
    total = sum(counts)
    xs = [e for e, c in zip(h["exponents"], h["counts"]) if c]
    if not xs:
        lo, hi = -30, 20
    else:
        lo, hi = min(xs), max(xs) + 1
    lo, hi = min(lo, -26) - 2, max(hi, 17) + 2
    fig = _figure(10, 4.2 + 0.35 * len(report.formats))
    grid = fig.add_gridspec(2, 1, height_ratios=[4, 0.45 * len(report.formats) + 0.3], hspace=0.08)
    ax = fig.add_subplot(grid[0])
    strip = fig.add_subplot(grid[1], sharex=ax)
    bars = [(e, c / total) for e, c in zip(h["exponents"], h["counts"]) if c]
    if bars:
        ax.bar([e + 0.5 for e, _ in bars], [v for _, v in bars], width=1.0, color="#444444", alpha=0.8,
               label="values (2^e <= |x| < 2^(e+1))")
    if h["zero"]:
        ax.bar([lo + 0.5], [h["zero"] / total], width=1.0, color="#ff7f0e", label="exact zeros")
    for f in report.formats:
        sub, _, top = _format_span(f)
        color = COLORS.get(f, "#000000")
        ax.axvline(sub - 1, color=color, linestyle=":", linewidth=1)     # below: flushes to zero
        ax.axvline(top, color=color, linestyle="--", linewidth=1)        # above: overflows
    ax.set_yscale("log")
    ax.set_ylabel("fraction of values")
    ax.set_title(f"{KIND_TITLES[kind]}: log2 |x| histogram over the model{_scale_note(report, kind)}")
    ax.legend(loc="upper right", fontsize=8)
    ax.tick_params(labelbottom=False)
    for i, f in enumerate(report.formats):
        sub, normal, top = _format_span(f)
        color = COLORS.get(f, "#000000")
        y = len(report.formats) - 1 - i
        strip.barh(y, normal - sub, left=sub, color=color, alpha=0.3, height=0.7)
        strip.barh(y, top - normal, left=normal, color=color, alpha=0.85, height=0.7)
    strip.set_yticks(range(len(report.formats)), [f.replace("fp8_", "") for f in reversed(report.formats)])
    strip.set_xlabel("log2 |x|   (light: subnormals; solid: normal range; dotted/dashed above: zero and "
                     "overflow edges)", fontsize=8)
    strip.set_xlim(lo, hi)
    fig.savefig(path)
    return Path(path)


def _percentile_exponents(counts: list[int], qs: tuple[float, ...]) -> list[float]:
    h = histogram(counts)
    pairs = [(e, c) for e, c in zip(h["exponents"], h["counts"]) if c]
    total = sum(c for _, c in pairs)
    out = []
    for q in qs:
        acc, target = 0, q * total
        value = pairs[-1][0] + 1 if pairs else 0.0
        for e, c in pairs:
            if acc + c >= target:
                value = e + (target - acc) / c   # linear within the binade
                break
            acc += c
        out.append(value)
    return out


def plot_ranges(report: "DiagnosisReport", kind: str, path: str | Path) -> Path | None:
    """One line per layer: log2 of its smallest non-zero magnitude to its amax, the central 90% thicker,
    the median a dot; the formats' zero and overflow edges as vertical lines. None: no data."""
    rows = [(layer.display_name, getattr(layer, kind)) for layer in report.layers.values()
            if getattr(layer, kind) is not None and getattr(layer, kind).log2_range is not None
            and (layer.leaf or not kind.startswith("activation"))]
    if not rows:
        return None
    rows = rows[:MAX_RANGE_ROWS]
    fig = _figure(10, 1.5 + 0.22 * len(rows))
    ax = fig.add_subplot(1, 1, 1)
    for i, (_, s) in enumerate(rows):
        y = len(rows) - 1 - i
        lo, hi = s.log2_range
        p5, p50, p95 = _percentile_exponents(s.counts, (0.05, 0.5, 0.95))
        ax.plot([lo, hi], [y, y], color="#888888", linewidth=1)
        ax.plot([p5, p95], [y, y], color="#222222", linewidth=4, solid_capstyle="butt")
        ax.plot([p50], [y], "o", color="white", markeredgecolor="#222222", markersize=4)
    for f in report.formats:
        sub, _, top = _format_span(f)
        color = COLORS.get(f, "#000000")
        ax.axvline(sub - 1, color=color, linestyle=":", linewidth=1)
        ax.axvline(top, color=color, linestyle="--", linewidth=1, label=f.replace("fp8_", ""))
    lo = min(s.log2_range[0] for _, s in rows)
    hi = max(s.log2_range[1] for _, s in rows)
    ax.set_xlim(min(lo, -26) - 2, max(hi, 17) + 2)   # FP16's and FP8's ranges in view; BF16's edges lie far out
    ax.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)], fontsize=7)
    ax.set_xlabel("log2 |x|: min>0 .. amax (thin), 5-95% (thick), median (dot); dotted: zero edge, dashed: max")
    ax.set_title(f"{KIND_TITLES[kind]} per layer{_scale_note(report, kind)}")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def _table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _report_rows(report: "DiagnosisReport") -> tuple[list[str], list[list[str]]]:
    from mixprec.diagnostics.report import KIND_LABELS, _pct
    header = ["module", "kind", "amax", "min>0"] + [f"{f} u/s/o %" for f in report.formats] + ["SQNR dB (end to end)",
                                                                                             "SQNR dB (alone)", "risk"]
    rows = []
    for r in report.rows():
        s = r.stats
        cells = [r.module.display_name, KIND_LABELS[r.kind], f"{s.amax:.3g}",
                 f"{s.min_nonzero:.3g}" if s.min_nonzero is not None else "-"]
        cells += [f"{_pct(s.formats[f]['underflow'])} / {_pct(s.formats[f]['subnormal'])} / "
                  f"{_pct(s.formats[f]['overflow'])}" for f in report.formats]
        show = r.kind == "activations"
        cells += [f"{r.module.sqnr_db:.1f}" if show and r.module.sqnr_db is not None else "",
                  f"{r.module.sqnr_local_db:.1f}" if show and r.module.sqnr_local_db is not None else "", r.why]
        rows.append(cells)
    return header, rows


def _fp8_rows(report: "DiagnosisReport") -> tuple[list[str], list[list[str]]] | None:
    from mixprec.diagnostics.report import KIND_LABELS, _pct
    fp8 = [f for f in report.formats if f.startswith("fp8")]
    if not fp8:
        return None
    grans = ("tensorwise", "rowwise", "1x128", "128x128")
    header = ["module", "kind"] + [f"{f.replace('fp8_', '')} {g} u%" for f in fp8 for g in grans] + \
             [f"spread {g} (bits)" for g in grans]
    rows = []
    for r in report.rows():
        w = r.stats.fp8_scaling
        if not w:
            continue
        rows.append([r.module.display_name, KIND_LABELS[r.kind]] + [_pct(w[g][f]["underflow"]) for f in fp8 for g in grans]
                    + [f"{w[g]['scale_spread_bits']:.1f}" for g in grans])
    return header, rows


def _int8_rows(report: "DiagnosisReport") -> tuple[list[str], list[list[str]]] | None:
    from mixprec.diagnostics.report import KIND_LABELS, _db, _pct
    if not report.int8:
        return None
    header = ["module", "kind", "SQNR dB rowwise", "SQNR dB tensorwise", "zero % rowwise", "zero % tensorwise"]
    rows = []
    for r in report.rows():
        w = r.stats.int8_scaling
        if w:
            rows.append([r.module.display_name, KIND_LABELS[r.kind], _db(w["rowwise"]["sqnr_db"]),
                         _db(w["tensorwise"]["sqnr_db"]), _pct(w["rowwise"]["zero"]), _pct(w["tensorwise"]["zero"])])
    return header, rows


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;
font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child,th:first-child{
text-align:left}img{max-width:100%;border:1px solid #eee;margin:4px 0}code{background:#f4f4f4}.note{color:#a40}"""


def save_html(report: "DiagnosisReport", directory: str | Path) -> Path:
    """Write report.html and its PNGs (hist_<kind>.png, ranges_<kind>.png) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images: dict[str, list[Path]] = {}
    try:
        import matplotlib  # noqa: F401
        have_plot = True
    except ImportError:
        have_plot = False
    if have_plot:
        for kind in KINDS:
            made = [plot_histogram(report, kind, directory / f"hist_{kind}.png"),
                    plot_ranges(report, kind, directory / f"ranges_{kind}.png")]
            images[kind] = [p for p in made if p is not None]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>mixprec diagnosis</title>"
             f"<style>{_STYLE}</style></head><body>", "<h1>mixprec diagnosis</h1>",
             f"<p>{html.escape(report.header())}</p>"]
    try:
        policy: RecommendedPolicy | None = report.recommend()
    except ValueError:
        policy = None
    if policy is not None:
        parts.append(f"<h2>Recommended policy</h2><p><code>{html.escape(policy.name or '')}</code>: "
                     f"{html.escape(policy.describe())}</p>")
        if policy.reasons:
            parts.append("<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in policy.reasons) + "</ul>")
    if not have_plot:
        parts.append(f"<p class='note'>{html.escape(PLOT_HINT)}</p>")
    for kind in KINDS:
        for path in images.get(kind, []):
            parts.append(f"<h3>{html.escape(KIND_TITLES[kind])}</h3><img src='{html.escape(path.name)}' "
                         f"alt='{html.escape(path.stem)}'>")
    header, rows = _report_rows(report)
    parts.append("<h2>Per layer, highest risk first</h2><p>u/s/o: % of values that flush to zero / become "
                 "subnormal / overflow in the format</p>" + _table_html(header, rows))
    fp8 = _fp8_rows(report)
    if fp8 is not None and fp8[1]:
        parts.append("<h2>FP8 what-if scaling</h2><p>% of values still flushing to zero with each group's amax "
                     "scaled to the format's max; spread: log2 of the largest over the smallest group scale</p>"
                     + _table_html(*fp8))
    int8 = _int8_rows(report)
    if int8 is not None and int8[1]:
        parts.append("<h2>INT8 what-if</h2><p>each tensor quantized to symmetric INT8 (absmax/127 per row along "
                     "the last dimension, or per tensor): SQNR against the tensor, and % of values that are "
                     "non-zero but quantize to 0</p>" + _table_html(*int8))
    if report.audit is not None:
        parts.append("<h2>Precision audit</h2><pre>" + html.escape(str(report.audit)) + "</pre>")
    parts.append("</body></html>")
    out = directory / "report.html"
    out.write_text("\n".join(parts))
    return out
