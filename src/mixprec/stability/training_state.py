"""The training state a rollback restores, gathered as named tensors (copied by the snapshot ring) and host
values, and written back in place so the restored state equals the snapshot bit for bit.

    ("model", k)              the model's parameters and buffers (k-th unique tensor)
    ("param", j, i)           optimizer j's i-th parameter when it is not the model's (FP32 masters)
    ("state", j, i, key)      its optimizer state tensors (moments, step counts, codes, block scales)
    ("scaler", name)          the loss scaler's device state (scale, trackers, counters)
    ("guard", name)           the guard's windows and ZClip statistics
host: param-group hyper-parameters, non-tensor optimizer state, the LR scheduler's state_dict, guard values.
A parameter that had no optimizer state in the snapshot has none after the restore.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def gather(model_ts: list[torch.Tensor], optimizers: list[torch.optim.Optimizer], scaler_state: dict,
           guard_state: dict, scheduler: Any, guard_host: dict) -> tuple[dict, dict]:
    """(tensors by key, host values) of the current training state; the tensors are the live ones."""
    tensors: dict[Any, torch.Tensor] = {("model", k): t for k, t in enumerate(model_ts)}
    in_model = {id(t) for t in model_ts}
    values, devices, groups = {}, {}, []
    for j, opt in enumerate(optimizers):
        for i, p in enumerate(optimizer_params(opt)):
            if id(p) not in in_model:
                tensors[("param", j, i)] = p
            st = opt.state.get(p)
            if not st:
                continue
            values[(j, i)] = {k: copy.deepcopy(v) for k, v in st.items() if not isinstance(v, torch.Tensor)}
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[("state", j, i, key)] = v
                    devices[(j, i, key)] = v.device
        groups.append([{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups])
    tensors.update({("scaler", k): v for k, v in scaler_state.items()})
    tensors.update({("guard", k): v for k, v in guard_state.items()})
    host = {"state_values": values, "state_devices": devices, "groups": groups,
            "scheduler": None if scheduler is None else copy.deepcopy(scheduler.state_dict()),
            "guard": copy.deepcopy(guard_host)}
    return tensors, host


@torch.no_grad()
def restore(saved: dict, host: dict, model_ts: list[torch.Tensor], optimizers: list[torch.optim.Optimizer],
            scaler_state: dict, guard_state: dict, scheduler: Any) -> None:
    """Write a gathered state back in place (new tensors only where a state tensor's shape or dtype changed)."""
    live, _ = gather(model_ts, optimizers, scaler_state, guard_state, None, {})
    for key, t in saved.items():
        if key[0] != "state" and key in live:
            live[key].copy_(t, non_blocking=True)
    for j, opt in enumerate(optimizers):
        for i, p in enumerate(optimizer_params(opt)):
            saved_ts = {key[3]: t for key, t in saved.items() if key[0] == "state" and key[1:3] == (j, i)}
            vals = host["state_values"].get((j, i))
            if vals is None and not saved_ts:
                opt.state.pop(p, None)
                continue
            current = opt.state.get(p, {})
            new = {}
            for key, t in saved_ts.items():
                cur = current.get(key)
                if isinstance(cur, torch.Tensor) and cur.shape == t.shape and cur.dtype == t.dtype:
                    cur.copy_(t, non_blocking=True)
                    new[key] = cur
                else:
                    new[key] = t.to(host["state_devices"][(j, i, key)], copy=True)
            new.update(copy.deepcopy(vals or {}))
            opt.state[p] = new
        for group, saved_group in zip(opt.param_groups, host["groups"][j]):
            group.update(copy.deepcopy(saved_group))
    if scheduler is not None and host["scheduler"] is not None:
        scheduler.load_state_dict(copy.deepcopy(host["scheduler"]))
