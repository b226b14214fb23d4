"""The stability guard in `mixprec train` and `compare`: its flags, the mp.StabilityGuard a TrainConfig asks
for, GLM-130B's embedding gradient shrink, and how guard events read in logs.

    --guard off       no guard: the trainer clips and steps (the default)
    --guard skip      ladder ("skip",), no snapshots: a faulty step (a non-finite loss or gradient, a spike) is
                      not applied
    --guard rollback  the guard's default ladder: skip, then roll back to a snapshot after 3 faulty steps in a row
    --guard zclip     ZClip (z threshold 2.5) clips every step's gradient adaptively; faulty steps are skipped
    --spike-sigma K   a spike is K standard deviations above the mean of the last --window N clean steps
    --snapshot-every N  rollback's snapshot cadence (default: a tenth of the run, at most 100 steps)
    --embedding-grad-shrink ALPHA   the token embedding's gradient times ALPHA (GLM-130B: 0.1), any guard
    --diagnose-events  each event's record carries mp.diagnose's view of its batch (event_diagnosis)

The guard replaces the trainer's clip + scaler.step + scaler.update: it clips to --grad-clip with the norm it
measures anyway (one norm per step, on the device).
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn as nn

import mixprec as mp
from mixprec.stability import GuardStep

GUARDS = ("off", "skip", "rollback", "zclip")
GUARD_FLAGS = ("guard", "spike_sigma", "window", "snapshot_every", "embedding_grad_shrink")   # TrainConfig fields
ZCLIP_Z = 2.5                   # ZClip's paper: clip gradient norms more than 2.5 standard deviations above the EMA
# A rollback loses the steps since its snapshot: a snapshot every tenth of the run (at most every 100 steps, the
# guard's default) bounds that loss.
MAX_SNAPSHOT_EVERY = 100
# A bad update (an LR spike) shows in the next step's loss: the snapshot taken at that step already holds it, so a
# rollback goes at least one step further back.
ROLLBACK_MIN_AGE = 1


def add_guard_arguments(parser: argparse.ArgumentParser) -> None:
    """The guard's flags, for train and compare (defaults None: TrainConfig's apply, and --resume can tell
    which were given)."""
    g = parser.add_argument_group("stability guard (mp.StabilityGuard)")
    g.add_argument("--guard", help=f"one of: {', '.join(GUARDS)} (default off). skip: faulty steps are not applied; "
                                   f"rollback: skip, then restore a snapshot; zclip: adaptive clipping (z "
                                   f"{ZCLIP_Z:g}) and skips")
    g.add_argument("--spike-sigma", type=float, metavar="K", help="a loss or gradient-norm spike is K standard "
                                                                  "deviations above its window's mean (default 6)")
    g.add_argument("--window", type=int, metavar="N", help="clean steps the spike rule looks back on (default 128)")
    g.add_argument("--snapshot-every", type=int, metavar="N",
                   help=f"--guard rollback: a snapshot every N steps, what a rollback returns to (default: a tenth "
                        f"of the run, at most {MAX_SNAPSHOT_EVERY})")
    g.add_argument("--embedding-grad-shrink", type=float, metavar="ALPHA",
                   help="multiply the token embedding's gradient by ALPHA in (0, 1] (GLM-130B: 0.1)")
    g.add_argument("--diagnose-events", action="store_true", default=None,
                   help="attach a diagnosis of the batch to each guard event in metrics.jsonl (which modules' "
                        "values overflow or underflow in FP16/BF16; an FP32 forward and backward per event)")


def check_fields(cfg: Any) -> None:
    """TrainConfig's guard fields: ValueError naming the bad value and the valid ones."""
    if cfg.guard not in GUARDS:
        raise ValueError(f"Unknown guard {cfg.guard!r}; choose one of: {', '.join(GUARDS)}")
    if isinstance(cfg.spike_sigma, bool) or not isinstance(cfg.spike_sigma, (int, float)) \
            or not math.isfinite(cfg.spike_sigma) or cfg.spike_sigma <= 0:
        raise ValueError(f"spike_sigma must be a finite number > 0, e.g. 6; got {cfg.spike_sigma!r}")
    if isinstance(cfg.window, bool) or not isinstance(cfg.window, int) or cfg.window < 2:
        raise ValueError(f"window must be an integer >= 2 (steps); got {cfg.window!r}")
    every = cfg.snapshot_every
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"snapshot_every must be a positive integer (steps); got {every!r}")
    alpha = cfg.embedding_grad_shrink
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not 0 < alpha <= 1 or math.isnan(alpha)):
        raise ValueError(f"embedding_grad_shrink must be in (0, 1] (GLM-130B used 0.1); got {alpha!r}")
    if alpha is not None and cfg.model == "cnn":
        raise ValueError("--embedding-grad-shrink applies to models with a token embedding (gpt, lstm, gru); "
                         "--model cnn has none: drop --embedding-grad-shrink")


def check_applies(args: argparse.Namespace, guards: set[str]) -> None:
    """Refuse --spike-sigma, --window and --diagnose-events where no run is guarded, and --snapshot-every
    where none rolls back (`guards`: the guards of the runs)."""
    if getattr(args, "snapshot_every", None) is not None and "rollback" not in guards:
        raise ValueError(f"--snapshot-every applies to --guard rollback (its snapshots are what a rollback returns "
                         f"to); this run's guard is {' / '.join(sorted(guards))}: drop --snapshot-every or give "
                         f"--guard rollback")
    if guards - {"off"}:
        return
    for flag in ("spike_sigma", "window", "diagnose_events"):
        if getattr(args, flag, None) is not None:
            name = "--" + flag.replace("_", "-")
            raise ValueError(f"{name} applies to a guarded run (--guard skip, rollback or zclip); this run's guard is "
                             f"off: drop {name} or give --guard")


def build_guard(cfg: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> mp.StabilityGuard | None:
    """The guard of cfg.guard (None for off), clipping at cfg.grad_clip on the task's scale as the trainer
    does (the norm it sees is the loss factor times the task's)."""
    if cfg.guard == "off":
        return None
    kw: dict[str, Any] = dict(sigma=float(cfg.spike_sigma), window=cfg.window, max_norm=cfg.grad_clip * cfg.loss_factor)
    if cfg.guard == "rollback":
        kw.update(snapshot_every=cfg.snapshot_every or snapshot_every(cfg.steps), rollback_min_age=ROLLBACK_MIN_AGE)
    else:
        kw.update(ladder=("skip",), snapshot_every=0)
        if cfg.guard == "zclip":
            kw.update(zclip=ZCLIP_Z)
    return mp.StabilityGuard(model, optimizer, **kw)


def snapshot_every(steps: int) -> int:
    return max(1, min(MAX_SNAPSHOT_EVERY, steps // 10))


def shrink_embedding(cfg: Any, model: nn.Module) -> None:
    """GLM-130B's shrink on the model's token embedding, when cfg asks for it."""
    if cfg.embedding_grad_shrink is not None:
        mp.shrink_embedding_grad(model.tok_emb, alpha=cfg.embedding_grad_shrink)


def step_figures(out: GuardStep, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient norm, skipped) of a guard step as device tensors; a rolled-back step: (NaN, True)."""
    if out.rolled_back:
        return torch.full((), math.nan, device=device), torch.ones((), dtype=torch.bool, device=device)
    return out.grad_norm, out.skipped


def event_record(event: dict) -> dict:
    """A guard event as a metrics.jsonl record: "step" counts steps done, as the other records do (the event's
    batch index plus one); "event" is the cause."""
    return {"step": event["step"] + 1, "event": event["cause"], "action": event["action"],
            **{k: v for k, v in event.items() if k not in ("step", "cause", "action")}}


def diagnose_event(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """mp.diagnose's compact view of an event's batch (x, y) under the model's weights when the event is read:
    the riskiest modules and the largest values (a skipped step left the weights as they were)."""
    from mixprec.diagnostics import event_diagnosis
    from mixprec.train.diagnose_command import loss_on_logits
    return event_diagnosis(model, batch, loss_on_logits)


def describe_event(event: dict) -> str:
    """One line for the progress output."""
    if event["action"] == "restored":
        return (f"guard: step {event['step'] + 1}: rolled back to the snapshot of step {event['to_step']} after "
                f"{event['run']} faulty steps ({event['cause']}); batches {event['rolled_back_batches']} dropped")
    z = event.get("z_loss"), event.get("z_grad_norm")
    scale = event.get("loss_scale")
    return (f"guard: step {event['step'] + 1}: {event['cause']} (loss {_num(event['loss'])}, grad norm "
            f"{_num(event['grad_norm'])}, z {_num(z[0])}/{_num(z[1])}, loss scale {_num(scale)}) -> {event['action']}")


def summarize_events(events: list[dict]) -> str:
    """'step 91 loss_spike -> skip; step 151 nonfinite_grad -> skip' (at most 6, then a count)."""
    parts = [f"step {e['step'] + 1} {e['cause']} -> {e['action']}" for e in events[:6]]
    more = f"; and {len(events) - 6} more" if len(events) > 6 else ""
    return "; ".join(parts) + more if parts else "no events"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
