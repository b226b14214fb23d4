"""`mixprec bench --profile DIR`: where each variant's step time goes, kernel by kernel, side by side.

After the timed rounds, each variant runs a few more steps under torch.profiler. Written to DIR:

    trace-<variant>.json   the Chrome trace of those steps (Perfetto, chrome://tracing, TensorBoard)
    kernels.md             per kernel (on the CPU: per op), time and launches per step of both variants,
                           the largest differences first, with the totals

and the result's "profile" entry holds the totals and the rows of kernels.md. On CUDA a row is a kernel's
own device time (what the GPU spent in it); on the CPU an op's own host time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

TABLE_ROWS = 40


def profile_steps(step: Callable[[], None], steps: int, device: torch.device, trace: Path) -> dict[str, Any]:
    """Run `step` `steps` times under the profiler; write the Chrome trace; per-step time and launches
    per kernel (CUDA) or op (CPU), in microseconds."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    prof.export_chrome_trace(str(trace))
    rows: dict[str, dict[str, float]] = {}
    host_us = 0.0
    for entry in prof.key_averages():
        host_us += entry.self_cpu_time_total
        if device.type == "cuda":   # kernels only: an op's own device time, or an annotated range's, repeats them
            kernel = entry.device_type != DeviceType.CPU and not getattr(entry, "is_user_annotation", False)
            own = entry.self_device_time_total if kernel else 0.0
        else:
            own = entry.self_cpu_time_total
        if own > 0:
            row = rows.setdefault(entry.key, {"us": 0.0, "launches": 0.0})
            row["us"] += own / steps
            row["launches"] += entry.count / steps
    return {"rows": rows, "total_us": sum(r["us"] for r in rows.values()),
            "launches": sum(r["launches"] for r in rows.values()), "host_op_us": host_us / steps}


def compare(profiles: dict[str, dict[str, Any]], anchor: str, ours: str, *, unit: str) -> dict[str, Any]:
    """The two variants' rows joined by name, the largest absolute differences first."""
    absent = {"us": 0.0, "launches": 0.0}
    a, b = profiles[anchor]["rows"], profiles[ours]["rows"]
    names = sorted(set(a) | set(b), key=lambda n: -abs(b.get(n, absent)["us"] - a.get(n, absent)["us"]))
    rows = [{"name": n, f"{anchor} us": a.get(n, absent)["us"], f"{ours} us": b.get(n, absent)["us"],
             f"{anchor} launches": a.get(n, absent)["launches"], f"{ours} launches": b.get(n, absent)["launches"]}
            for n in names]
    totals = {v: {k: p[k] for k in ("total_us", "launches", "host_op_us")} for v, p in profiles.items()}
    return {"unit": unit, "totals": totals, "rows": rows}


def write_table(result: dict[str, Any], anchor: str, ours: str, path: Path, title: str) -> None:
    t = result["totals"]
    lines = [f"# {title}", "",
             f"Per step, {result['unit']}: time in microseconds, launches. Largest differences first "
             f"({min(TABLE_ROWS, len(result['rows']))} of {len(result['rows'])} rows).", "",
             f"| {result['unit']} | {anchor} us | {ours} us | difference us | {anchor} launches | {ours} launches |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| **total** | {t[anchor]['total_us']:,.1f} | {t[ours]['total_us']:,.1f} | "
             f"{t[ours]['total_us'] - t[anchor]['total_us']:+,.1f} | {t[anchor]['launches']:,.1f} | "
             f"{t[ours]['launches']:,.1f} |",
             f"| host time in ops | {t[anchor]['host_op_us']:,.1f} | {t[ours]['host_op_us']:,.1f} | "
             f"{t[ours]['host_op_us'] - t[anchor]['host_op_us']:+,.1f} | | |"]
    for row in result["rows"][:TABLE_ROWS]:
        name = row["name"].replace("|", "\\|")
        name = name if len(name) <= 120 else name[:117] + "..."
        a_us, b_us = row[f"{anchor} us"], row[f"{ours} us"]
        lines.append(f"| `{name}` | {a_us:,.1f} | {b_us:,.1f} | {b_us - a_us:+,.1f} | "
                     f"{row[f'{anchor} launches']:,.1f} | {row[f'{ours} launches']:,.1f} |")
    path.write_text("\n".join(lines) + "\n")
