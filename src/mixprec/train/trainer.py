"""The training loop behind `mixprec train` (and each recipe of `mixprec compare`).

One iteration, in the precision a mixprec Policy asks for:

    x, y = batch(seed, step)                      # the data position is the step
    with mp.autocast(policy):  loss = model(x, y)  # GPT: mp.ops.head_cross_entropy (head + loss fused)
                                                  # CNN, RNNs: mp.ops.cross_entropy(model(x), y)
    scaler.scale(loss * task_factor).backward()
    scaler.unscale_(opt); clip_grad_norm_(masters); scaler.step(opt); scaler.update()
    # or, with --guard: guard.step(loss, scaler=scaler, batch=step), which clips with the norm it measures

--guard (guarding.py) puts an mp.StabilityGuard in place of the last line; its events are read at the log
cadence, written to metrics.jsonl as {"event": cause, ...} records and shown on the progress output.
--task faults (faults.py) injects a corrupt batch, a NaN gradient and an LR spike at fixed steps.

No host sync per step: losses stay on the device and are read every `log_every` steps (the progress
bar, metrics.jsonl), so the trainer adds little to the bare loop's time on a GPU. Those reads also catch
a diverged run: a non-finite loss, or every step of the last SKIPPED_IN_A_ROW skipped by the loss
scaler, stops it (Diverged) without saving the diverged state over the last good checkpoint.
SIGINT and SIGTERM finish the step, save a checkpoint and raise Interrupted (stops.py).

Nothing is written into the output directory before run() starts.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import mixprec as mp
from mixprec.stability import StabilityAbort
from mixprec.train import checkpoint, guarding, memory, optimizers
from mixprec.train.config import TrainConfig
from mixprec.train.data import batches_for
from mixprec.train.faults import FaultPlan
from mixprec.train.metrics import MetricsLog
from mixprec.train.models import GPT, build_model
from mixprec.train.progress import Progress
from mixprec.train.stops import Diverged, Interrupted, StopRequests

BETAS = (0.9, 0.95)     # GPT-3 / LLaMA: beta2 0.95 reacts faster than 0.999 on short, noisy runs
ADAM_EPS = 1e-8
MIN_LR_FRACTION = 0.1   # cosine decay to 10 % of the peak (Chinchilla, LLaMA)
FINAL_LOSS_WINDOW = 10  # "final train loss": mean of the last 10 steps, less noisy than the last one
# The default dynamic loss scale (2**16) backs off to 1 in 16 skipped steps: twice that many skipped in a
# row means no scale gives finite gradients, and the run no longer trains.
SKIPPED_IN_A_ROW = 32


@dataclass
class RunSummary:
    """What a finished (or stopped) run measured."""

    config: dict[str, Any]
    steps_done: int
    train_losses: list[float]                        # one per step
    val_curve: list[tuple[int, float]]               # (step, validation loss)
    final_train_loss: float
    final_val_loss: float
    items_per_s: float                               # tokens/s for text models, images/s for the CNN
    item_name: str
    peak_memory_bytes: int
    memory_measure: str
    skipped_steps: int
    final_scale: float | None                        # None: the recipe uses no loss scaling
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)   # one per step, on the task's scale (NaN: none)
    guard_events: list[dict] = field(default_factory=list)  # the stability guard's events (guard.events)
    stopped: str | None = None                               # why the run ended before cfg.steps, if it did


class Trainer:
    """Builds the model, data, optimizer and loss scaler for a TrainConfig, and runs it.

    `resume`: a checkpoint dict (checkpoint.load_checkpoint) to continue from; the state loaded is
    checked against the checkpoint's checksums. `on_step(step)` is called after every completed step
    (tests use it to interrupt). `save_checkpoints=False` writes none (compare). `progress=False` hides
    the progress bar. `stop_on_divergence=False` trains a diverged run to the end (compare, where it is
    a result).
    """

    def __init__(self, cfg: TrainConfig, *, resume: dict[str, Any] | None = None, progress: bool = True,
                 on_step: Callable[[int], None] | None = None, save_checkpoints: bool = True,
                 write_metrics: bool = True, stop_on_divergence: bool = True) -> None:
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device cuda needs a CUDA GPU, but torch {torch.__version__} sees none "
                             f"(torch.cuda.is_available() is False); use --device cpu")
        self.cfg, self.progress, self.on_step = cfg, progress, on_step
        self.save_checkpoints, self.out = save_checkpoints, Path(cfg.out)
        self.write_metrics, self.stop_on_divergence = write_metrics, stop_on_divergence
        self.checkpoints = checkpoint.CheckpointWriter(self.out)
        self.device = torch.device(cfg.device)
        self.policy = cfg.precision_policy()
        # On CUDA the table's op rows ride on torch.autocast's own lists: the models here use none of
        # mp.autocast's CUDA_AUTOCAST_EXCEPTIONS (the losses are mixprec.ops'), and the function mode's
        # Python per op costs host time an eager GPU loop can be bound by (benchmarks/results/train.md).
        self.op_rules = "autocast" if self.device.type == "cuda" and not mp.rules.user_op_rules() else "intercept"
        model_cfg = cfg.model_config()
        self.data = batches_for(cfg.model, batch_size=cfg.batch_size, seq_len=getattr(model_cfg, "seq_len", 1),
                                seed=cfg.seed)
        self.val_batches = [(x.to(self.device), y.to(self.device)) for x, y in self.data.val_batches(cfg.eval_batches)]
        self.item_name = "images" if cfg.model == "cnn" else "tokens"

        torch.manual_seed(cfg.seed)  # the same initial weights for every recipe
        self.model = mp.prepare(build_model(model_cfg).to(self.device), self.policy)
        guarding.shrink_embedding(cfg, self.model)
        # the compiled module runs the steps; the model itself keeps the parameters and the state_dict keys
        self.forward_model = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = self._build_optimizer()
        self.clip_params = list(mp.master_params(self.optimizer))
        self.scaler = mp.LossScaler.for_policy(self.policy)
        self.guard = guarding.build_guard(cfg, self.model, self.optimizer)
        self.faults = FaultPlan.for_steps(cfg.steps) if cfg.task == "faults" else None
        self.grad_norms: list[float] = []
        self._step_figures: list[tuple[torch.Tensor, torch.Tensor]] = []   # (grad norm, skipped) per step, on device
        self._not_skipped = torch.zeros((), dtype=torch.bool, device=self.device)   # read-only, made once
        self._guard_skipped = self._events_seen = 0
        self.stopped: str | None = None

        self.step = 0
        self.train_losses: list[float] = []
        self.val_curve: list[tuple[int, float]] = []
        self._windows: list[tuple[int, float]] = []     # (items, seconds) per log window
        self.validation_seconds = 0.0                    # wall time spent in validate() so far
        self._state_bytes = self._activation_bytes = 0
        self._resumed = resume is not None
        self._saved: tuple[Path, int] | None = None      # the last checkpoint known to be on disk: (path, step)
        self._pending: tuple[Path, int] | None = None    # a checkpoint being written in the background
        self._skipped_seen = self._skipped_in_a_row = 0
        self.metrics: MetricsLog | None = None
        if resume is not None:
            self.load_state_dict(resume)

    # ---- construction --------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        # weight decay on matrices (and embeddings), not on norm gains and biases (GPT-2, LLaMA)
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return optimizers.build_optimizer(groups, optim=self.cfg.optim, rounding=self.cfg.rounding,
                                          policy=self.policy, device=self.device, lr=self.cfg.lr, betas=BETAS,
                                          eps=ADAM_EPS * self.cfg.loss_factor, seed=self.cfg.seed)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to MIN_LR_FRACTION of the peak."""
        cfg, warmup = self.cfg, self.cfg.warmup_steps
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))

    # ---- one step ------------------------------------------------------------------------------
    def autocast(self):
        return mp.autocast(self.policy, device_type=self.device.type, op_rules=self.op_rules)

    def loss_on(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of a batch (mean or sum over its targets) under the policy's autocast, in FP32:
        the GPT's fused head + loss, or mp.ops.cross_entropy on the other models' logits."""
        with self.autocast():
            if isinstance(self.model, GPT):
                return self.forward_model(x, y, reduction=reduction)
            logits = self.forward_model(x)
            return mp.ops.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction=reduction)

    def train_step(self, step: int, *, count_memory: bool = False) -> torch.Tensor:
        """One optimizer step on batch `step`; returns the (unscaled) loss as a device tensor."""
        x, y = (t.to(self.device, non_blocking=True) for t in self.data.train_batch(step))
        lr = self.lr_at(step) * (self.faults.lr_multiplier(step) if self.faults else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if count_memory:
            excluded = {memory._storage_key(p) for p in self.model.parameters()}
            with memory.count_saved_activations(excluded) as saved:
                loss = self.loss_on(x, y)
            self._activation_bytes = saved[0]
        else:
            loss = self.loss_on(x, y)
        if self.faults is not None:
            loss = loss * self.faults.loss_multiplier(step)
        objective = loss * self.cfg.loss_factor if self.cfg.loss_factor != 1.0 else loss
        self.scaler.scale(objective).backward()
        if self.faults is not None:
            self.faults.poison_grads(step, self.model)
        if self.guard is None:
            self.scaler.unscale_(self.optimizer)
            norm, skipped = self._clip_gradients(), self._not_skipped
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            norm, skipped = guarding.step_figures(self.guard.step(loss, scaler=self.scaler, batch=step), self.device)
            norm = norm / self.cfg.loss_factor
        self._step_figures.append((norm.detach().float(), skipped))
        if count_memory:
            self._state_bytes = memory.state_bytes(self.model, self.optimizer)[0]
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the global norm to cfg.grad_clip, measured on the task's scale: under the small-gradient
        task the norm is divided by the loss factor (a power of 2, exact), so clipping acts exactly as
        in the default task (torch's clip adds 1e-6 to the norm, which a tiny norm would notice). Returns the
        norm before clipping, on the task's scale (a device tensor)."""
        grads = [p.grad for p in self.clip_params if p.grad is not None]
        if not grads:
            return torch.full((), math.nan, device=self.device)
        norm = torch.nn.utils.get_total_norm(grads) / self.cfg.loss_factor
        torch.nn.utils.clip_grads_with_norm_(self.clip_params, self.cfg.grad_clip, norm)
        # sharded gradients (FSDP2) give a DTensor norm: the log reads the global value
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @torch.no_grad()
    def validate(self) -> float:
        """Mean validation loss over the fixed validation batches."""
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        for x, y in self.val_batches:
            total += self.loss_on(x, y, reduction="sum")
            count += y.numel()
        self.model.train()
        return float(total) / count

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Train from the current step to cfg.steps. SIGINT or SIGTERM finishes the step, saves a
        checkpoint and raises Interrupted; a divergence raises Diverged (see the module docstring)."""
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.model.train()
        self._open_outputs()
        self._skipped_seen = self._skipped_total()
        bar = Progress(total=self.cfg.steps, initial=self.step, desc=f"{self.cfg.model} {self.cfg.recipe}",
                       enabled=self.progress)
        stops = StopRequests()
        try:
            with stops:
                try:
                    self._loop(stops, bar)
                except Interrupted as stopped:
                    if stopped.step is None:   # a second signal stopped the loop at once, from its handler;
                        with stops.saving():   # a third must not cut short the wait for a write in flight
                            raise Interrupted(stopped.signum, step=self.step, **self._checkpoint_fields()) from None
                    raise
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        return self.summary(time.perf_counter() - start)

    def _loop(self, stops: StopRequests, bar: Progress) -> None:
        cfg, first_step = self.cfg, self.step
        window: list[torch.Tensor] = []
        window_start = time.perf_counter()
        while self.step < cfg.steps:
            count_memory = self.device.type == "cpu" and not self._state_bytes
            try:
                window.append(self.train_step(self.step, count_memory=count_memory))
            except StabilityAbort as abort:   # the guard gave up on the run: it cannot train on
                self._stop_on_abort(abort, window, window_start, bar)
                return
            self.step += 1
            if self.step == first_step + 1 and self.step < cfg.steps and self.device.type == "cuda":
                # the peak of training, not of the first step's one-time work: Triton's autotuning
                # (the FP8 kernels) allocates a 256 MB scratch buffer to flush the L2 cache
                torch.cuda.reset_peak_memory_stats(self.device)
            if self.on_step is not None:
                self.on_step(self.step)
            last, stop = self.step == cfg.steps, self._stop_requested(stops)
            checkpoint_now = self.save_checkpoints and (
                last or stop or bool(cfg.ckpt_every) and self.step % cfg.ckpt_every == 0)
            # a checkpoint ends the log window: its losses are checked before the state is saved
            if self.step % cfg.log_every == 0 or last or stop or checkpoint_now:
                self._check(self._end_window(window, window_start, bar))
                window, window_start = [], time.perf_counter()
            bar.update(1)
            validate = self.step % cfg.eval_every == 0 or last
            if not (validate or checkpoint_now or stop):
                continue
            # validation and checkpoints are not training time; the steps still queued on the GPU are
            self._synchronize()
            paused = time.perf_counter()
            if validate:
                self._record_validation(bar)
            if checkpoint_now:
                self._check(self._nonfinite_parameters())
                with stops.saving():
                    self.save()
                    if last or stop:
                        self._checkpoint_on_disk()   # on disk before we say so
            if stop:
                raise Interrupted(stops.signum, step=self.step, saved_now=self.save_checkpoints,
                                  **self._checkpoint_fields())
            window_start += time.perf_counter() - paused

    def _stop_on_abort(self, abort: StabilityAbort, window: list[torch.Tensor], window_start: float, bar) -> None:
        """Diverged (train); or, where a diverged run is a result (compare), end the run here and validate."""
        if window:
            self._end_window(window, window_start, bar)
        self._check(f"the stability guard gave up: {abort}")
        self.stopped = f"stopped at step {self.step}: the stability guard gave up"
        bar.write(self.stopped)
        self._record_validation(bar)

    def _stop_requested(self, stops: StopRequests) -> bool:
        """Whether a signal asked the run to stop (data parallelism agrees on it across ranks)."""
        return stops.signum is not None

    def _open_outputs(self) -> None:
        """config.json and metrics.jsonl (a resumed run keeps its records up to the resumed step)."""
        if not self.write_metrics:
            return
        self.metrics = MetricsLog(self.out, resume_step=self.step if self._resumed else None)
        (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")

    def _check(self, problem: str | None) -> None:
        """Stop a diverged run (unless told to train on): the last good checkpoint stays as it is."""
        if problem is not None and self.stop_on_divergence:
            raise Diverged(problem, step=self.step, **self._checkpoint_fields())

    def _checkpoint_on_disk(self) -> tuple[Path, int] | None:
        """The last checkpoint written in full, waiting for a background write still running."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.checkpoints.wait()
            self._saved = pending
        return self._saved

    def _checkpoint_fields(self) -> dict[str, Any]:
        try:
            saved = self._checkpoint_on_disk()
        except OSError:   # the write in flight failed: the checkpoint before it is the last one
            saved = self._saved
        return {"checkpoint": saved[0] if saved else None, "checkpoint_step": saved[1] if saved else None}

    def _nonfinite_parameters(self) -> str | None:
        """A finite loss can follow the step that made parameters inf or NaN: check before saving them."""
        tensors = {id(p): p for p in (*self.model.parameters(), *self.clip_params)}.values()
        if bool(torch.stack([torch.isfinite(p).all() for p in tensors]).all()):
            return None
        return f"some parameters are inf or NaN after step {self.step}"

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _end_window(self, window: list[torch.Tensor], window_start: float, bar) -> str | None:
        """Record the window's losses and rate; returns what diverged, if the run did (else None)."""
        losses, norms, skips = self._read_window(window)  # the one host sync per log window
        seconds = time.perf_counter() - window_start  # after the sync: the GPU's queued steps count too
        self.train_losses.extend(losses)
        self.grad_norms.extend(norms)
        self._guard_skipped += sum(skips)
        items = len(window) * self.cfg.batch_size * (self.data.seq_len if self.item_name == "tokens" else 1)
        self._windows.append((items, seconds))
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        rate = items / seconds
        finite_norms = [n for n in norms if math.isfinite(n)]
        record = {"step": self.step, "train_loss": sum(losses) / len(losses), f"{self.item_name}_per_s": rate,
                  "lr": self.lr_at(self.step - 1), "loss_scale": scale, "skipped_steps": self._skipped_total(),
                  "grad_norm": sum(finite_norms) / len(finite_norms) if finite_norms else math.nan,
                  "grad_norm_max": max(norms, key=lambda n: n if math.isfinite(n) else math.inf)}
        fields = {"loss": f"{record['train_loss']:.3f}", "grad norm": f"{record['grad_norm']:.3g}",
                  f"{self.item_name}/s": f"{rate:,.0f}", "scale": "-" if scale is None else f"{scale:g}"}
        if self.guard is not None:
            record["guard_events"] = self._log_guard_events(bar)
            fields.update(skipped=str(record["skipped_steps"]), events=str(record["guard_events"]))
        if self.metrics is not None:
            self.metrics.write(record)
        bar.set_fields(fields)
        # a step the guard skipped may have a non-finite loss: that is the guard at work, not divergence
        bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss) and not skips[i]), None)
        if bad is not None:
            return f"the training loss is {losses[bad]} at step {self.step - len(losses) + bad + 1}"
        skipped = record["skipped_steps"]
        all_skipped = skipped - self._skipped_seen == len(window)
        self._skipped_seen = skipped
        self._skipped_in_a_row = self._skipped_in_a_row + len(window) if all_skipped else 0
        if self._skipped_in_a_row >= SKIPPED_IN_A_ROW:
            if self.guard is not None:
                return (f"the stability guard (--guard {self.cfg.guard}) skipped each of the last "
                        f"{self._skipped_in_a_row} steps: the loss stays far above its window; --guard rollback "
                        f"restores a snapshot from before the damage")
            return (f"the loss scaler skipped each of the last {self._skipped_in_a_row} steps (loss scale now "
                    f"{scale:g}): the gradients are inf or NaN at every scale")
        return None

    def _read_window(self, window: list[torch.Tensor]) -> tuple[list[float], list[float], list[bool]]:
        """The window's losses, gradient norms and skipped flags, read in one transfer."""
        figures, self._step_figures = self._step_figures, []
        rows = [torch.stack(window).float()]
        if len(figures) == len(window):
            rows += [torch.stack([f[0] for f in figures]).to(self.device), torch.stack([f[1] for f in figures]).float()]
        host = torch.stack(rows).cpu().tolist()
        if len(host) == 1:
            return host[0], [math.nan] * len(window), [False] * len(window)
        return host[0], host[1], [bool(v) for v in host[2]]

    def _skipped_total(self) -> int:
        """Steps not applied so far: the guard's skips (its own and the loss scaler's), else the scaler's."""
        if self.guard is not None:
            return self._guard_skipped
        return self.scaler.num_skipped_steps if self.scaler.is_enabled() else 0

    def _log_guard_events(self, bar) -> int:
        """Write the guard's new events to metrics.jsonl and the progress output; returns the count so far."""
        self.guard.flush()   # the last step's record: this window already synchronised
        for event in self.guard.events[self._events_seen:]:
            if self.metrics is not None:
                record = guarding.event_record(event)
                if self.cfg.diagnose_events and isinstance(event.get("batch"), int):
                    batch = tuple(t.to(self.device) for t in self.data.train_batch(event["batch"]))
                    record["diagnosis"] = guarding.diagnose_event(self.model, batch)
                self.metrics.write(record, scalars=False)
            bar.write(guarding.describe_event(event))
        self._events_seen = len(self.guard.events)
        return self._events_seen

    def throughput(self) -> float:
        """Items per second of training steps, leaving out the first log window (warm-up) when there
        are others; validation and checkpoint time are not counted."""
        windows = self._windows[1:] if len(self._windows) > 1 else self._windows
        seconds = sum(s for _, s in windows)
        return sum(n for n, _ in windows) / seconds if seconds else float("nan")

    def _record_validation(self, bar) -> None:
        start = time.perf_counter()
        val = self.validate()
        self.validation_seconds += time.perf_counter() - start
        self.val_curve.append((self.step, val))
        if self.metrics is not None:
            self.metrics.write({"step": self.step, "val_loss": val})
        bar.write(f"step {self.step}: validation loss {val:.4f}")
        self._check(None if math.isfinite(val) else f"the validation loss is {val} at step {self.step}")

    def summary(self, seconds: float = 0.0) -> RunSummary:
        """The run so far (also after a divergence or a signal stopped it)."""
        n = min(FINAL_LOSS_WINDOW, len(self.train_losses))
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            how = "torch.cuda.max_memory_allocated after the first step"
        else:
            peak, how = self._state_bytes + self._activation_bytes, "counted: params+grads+optimizer+saved activations"
        return RunSummary(
            config=self.cfg.to_dict(), steps_done=self.step, train_losses=list(self.train_losses),
            val_curve=list(self.val_curve),
            final_train_loss=sum(self.train_losses[-n:]) / n if n else float("nan"),
            final_val_loss=self.val_curve[-1][1] if self.val_curve else float("nan"),
            items_per_s=self.throughput(),
            item_name=self.item_name, peak_memory_bytes=peak, memory_measure=how,
            skipped_steps=self._skipped_total(),
            final_scale=self.scaler.get_scale() if self.scaler.is_enabled() else None, seconds=seconds,
            grad_norms=list(self.grad_norms), guard_events=list(self.guard.events) if self.guard else [],
            stopped=self.stopped)

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "step": self.step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": checkpoint.rng_state(), "train_losses": self.train_losses, "val_curve": self.val_curve,
                "grad_norms": self.grad_norms, **self._guard_state()}

    def _guard_state(self) -> dict[str, Any]:
        if self.guard is None:
            return {}
        return {"guard": self.guard.state_dict(), "guard_skipped": self._guard_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`. With the checkpoint's checksums, checks that the model, optimizer and
        scaler now hold what was saved (a DamagedCheckpoint, a ValueError, if not)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.train_losses = list(state["train_losses"])
        self.val_curve = [tuple(v) for v in state["val_curve"]]
        self.grad_norms = list(state.get("grad_norms", [math.nan] * len(self.train_losses)))
        if self.guard is not None:   # resumed_config made sure the checkpoint's run had the same guard
            self.guard.load_state_dict(state["guard"])
            self._guard_skipped, self._events_seen = int(state["guard_skipped"]), len(self.guard.events)
        saved = state.get("checksums", {})
        for part, loaded in (("model", self.model), ("optimizer", self.optimizer), ("scaler", self.scaler)):
            if part in saved and checkpoint.checksum(loaded.state_dict()) != saved[part]:
                raise checkpoint.DamagedCheckpoint(
                    f"the {part} state loaded from the checkpoint of step {self.step} differs from the one saved "
                    f"(its checksum does not match): this checkpoint cannot resume the run")

    @property
    def checkpoint_file(self) -> Path:
        """Where the latest checkpoint of this run is (or will be)."""
        return checkpoint.checkpoint_path(self.out)

    def save(self) -> Path | None:
        """Checkpoint into the output directory (unless checkpoints are off): the state is copied now
        and written atomically in the background; `self.checkpoints.wait()` waits for the write."""
        if not self.save_checkpoints:
            return None
        if self._pending is not None:   # save() waits for the previous write: it is on disk now
            self.checkpoints.wait()
            self._saved, self._pending = self._pending, None
        path = self.checkpoints.save(self.state_dict())
        self._pending = (path, self.step)
        return path
