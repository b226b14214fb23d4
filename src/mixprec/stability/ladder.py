"""The guard's configuration as data: the escalation ladder's rungs and ZClip's settings.

A ladder is a sequence of rungs; rung k takes over when a run of consecutive faulty steps reaches its
`after` (the highest such rung wins). A clean step resets the run; a step the loss scaler skipped for an
FP16 overflow neither counts nor resets it.

    ladder=("skip", "rollback")                  # default: skip steps 1..3 of a run, roll back at the 4th
    ladder=("clip", Rung("skip", after=2), Rung("lower_lr", after=3, lr_factor=0.1, lr_steps=50),
            Rung("rollback", after=5), Rung("abort", after=9))

Rungs acting on the device, inside the step that found the fault (no host sync):
    clip      apply the step with the gradient clipped to the spike threshold (a finite norm spike); a
              non-finite step or a loss spike cannot be clipped into health and is skipped
    skip      do not apply the step: parameters, optimizer state (moments, step counts), loss scale
              and LR schedule stay as if the batch had never been seen
    reset     skip, and zero the optimizer state (moments, step count) of the parameters whose own
              gradient norm spiked (SPAM): their Adam restarts with a bias-corrected, bounded update
Rungs acting on the host when the step's record arrives (the next guard.step; the step itself is skipped):
    lower_lr  skip, then multiply the learning rate by lr_factor for the next lr_steps steps
    rollback  restore the newest snapshot taken before the run of faults began (PaLM) and skip the
              batches since; repeated rollbacks without recovery end in abort
    abort     raise StabilityAbort with the figures of the run of faults
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence, Union

Action = Literal["clip", "skip", "reset", "lower_lr", "rollback", "abort"]
ACTIONS: tuple[str, ...] = ("clip", "skip", "reset", "lower_lr", "rollback", "abort")
DEVICE_ACTIONS = ("clip", "skip", "reset")
HOST_ACTIONS = ("lower_lr", "rollback", "abort")
# Device codes of the actions (0: a clean step); the rung table on the device holds these.
CODE = {"none": 0, **{name: i + 1 for i, name in enumerate(ACTIONS)}}
NAME = {code: name for name, code in CODE.items()}


@dataclass(frozen=True, kw_only=True)
class Rung:
    """One rung of the escalation ladder.

    Args:
        action: one of clip, skip, reset, lower_lr, rollback, abort (see the module docstring).
        after: the length of the run of consecutive faulty steps at which this rung takes over; None:
            the previous rung's plus the guard's `escalate_after` (1 for the first rung).
        lr_factor, lr_steps: lower_lr's multiplier and duration in steps.
    """

    action: Action
    after: int | None = None
    lr_factor: float = 0.1
    lr_steps: int = 100

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Unknown ladder action {self.action!r}; choose one of: {', '.join(ACTIONS)}")
        if self.after is not None and (isinstance(self.after, bool) or not isinstance(self.after, int)
                                       or self.after < 1):
            raise ValueError(f"Rung after must be an integer >= 1 (consecutive faulty steps); got {self.after!r}")
        if not (0 < self.lr_factor <= 1):
            raise ValueError(f"Rung lr_factor must be in (0, 1]; got {self.lr_factor!r}")
        if isinstance(self.lr_steps, bool) or not isinstance(self.lr_steps, int) or self.lr_steps < 1:
            raise ValueError(f"Rung lr_steps must be an integer >= 1; got {self.lr_steps!r}")


RungLike = Union[str, Rung]


def parse_ladder(ladder: Sequence[RungLike], escalate_after: int) -> tuple[Rung, ...]:
    """Rungs with every `after` filled in, checked to increase strictly."""
    if isinstance(ladder, (str, Rung)):
        ladder = (ladder,)
    if not ladder:
        raise ValueError("ladder must hold at least one rung, e.g. ('skip',) or ('skip', 'rollback')")
    rungs: list[Rung] = []
    for item in ladder:
        rung = Rung(action=item) if isinstance(item, str) else item
        if not isinstance(rung, Rung):
            raise TypeError(f"ladder entries are action names or Rung(...); got {item!r}")
        after = rung.after if rung.after is not None else (rungs[-1].after + escalate_after if rungs else 1)
        if rungs and after <= rungs[-1].after:
            raise ValueError(f"ladder rungs must take over at increasing run lengths; {rung.action!r} after={after} "
                             f"follows {rungs[-1].action!r} after={rungs[-1].after}")
        rungs.append(Rung(action=rung.action, after=after, lr_factor=rung.lr_factor, lr_steps=rung.lr_steps))
    if rungs[0].after != 1:
        raise ValueError(f"the first rung must act on the first faulty step (after=1); got after={rungs[0].after}")
    return tuple(rungs)


def rung_table(rungs: tuple[Rung, ...]) -> list[int]:
    """Action code per run length 0..max_after (index the last entry for longer runs)."""
    table = [CODE["none"]]
    for run in range(1, rungs[-1].after + 1):
        table.append(CODE[[r for r in rungs if r.after <= run][-1].action])
    return table


def rung_at(rungs: tuple[Rung, ...], run: int) -> Rung | None:
    """The rung acting on a run of `run` consecutive faulty steps (None for 0)."""
    active = [r for r in rungs if r.after <= run]
    return active[-1] if active else None


@dataclass(frozen=True, kw_only=True)
class ZClip:
    """ZClip (Kumar et al., 2025): clip the gradient norm where its z-score against an EMA passes z.

        warm-up:  the first `warmup` clean norms give mean and (population) variance
        then:     z = (N - mean) / (std + eps);  clipped = z > z_thresh;  N_eff = mean + z_thresh*std if clipped
                  mean <- alpha*mean + (1 - alpha)*N_eff;  var <- alpha*var + (1 - alpha)*(N_eff - mean)^2
    (the paper's "percentile" threshold, mean + z*std; its EMA takes the clipped norm, so a spike does not
    inflate the statistics). Skipped and overflowed steps do not update it.
    """

    z_thresh: float = 2.5     # the paper's default
    alpha: float = 0.97       # the paper's default EMA factor
    warmup: int = 25          # the paper's default warm-up
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not (self.z_thresh > 0 and math.isfinite(self.z_thresh)):
            raise ValueError(f"ZClip z_thresh must be a positive finite number; got {self.z_thresh!r}")
        if not (0 < self.alpha < 1):
            raise ValueError(f"ZClip alpha must be in (0, 1); got {self.alpha!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 2:
            raise ValueError(f"ZClip warmup must be an integer >= 2 (a variance needs two norms); got {self.warmup!r}")
        if not self.eps > 0:
            raise ValueError(f"ZClip eps must be > 0; got {self.eps!r}")


def parse_zclip(zclip: None | float | ZClip) -> ZClip | None:
    if zclip is None or isinstance(zclip, ZClip):
        return zclip
    if isinstance(zclip, bool) or not isinstance(zclip, (int, float)):
        raise TypeError(f"zclip must be None, a z threshold (e.g. 2.5) or ZClip(...); got {zclip!r}")
    return ZClip(z_thresh=float(zclip))


def check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")


def check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
