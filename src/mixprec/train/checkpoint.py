"""Checkpoints that survive a crash mid-write and resume the exact trajectory.

A checkpoint is one file, DIR/checkpoint.pt, holding the run's config, the step (which is also the
data position: batches are a function of (seed, step)), the model, optimizer and loss-scaler states,
and the random number generators' states. It is written to a temporary file in the same directory and
moved over the old one with os.replace, which is atomic on POSIX and Windows: a reader sees the old
checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def checkpoint_path(directory: Path | str) -> Path:
    return Path(directory) / CHECKPOINT_NAME


def save_checkpoint(directory: Path | str, state: dict[str, Any]) -> Path:
    """Write `state` to DIR/checkpoint.pt atomically (temp file + fsync + os.replace)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(directory)
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT_NAME}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(directory: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read DIR/checkpoint.pt; a ValueError names the path when there is none or it is not ours."""
    path = checkpoint_path(directory)
    if not path.is_file():
        raise ValueError(f"No checkpoint to resume from: {path} does not exist (mixprec train writes it "
                         f"into its --out directory)")
    # weights_only=False: the checkpoint holds Python RNG state (a tuple) and numpy's state (a dict);
    # it is a file this program wrote, not an untrusted download.
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a mixprec train checkpoint (format {FORMAT_VERSION})")
    return state


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from: torch (CPU and CUDA), numpy, Python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
