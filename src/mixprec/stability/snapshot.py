"""A ring of training-state snapshots for rollback, in host memory (pinned) or on disk (written atomically).

A snapshot is a flat dict {key: tensor} (the guard names model parameters and buffers, optimizer state,
loss-scale state and its own statistics) plus host values (hyper-parameters, the LR scheduler's state).

    memory (default): each device tensor is copied into a host buffer of its slot, pinned for CUDA tensors so
        the copy is asynchronous (no host sync; the buffers are reused while shapes hold). Cost: one more
        copy of the state in host memory per slot, and a device-to-host transfer every `snapshot_every` steps.
    disk (directory=...): the tensors are brought to the CPU (a sync, once per snapshot), saved with
        torch.save to `<dir>/snapshot-<slot>.pt.tmp`, flushed to disk and renamed over
        `<dir>/snapshot-<slot>.pt` (os.replace is atomic: a crash leaves the old file or the new one,
        never half of one). Restore reads the file back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Snapshot:
    iteration: int                                   # the state before this iteration's update
    tensors: dict[Any, torch.Tensor] = field(default_factory=dict)   # memory mode
    host: Any = None
    path: Path | None = None                         # disk mode


class SnapshotRing:
    """The newest `keep` snapshots, oldest first."""

    def __init__(self, keep: int, directory: str | os.PathLike | None = None) -> None:
        self.keep = keep
        self.directory = None if directory is None else Path(directory)
        self.snapshots: list[Snapshot] = []
        self._next_slot = 0
        self._spare: list[dict[Any, torch.Tensor]] = []   # host buffers of dropped snapshots, for reuse

    def __len__(self) -> int:
        return len(self.snapshots)

    def take(self, iteration: int, tensors: dict[Any, torch.Tensor], host: Any) -> Snapshot:
        if self.directory is not None:
            snap = self._to_disk(iteration, tensors, host)   # written before the oldest is dropped
            if len(self.snapshots) == self.keep:
                self._forget(self.snapshots.pop(0))
            self.snapshots.append(snap)
            return snap
        if len(self.snapshots) == self.keep:
            self._spare.append(self.snapshots.pop(0).tensors)
        buffers = self._spare.pop() if self._spare else {}
        copies = {}
        for key, t in tensors.items():
            buf = buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            buf.copy_(t.detach(), non_blocking=t.is_cuda)
            copies[key] = buf
        snap = Snapshot(iteration, copies, host)
        self.snapshots.append(snap)
        return snap

    def _to_disk(self, iteration: int, tensors: dict[Any, torch.Tensor], host: Any) -> Snapshot:
        self.directory.mkdir(parents=True, exist_ok=True)
        used = {s.path for s in self.snapshots}
        path = self.directory / f"snapshot-{self._next_slot}.pt"
        while path in used:
            self._next_slot = (self._next_slot + 1) % (self.keep + 1)
            path = self.directory / f"snapshot-{self._next_slot}.pt"
        self._next_slot = (self._next_slot + 1) % (self.keep + 1)
        payload = {"iteration": iteration, "tensors": {k: t.detach().cpu() for k, t in tensors.items()}, "host": host}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:   # make the rename itself durable
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        return Snapshot(iteration, {}, None, path)

    def load(self, snap: Snapshot) -> tuple[dict[Any, torch.Tensor], Any]:
        """The snapshot's tensors (host copies) and host values."""
        if snap.path is None:
            return snap.tensors, snap.host
        payload = torch.load(snap.path, map_location="cpu", weights_only=False)
        return payload["tensors"], payload["host"]

    def newest_at_most(self, iteration: int) -> Snapshot | None:
        """The newest snapshot of the state before `iteration` or earlier."""
        eligible = [s for s in self.snapshots if s.iteration <= iteration]
        return eligible[-1] if eligible else None

    def drop_newer(self, iteration: int) -> None:
        """Forget snapshots newer than `iteration` (a rollback made them another timeline)."""
        keep = [s for s in self.snapshots if s.iteration <= iteration]
        for s in self.snapshots:
            if s.iteration > iteration:
                self._forget(s)
        self.snapshots = keep

    def _forget(self, snap: Snapshot) -> None:
        if snap.tensors:
            self._spare.append(snap.tensors)
        if snap.path is not None:
            snap.path.unlink(missing_ok=True)

    def clear(self) -> None:
        self.drop_newer(-1)

    def iterations(self) -> list[int]:
        return [s.iteration for s in self.snapshots]
