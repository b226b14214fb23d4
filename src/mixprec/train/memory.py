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
import os
from typing import Iterable, Iterator

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2): the memory this process holds of it."""
    return t.to_local() if hasattr(t, "to_local") else t


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    t = _local(t)
    return (str(t.device), t.untyped_storage().data_ptr())


def _unique_bytes(tensors: Iterable[torch.Tensor], seen: set) -> int:
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        t = _local(t)
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


# ---- will one training step fit? -----------------------------------------------------------------
FIT_HEADROOM = 0.5   # suggest sizes whose lower bound takes half the memory: the bound leaves much out


def step_bytes_lower_bound(cfg) -> tuple[int, str]:
    """(bytes, what they are): a lower bound on the activation memory one training step of `cfg` (a
    TrainConfig) keeps for the backward pass, counting only what it surely stores:

        GPT, manual attention:  layers x batch x heads x seq_len**2 x 4   (the FP32 softmax probabilities)
        GPT:                    layers x batch x seq_len x 8 d_model x 2  (qkv, attention output and the
                                                                           MLP's 4 d hidden, at least 16-bit)
        LSTM/GRU:               layers x batch x seq_len x hidden x 4     (the FP32 hidden states)
        text models:            batch x seq_len x 256 x 4                 (the FP32 logits)

    The CNN's images are 8x8: any batch that fits the data fits.
    """
    m, b = cfg.model_config(), cfg.batch_size
    if cfg.model == "cnn":
        return 0, "nothing that grows with a flag"
    t = m.seq_len
    logits = b * t * 256 * 4
    if cfg.model == "gpt":
        linear = m.n_layer * b * t * 8 * m.d_model * 2
        if m.attention == "manual":
            probs = m.n_layer * b * m.n_head * t * t * 4
            return probs + linear + logits, (f"the attention probabilities alone are {m.n_layer} layers x batch {b} "
                                             f"x {m.n_head} heads x {t}^2 x 4 bytes")
        return linear + logits, f"{m.n_layer} layers x batch {b} x {t} positions x {8 * m.d_model} values x 2 bytes"
    return m.n_layer * b * t * m.hidden * 4 + logits, f"{m.n_layer} layers x batch {b} x {t} x {m.hidden} x 4 bytes"


def available_bytes(device: str) -> tuple[int, str]:
    """(bytes, where): the GPU's memory, or the memory the OS says is available to a new process."""
    if device == "cuda":
        import torch
        return torch.cuda.get_device_properties(0).total_memory, f"{torch.cuda.get_device_name()}'s memory"
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024, "available memory (/proc/meminfo)"
    except (OSError, KeyError, ValueError):  # not Linux: the physical memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


def check_fits(cfg) -> None:
    """Raise ValueError naming the flags when one training step of `cfg` surely cannot fit the device's
    memory, with the largest --seq-len (or, for the CNN, nothing) that could."""
    need, what = step_bytes_lower_bound(cfg)
    have, where = available_bytes(cfg.device)
    if need <= have:
        return
    seq_len = cfg.model_config().seq_len
    fitting = seq_len
    while fitting > 1 and step_bytes_lower_bound(cfg.replace(seq_len=fitting))[0] > FIT_HEADROOM * have:
        fitting = fitting * 9 // 10          # shrinks 10 % a try: a few dozen tries from any size
    fitting = max(1, fitting // 64 * 64) if fitting >= 64 else fitting   # a round number to type
    raise ValueError(f"--seq-len {seq_len} at --batch-size {cfg.batch_size} needs more than {_gb(need)} for one "
                     f"training step ({what}); {where} is {_gb(have)}: --seq-len {fitting} or less fits at this "
                     f"batch size (or lower --batch-size)")


def _gb(n: int) -> str:
    return f"{n / 1e12:.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB"
