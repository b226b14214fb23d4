"""Distributed checkpoints (torch.distributed.checkpoint): model, optimizer, loss scaler and extras.

    mp.distributed.save_checkpoint(path, model, optimizer, scaler=scaler, extra={"step": step})
    extra = mp.distributed.load_checkpoint(path, model, optimizer, scaler=scaler)

Every rank calls both (they are collective). Each rank writes its own shards; loading reshards onto any
number of ranks, or onto a plain model in one process. What is saved:
    model       get_state_dict's model part (FSDP2 parameters as DTensors; DDP's without "module.")
    optim       get_state_dict's optimizer part keyed by parameter names. mixprec.optim.AdamW's state of a
                sharded parameter is DTensors (optim/sharded.py): codes with the parameter's shape and
                placements, block scales per shard; loading on the same number of ranks restores every bit,
                on another number every element is dequantized with its saved block's scale and requantized.
    scaler      LossScaler.state_dict() (the same on every rank, so rank 0's copy), as JSON
    extra       a JSON-serializable dict (step counter, data position, guard settings) from rank 0

Loading needs no optimizer step first: AdamW.materialize_state() creates the state to load into (torch
optimizers without it get DCP's own zero-gradient initialization), and the optimizer entries are shaped from
the checkpoint's metadata, so state saved on another number of ranks, or in another state_dtype, loads and
is converted. MasterWeights is not supported (under FSDP2 the sharded FP32 parameters are the masters; under
DDP save its state_dict() with torch.save on rank 0).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixprec.masters import MasterWeights
from mixprec.scaler import LossScaler


def _state_dict_api():
    from torch.distributed.checkpoint import state_dict as api
    return api


def _check(model: nn.Module, optimizer: torch.optim.Optimizer | None, scaler: LossScaler | None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if isinstance(optimizer, MasterWeights):
        raise TypeError("distributed checkpoints do not take MasterWeights: under FSDP2 keep FP32 parameters (they are "
                        "the masters; shard_model does this for master_weights policies); under DDP save "
                        "optimizer.state_dict() with torch.save on rank 0")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None; got {type(optimizer).__name__}")
    if scaler is not None and not isinstance(scaler, LossScaler):
        raise TypeError(f"scaler must be a mixprec LossScaler or None; got {type(scaler).__name__}")


def _get(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    api = _state_dict_api()
    if optimizer is None:
        return api.get_model_state_dict(model), None
    materialize = getattr(optimizer, "materialize_state", None)
    if callable(materialize):
        materialize()
    return api.get_state_dict(model, optimizer)


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    scaler: LossScaler | None = None, extra: dict[str, Any] | None = None) -> None:
    """Save model, optimizer, scaler and `extra` to the directory `path` with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    _check(model, optimizer, scaler)
    model_sd, optim_sd = _get(model, optimizer)
    state: dict[str, Any] = {"model": model_sd}
    if optim_sd is not None:
        state["optim"] = optim_sd
    if scaler is not None:
        state["scaler"] = json.dumps(scaler.state_dict())
    if extra is not None:
        try:
            state["extra"] = json.dumps(extra)
        except TypeError as e:
            raise TypeError(f"extra must be JSON-serializable (numbers, strings, lists, dicts): {e}") from None
    dcp.save(state, checkpoint_id=str(path))


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    scaler: LossScaler | None = None) -> dict[str, Any] | None:
    """Load what save_checkpoint wrote into model, optimizer and scaler (in place); returns `extra` (or None)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    _check(model, optimizer, scaler)
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} holds no distributed checkpoint (no .metadata file); save_checkpoint writes "
                                "one directory per checkpoint")
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model_sd, optim_sd = _get(model, optimizer)
    state: dict[str, Any] = {"model": model_sd}
    if optim_sd is not None:
        if not any(k.startswith("optim.") for k in metadata):
            raise ValueError(f"{path} holds no optimizer state (saved without an optimizer); pass optimizer=None")
        state["optim"] = _optimizer_template(model, optimizer, optim_sd, metadata, BytesStorageMetadata)
    for key in ("scaler", "extra"):
        if key in metadata and (key != "scaler" or scaler is not None):
            state[key] = ""
    if scaler is not None and "scaler" not in metadata:
        raise ValueError(f"{path} holds no loss scaler state (saved without scaler=); pass scaler=None or start a "
                         "fresh scaler")
    dcp.load(state, checkpoint_id=str(path))
    api = _state_dict_api()
    if optimizer is None:
        api.set_model_state_dict(model, state["model"])
    else:
        api.set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if scaler is not None:
        scaler.load_state_dict(json.loads(state["scaler"]))
    return json.loads(state["extra"]) if "extra" in state else None


def _optimizer_template(model: nn.Module, optimizer, optim_sd: dict, metadata: dict, bytes_type) -> dict:
    """The optimizer entries DCP loads into, shaped as they were saved.

    A tensor saved with the parameter's shape loads into a DTensor placed like the parameter (DCP reshards it);
    the current state's own tensor where the saved shape matches it (same number of ranks: every bit back);
    otherwise a plain tensor of the saved shape, which load_state_dict converts (block scales of another
    number of shards, another state_dtype)."""
    params = _params_by_fqn(model, optimizer)
    template: dict[str, Any] = {"state": {}, "param_groups": optim_sd["param_groups"]}
    for fqn, current in optim_sd["state"].items():
        prefix = f"optim.state.{fqn}."
        saved = {k[len(prefix):]: md for k, md in metadata.items()
                 if k.startswith(prefix) and "." not in k[len(prefix):]}
        if not saved:
            continue   # saved before its first step: it starts fresh
        param = params.get(fqn)
        entry: dict[str, Any] = {}
        for key, md in saved.items():
            if isinstance(md, bytes_type):
                entry[key] = current.get(key, 0)
                continue
            size, dtype = tuple(md.size), md.properties.dtype
            mine = current.get(key)
            if isinstance(mine, torch.Tensor) and tuple(mine.shape) == size and mine.dtype == dtype:
                entry[key] = mine
            elif param is not None and _is_dtensor(param) and size == tuple(param.shape) and size:
                entry[key] = _placed_like(param, dtype)
            else:
                device = param.device if param is not None and not _is_dtensor(param) else "cpu"
                entry[key] = torch.empty(size, dtype=dtype, device=device)
        template["state"][fqn] = entry
    return template


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _placed_like(param, dtype: torch.dtype):
    from torch.distributed.tensor import DTensor
    local = torch.empty(param._local_tensor.shape, dtype=dtype, device=param._local_tensor.device)
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def _params_by_fqn(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    """Parameter name as get_state_dict writes it (DDP's "module." and compile's "_orig_mod." removed)."""
    try:
        from torch.distributed.checkpoint.state_dict import _get_fqns
    except ImportError:   # pragma: no cover - older torch
        _get_fqns = None
    out = {}
    for name, p in model.named_parameters():
        fqns = _get_fqns(model, name) if _get_fqns is not None else {name.removeprefix("module.")}
        for fqn in fqns:
            out[fqn] = p
    return out


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes a checkpoint directory holds (all its files)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

