"""Where training metrics go: one JSON object per line (metrics.jsonl), and TensorBoard when installed."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Appends records like {"step": 10, "train_loss": 2.1, ...} to DIR/metrics.jsonl.

    On resume from step s, records after s (written by the interrupted run after its last checkpoint)
    are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, directory: Path | str, *, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(directory) / METRICS_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        self._tb = _tensorboard_writer(self.path.parent) if tensorboard else None

    def write(self, record: dict[str, Any], *, scalars: bool = True) -> None:
        """One JSON line; its numbers also as TensorBoard scalars unless scalars=False (an event's figures
        would mix into the per-window curves of the same names)."""
        clean = {k: _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None and scalars:
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, clean["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(directory: Path | str) -> list[dict[str, Any]]:
    """The records of DIR/metrics.jsonl, in order."""
    path = Path(directory) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonable(value: Any) -> Any:
    # JSON has no inf/NaN: a diverged run's loss is written as the string "nan"/"inf" rather than lost
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: JSONL is always written
        return None
    return SummaryWriter(log_dir=str(directory / "tensorboard"))
