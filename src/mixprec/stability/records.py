"""What one guarded step reports: a small FP32 vector built on the device, copied to the host without a wait
(pinned memory and a CUDA event), and read one step later into plain dicts a trainer can log.

    per-step record  {"step", "batch", "loss", "grad_norm", "loss_scale", "skipped", "overflow", "clipped",
                      "fault", "clip_coef"[, "group_norms"]}
    event (a fault)  {"step", "batch", "cause", "loss", "grad_norm", "z_loss", "z_grad_norm", "loss_scale",
                      "action", "run"};  cause joins the fault bits below with "+"
"""
from __future__ import annotations

import math
from typing import Any, Hashable

import torch

from mixprec.stability.ladder import NAME

FIELDS = ("loss", "grad_norm", "loss_mean", "loss_std", "norm_mean", "norm_std", "loss_scale", "flags", "run",
          "code", "clip_coef", "zclip_z")
BITS = ("nonfinite_loss", "nonfinite_grad", "loss_spike", "grad_norm_spike", "group_norm_spike", "other_rank",
        "overflow", "applied", "clipped")
FAULT_BITS = BITS[:6]


def pack(values: list[torch.Tensor], flags: list[torch.Tensor], extra: torch.Tensor | None) -> torch.Tensor:
    """One FP32 vector: FIELDS in order, the flags as a bit field in "flags" (exact in FP32 below 2**24)."""
    bits = sum(f.to(torch.float32) * float(1 << i) for i, f in enumerate(flags))
    at = FIELDS.index("flags")
    record = torch.stack([v.to(torch.float32).reshape(()) for v in values[:at] + [bits] + values[at:]])
    return record if extra is None else torch.cat([record, extra.to(torch.float32)])


def to_host(record: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start the record's copy to the host: pinned memory and an event on CUDA (no wait now)."""
    if record.device.type == "cuda":
        host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
        host.copy_(record, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    return record.cpu(), None


def read(iteration: int, ids: tuple, host: torch.Tensor, event: Any) -> tuple[dict, dict | None, dict]:
    """(per-step record, event or None, the raw fields and bits) of a record whose copy was started."""
    if event is not None:
        event.synchronize()
    values = host.tolist()
    r = dict(zip(FIELDS, values))
    flags = int(r["flags"])
    bit = {name: bool(flags >> i & 1) for i, name in enumerate(BITS)}
    fault = any(bit[b] for b in FAULT_BITS)
    scale = None if math.isnan(r["loss_scale"]) else r["loss_scale"]
    rec = {"step": iteration, "batch": show(ids), "loss": r["loss"], "grad_norm": r["grad_norm"], "loss_scale": scale,
           "skipped": not bit["applied"], "overflow": bit["overflow"], "clipped": bit["clipped"], "fault": fault,
           "clip_coef": r["clip_coef"]}
    if len(values) > len(FIELDS):
        rec["group_norms"] = values[len(FIELDS):]
    event = None
    if fault:
        event = {"step": iteration, "batch": show(ids), "cause": "+".join(b for b in FAULT_BITS if bit[b]),
                 "loss": r["loss"], "grad_norm": r["grad_norm"],
                 "z_loss": zscore(r["loss"], r["loss_mean"], r["loss_std"]),
                 "z_grad_norm": zscore(r["grad_norm"], r["norm_mean"], r["norm_std"]),
                 "loss_scale": scale, "action": NAME[int(r["code"])], "run": int(r["run"])}
    return rec, event, {**r, **bit}


def ids_of(batch: Any) -> tuple:
    """The ids a step's `batch` argument names (a batch index, sample ids, or None). Pass host values: a CUDA
    tensor of ids is read back (a sync)."""
    if batch is None:
        return ()
    if isinstance(batch, torch.Tensor):
        return tuple(batch.reshape(-1).tolist())
    if isinstance(batch, (list, tuple, range)):
        return tuple(hashable(b) for b in batch)
    return (hashable(batch),)


def hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def show(ids: tuple) -> Any:
    return ids[0] if len(ids) == 1 else (list(ids) if ids else None)


def zscore(x: float, mean: float, std: float) -> float | None:
    """(x - mean) / std of a window's statistics; None where x is not finite."""
    if math.isnan(mean) or not math.isfinite(x):
        return None
    return (x - mean) / std if std > 0 else math.inf if x > mean else 0.0
