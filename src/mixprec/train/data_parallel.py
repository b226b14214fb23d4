"""`mixprec train --nproc N [--dp ddp|fsdp2]`: the same run as N data-parallel ranks on this machine.

The command first runs as one process, the launcher: it checks everything a single-process run checks,
then what only data parallelism asks (the global batch splits evenly over N ranks, N GPUs for --device
cuda), and re-runs the same command line as N ranks through torch.distributed.run
(mixprec.distributed.launch). Each rank builds a DataParallelTrainer, a Trainer that

    joins the ranks (init_ranks): gloo on the CPU, nccl on cuda:LOCAL_RANK
    builds the model and policy as one process does, then wraps it: DDP after mp.prepare (gradients
        averaged in FP32 by its reduction hook), or FSDP2 (mixprec.distributed.shard_model), and builds
        the optimizer over the wrapped model's parameters
    scales losses with mixprec.distributed.loss_scaler: every rank skips the steps any rank overflowed
    trains on its own contiguous slice of each global batch (--batch-size stays the global batch)
    averages the losses over the ranks once per log window, and validates on its part of each
        validation batch (sums and counts added over the ranks)
    agrees on a stop signal after every step (one all-reduce of an int on the CPU: no device sync), so
        that all ranks stop after the same step and save it together
    writes OUT/checkpoint.dcp with torch.distributed.checkpoint (each rank its shards; the checkpoint
        before becomes OUT/checkpoint.prev.dcp); rank 0 alone writes metrics, TensorBoard, config.json,
        progress and messages (the other ranks' stdout and stderr go to /dev/null, tracebacks excepted)

The loss trajectory is one process's on the same global batch up to rounding (tests/tolerances.py), except
where a model normalizes over the batch: the CNN's BatchNorm uses each rank's slice, as DDP does by default.

`--resume OUT` continues on the checkpoint's number of ranks and --dp unless they are given: DCP
reshards model and optimizer onto another number of ranks or the other --dp. No random generator is
saved: the batches are a function of (seed, step) and the models draw no random numbers while training.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import mixprec as mp
import mixprec.distributed as mpd
from mixprec.train.config import TrainConfig
from mixprec.train.stops import Diverged, Interrupted
from mixprec.train.trainer import RunSummary, Trainer

CHECKPOINT_DIR = "checkpoint.dcp"
PREVIOUS_DIR = "checkpoint.prev.dcp"
_WRITING_DIR = ".checkpoint.dcp.tmp"
# torchrun's agent catches these while the ranks run and forwards them; its handlers are undone afterwards
_AGENT_SIGNALS = tuple(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, s))


# ---- the launcher --------------------------------------------------------------------------------
def in_rank() -> bool:
    """True inside a process that torch.distributed.run started."""
    return dist.is_available() and dist.is_torchelastic_launched()


def holds_run(directory: str | Path) -> bool:
    """Whether `directory` holds a checkpoint of a run over several processes."""
    return any((Path(directory) / d / ".metadata").is_file() for d in (CHECKPOINT_DIR, PREVIOUS_DIR))


def requested(args: argparse.Namespace, state: dict[str, Any] | None) -> bool:
    """--nproc other than 1, --dp, --resume of a run over several processes (`state` from read_state), or a
    process torchrun started (a rank of such a run)."""
    resumes_ranks = state is not None and "nproc" in state
    return args.nproc not in (None, 1) or args.dp is not None or resumes_ranks or in_rank()


def read_state(directory: str | Path, warn=None) -> dict[str, Any]:
    """What a distributed checkpoint in `directory` says about its run: config, step, nproc, dp (and the
    path it is in). Falls back to the previous checkpoint when the latest one is incomplete."""
    import torch.distributed.checkpoint as dcp
    directory = Path(directory)
    latest, previous = directory / CHECKPOINT_DIR, directory / PREVIOUS_DIR
    path = latest if (latest / ".metadata").is_file() else previous
    if path is previous and warn is not None:
        warn(f"{latest} is missing or incomplete; using the previous checkpoint, {previous}")
    state = {"extra": ""}
    with warnings.catch_warnings():   # DCP warns that it loads in one process: that is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)   # the JSON entry alone, in any process
    return {**json.loads(state["extra"]), "path": str(path)}


@dataclass
class Launch:
    """The launcher's job: start `nproc` ranks running `argv` (mixprec's own command line)."""

    nproc: int
    dp: str
    cfg: TrainConfig
    argv: list[str]
    overwrite: bool

    def start(self) -> int:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        from mixprec.train.outputs import clear_run
        if self.overwrite:   # here, before the ranks start: they must not race each other to clear OUT
            clear_run(self.cfg.out)
        backend = "nccl" if self.cfg.device == "cuda" else "gloo"
        print(f"mixprec train: {self.nproc} process{'es' if self.nproc > 1 else ''} ({self.dp}, {backend}), "
              f"{self.cfg.batch_size // self.nproc} of the global batch of {self.cfg.batch_size} each", flush=True)
        handlers = {s: signal.getsignal(s) for s in _AGENT_SIGNALS}
        try:
            # "--": torchrun's parser would take mixprec's --nproc for an abbreviation of its own options
            code = mpd.launch(self.nproc, ["-m", "--", "mixprec", *self.argv])
        except SignalException as e:   # the agent forwarded it and waited for the ranks to save and stop
            return 128 + int(e.sigval)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        return 128 - code if code < 0 else code   # a rank killed by a signal: the shell's 128 + its number


def setup(cfg: TrainConfig, args: argparse.Namespace, state: dict[str, Any] | None):
    """In the launcher: the checks data parallelism adds, and the Launch (ValueError for a mistake). In a
    rank: this rank's DataParallelTrainer."""
    resumed = state is not None and "nproc" in state
    if state is not None and not resumed:
        raise ValueError(f"--resume {args.resume} holds a single-process run (checkpoint.pt): resume it without "
                         f"--nproc/--dp, or start a fresh run over several processes with another --out")
    nproc = args.nproc if args.nproc is not None else state["nproc"] if resumed else 1
    dp = args.dp if args.dp is not None else state["dp"] if resumed else "ddp"
    if in_rank():
        return _rank_trainer(cfg, args, dp, state["path"] if resumed else None)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer (processes to start); got {nproc}")
    if nproc == 1 and not resumed:
        raise ValueError("--dp applies to runs over several processes: give --nproc 2 or more")
    if dp not in mpd.DATA_PARALLEL:
        raise ValueError(f"Unknown --dp {dp!r}; choose one of: {', '.join(mpd.DATA_PARALLEL)}")
    mpd.per_rank_batch(cfg.batch_size, nproc)
    if cfg.device == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} with --device cuda needs a GPU per process; this machine shows "
                         f"{torch.cuda.device_count()}: give --nproc {torch.cuda.device_count()} or less")
    if cfg.guard != "off" or cfg.embedding_grad_shrink is not None:
        raise ValueError(f"--guard and --embedding-grad-shrink train in one process for now; drop them or --nproc "
                         f"(got --guard {cfg.guard} with --nproc {nproc})")
    policy = cfg.precision_policy()
    if policy.master_weights:
        raise ValueError(f"recipe {cfg.recipe} keeps FP32 master weights (mp.MasterWeights), which distributed "
                         f"checkpoints do not hold; use fp16-mixed over several processes, or train it in one")
    if policy.converters and not resumed and not args.allow_no_fp8:
        # the single-process check, on a CPU copy of the model: the launcher holds no GPU memory while ranks run
        from mixprec.train.fp8_coverage import refuse_no_conversion
        from mixprec.train.models import build_model
        refuse_no_conversion(cfg, policy, mp.prepare(build_model(cfg.model_config()), policy))
    return Launch(nproc, dp, cfg, list(args.argv), bool(args.overwrite))


# ---- a rank --------------------------------------------------------------------------------------
def _rank_trainer(cfg: TrainConfig, args: argparse.Namespace, dp: str, resume: str | None) -> "DataParallelTrainer":
    ranks = mpd.init_ranks(cfg.device)
    if not ranks.is_main:   # rank 0 speaks for the run; another rank's crash still shows its traceback
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)
    args.overwrite = False   # the launcher cleared OUT before starting the ranks
    return DataParallelTrainer(cfg, ranks, dp, resume=resume, progress=not args.quiet)


class _RankSlices:
    """The run's batches, each cut to this rank's contiguous slice (mixprec.distributed.rank_slice)."""

    def __init__(self, data) -> None:
        self.data = data

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.train_batch(step)
        return mpd.rank_slice(x), mpd.rank_slice(y)

    def __getattr__(self, name: str):
        return getattr(self.data, name)


class DataParallelTrainer(Trainer):
    """A Trainer on one of several ranks (see the module docstring). `resume`: a distributed checkpoint."""

    def __init__(self, cfg: TrainConfig, ranks: mpd.Ranks, dp: str, *, resume: str | Path | None = None,
                 progress: bool = True) -> None:
        self.ranks, self.dp = ranks, dp
        super().__init__(cfg, progress=progress and ranks.is_main, write_metrics=ranks.is_main)
        # the stop flag and the checkpoint barriers travel on the CPU: agreeing costs no device sync
        self.cpu_group = None if ranks.backend == "gloo" else dist.new_group(backend="gloo")
        self.data = _RankSlices(self.data)
        # validation batches need not split evenly (the CNN's last one): near-equal parts, sums added
        self.val_batches = [(x.tensor_split(ranks.world_size)[ranks.rank], y.tensor_split(ranks.world_size)[ranks.rank])
                            for x, y in self.val_batches]
        wrapped = mpd.parallelize(self.model, self.policy, dp)   # DDP's wrapper, or the model sharded in place
        if dp == "fsdp2":   # FSDP2 replaced the parameters: the optimizer must hold the sharded ones
            # FSDP2 warns of views returned by modules (the heads' reshaped logits) in case they are modified
            # in place, which would skip its backward hook; the losses here read them out of place
            warnings.filterwarnings("ignore", message=".*returned a view tensor", category=UserWarning)
            self.optimizer = self._build_optimizer()
            self.clip_params = list(mp.master_params(self.optimizer))
        self.forward_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.scaler = mpd.loss_scaler(self.policy, dp)
        if resume is not None:
            self.load(resume)

    @property
    def checkpoint_file(self) -> Path:
        return self.out / CHECKPOINT_DIR

    def run(self) -> RunSummary:
        """Trainer.run, then leave the process group (NCCL warns at exit otherwise)."""
        try:
            summary = super().run()
        except (Interrupted, Diverged):   # every rank stopped after the same step: they leave together
            mpd.close_ranks()
            raise
        mpd.close_ranks()
        return summary

    # ---- agreement across ranks --------------------------------------------------------------------
    def _stop_requested(self, stops) -> bool:
        flag = torch.tensor([stops.signum or 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.cpu_group)
        agreed = int(flag.item())
        if agreed and stops.signum is None:   # another rank got the signal: stop with it
            stops.signum = agreed
        # the agreed flag, not stops.signum again: a signal landing after the all-reduce would make this rank
        # stop (and save, alone) a step before the others; the next step's all-reduce carries it to every rank
        return agreed != 0

    def _end_window(self, window: list[torch.Tensor], window_start: float, bar) -> str | None:
        # each rank's loss is the mean over its slice; slices are equal, so their mean is the global batch's
        losses = torch.stack(window).float()
        dist.all_reduce(losses)
        return super()._end_window(list((losses / self.ranks.world_size).unbind()), window_start, bar)

    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)   # loss sum, target count
        for x, y in self.val_batches:
            total[0] += self.loss_on(x, y, reduction="sum")
            total[1] += y.numel()
        self.model.train()
        dist.all_reduce(total)
        return float(total[0] / total[1])

    def _nonfinite_parameters(self) -> str | None:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]   # FSDP2's shards
        bad = torch.stack([~torch.isfinite(t).all() for t in local]).any().to(torch.int32).reshape(1).cpu()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return f"some parameters are inf or NaN after step {self.step}" if bad.item() else None

    # ---- distributed checkpoints -------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write OUT/checkpoint.dcp (every rank its shards, synchronously); the one before becomes
        OUT/checkpoint.prev.dcp. Written into a temporary directory first and renamed by rank 0, so the
        latest checkpoint is always a whole one."""
        if not self.save_checkpoints:
            return None
        writing, latest, previous = self.out / _WRITING_DIR, self.out / CHECKPOINT_DIR, self.out / PREVIOUS_DIR
        if self.ranks.is_main:
            shutil.rmtree(writing, ignore_errors=True)   # left by a run that stopped mid-write
            writing.mkdir(parents=True)
        dist.barrier(group=self.cpu_group)
        extra = {"config": self.cfg.to_dict(), "step": self.step, "train_losses": self.train_losses,
                 "val_curve": self.val_curve, "nproc": self.ranks.world_size, "dp": self.dp}
        mpd.save_checkpoint(writing, self.model, self.optimizer, extra=extra,
                            scaler=self.scaler if self.scaler.is_enabled() else None)
        dist.barrier(group=self.cpu_group)
        if self.ranks.is_main:
            if latest.exists():
                shutil.rmtree(previous, ignore_errors=True)
                os.replace(latest, previous)
            os.replace(writing, latest)
        dist.barrier(group=self.cpu_group)   # on disk before any rank says so
        self._saved = (latest, self.step)
        return latest

    def load(self, path: str | Path) -> None:
        """Continue from the distributed checkpoint in `path` (any number of ranks, either --dp)."""
        extra = mpd.load_checkpoint(path, self.model, self.optimizer,
                                    scaler=self.scaler if self.scaler.is_enabled() else None)
        self.step = int(extra["step"])
        self.train_losses = list(extra["train_losses"])
        self.val_curve = [tuple(v) for v in extra["val_curve"]]
        self._resumed = True
