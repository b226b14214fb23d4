"""Peak training memory, measured on CUDA and counted on the CPU.

CUDA: torch.cuda.max_memory_allocated over the run after its first step (everything the caching
allocator handed out; the first step's one-time work, such as Triton autotuning's scratch buffer, is not
training memory).

CPU: the process's RSS says little (torch's allocator, the corpus, Python itself) and tracemalloc does
not see tensors, so the CPU figure is counted: the bytes of the parameters, their gradients, the
optimizer state (FP32 masters included), plus the tensors autograd saves for the backward pass of one
training step (the activations), each storage counted once. That is the memory a mixed precision
recipe changes. Emulated FP16 on the CPU holds FP16 values in FP32 storage and is counted as stored.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _unique_bytes(tensors: Iterable[torch.Tensor], seen: set) -> int:
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield p          # the FP32 masters under MasterWeights, the model's params otherwise
            if p.grad is not None:
                yield p.grad
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                yield value


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, set]:
    """Bytes of parameters, gradients and optimizer state; also the storages counted."""
    seen: set = set()
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
               *model.buffers(), *_optimizer_tensors(optimizer)]
    return _unique_bytes(tensors, seen), seen


@contextlib.contextmanager
def count_saved_activations(exclude: set) -> Iterator[list[int]]:
    """Count the bytes of tensors autograd saves for backward inside the block (storages in
    `exclude`, e.g. parameters, are not counted). Yields a one-element list holding the total."""
    total = [0]
    seen = set(exclude)

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += _unique_bytes([t], seen)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
