"""The plot of one run (`mixprec train` writes OUT/curves.png): training loss and gradient norm per step, the
stability guard's events marked on both. `mark_events` marks them on compare's loss curves too."""
from __future__ import annotations

from pathlib import Path
from typing import Any

# marker per guard action: what the guard did at that step
MARKERS = {"skip": "x", "clip": "^", "reset": "s", "lower_lr": "v", "rollback": "D", "restored": "D", "abort": "X"}


def plot_run(summary: Any, path: Path) -> Path | None:
    """Two panels (log scale: a spike is orders of magnitude above the curve): loss and gradient norm per step,
    with a marker at each guard event. None (nothing written) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(12, 4.2))
    steps = range(1, len(summary.train_losses) + 1)
    ax_loss.plot(steps, summary.train_losses, linewidth=1.0, label="training loss")
    if summary.val_curve:
        val_steps, vals = zip(*summary.val_curve)
        ax_loss.plot(val_steps, vals, marker="o", markersize=3, linewidth=1.0, label="validation loss")
    ax_norm.plot(range(1, len(summary.grad_norms) + 1), summary.grad_norms, linewidth=1.0, color="tab:green",
                 label="gradient norm (before clipping)")
    mark_events(ax_loss, summary.guard_events, summary.train_losses)
    mark_events(ax_norm, summary.guard_events, summary.grad_norms)
    for ax, title in ((ax_loss, "loss"), (ax_norm, "gradient norm")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    cfg = summary.config
    fig.suptitle(f"mixprec train: {cfg['model']} {cfg['recipe']}, guard {cfg.get('guard', 'off')}, task "
                 f"{cfg['task']}; {len(summary.guard_events)} guard events", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mark_events(ax: Any, events: list[dict], values: list[float], color: Any = "tab:red", label: str = "") -> None:
    """A marker per guard event at its step, on the curve `values` (one per step); a non-finite value sits on the
    curve's largest finite one. One legend entry per action."""
    finite = [v for v in values if v == v and abs(v) != float("inf") and v > 0]
    top = max(finite) if finite else 1.0
    seen = set()
    for event in events:
        i = event["step"]   # the event's batch index: the step's value is values[i]
        y = values[i] if i < len(values) and values[i] in finite else top
        action = event["action"]
        name = f"{label}{' ' if label else ''}guard: {action}"
        ax.scatter([i + 1], [y], marker=MARKERS.get(action, "o"), color=color, s=40, zorder=3,
                   label=None if name in seen else name)
        seen.add(name)
