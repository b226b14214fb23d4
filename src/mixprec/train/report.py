"""The outputs of `mixprec compare`: a table (Markdown and CSV), every curve as JSON, a PNG of the curves."""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from mixprec.policy import Policy
from mixprec.train.curves import mark_events
from mixprec.train.experiments import Comparison, RecipeResult

COLUMNS = ("recipe", "train loss", "val loss", "val vs ref", "{items}/s", "peak memory", "skipped steps",
           "final loss scale", "FP16 underflow, unscaled", "FP16 underflow, recipe's scale")


def columns(comparison: Comparison) -> list[str]:
    items = comparison.results[0].summary.item_name if comparison.results and comparison.results[0].summary else "tokens"
    ref = comparison.reference.name if comparison.reference else "fp32"
    return [c.format(items=items).replace("ref", ref) for c in COLUMNS]


def _row_values(result: RecipeResult, reference: RecipeResult | None) -> list[Any]:
    """Raw values (floats, ints, None) for CSV; None where the recipe did not produce one."""
    s, u = result.summary, result.underflow
    if s is None:
        return [result.name] + [None] * (len(COLUMNS) - 1)
    ref_val = reference.summary.final_val_loss if reference is not None and reference.summary else float("nan")
    rel = (s.final_val_loss - ref_val) / ref_val if ref_val else float("nan")
    return [result.name, s.final_train_loss, s.final_val_loss, rel, s.items_per_s, s.peak_memory_bytes,
            s.skipped_steps, s.final_scale, u.activation_grads if u else None,
            u.activation_grads_scaled if u else None]


def _fmt_row(values: list[Any], result: RecipeResult) -> list[str]:
    if result.summary is None:
        return [result.name, f"failed: {result.error}"] + [""] * (len(values) - 2)
    recipe, train, val, rel, rate, mem, skipped, scale, under, under_scaled = values
    # '-': the recipe has no loss scale, or does not compute in FP16 (nothing of its own to lose)
    scaled = "n/a" if result.underflow is None else "-" if under_scaled is None else _percent(under_scaled)
    return [recipe, _loss(train), _loss(val), _percent(rel, signed=True), f"{rate:,.0f}", _bytes(mem), str(skipped),
            "-" if scale is None else f"{scale:g}", _percent(under), scaled]


def markdown_table(comparison: Comparison) -> str:
    header = columns(comparison)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for result in comparison.results:
        cells = _fmt_row(_row_values(result, comparison.reference), result)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(comparison: Comparison, seeds: list[int] | None = None) -> str:
    """A few lines saying what ran, for above the table (seeds: the seeds of a --seeds run)."""
    m = comparison.meta
    if not m:
        return ""
    seed_text = f"seeds {', '.join(map(str, seeds))}" if seeds else f"seed {m['seed']}"
    text = (f"{m['model']} ({m['parameters']:,} parameters), {m['steps']} steps of batch {m['batch_size']}, "
            f"{seed_text}, task {m['task']}" + (f" (loss x {m['loss_factor']:g})" if m["loss_factor"] != 1 else "")
            + f"; {m['device']}, torch {m['torch']}")
    if "unigram_entropy" in m:
        text += (f"\ndata: {m['corpus']} ({m['train_bytes']:,} train / {m['val_bytes']:,} validation bytes); "
                 f"byte-unigram entropy {m['unigram_entropy']:.3f} nats")
    else:
        text += f"\ndata: {m['corpus']}"
    ref = comparison.reference
    text += "".join(f"\n{line}" for line in _optimizer_lines(comparison))
    text += (f"\nlosses in nats (train: mean of the last 10 steps); 'val vs {ref.name if ref else 'ref'}': relative "
             f"difference of the final validation loss")
    memory = next((r.summary.memory_measure for r in comparison.results if r.summary), None)
    if memory:
        text += f"\npeak memory: {memory}"
    text += ("\nFP16 underflow: share of activation-gradient values, nonzero in FP32, that FP16 flushes to zero "
             "(one FP32 probe step on each trained model): 'unscaled' as in the 2018 paper (what FP16 would lose); "
             "\"recipe's scale\" at the recipe's final loss scale (1 for fp16-noscale); '-': the recipe does not "
             "compute in FP16")
    return text


def _optimizer_lines(comparison: Comparison) -> list[str]:
    """'optimizer: ...' when every row has the same one, else one line per optimizer naming its rows."""
    rows: dict[str, list[str]] = {}
    for r in comparison.results:
        if r.optimizer:
            rows.setdefault(r.optimizer, []).append(r.name)
    if len(rows) == 1:
        return [f"optimizer: {next(iter(rows))}"]
    return [f"optimizer of {', '.join(names)}: {optimizer}" for optimizer, names in rows.items()]


def notes(comparison: Comparison) -> list[str]:
    """Lines for under the table: how much of each FP8 (INT8) recipe's model actually ran in FP8 (INT8); the
    faults injected and what each row's stability guard did."""
    lines = _guard_notes(comparison)
    for r in comparison.results:
        if r.fp8_layers is None:
            continue
        fp8, total = r.fp8_layers
        if fp8 == 0 and r.fp8_note:   # the recipe did nothing: say what the row is and what would change it
            lines.append(r.fp8_note)
        else:
            lines.append(f"{r.name}: {fp8} of {total} Linear layers in "
                         f"{'INT8' if Policy.from_recipe(r.recipe).int8 is not None else 'FP8'}")
    return lines


def _guard_notes(comparison: Comparison) -> list[str]:
    from mixprec.train.faults import FaultPlan
    from mixprec.train.guarding import summarize_events

    lines = []
    if comparison.base.task == "faults":
        lines.append(FaultPlan.for_steps(comparison.base.steps).describe())
    for r in comparison.results:
        s = r.summary
        guard = s.config.get("guard", "off") if s is not None else "off"
        if guard != "off":
            lines.append(f"{r.name}: guard {guard}, {len(s.guard_events)} events: {summarize_events(s.guard_events)}")
        if s is not None and s.stopped:
            lines.append(f"{r.name}: {s.stopped}")
    return lines


def write_outputs(comparison: Comparison, out: Path | str) -> dict[str, Path | None]:
    """table.md, table.csv, curves.json and loss_curves.png in `out`; returns their paths (png None
    when matplotlib is missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path | None] = {"table_md": out / "table.md", "table_csv": out / "table.csv",
                                     "curves": out / "curves.json", "plot": out / "loss_curves.png"}
    paths["table_md"].write_text(describe(comparison) + "\n\n" + markdown_table(comparison) + "\n"
                                 + "".join(f"\n{line}\n" for line in notes(comparison)))
    with paths["table_csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns(comparison) + ["error"])
        for r in comparison.results:
            writer.writerow(["" if v is None else v for v in _row_values(r, comparison.reference)] + [r.error or ""])
    paths["curves"].write_text(json.dumps(_clean(_curves(comparison)), indent=1, allow_nan=False))
    paths["plot"] = plot_curves(comparison, paths["plot"])
    return paths


def seed_differences(comparisons: dict[int, Comparison]) -> dict[str, Any]:
    """Each recipe's relative difference of final validation loss to the reference, per seed, with its
    mean, standard deviation and the standard error of the mean over the seeds that ran."""
    first = next(iter(comparisons.values()))
    recipes = {}
    for recipe in (r.name for r in first.results):
        by_seed = {}
        for seed, comparison in comparisons.items():
            result = next(r for r in comparison.results if r.name == recipe)
            if result.summary is not None and comparison.reference is not None:
                by_seed[seed] = _row_values(result, comparison.reference)[3]
        n = len(by_seed)
        std = statistics.stdev(by_seed.values()) if n >= 2 else float("nan")
        recipes[recipe] = {"by_seed": by_seed, "mean": statistics.fmean(by_seed.values()) if n else float("nan"),
                           "std": std, "std_error": std / math.sqrt(n) if n >= 2 else float("nan")}
    reference = first.reference.name if first.reference else None
    return {"reference": reference, "seeds": list(comparisons), "recipes": recipes}


def seed_table(differences: dict[str, Any]) -> str:
    """The Markdown table of seed_differences, with a line saying how to read it."""
    ref, seeds = differences["reference"], differences["seeds"]
    header = ["recipe", f"val vs {ref}, seeds {', '.join(map(str, seeds))}", "mean", "std over seeds",
              "std error of the mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for recipe, d in differences["recipes"].items():
        per_seed = " / ".join(_percent(d["by_seed"][s], signed=True) if s in d["by_seed"] else "failed" for s in seeds)
        lines.append(f"| {recipe} | {per_seed} | {_percent(d['mean'], signed=True)} | {_percent(d['std'])} | "
                     f"{_percent(d['std_error'])} |")
    return ("relative difference of the final validation loss to " + str(ref) + ", seed by seed; a single run's "
            "difference varies from seed to seed by about the std, so a bar like DeepSeek-V3's 0.25% is read "
            "against the mean, within about two standard errors\n\n" + "\n".join(lines))


def write_seed_summary(comparisons: dict[int, Comparison], out: Path | str) -> dict[str, Path]:
    """seeds.md and seeds.json in `out`: the per-seed differences and their statistics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    differences = seed_differences(comparisons)
    paths = {"seeds_md": out / "seeds.md", "seeds_json": out / "seeds.json"}
    paths["seeds_md"].write_text(describe(next(iter(comparisons.values())), seeds=list(comparisons)) + "\n\n"
                                 + seed_table(differences) + "\n")
    paths["seeds_json"].write_text(json.dumps(_clean(differences), indent=1, allow_nan=False))
    return paths


def batch_size_differences(comparisons: dict[int, Comparison]) -> dict[str, Any]:
    """Each row's relative difference of final validation loss to the reference at the same batch size
    (rows named recipe@b; keyed here by recipe, then batch size); None where the row did not run."""
    differences: dict[str, dict[int, float | None]] = {}
    reference = None
    for b, comparison in comparisons.items():
        ref = comparison.reference
        reference = reference or (_base_name(ref.name) if ref else None)
        for r in comparison.results:
            rel = _row_values(r, ref)[3] if r.summary is not None and ref is not None else None
            differences.setdefault(_base_name(r.name), {})[b] = rel
    return {"reference": reference, "batch_sizes": list(comparisons), "differences": differences,
            "steps": {b: c.base.steps for b, c in comparisons.items()}}


def batch_size_table(comparisons: dict[int, Comparison]) -> str:
    """Every row (recipe@b) with the usual columns, 'val vs' against the reference at its own batch size;
    then each recipe's difference along the batch sizes, where a recipe parting from the reference shows."""
    first = next(iter(comparisons.values()))
    summary = batch_size_differences(comparisons)
    ref, sizes = summary["reference"], summary["batch_sizes"]
    header = columns(first)
    header[3] = f"val vs {ref} at its batch size"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for comparison in comparisons.values():
        for r in comparison.results:
            lines.append("| " + " | ".join(_fmt_row(_row_values(r, comparison.reference), r)) + " |")
    steps = summary["steps"]
    pivot = ["| recipe | " + " | ".join(f"batch {b} ({steps[b]} steps)" for b in sizes) + " |",
             "|" + "|".join(" --- " for _ in range(len(sizes) + 1)) + "|"]
    for name, by_size in summary["differences"].items():
        cells = [_percent(by_size[b], signed=True) if by_size.get(b) is not None else "failed" for b in sizes]
        pivot.append(f"| {name} | {' | '.join(cells)} |")
    return ("\n".join(lines) + f"\n\nrelative difference of the final validation loss to {ref} at the same batch "
            "size, read along a row: where it grows past run-to-run noise (measure that with --seeds), the recipe "
            f"parts from {ref}\n\n" + "\n".join(pivot))


def write_batch_size_summary(comparisons: dict[int, Comparison], range_shifts: str,
                             out: Path | str) -> dict[str, Path]:
    """batch_sizes.md and batch_sizes.json in `out`: the rows of every batch size against the reference at
    theirs, and the ranges that moved with the batch size (diagnostics.describe_range_shifts)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"batch_sizes_md": out / "batch_sizes.md", "batch_sizes_json": out / "batch_sizes.json"}
    m = next(iter(comparisons.values())).meta
    head = (f"{m['model']} ({m['parameters']:,} parameters), batch sizes {', '.join(map(str, comparisons))}, seed "
            f"{m['seed']}, task {m['task']}; {m['device']}, torch {m['torch']}; what each batch size ran, and how to "
            f"read the columns: bs-<b>/table.md\n\n") if m else ""
    paths["batch_sizes_md"].write_text(
        head + batch_size_table(comparisons) + "\n\nranges of the "
        "initial FP32 model on the first batch of each size (mixprec diagnose), the moves largest first:\n"
        + range_shifts + "\n")
    summary = {**batch_size_differences(comparisons), "range_shifts": range_shifts.splitlines()}
    paths["batch_sizes_json"].write_text(json.dumps(_clean(summary), indent=1, allow_nan=False))
    return paths


def _base_name(row_name: str) -> str:
    return row_name.rsplit("@", 1)[0]   # 'fp16-mixed@64' -> 'fp16-mixed'


def _curves(comparison: Comparison) -> dict[str, Any]:
    runs = {}
    for r in comparison.results:
        if r.summary is None:
            runs[r.name] = {"error": r.error}
            continue
        s = r.summary
        runs[r.name] = {
            "recipe": r.recipe, "optimizer": r.optimizer, "train_loss": s.train_losses, "val_loss": s.val_curve,
            "final_train_loss": s.final_train_loss, "final_val_loss": s.final_val_loss,
            f"{s.item_name}_per_s": s.items_per_s, "peak_memory_bytes": s.peak_memory_bytes,
            "memory_measure": s.memory_measure, "skipped_steps": s.skipped_steps, "final_loss_scale": s.final_scale,
            "seconds": s.seconds, "underflow": vars(r.underflow) if r.underflow else None,
            "fp8_layers": r.fp8_layers, "grad_norm": s.grad_norms, "guard_events": s.guard_events, "stopped": s.stopped}
    return {"meta": comparison.meta, "config": comparison.base.to_dict(), "runs": runs}


def plot_curves(comparison: Comparison, path: Path) -> Path | None:
    """Three panels: training loss (lightly smoothed), validation loss, and each recipe's smoothed
    training loss minus the reference recipe's, where differences too small to see in the first panel
    show (the batches are the same for every recipe, so their noise cancels in the difference)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ran = [r for r in comparison.results if r.summary is not None]
    ref = comparison.reference
    fig, (ax_train, ax_val, ax_diff) = plt.subplots(1, 3, figsize=(15, 4.4))
    styles = ("-", "--", "-.", ":")  # curves that coincide stay visible under one another
    # faults: per-step losses, as an average would smear a corrupt batch's 1e3-times loss over the next steps
    faults = comparison.base.task == "faults"
    smooth_of = (lambda v: v) if faults else _smooth
    how = "per step" if faults else "EMA 0.9"
    ref_smooth = smooth_of(ref.summary.train_losses) if ref is not None else []
    for i, r in enumerate(ran):
        style = dict(label=r.name, linestyle=styles[i % len(styles)], linewidth=1.4)
        smooth = smooth_of(r.summary.train_losses)
        steps = range(1, len(smooth) + 1)
        line, = ax_train.plot(steps, smooth, **style)
        mark_events(ax_train, r.summary.guard_events, smooth, color=line.get_color(), label=r.name)
        diverged = next((i for i, v in enumerate(r.summary.train_losses) if not math.isfinite(v)), None)
        if diverged is not None:   # a NaN curve draws nothing from here on: say where it ended
            ax_train.axvline(diverged + 1, color=line.get_color(), linestyle=":", label=f"{r.name}: loss NaN")
        if r.summary.val_curve:
            val_steps, vals = zip(*r.summary.val_curve)
            ax_val.plot(val_steps, vals, marker="o", markersize=3, **style)
        ax_diff.plot(steps, [a - b for a, b in zip(smooth, ref_smooth)], **style)
    if any(r.summary.guard_events for r in ran) or comparison.base.task == "faults":
        ax_train.set_yscale("log")   # a corrupt batch's loss is 1e3 times the curve
    entropy = comparison.meta.get("unigram_entropy")
    if entropy:
        ax_train.axhline(entropy, color="grey", linestyle="--", linewidth=0.8, label="byte-unigram entropy")
    ax_diff.axhline(0.0, color="grey", linewidth=0.8)
    if faults:
        ax_diff.set_yscale("symlog", linthresh=0.1)   # the corrupt batch's spike would flatten everything else
    ref_name = ref.name if ref is not None else "reference"
    for ax, title, ylabel in ((ax_train, f"training loss ({how})", "cross-entropy (nats)"),
                              (ax_val, "validation loss", "cross-entropy (nats)"),
                              (ax_diff, f"training loss minus {ref_name}'s ({how})", "difference (nats)")):
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    m = comparison.meta
    fig.suptitle(f"mixprec compare: {m.get('model', '')} ({m.get('parameters', 0):,} parameters), "
                 f"{m.get('steps', '')} steps, task {m.get('task', '')}; {m.get('device', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(values: list[float], beta: float = 0.9) -> list[float]:
    # an exponential moving average, bias-corrected, so the first steps are not pulled toward 0
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def _loss(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else str(v)


def _percent(v: float | None, signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "n/a" if v is None else str(v)
    return f"{v:+.2%}" if signed else f"{v:.2%}"


def _bytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _clean(obj: Any) -> Any:
    """JSON has no inf/NaN: a diverged run's values become the strings "nan"/"inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
