"""The faults task (`--task faults`): a run that meets the three faults a large run meets, at fixed steps.

    batch    at 40 % of the steps: one batch whose loss (and so gradient) is 1e3 times too large, as a
             corrupt batch gives; the trainer's clip bounds its update, the loss curve spikes
    nan      at 60 %: one element of the first parameter's gradient is NaN (a bad kernel, a flipped bit);
             unguarded, the clip spreads it to every gradient and AdamW to every weight
    lr       at 75 %, for LR_SPIKE_STEPS steps: the learning rate times 100 (a schedule bug): the spiked
             update looks clean (its gradient is), the steps after it do not

Steps are batch indices (0-based); the same for every recipe and guard at the same --steps, so the rows of
`mixprec compare --task faults` see the same faults on the same batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

LOSS_FACTOR = 1e3        # the corrupt batch: far above any sigma rule's threshold, finite in FP32 and BF16
LR_FACTOR = 100.0        # x100: Adam's step per weight becomes ~0.1, which erases what a small GPT learnt
LR_SPIKE_STEPS = 3
AT = {"batch": 0.4, "nan": 0.6, "lr": 0.75}   # where in the run each fault falls (fractions of --steps)


@dataclass(frozen=True)
class FaultPlan:
    """The batch indices of the faults of a run of `steps` steps."""

    batch: int
    nan: int
    lr: tuple[int, ...]

    @classmethod
    def for_steps(cls, steps: int) -> "FaultPlan":
        at = {name: int(steps * fraction) for name, fraction in AT.items()}
        return cls(at["batch"], at["nan"], tuple(range(at["lr"], min(at["lr"] + LR_SPIKE_STEPS, steps))))

    def loss_multiplier(self, step: int) -> float:
        return LOSS_FACTOR if step == self.batch else 1.0

    def lr_multiplier(self, step: int) -> float:
        return LR_FACTOR if step in self.lr else 1.0

    def poison_grads(self, step: int, model: nn.Module) -> None:
        """After the backward pass of batch `nan`: one gradient element NaN."""
        if step != self.nan:
            return
        grad = next(p.grad for p in model.parameters() if p.grad is not None)
        grad.view(-1)[0].fill_(math.nan)   # a kernel: assigning a Python float would copy from the host (a sync)

    def describe(self) -> str:
        lr = f"{self.lr[0]}..{self.lr[-1]}" if len(self.lr) > 1 else str(self.lr[0]) if self.lr else "-"
        return (f"faults (batch indices): loss x{LOSS_FACTOR:g} at {self.batch}, a NaN gradient at {self.nan}, "
                f"learning rate x{LR_FACTOR:g} at {lr}")
