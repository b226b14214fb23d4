"""StabilityGuard: detect loss and gradient spikes on the device and act on them without a host sync.

    guard = mp.StabilityGuard(model, optimizer, sigma=6.0, window=128, ladder=("skip", "rollback"))
    for batch_id, (x, y) in enumerate(loader):
        if guard.is_skipped(batch_id):                 # batches a skip or rollback put on the skip list
            continue
        loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()                  # or loss.backward() without a loss scaler
        guard.step(loss, scaler=scaler, batch=batch_id)   # replaces scaler.step(opt); scaler.update()
        optimizer.zero_grad()

One guard.step (iteration i), after the backward pass:

    host   records of iteration i-1 arrive (copied asynchronously one step earlier: no stall): per-step
           signals and events, the skip list, scheduler.step() for applied steps, and the host rungs
           (lower_lr, rollback, abort). A rollback restores a snapshot, discards this iteration's gradients
           and returns.
    host   every `snapshot_every` iterations: a snapshot of the state before this update (async copy)
    device unscale (scaler); n_k = ||g_k|| per tensor, one foreach norm; N = ||n||; per-group norms
           overflow = the scaler's found_inf (an FP16 overflow is the scaler's skip, not a fault)
           per signal x (loss, N, group norms): spike = warm and x - mean > sigma * std over its window
           fault = loss not finite, or N not finite (unless overflow), or a spike (norm spikes unless overflow)
           run = fault ? run + 1 : (overflow ? run : 0);   rung = ladder table[run]
           clip: coef = min(1, max_norm / N, ZClip's threshold / N, the clip rung's threshold / N)
           apply = not overflow and (not fault or (rung == clip and the fault is a finite norm spike))
           optimizer.step(), a no-op where not apply (found_inf, or a select: see apply.py)
           rung == reset: zero the state of the parameters whose own norm spiked (SPAM)
           scaler.update(), then its state := before where fault (a skip leaves the scale untouched)
           windows and ZClip take the step's values where clean (not fault, not overflow)
           the step's record (loss, N, statistics, flags, run, rung) -> host, asynchronously

Host syncs: none per step on CUDA with an optimizer that skips on the device or keeps its state on the
parameters' device (test_stability_cuda runs guarded steps under torch.cuda.set_sync_debug_mode("error")). The
records are read one step late from pinned memory after their event: the host waits, if at all, for the
previous step's end, while this step's forward and backward are already queued. guard.state_dict(), flush(),
window and disk snapshots read on purpose.
"""
from __future__ import annotations

import copy
import math
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Sequence

import torch
import torch.nn as nn

from mixprec.masters import MasterWeights
from mixprec.stability import records, training_state
from mixprec.stability.apply import ProtectedStep, lowered_lr, reset_state, scale_grads_, update_scaler
from mixprec.stability.detect import Window, ZClipState, decide, grad_norms, segment_norms
from mixprec.stability.ladder import (CODE, HOST_ACTIONS, Rung, RungLike, ZClip, check_int, check_positive,
                                      parse_ladder, parse_zclip, rung_at, rung_table)
from mixprec.stability.snapshot import SnapshotRing

SIGNALS = ("loss", "grad_norm")
# torch.nn.utils.clip_grad_norm_'s epsilon: the coefficient max_norm / (N + 1e-6) stays finite at N = 0.
_CLIP_EPS = 1e-6


class StabilityAbort(RuntimeError):
    """Raised by StabilityGuard.step when the ladder gives up (an abort rung, or rollbacks that did not help)."""


@dataclass
class GuardStep:
    """What one guard.step did. Device tensors are this iteration's; lists hold what reached the host now
    (the previous iteration's record)."""

    grad_norm: torch.Tensor | None          # gradient norm before clipping (0-dim FP32, device); None: rolled back
    skipped: torch.Tensor | None            # 0-dim bool on the device: the update was not applied
    rolled_back: bool = False               # a rollback ran; this iteration's gradients were discarded
    records: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)


class StabilityGuard:
    """Detects loss and gradient-norm spikes and non-finite values on the device and acts through an
    escalation ladder (skip, clip, reset moments, lower LR, rollback, abort); see the module docstring.

    Args:
        model: the model (its parameters and buffers are snapshotted; embeddings found for the embedding clip).
        optimizer: an optimizer or a list of them (torch's, mixprec.optim.AdamW, MasterWeights).
        sigma: a spike is a value above mean + sigma * std of its window (OLMo-core: 6).
        window: values per window (OLMo-core: the last 128 steps).
        warmup: clean values a window needs before it can call a spike (default max(2, window // 2), OLMo-core's).
        signals: which signals the sigma rule watches: "loss", "grad_norm" (non-finite values always count).
        per_group: also watch each parameter group's gradient norm (across all optimizers, in order).
        ladder: rungs as names or Rung(...) (ladder.py); default skip, then rollback after `escalate_after` skips.
        escalate_after: default distance in consecutive faulty steps between rungs without an explicit `after`.
        max_rollbacks: rollbacks in a row (without `recover_after` clean steps between) before the guard aborts.
        rollback_min_age: a rollback restores the newest snapshot taken at least this many iterations before
            the run of faults began (PaLM restarted ~100 steps before a spike).
        recover_after: clean steps in a row that end a series of rollbacks (default snapshot_every).
        zclip: None, a z threshold (2.5 in the paper) or ZClip(...): adaptive clipping of every step.
        max_norm: clip the total gradient norm to this (torch's clip_grad_norm_), using the guard's norm.
        embedding_max_norm: clip the embeddings' gradient to this norm, apart from the total
            (embeddings: the modules; default the model's nn.Embedding modules).
        snapshot_every: iterations between snapshots (0: none; rollback needs them).
        keep_snapshots: snapshots in the ring; snapshot_dir: keep them on disk instead of pinned host memory.
        scheduler: an LR scheduler the guard steps once per applied update (a skipped step leaves the schedule
            where it was); restored by a rollback. Without it, stepping the schedule is yours.
        process_group: None, "default" or a ProcessGroup: the fault flags are all-reduced (MAX) so every rank
            skips together (data-parallel ranks see different losses).
        history: per-step records kept in `history`.
        fuse: compile the per-step statistics (windows, verdict, ladder, record) with torch.compile into a few
            kernels instead of about a hundred tiny ones; default on CUDA, where each kernel costs a launch.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], *,
                 sigma: float = 6.0, window: int = 128, warmup: int | None = None,
                 signals: Sequence[str] = SIGNALS, per_group: bool = False,
                 ladder: Sequence[RungLike] = ("skip", "rollback"), escalate_after: int = 3, max_rollbacks: int = 3,
                 rollback_min_age: int = 0, recover_after: int | None = None,
                 zclip: None | float | ZClip = None, max_norm: float | None = None,
                 embedding_max_norm: float | None = None, embeddings: Iterable[nn.Module] | None = None,
                 snapshot_every: int = 100, keep_snapshots: int = 2, snapshot_dir: str | None = None,
                 scheduler: Any = None, process_group: Any = None, history: int = 10_000,
                 fuse: bool | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or a list of them; got {optimizer!r}")
        check_positive("sigma", sigma)
        check_int("window", window, 2)
        warmup = max(2, window // 2) if warmup is None else warmup
        check_int("warmup", warmup, 2)
        if warmup > window:
            raise ValueError(f"warmup ({warmup}) cannot exceed window ({window}): the window holds at most {window}")
        signals = tuple(signals)
        for s in signals:
            if s not in SIGNALS:
                raise ValueError(f"Unknown signal {s!r}; choose from: {', '.join(SIGNALS)}")
        check_int("escalate_after", escalate_after, 1)
        check_int("max_rollbacks", max_rollbacks, 1)
        check_int("rollback_min_age", rollback_min_age, 0)
        check_int("snapshot_every", snapshot_every, 0)
        check_int("keep_snapshots", keep_snapshots, 1)
        for name, value in (("max_norm", max_norm), ("embedding_max_norm", embedding_max_norm)):
            if value is not None:
                check_positive(name, value)
        self.rungs: tuple[Rung, ...] = parse_ladder(ladder, escalate_after)
        actions = {r.action for r in self.rungs}
        if "rollback" in actions and snapshot_every == 0:
            raise ValueError("the ladder rolls back but snapshot_every=0 takes no snapshots; set snapshot_every >= 1 "
                             "or drop 'rollback' from the ladder")
        if "clip" in actions and "grad_norm" not in signals:
            raise ValueError("the 'clip' rung clips gradient-norm spikes: keep 'grad_norm' in signals")

        self.model, self.optimizers, self.scheduler = model, optimizers, scheduler
        self.sigma, self.window_size, self.warmup, self.signals = float(sigma), window, warmup, signals
        self.per_group, self.max_norm, self.embedding_max_norm = per_group, max_norm, embedding_max_norm
        self.max_rollbacks, self.rollback_min_age = max_rollbacks, rollback_min_age
        self.recover_after = recover_after if recover_after is not None else max(snapshot_every, 1)
        self.snapshot_every, self.process_group = snapshot_every, process_group
        self.zclip_config = parse_zclip(zclip)
        self._steps = [ProtectedStep(o) for o in optimizers]
        self._params = [p for o in optimizers for p in training_state.optimizer_params(o)]
        self.device = self._params[0].device if self._params else torch.device("cpu")
        dev = self.device
        # Signals: [loss] [grad_norm] [group norms...] [tensor norms... (SPAM's reset only)]
        groups = [g for o in optimizers for g in o.param_groups]
        self._n_groups = len(groups)
        group_of = [gi for gi, g in enumerate(groups) for _ in g["params"]]
        self._group_of = torch.tensor(group_of, dtype=torch.int64, device=dev)
        self._watch_loss, self._watch_norm = "loss" in signals, "grad_norm" in signals
        self._reset = "reset" in actions
        self._sig = {"loss": 0, "grad_norm": 1, "groups": 2, "tensors": 2 + (self._n_groups if per_group else 0)}
        n_signals = self._sig["tensors"] + (len(self._params) if self._reset else 0)
        self._window = Window(n_signals, window, dev)
        watched = torch.zeros(n_signals, dtype=torch.bool)
        watched[0], watched[1] = self._watch_loss, self._watch_norm
        if per_group:
            watched[2:2 + self._n_groups] = True
        self._watched = watched.to(dev)
        self._zclip = ZClipState(self.zclip_config, dev) if self.zclip_config else None
        self._rung_table = torch.tensor(rung_table(self.rungs), dtype=torch.int64, device=dev)
        self._run = torch.zeros((), dtype=torch.int64, device=dev)
        # Embeddings (their optimizer parameters: the FP32 masters under MasterWeights).
        self._emb_params: list[torch.Tensor] = []
        if embedding_max_norm is not None:
            modules = list(embeddings) if embeddings is not None else \
                [m for m in model.modules() if isinstance(m, nn.Embedding)]
            if not modules:
                raise ValueError("embedding_max_norm is set but the model has no nn.Embedding; pass embeddings=[...]")
            masters = {}
            for o in optimizers:
                if isinstance(o, MasterWeights):
                    masters.update(o.master_of())
            wanted = {id(masters.get(id(p), p)) for m in modules for p in m.parameters()}
            self._emb_params = [p for p in self._params if id(p) in wanted]
            self._emb_of = torch.tensor([0 if id(p) in wanted else 1 for p in self._params], device=dev)
        self._clipping = max_norm is not None or self._zclip is not None or "clip" in actions
        self._model_ts = training_state.model_tensors(model)
        self.ring = SnapshotRing(keep_snapshots, snapshot_dir) if snapshot_every else None
        # Host state.
        self.iteration = 0
        self.events: list[dict] = []
        self.history: deque[dict] = deque(maxlen=history)
        self._skip: dict[Hashable, int] = {}       # batch/sample id -> iteration that put it there (ordered)
        self._queue: deque = deque()                # (iteration, batch, host record, event)
        self._batches: dict[int, tuple] = {}        # iteration -> batch ids, since the oldest snapshot
        self._pending: list[dict] = []              # host actions waiting for the next step
        self._host = {"lr_low": None}               # [factor, steps left] of a lower_lr rung
        self._rollbacks_in_a_row = 0
        self._clean_streak = 0
        self.counters = {"applied": 0, "skipped": 0, "overflows": 0, "faults": 0, "clipped": 0, "rollbacks": 0}
        self._need_snapshot = True
        self._cache: dict | None = None
        self._scaler = None
        self._fuse = dev.type == "cuda" if fuse is None else bool(fuse)
        self._compiled: dict[str, Any] = {}
        # read-only stand-ins, made once rather than filled on the device every step
        self._no_overflow = torch.zeros((), dtype=torch.bool, device=dev)
        self._no_scale = torch.full((), math.nan, device=dev)

    # ---- the step -------------------------------------------------------------------------------------
    def grad_norm(self, scaler: Any = None) -> torch.Tensor:
        """This iteration's total gradient norm (0-dim FP32 on the device, before any clipping), computed now
        with one foreach norm after unscaling through `scaler`; guard.step reuses it. For clipping the gradients
        yourself: torch.nn.utils.clip_grads_with_norm_(params, max_norm, guard.grad_norm(scaler))."""
        return torch.linalg.vector_norm(self._norms(scaler)["per_tensor"])

    def step(self, loss: torch.Tensor | float | Sequence[torch.Tensor] | None, scaler: Any = None,
             batch: Hashable | Sequence[Hashable] | None = None) -> GuardStep:
        """Check this iteration's loss and gradients, step the optimizer(s) unless the ladder says otherwise, and
        update the scaler. `loss`: the unscaled loss (a 0-dim tensor, a number, or micro-batch losses to average);
        `batch`: the batch index or the sample ids of this iteration, for the skip list."""
        out = GuardStep(None, None)
        self._drain(self.iteration - 1, out)
        if self._pending and self._act(scaler, batch, out):
            out.rolled_back = True
            return out
        if self.ring is not None and (self._need_snapshot or self.iteration % self.snapshot_every == 0):
            self._snapshot(scaler)
        ids = records.ids_of(batch)
        if self.ring is not None:
            self._batches[self.iteration] = ids
        self._device_step(loss, scaler, ids, out)
        self.iteration += 1
        return out

    def _norms(self, scaler: Any) -> dict:
        if self._cache is not None:
            return self._cache
        overflow = None
        if scaler is not None and scaler.is_enabled():
            self._scaler = scaler
            for opt in self.optimizers:
                if scaler.found_inf(opt) is None:
                    scaler.unscale_(opt)
            found = [scaler.found_inf(o).to(self.device) for o in self.optimizers]
            overflow = (torch.stack(found).amax() if len(found) > 1 else found[0]) > 0
        else:
            for opt in self.optimizers:
                sync = getattr(opt, "sync_grads", None)   # MasterWeights: masters' grads follow the model's
                if callable(sync):
                    sync()
        self._cache = {"per_tensor": grad_norms(self._params, self.device), "overflow": overflow}
        return self._cache

    def _loss(self, loss: Any) -> torch.Tensor | None:
        if loss is None:
            return None
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must be a single value (a 0-dim tensor); got shape {tuple(loss.shape)}")
            return loss.detach().reshape(()).to(self.device, torch.float32, non_blocking=True)
        if isinstance(loss, (list, tuple)):
            return torch.stack([self._loss(x) for x in loss]).mean()
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return torch.full((), float(loss), dtype=torch.float32, device=self.device)
        raise TypeError(f"loss must be a tensor, a number or a list of micro-batch losses; got {type(loss).__name__}")

    @torch.no_grad()
    def _device_step(self, loss: Any, scaler: Any, ids: tuple, out: GuardStep) -> None:
        cache = self._norms(scaler)
        self._cache = None
        per_tensor, overflow = cache["per_tensor"], cache["overflow"]
        if overflow is None:
            overflow = self._no_overflow
        loss_t = self._loss(loss)
        if loss_t is None and self._watch_loss:
            raise ValueError("the guard watches the loss (signals includes 'loss'): pass it to step(), or build the "
                             "guard with signals=('grad_norm',)")
        if self.process_group is None:
            v = self._phase("verdict", self._verdict, per_tensor, loss_t, overflow)
        else:   # every rank takes the same decision: the fault flags are all-reduced between the two halves
            import torch.distributed as dist
            v = self._phase("detect", self._detect, per_tensor, loss_t, overflow)
            flags = torch.stack([v["fault"], ~v["clippable"]]).float()
            dist.all_reduce(flags, op=dist.ReduceOp.MAX,
                            group=None if self.process_group == "default" else self.process_group)
            v.update(self._phase("ladder", self._ladder, flags[0] > 0, ~(flags[1] > 0), v["total"], overflow,
                                 v["mean"], v["std"]))
        skip = ~v["apply"]
        if self._clipping:
            scale_grads_(self._params, v["coef"])
        if self._emb_params:
            emb_norm = segment_norms(per_tensor, self._emb_of, 1)[0]
            scale_grads_(self._emb_params, (self.embedding_max_norm / (emb_norm + _CLIP_EPS)).clamp(max=1.0))

        lr_low = self._host["lr_low"]
        with lowered_lr(self.optimizers, lr_low[0] if lr_low else None):
            for protected in self._steps:
                protected.step(skip)
        if lr_low is not None:
            lr_low[1] -= 1
            if lr_low[1] <= 0:
                self._host["lr_low"] = None
        if self._reset:
            spiked = ((v["spikes"][self._sig["tensors"]:] | ~torch.isfinite(per_tensor)) & v["fault"]
                      & (v["code"] == CODE["reset"]))
            start = 0
            for opt in self.optimizers:
                params = training_state.optimizer_params(opt)
                reset_state(opt, params, spiked[start:start + len(params)])
                start += len(params)

        scale_used = self._no_scale
        if scaler is not None and scaler.is_enabled():
            scale_used = update_scaler(scaler, keep=v["fault"])   # a fault leaves the scale schedule where it was
        record = self._phase("commit", self._commit, v, overflow, scale_used)
        self._queue.append((self.iteration, ids, *records.to_host(record)))
        out.grad_norm, out.skipped = v["total"], skip

    # The step's arithmetic: pure functions of device tensors (plus the guard's own state, updated in place), so
    # that on CUDA torch.compile turns each phase's hundred or so tiny kernels into a few.
    def _phase(self, name: str, fn: Any, *args: Any) -> Any:
        if not self._fuse:
            return fn(*args)
        compiled = self._compiled.get(name)
        if compiled is None:
            compiled = self._compiled[name] = torch.compile(fn, fullgraph=True, dynamic=False)
        try:
            return compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as err:
            # tracing or code generation failed (before anything ran): the same arithmetic, kernel by kernel,
            # from now on (so this warns once)
            warnings.warn(f"StabilityGuard: compiling its per-step statistics failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); they run eagerly (a few hundred "
                          "microseconds per step on a GPU). Pass fuse=False to silence this.",
                          RuntimeWarning, stacklevel=4)
            self._fuse = False
            return fn(*args)

    def _verdict(self, per_tensor: torch.Tensor, loss: torch.Tensor | None, overflow: torch.Tensor) -> dict:
        v = self._detect(per_tensor, loss, overflow)
        v.update(self._ladder(v["fault"], v["clippable"], v["total"], overflow, v["mean"], v["std"]))
        return v

    def _detect(self, per_tensor: torch.Tensor, loss: torch.Tensor | None, overflow: torch.Tensor) -> dict:
        """The signals x = [loss, N, group norms..., tensor norms...], their windows' statistics, the verdict."""
        sig = self._sig
        total = torch.linalg.vector_norm(per_tensor)
        parts = [total.new_full((1,), math.nan) if loss is None else loss.reshape(1), total.reshape(1)]
        if self.per_group:
            parts.append(segment_norms(per_tensor, self._group_of, self._n_groups))
        if self._reset:
            parts.append(per_tensor)
        x = torch.cat(parts)
        mean, std = self._window.stats()
        d = decide(x, mean, std, self._window.count >= self.warmup, self.sigma, self._watched, loss, total,
                   overflow, groups=slice(2, sig["tensors"]) if self.per_group else None)
        return {**d, "local_fault": d["fault"], "total": total, "x": x, "mean": mean, "std": std}

    def _ladder(self, fault: torch.Tensor, clippable: torch.Tensor, total: torch.Tensor, overflow: torch.Tensor,
                mean: torch.Tensor, std: torch.Tensor) -> dict:
        """The rung of this step's run of faults, whether the update applies, and the clip coefficient."""
        run = torch.where(fault, self._run + 1, torch.where(overflow, self._run, torch.zeros_like(self._run)))
        code = torch.where(fault, self._rung_table.index_select(
            0, run.clamp(max=len(self._rung_table) - 1).reshape(1)).reshape(()), torch.zeros_like(run))
        clip_rung = fault & (code == CODE["clip"]) & clippable
        apply = ~overflow & (~fault | clip_rung)
        coef = torch.ones((), device=total.device)
        zclip_clip = torch.zeros((), dtype=torch.bool, device=total.device)
        zclip_thr, zclip_z = total, torch.full((), math.nan, device=total.device)
        if self._clipping:
            limit = torch.full((), math.inf, device=total.device)
            if self.max_norm is not None:
                limit = limit.clamp(max=self.max_norm)
            if self._zclip is not None:
                zclip_clip, zclip_thr, zclip_z = self._zclip.threshold(total)
                limit = torch.where(zclip_clip, torch.minimum(limit, zclip_thr), limit)
            window_thr = mean[1] + self.sigma * std[1]
            limit = torch.where(clip_rung, torch.minimum(limit, window_thr), limit)
            coef = (limit / (total + _CLIP_EPS)).clamp(max=1.0)
            coef = torch.where(torch.isfinite(coef), coef, torch.ones_like(coef))
        return {"fault": fault, "run": run, "code": code, "apply": apply, "coef": coef, "zclip_clip": zclip_clip,
                "zclip_thr": zclip_thr, "zclip_z": zclip_z}

    def _commit(self, v: dict, overflow: torch.Tensor, scale_used: torch.Tensor) -> torch.Tensor:
        """Clean values into the windows and ZClip, the run of faults kept; returns the step's record."""
        fault, apply, x, mean, std = v["fault"], v["apply"], v["x"], v["mean"], v["std"]
        clean = ~fault & ~overflow
        self._window.push(x, clean.expand_as(x))
        if self._zclip is not None:
            self._zclip.update(torch.where(v["zclip_clip"], v["zclip_thr"], v["total"]), clean)
        self._run.copy_(v["run"])
        flags = [v["nonfinite_loss"], v["nonfinite_grad"], v["loss_spike"], v["norm_spike"], v["group_spike"],
                 fault & ~v["local_fault"], overflow, apply, apply & (v["coef"] < 1)]
        return records.pack([v["x"][0], v["total"], mean[0], std[0], mean[1], std[1], scale_used, v["run"], v["code"],
                             v["coef"], v["zclip_z"]], flags, x[2:self._sig["tensors"]] if self.per_group else None)

    # ---- the host side --------------------------------------------------------------------------------
    def _drain(self, upto: int, out: GuardStep | None = None) -> None:
        """Read the records of iterations <= upto: history, events, skip list, scheduler, host rungs."""
        while self._queue and self._queue[0][0] <= upto:
            iteration, ids, host, event = self._queue.popleft()
            rec, ev, r = records.read(iteration, ids, host, event)
            self.history.append(rec)
            if out is not None:
                out.records.append(rec)
            self.counters["applied" if r["applied"] else "skipped"] += 1
            self.counters["overflows"] += r["overflow"]
            self.counters["clipped"] += r["clipped"]
            if r["applied"] and self.scheduler is not None:
                self.scheduler.step()
            if ev is None:
                if not r["overflow"]:
                    self._clean_streak += 1
                    if self._clean_streak >= self.recover_after:
                        self._rollbacks_in_a_row = 0
                continue
            self._clean_streak = 0
            self.counters["faults"] += 1
            self._event(ev, out)
            if not r["applied"]:
                self._add_skips(ids, iteration)
            if ev["action"] in HOST_ACTIONS:
                self._pending.append({"action": ev["action"], "iteration": iteration, "run": ev["run"], "event": ev})

    def _act(self, scaler: Any, batch: Any, out: GuardStep) -> bool:
        """Run the pending host rungs; True when a rollback discarded this iteration."""
        pending, self._pending = self._pending, []
        for item in pending:
            rung = rung_at(self.rungs, item["run"])
            if item["action"] == "lower_lr":
                self._host["lr_low"] = [rung.lr_factor, rung.lr_steps]
            elif item["action"] == "abort":
                raise StabilityAbort(self._abort_message(item, "the ladder's abort rung was reached"))
            elif item["action"] == "rollback":
                if self._rollbacks_in_a_row >= self.max_rollbacks:
                    raise StabilityAbort(self._abort_message(
                        item, f"{self._rollbacks_in_a_row} rollback(s) in a row did not help (max_rollbacks="
                              f"{self.max_rollbacks})"))
                start = item["iteration"] - item["run"] + 1
                snap = self.ring.newest_at_most(start - self.rollback_min_age)
                if snap is None:
                    raise StabilityAbort(self._abort_message(
                        item, f"no snapshot from before iteration {start - self.rollback_min_age} to roll back to "
                              f"(the ring holds iterations {self.ring.iterations()})"))
                self._rollback(snap, scaler, batch, item, out)
                return True
        return False

    def _rollback(self, snap, scaler: Any, batch: Any, item: dict, out: GuardStep) -> None:
        scaler = scaler if scaler is not None else self._scaler
        if scaler is not None and scaler.is_enabled() and any(scaler.found_inf(o) is not None
                                                              for o in self.optimizers):
            scaler.update()   # end the scaler's iteration (its state is restored below)
        saved, host = self.ring.load(snap)
        training_state.restore(saved, host, self._model_ts, self.optimizers, self._scaler_state(scaler),
                               self._guard_tensors(), self.scheduler)
        self._host = copy.deepcopy(host["guard"])
        ids = records.ids_of(batch)
        rolled = [i for i in sorted(self._batches) if i >= snap.iteration]
        lost = [b for i in rolled for b in self._batches[i]] + list(ids)
        for i in rolled:
            self._add_skips(self._batches[i], i)
        self._add_skips(ids, self.iteration)
        self.ring.drop_newer(snap.iteration)
        self._batches = {i: b for i, b in self._batches.items() if i < snap.iteration}
        self._queue.clear()
        self._cache = None
        self._run.zero_()
        self._rollbacks_in_a_row += 1
        self._clean_streak = 0
        self.counters["rollbacks"] += 1
        self._event({"step": self.iteration, "batch": records.show(ids), "cause": item["event"]["cause"],
                     "loss": None, "grad_norm": None, "z_loss": None, "z_grad_norm": None, "loss_scale": None,
                     "action": "restored", "run": item["run"], "to_step": snap.iteration,
                     "rolled_back_batches": lost}, out)
        self.iteration += 1

    def _snapshot(self, scaler: Any) -> None:
        if scaler is not None and scaler.is_enabled():
            self._scaler = scaler
        tensors, host = training_state.gather(self._model_ts, self.optimizers, self._scaler_state(self._scaler),
                                              self._guard_tensors(), self.scheduler, self._host)
        self.ring.take(self.iteration, tensors, host)
        oldest = self.ring.snapshots[0].iteration
        self._batches = {i: b for i, b in self._batches.items() if i >= oldest}
        self._need_snapshot = False

    def _scaler_state(self, scaler: Any) -> dict:
        return scaler.device_state() if scaler is not None and scaler.is_enabled() else {}

    def _guard_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"window.{k}": v for k, v in self._window.tensors().items()}
        if self._zclip is not None:
            out.update({f"zclip.{k}": v for k, v in self._zclip.tensors().items()})
        return out

    def _event(self, ev: dict, out: GuardStep | None) -> None:
        self.events.append(ev)
        if out is not None:
            out.events.append(ev)

    def _add_skips(self, ids: tuple, iteration: int) -> None:
        for i in ids:
            self._skip.setdefault(i, iteration)

    def _abort_message(self, item: dict, why: str) -> str:
        ev = item["event"]
        return (f"StabilityGuard aborted at iteration {self.iteration}: {why}. {item['run']} faulty step(s) in a row "
                f"up to iteration {item['iteration']} (last: {ev['cause']}, loss {ev['loss']:.6g}, gradient norm "
                f"{ev['grad_norm']:.6g}, z {ev['z_loss']} / {ev['z_grad_norm']}, loss scale {ev['loss_scale']}); "
                f"{self.counters['rollbacks']} rollback(s) so far. The faulty steps were not applied. The run is "
                "diverging: lower the learning rate or raise warm-up, check the data of the skipped batches "
                f"({list(self._skip)[-10:]} ...), or resume from an earlier checkpoint.")

    # ---- reading, checkpoints -------------------------------------------------------------------------
    def flush(self) -> None:
        """Read every outstanding step record now (a sync): history, events and skip list up to date."""
        self._drain(self.iteration)

    def is_skipped(self, batch_id: Hashable) -> bool:
        """Whether a batch index or sample id is on the skip list (do not feed it again)."""
        return batch_id in self._skip

    @property
    def skip_list(self) -> list:
        """Batch indices or sample ids of skipped and rolled-back steps, in the order they were added."""
        return list(self._skip)

    def skip_batches(self, ids: Iterable[Hashable]) -> None:
        """Add ids to the skip list by hand (PaLM's restart: resume earlier and skip the batches around a spike)."""
        self._add_skips(tuple(ids), self.iteration)

    @property
    def window(self) -> dict[str, torch.Tensor]:
        """The values in each window, oldest first (host copies; a sync): loss, grad_norm, group_norm.k."""
        rows = self._window.ordered()
        out = {"loss": rows[0], "grad_norm": rows[1]}
        for k in range(self._n_groups if self.per_group else 0):
            out[f"group_norm.{k}"] = rows[2 + k]
        return out

    def state_dict(self) -> dict[str, Any]:
        """Windows, ZClip statistics, ladder state, skip list, events and counters (reads the device: a sync).
        Save it with the checkpoint; snapshots are not in it (a checkpoint is one). Take it before the LR
        scheduler's state_dict(): reading the last step's record steps a scheduler the guard owns."""
        self.flush()
        return {"version": 1, "iteration": self.iteration,
                "tensors": {k: v.detach().cpu().clone() for k, v in self._guard_tensors().items()},
                "run": int(self._run.item()), "skip_list": list(self._skip.items()), "events": list(self.events),
                "pending": list(self._pending), "host": {k: (list(v) if isinstance(v, list) else v)
                                                          for k, v in self._host.items()},
                "rollbacks_in_a_row": self._rollbacks_in_a_row, "clean_streak": self._clean_streak,
                "counters": dict(self.counters)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state_dict(); the snapshot ring starts empty and the next step takes a snapshot."""
        tensors = self._guard_tensors()
        if set(state_dict["tensors"]) != set(tensors):
            raise ValueError(f"the state dict holds {sorted(state_dict['tensors'])}; this guard has {sorted(tensors)} "
                             "(build it with the same per_group, ladder and zclip settings)")
        with torch.no_grad():
            for k, v in state_dict["tensors"].items():
                if v.shape != tensors[k].shape:
                    raise ValueError(f"{k}: saved shape {tuple(v.shape)} differs from this guard's "
                                     f"{tuple(tensors[k].shape)} (window size, groups or parameters changed)")
                tensors[k].copy_(v)
            self._run.fill_(int(state_dict["run"]))
        self.iteration = int(state_dict["iteration"])
        self._skip = dict((records.hashable(k), i) for k, i in state_dict["skip_list"])
        self.events = list(state_dict["events"])
        self._pending = list(state_dict["pending"])
        self._host = {k: (list(v) if isinstance(v, list) else v) for k, v in state_dict["host"].items()}
        self._rollbacks_in_a_row = int(state_dict["rollbacks_in_a_row"])
        self._clean_streak = int(state_dict["clean_streak"])
        self.counters = dict(state_dict["counters"])
        self._queue.clear()
        self._batches = {}
        self._cache = None
        if self.ring is not None:
            self.ring.clear()
        self._need_snapshot = True

    def __repr__(self) -> str:
        ladder = ", ".join(f"{r.action}@{r.after}" for r in self.rungs)
        return (f"StabilityGuard(sigma={self.sigma}, window={self.window_size}, warmup={self.warmup}, "
                f"signals={self.signals}, ladder=[{ladder}], zclip={self.zclip_config}, "
                f"snapshot_every={self.snapshot_every}, iteration={self.iteration})")
