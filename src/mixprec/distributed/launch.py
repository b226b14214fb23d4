"""Starting ranks and wrapping a model for data parallelism: what `mixprec train --nproc N --dp ...` calls.

    # the launcher process (no process group yet):
    exit_code = mp.distributed.launch(nproc=2, args=["-m", "mixprec", "train", ...])   # torchrun, standalone
    # in each rank (dist.is_torchelastic_launched() is True there):
    ranks = mp.distributed.init_ranks("cpu")            # gloo on the CPU, nccl (cuda:LOCAL_RANK) on GPUs
    model = mp.distributed.parallelize(model, policy, dp="fsdp2", device=ranks.device)
    scaler = mp.distributed.loss_scaler(policy, dp="fsdp2")
    x = mp.distributed.rank_slice(global_batch)         # or per_rank_batch(global_batch_size) samples a rank
    ...
    mp.distributed.save_checkpoint(out / f"step{step}", model, optimizer, scaler=scaler, extra={"step": step})
    mp.distributed.close_ranks()
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from mixprec.distributed.fsdp import shard_model
from mixprec.policy import Policy
from mixprec.prepare import prepare
from mixprec.scaler import LossScaler

DataParallel = Literal["ddp", "fsdp2"]
DATA_PARALLEL: tuple[str, ...] = ("ddp", "fsdp2")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes single files."""
        return self.rank == 0


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run `python <args>` as `nproc` ranks on this machine through torch.distributed.run (torchrun's
    standalone rendezvous on a free port); returns when they end: 0, or the first failing rank's exit code."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer; got {nproc!r}")
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        run.main(["--standalone", f"--nproc-per-node={nproc}", *args])
    except SystemExit as e:
        return int(e.code or 0)
    except ChildFailedError as e:   # a rank failed: its exit code
        return next((f.exitcode for f in e.failures.values() if f.exitcode), 1)
    return 0


def init_ranks(device_type: Literal["cpu", "cuda"] = "cpu") -> Ranks:
    """Join the process group torchrun described (env://): gloo for CPU ranks, nccl for CUDA ranks (each on
    cuda:LOCAL_RANK). Reuses a group that is already initialized."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda'; got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device_type='cuda' but no CUDA GPU is visible; use 'cpu' (gloo)")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if not dist.is_torchelastic_launched():
            raise RuntimeError("init_ranks runs inside ranks started by torchrun (mixprec.distributed.launch, "
                               "`mixprec train --nproc N`); in a plain process call "
                               "torch.distributed.init_process_group yourself")
        dist.init_process_group(backend)
    local_rank = dist.get_node_local_rank(fallback_rank=dist.get_rank())
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {dist.get_rank()} has local rank {local_rank} but this machine shows "
                             f"{torch.cuda.device_count()} GPUs: start at most that many ranks per machine")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, device, str(dist.get_backend()))


def close_ranks() -> None:
    """Leave the process group (every rank, at the end)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, policy: Policy, dp: DataParallel = "ddp", *,
                device: torch.device | str | None = None, blocks=None) -> nn.Module:
    """The model on `device`, prepared with `policy`, wrapped for data parallelism.

    "ddp":   DistributedDataParallel(mp.prepare(model, policy)), with mp.prepare's reduction hook (gradients
             averaged in policy.reduce_dtype: FP32 for half gradients).
    "fsdp2": mp.distributed.shard_model(mp.prepare(model, policy), policy) (FSDP2, a MixedPrecisionPolicy
             per module). Optimizers are built afterwards, over the returned model's parameters.
    Run the forward under mp.autocast(policy) in both cases.
    """
    if dp not in DATA_PARALLEL:
        raise ValueError(f"Unknown data parallelism {dp!r}; choose one of: {', '.join(DATA_PARALLEL)}")
    if dist.is_available() and not dist.is_initialized():
        raise RuntimeError("parallelize needs an initialized process group: call mp.distributed.init_ranks() (under "
                           "torchrun) or torch.distributed.init_process_group first")
    if device is not None:
        model = model.to(device)
    model = prepare(model, policy)
    if dp == "fsdp2":
        return shard_model(model, policy, blocks=blocks)
    from torch.nn.parallel import DistributedDataParallel

    from mixprec.distributed.checks import check_devices
    device = check_devices(model)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return prepare(ddp, policy)


def loss_scaler(policy: Policy, dp: DataParallel = "ddp", **overrides) -> LossScaler:
    """The LossScaler a policy asks for, agreeing across ranks: under FSDP2 a rank sees only its gradient shard,
    so found_inf is all-reduced (process_group="default"); under DDP every rank holds the averaged gradients
    (an inf anywhere is an inf everywhere), so it stays local."""
    if dp not in DATA_PARALLEL:
        raise ValueError(f"Unknown data parallelism {dp!r}; choose one of: {', '.join(DATA_PARALLEL)}")
    overrides.setdefault("process_group", "default" if dp == "fsdp2" else None)
    return LossScaler.for_policy(policy, **overrides)
