"""`mixprec diagnose`: mp.diagnose on a built-in model and one real batch of its embedded data; and the
diagnosis at several batch sizes that `mixprec compare --batch-sizes` prints.

    model  = build_model(sizes) after torch.manual_seed(seed)     the initial weights `train --seed` starts from
    x, y   = batches_for(model, batch_size, seq_len, seed).train_batch(0)     train's first batch
    loss   = mp.ops.cross_entropy(model(x) flattened, y)          the GPT's head runs as a module, so it is diagnosed
    run_cli_diagnosis(model, (x, y), loss, out, policy=recipe, loss_scale=scale)

The pair setup_diagnose / diagnose follows commands.py's convention: the set-up checks everything and
writes nothing, raising ValueError (one line) for a mistake the user can fix; the work prints and
returns the exit code.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import mixprec as mp
from mixprec.train.config import TrainConfig

# the flags of `diagnose` that TrainConfig checks as `train` does (the model, its sizes, the batch)
_CONFIG_FLAGS = ("model", "batch_size", "seed", "device")


def loss_on_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the built-in models' logits (batch[, time], classes), as the trainer computes it."""
    return mp.ops.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def model_and_batch(cfg: TrainConfig, batch_size: int | None = None) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """cfg's model at its initial weights and the first training batch (of `batch_size`, default cfg's),
    on cfg's device."""
    from mixprec.train.data import batches_for
    from mixprec.train.models import build_model

    device = torch.device(cfg.device)
    data = batches_for(cfg.model, batch_size=batch_size or cfg.batch_size, seq_len=cfg.seq_len_or_default,
                       seed=cfg.seed)
    x, y = (t.to(device) for t in data.train_batch(0))
    torch.manual_seed(cfg.seed)   # the weights the Trainer builds for this seed
    return build_model(cfg.model_config()).to(device), (x, y)


def diagnose_batch_sizes(cfg: TrainConfig, batch_sizes: list[int]) -> dict[str, Any]:
    """The FP32 ranges of cfg's model at its initial weights on the first batch of each size, keyed
    "batch <b>": the same weights each time, so only the batch moves them (describe_range_shifts)."""
    reports = {}
    for b in batch_sizes:
        model, batch = model_and_batch(cfg, b)
        # ranges only: no policy (no SQNR) and no FP8 what-if scaling, the slow parts
        reports[f"batch {b}"] = mp.diagnose(model, batch, loss_on_logits, fp8_scaling=False)
    return reports


# ---- the command ---------------------------------------------------------------------------------
def trained_model_and_batch(run: str | Path, device: str | None) -> tuple[TrainConfig, nn.Module,
                                                                           tuple[torch.Tensor, ...], int]:
    """A `mixprec train` run's model at its checkpoint's weights and the batch it would train on next
    (batch number `step`), on `device` (default the run's); returns (config, model, batch, step)."""
    import sys

    from mixprec.train.checkpoint import load_checkpoint
    from mixprec.train.config import resumed_config
    from mixprec.train.data import batches_for
    from mixprec.train.data_parallel import holds_run
    from mixprec.train.models import build_model

    if holds_run(run):
        raise ValueError(f"--run {run} holds a run over several processes (checkpoint.dcp); diagnose reads a "
                         f"single-process run's checkpoint.pt")
    state = load_checkpoint(run, warn=lambda line: print(f"mixprec diagnose: warning: {line}", file=sys.stderr))
    cfg = resumed_config(state["config"], {"device": device} if device else {}, str(run))
    model = build_model(cfg.model_config())
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()})
    data = batches_for(cfg.model, batch_size=cfg.batch_size, seq_len=cfg.seq_len_or_default, seed=cfg.seed)
    x, y = (t.to(cfg.device) for t in data.train_batch(state["step"]))
    return cfg, model.to(cfg.device), (x, y), state["step"]


@dataclass
class DiagnoseJob:
    cfg: TrainConfig                      # model, sizes, batch size, seed, device (its recipe is not used)
    model: nn.Module
    batch: tuple[torch.Tensor, ...]
    recipe: str | mp.Policy | None        # the policy to measure against FP32 (SQNR, audit); None: ranges only
    loss_scale: float | None
    out: Path
    step: int | None = None               # --run: the checkpoint's step (None: initial weights)


def setup_diagnose(args: argparse.Namespace) -> DiagnoseJob:
    """The model, batch and output directory of `mixprec diagnose`, checked; writes nothing."""
    from mixprec.train.commands import SIZE_FLAGS, require_device
    from mixprec.train.outputs import check_writable, refuse_nonempty

    given = {k: getattr(args, k) for k in (*_CONFIG_FLAGS, *SIZE_FLAGS) if getattr(args, k, None) is not None}
    fixed = [k for k in given if k != "device"] if args.run is not None else []
    if fixed:
        raise ValueError(f"--{fixed[0].replace('_', '-')} is fixed by the run that --run {args.run} names: drop it")
    cfg = TrainConfig(**given)
    if args.recipe is not None:
        mp.Policy.from_recipe(args.recipe)   # an unknown recipe: ValueError naming the recipes
    if args.loss_scale is not None and not (math.isfinite(args.loss_scale) and args.loss_scale > 0):
        raise ValueError(f"--loss-scale must be a finite number > 0, e.g. 65536; got {args.loss_scale}")
    require_device(cfg.device)
    recipe, step = args.recipe, None
    if args.run is not None:
        cfg, model, batch, step = trained_model_and_batch(args.run, args.device)
        recipe = args.recipe or cfg.precision_policy()
        default_out = Path(args.run) / "diagnosis"
    else:
        model, batch = model_and_batch(cfg)   # reads the corpus: a missing one is reported here
        default_out = Path("runs") / ("diagnose-" + cfg.model + (f"-{args.recipe}" if args.recipe else ""))
    out = Path(args.out or default_out)
    check_writable(out)
    if not args.overwrite:
        refuse_nonempty(out)
    return DiagnoseJob(cfg, model, batch, recipe, args.loss_scale, out, step)


def diagnose(job: DiagnoseJob, args: argparse.Namespace) -> int:
    from mixprec.diagnostics import run_cli_diagnosis
    from mixprec.train.outputs import clear_diagnosis

    cfg, out = job.cfg, job.out
    n_params = sum(p.numel() for p in job.model.parameters())
    name = job.recipe.name if isinstance(job.recipe, mp.Policy) else job.recipe
    against = f"recipe {name} against FP32" if job.recipe else "FP32 ranges (give --recipe for SQNR and the audit)"
    weights = (f"at its initial weights (seed {cfg.seed})" if job.step is None
               else f"trained {job.step} steps ({args.run}), on batch {job.step}")
    print(f"mixprec diagnose: {cfg.model} ({n_params:,} parameters) {weights}, one "
          f"batch of {cfg.batch_size} on {cfg.device}, {against}"
          + (f", loss scale {job.loss_scale:g}" if job.loss_scale else "") + f"; output in {out}", flush=True)
    if args.overwrite:
        clear_diagnosis(out)
    paths = run_cli_diagnosis(job.model, job.batch, loss_on_logits, out, policy=job.recipe,
                              loss_scale=job.loss_scale, echo=_print)
    if paths["images"]:
        print(f"figures: {len(paths['images'])} PNGs in {out} (hist_<kind>.png: histograms per format; "
              f"ranges_<kind>.png: each module's range)")
    return 0


def _print(line: str) -> None:
    print(line, flush=True)

