"""Gradient all-reduce hooks for DDP in the policy's reduce dtype (the core's part of mixprec.distributed).

The precision table sums across ranks in FP32: a sum of BF16 values rounds to 8 significant bits at every
hop of the reduction (FP16: 11), so small contributions vanish against large ones. PyTorch's
fp16/bf16_compress_hook cast FP32 buckets down; the hook here does the opposite for half gradients:

    x = bucket (FP16/BF16)  ->  y = float32(x) / world  ->  all_reduce(y, SUM) in FP32  ->  x.copy_(y)

The average is rounded to the gradient dtype once, at the end. It doubles the bytes on the wire of a half
bucket (FP32 is what an FP32 gradient would send). Inf and NaN pass through the sum, so under DDP every rank
sees any rank's overflow (a LossScaler needs no process_group there).

prepare() (layer 3) registers it on a DDP module through `register_reduce_hook`; mixprec.distributed
re-exports it.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

_HALF = (torch.float16, torch.bfloat16)
_HOOK_ATTRIBUTE = "_mixprec_reduce_hook"   # set on a DDP module once prepare registered its hook


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def allreduce_hook_in(dtype: torch.dtype) -> Callable[[Any, Any], torch.futures.Future]:
    """A DDP comm hook averaging each bucket in `dtype`: cast, divide by the world size, sum, copy back."""

    def hook(process_group, bucket):
        import torch.distributed as dist
        group = process_group if process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        buffer = bucket.buffer()
        wide = buffer.to(dtype)   # a copy unless buffer is already `dtype`; then the sum runs in place
        wide.div_(world)          # divide first (DDP's default order): a sum of averages cannot overflow

        def copy_back(fut: torch.futures.Future) -> torch.Tensor:
            result = fut.value()[0]
            if result.data_ptr() != buffer.data_ptr():
                buffer.copy_(result)   # one rounding to the gradient dtype
            return buffer

        return dist.all_reduce(wide, group=group, async_op=True).get_future().then(copy_back)

    # Real annotations (this module's are strings): DDP's register_comm_hook compares them with these objects.
    hook.__annotations__ = {"process_group": Any, "bucket": torch.distributed.GradBucket,
                            "return": torch.futures.Future[torch.Tensor]}
    hook.__name__ = hook.__qualname__ = f"{_dtype_name(dtype)}_allreduce_hook"
    hook.__doc__ = f"Average a DDP gradient bucket in {_dtype_name(dtype)} (mixprec._comm.allreduce_hook_in)."
    return hook


fp32_allreduce_hook = allreduce_hook_in(torch.float32)
fp32_allreduce_hook.__doc__ = """DDP comm hook: average half-precision gradient buckets in FP32.

    ddp_model.register_comm_hook(state=None, hook=mp.distributed.fp32_allreduce_hook)   # state: a group or None

Upcasts the bucket, divides by the world size, all-reduces (SUM) in FP32 and copies the average back into
the bucket's dtype (one rounding). FP32 buckets pass through as DDP's default hook would average them.
"""


def half_reduce_warning(reduce_dtype: torch.dtype, world_size: int | None, where: str) -> None:
    """Warn what a half-precision reduce dtype costs (allowed: a compressed reduction for slow links)."""
    bits = 8 if reduce_dtype == torch.bfloat16 else 11
    ranks = f"{world_size} ranks" if world_size else "the ranks"
    warnings.warn(
        f"{where}: reduce_dtype={reduce_dtype} sums gradients across {ranks} in {_dtype_name(reduce_dtype)}: every "
        f"partial sum is rounded to {bits} significant bits, so a gradient smaller than 2**-{bits} of the running sum "
        f"is lost and the average's relative error grows with the number of ranks (up to about "
        f"(ranks - 1) * 2**-{bits}). It halves the bytes of an FP32 reduction; choose it only for a slow link. "
        f"Pass reduce_dtype=torch.float32 to sum in FP32.", UserWarning, stacklevel=3)


def is_ddp(model: Any) -> bool:
    """Whether `model` is a torch DistributedDataParallel module."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def register_reduce_hook(ddp: torch.nn.parallel.DistributedDataParallel, reduce_dtype: torch.dtype) -> str | None:
    """Register the comm hook that averages `ddp`'s gradients in `reduce_dtype`, where DDP's default would not.

    Half gradients with reduce_dtype float32: `fp32_allreduce_hook`. FP32 gradients with a half reduce_dtype:
    the hook in that dtype (with half_reduce_warning). Gradients already in reduce_dtype: DDP's default
    averages them in that dtype, no hook. Returns the name of the hook now in place, or None. Idempotent;
    a hook the user registered earlier is left alone (DDP takes one).
    """
    if getattr(ddp, _HOOK_ATTRIBUTE, None) is not None:
        return getattr(ddp, _HOOK_ATTRIBUTE)
    grad_dtypes = {p.dtype for p in ddp.module.parameters() if p.requires_grad and p.is_floating_point()}
    if reduce_dtype in _HALF:
        group = getattr(ddp, "process_group", None)
        half_reduce_warning(reduce_dtype, group.size() if group is not None else None, "mp.prepare(DDP)")
    if grad_dtypes <= {reduce_dtype}:
        return None   # DDP's default all-reduce already averages in reduce_dtype
    if getattr(ddp, "_comm_hooks", None):
        return None   # the user's own Python hook stays
    hook = fp32_allreduce_hook if reduce_dtype == torch.float32 else allreduce_hook_in(reduce_dtype)
    try:
        ddp.register_comm_hook(state=getattr(ddp, "process_group", None), hook=hook)
    except RuntimeError as e:   # a built-in hook the user registered (register_builtin_comm_hook) stays
        if "only be called once" not in str(e):
            raise
        return None
    setattr(ddp, _HOOK_ATTRIBUTE, hook.__name__)
    return hook.__name__
