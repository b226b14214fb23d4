"""What data-parallel training must agree on before it starts, and cross-rank decisions while it runs.

Each check raises with the bad value and the way out; none of them syncs per step (the device check
gathers once, at setup).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def require_initialized(what: str) -> None:
    """Raise unless torch.distributed has a default process group."""
    if not dist.is_available():
        raise RuntimeError(f"{what} needs torch.distributed, which this PyTorch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what} needs an initialized process group: call torch.distributed.init_process_group('gloo') for CPU "
            "ranks or ('nccl') for GPU ranks first (torchrun sets the rendezvous variables; "
            "`mixprec train --nproc N` starts the ranks for you)")


def world_size(group: Any = None) -> int:
    """The number of ranks of `group` (the default group when None); 1 without torch.distributed."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def model_device(model: nn.Module) -> torch.device:
    """The one device a model's parameters and buffers are on; raises naming them if they are on several."""
    devices: dict[str, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        key = str(t.device)
        devices[key] = devices.get(key, 0) + 1
    if len(devices) > 1:
        listing = ", ".join(f"{d} ({n} tensors)" for d, n in sorted(devices.items()))
        raise ValueError(f"{type(model).__name__}'s parameters and buffers are on several devices: {listing}. Data "
                         "parallelism keeps one device per rank: move the model first, e.g. model.to('cuda:0') "
                         "(cuda:LOCAL_RANK under torchrun) or model.to('cpu')")
    return torch.device(next(iter(devices))) if devices else torch.device("cpu")


def check_devices(model: nn.Module, group: Any = None) -> torch.device:
    """The model's device, after checking that every rank of `group` holds its model on the same device type
    and that the backend moves tensors of that type (one all_gather_object at setup)."""
    require_initialized("check_devices")
    device = model_device(model)
    types = [None] * dist.get_world_size(group)
    dist.all_gather_object(types, device.type, group=group)
    if len(set(types)) > 1:
        listing = ", ".join(f"rank {r}: {t}" for r, t in enumerate(types))
        raise ValueError(f"the ranks hold their models on different device types ({listing}); every rank must use "
                         "one type: all CUDA with the nccl backend, or all CPU with gloo")
    backend = str(dist.get_backend(group))
    if device.type == "cpu" and backend == "nccl":
        raise ValueError("the process group's backend is nccl, which moves CUDA tensors only, and the model is on "
                         "the CPU: use init_process_group('gloo') for CPU training, or move the model to cuda")
    if device.type == "cuda" and backend == "gloo":
        raise ValueError("the process group's backend is gloo and the model is on CUDA: use "
                         "init_process_group('nccl') for GPU training (gloo's CUDA collectives are slow and partial)")
    return device


def per_rank_batch(global_batch: int, world: int | None = None) -> int:
    """The batch each rank runs when `global_batch` samples a step are split over `world` ranks (default: the
    default group's size); raises when it does not divide."""
    world = world_size() if world is None else world
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch <= 0:
        raise ValueError(f"the global batch size must be a positive integer; got {global_batch!r}")
    if global_batch % world:
        lower, upper = (global_batch // world) * world, (global_batch // world + 1) * world
        fits = [n for n in range(1, world) if global_batch % n == 0][-1]
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"a global batch of {global_batch} does not split evenly over {world} ranks "
                         f"({global_batch} % {world} = {global_batch % world}): use a batch size that is a multiple "
                         f"of {world} ({nearest}), or a number of ranks that divides {global_batch} (e.g. {fits})")
    return global_batch // world


def rank_slice(batch: torch.Tensor, group: Any = None) -> torch.Tensor:
    """This rank's contiguous part (dim 0) of a global batch every rank holds alike."""
    world = world_size(group)
    rank = dist.get_rank(group) if world > 1 else 0
    per = per_rank_batch(batch.shape[0], world)
    return batch[rank * per:(rank + 1) * per]


def agree(flags: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Make a decision the same on every rank: all-reduce `flags` (a device tensor) with MAX in place, so a flag
    any rank raised is raised everywhere (a skip, a rollback). One small collective, no host sync; a no-op
    without an initialized process group. Returns `flags`."""
    if world_size(group) > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags
