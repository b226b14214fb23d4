"""`mixprec compare`: the same run under several recipes (and optimizers), side by side.

Every row gets the same seed (so the same initial weights), the same batches in the same order and
the same number of steps; only the precision (or the optimizer) differs. After training, a probe step
on the next (unseen) training batch measures FP16 gradient underflow (see underflow.py).

Two sizes (`--size`): "cpu", the GPT whose defaults train on two CPU cores in about a minute per
recipe; and "gpu", a GPT large enough that the recipes do on a GPU what they are for: mixed precision
faster than FP32, and FP8 recipes converting every block's Linear layers (d_model 1024 >= FP8's
min_features). Flags given beside --size override its values.
"""
from __future__ import annotations

import gc
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mixprec as mp
from mixprec.policy import recipes as known_recipes
from mixprec.train.config import TrainConfig
from mixprec.train import fp8_coverage, optimizers
from mixprec.train.trainer import RunSummary, Trainer
from mixprec.train.underflow import UnderflowCounts, probe_underflow

DEFAULT_RECIPES = ("fp32", "fp16-noscale", "fp16-mixed", "bf16-mixed")
# On a GPU, FP8 too: tensorwise is the fastest FP8 recipe per GEMM (benchmarks/results/fp8.md).
DEFAULT_GPU_RECIPES = (*DEFAULT_RECIPES, "fp8-tensorwise")
COMPARE_STEPS = 300     # a few hundred steps: a loss well below the byte-unigram entropy
COMPARE_EVALS = 6       # validation points on the curves
SIZES = ("cpu", "gpu")
# TrainConfig fields of each --size. "gpu": GPT-2 medium's width at 12 layers (about 150M parameters),
# 8 x 1024 tokens a step; SDPA attention (its fused kernel keeps the softmax in FP32) and a separate head;
# lr 6e-4 as nanoGPT trains GPT-2 at this depth (the CPU size's 2e-3 is for d_model 128).
SIZE_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"steps": COMPARE_STEPS},
    "gpu": {"steps": COMPARE_STEPS, "n_layer": 12, "n_head": 16, "d_model": 1024, "seq_len": 1024, "batch_size": 8,
            "attention": "sdpa", "head": "separate", "lr": 6e-4},
}


def size_preset(size: str, model: str) -> dict[str, Any]:
    """The TrainConfig fields of `--size` for `model` (ValueError for an unknown size, or "gpu" on a
    model other than the GPT)."""
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of: {', '.join(SIZES)}")
    if size == "gpu" and model != "gpt":
        raise ValueError(f"--size gpu sets the GPT's sizes; --model {model} has one size: give --size cpu or "
                         f"--model gpt")
    return dict(SIZE_PRESETS[size])


@dataclass(frozen=True)
class Row:
    """One row of a comparison: a recipe with an optimizer (and its rounding), under a name; guard and task
    replace the base config's where set (the faults comparison)."""

    name: str
    recipe: str
    optim: str
    rounding: str | None = None
    guard: str | None = None
    task: str | None = None

    def changes(self) -> dict[str, Any]:
        """The TrainConfig fields this row sets on the comparison's base config."""
        extra = {k: v for k, v in (("guard", self.guard), ("task", self.task)) if v is not None}
        return {"recipe": self.recipe, "optim": self.optim, "rounding": self.rounding, **extra}


# `compare --task faults`: few steps and a small batch (four rows in about a minute on two CPU cores), and a spike
# window of 64 steps, which warms up (32 clean steps) well before the first fault at step 60.
FAULTS_PRESET = {"steps": 150, "batch_size": 8, "window": 64}
FAULTS_RECIPES = ("bf16-mixed",)
FAULTS_GUARDS = ("skip", "rollback")


def fault_rows(rows: list[Row], guard: str | None) -> list[Row]:
    """Per row: the clean run (the reference), the faulty run without a guard, and the faulty run with `guard`
    (None: with each of FAULTS_GUARDS)."""
    guards = [g for g in ([guard] if guard else FAULTS_GUARDS) if g != "off"]
    out = []
    for r in rows:
        base = dict(recipe=r.recipe, optim=r.optim, rounding=r.rounding)
        out += [Row(f"{r.name}-clean", **base, guard="off", task="default"),
                Row(r.name, **base, guard="off", task="faults")]
        out += [Row(f"{r.name}+{g}", **base, guard=g, task="faults") for g in guards]
    return out


def comparison_rows(recipe_names: list[str], optims: list[str] | None, optim: str = "adamw",
                    rounding: str | None = None) -> list[Row]:
    """Each recipe with each of `optims` (rows named recipe+optim), or with `optim` alone (rows named by
    recipe). `rounding` goes to the rows whose recipe updates half parameters in place; ValueError
    naming the recipes when none does."""
    rows = [Row(f"{recipe}+{o}" if optims else recipe, recipe, o) for recipe in recipe_names for o in (optims or [optim])]
    if rounding is None:
        return rows
    rounded = [r for r in rows if optimizers.rounds_in_place(mp.Policy.from_recipe(r.recipe))]
    if not rounded:
        optimizers.check_rounding(rounding, mp.Policy.from_recipe(recipe_names[0]), ", ".join(recipe_names))
    names = {r.name for r in rounded}
    return [Row(r.name, r.recipe, r.optim, rounding if r.name in names else None) for r in rows]


@dataclass
class RecipeResult:
    recipe: str
    name: str = ""                # the row's name: the recipe, or recipe+optim when optimizers are compared
    summary: RunSummary | None = None
    underflow: UnderflowCounts | None = None
    error: str | None = None      # a row that could not run (e.g. FP8 on hardware without it)
    fp8_layers: tuple[int, int] | None = None   # FP8/INT8 recipes: (Linear layers in FP8/INT8, Linear layers)
    fp8_note: str | None = None                 # FP8/INT8 recipes: what the recipe did to the model, in a line
    optimizer: str = ""                         # the optimizer, in a line (optimizers.describe)

    def __post_init__(self) -> None:
        self.name = self.name or self.recipe


@dataclass
class Comparison:
    """The results of one `compare`, with what is needed to read them."""

    base: TrainConfig
    results: list[RecipeResult]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> RecipeResult | None:
        """The row others are compared with: the first fp32 row that ran, else the first row that ran."""
        ran = [r for r in self.results if r.summary is not None]
        return next((r for r in ran if r.recipe == "fp32"), ran[0] if ran else None)


def computes_in_fp16(policy: mp.Policy) -> bool:
    """Whether the recipe's matmuls (and so its activation gradients) run in FP16."""
    return torch.float16 in (policy.compute_dtype, policy.param_dtype)


def parse_recipes(text: str) -> list[str]:
    """'fp32,bf16-mixed' -> ['fp32', 'bf16-mixed']; unknown names raise ValueError naming the choices."""
    return _parse_names(text, "--recipes", "recipe", tuple(known_recipes()))


def parse_optims(text: str) -> list[str]:
    """'adamw,adamw-int8' -> ['adamw', 'adamw-int8']; unknown names raise ValueError naming the choices."""
    return _parse_names(text, "--optims", "optim", optimizers.OPTIMS)


def _parse_names(text: str, flag: str, what: str, choices: tuple[str, ...]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"{flag} is empty; give a comma-separated list from: {', '.join(choices)}")
    for name in names:
        if name not in choices:
            raise ValueError(f"Unknown {what} {name!r}; choose one of: {', '.join(choices)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{flag} names a{'n' if what[0] in 'aeiou' else ''} {what} twice: {text}")
    return names


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; anything else raises ValueError naming the bad value."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise ValueError(f"--seeds takes comma-separated integers, e.g. 0,1,2,3; got {text!r}")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds names a seed twice: {text}")
    return seeds


def parse_batch_sizes(text: str) -> list[int]:
    """'16,64,256' -> [16, 64, 256] (ascending: ranges and differences are read from the smallest up);
    anything else raises ValueError naming the bad value."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--batch-sizes takes comma-separated positive integers, e.g. 16,64,256; got {text!r}")
    sizes = [int(p) for p in parts]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"--batch-sizes names a batch size twice: {text}")
    return sorted(sizes)


def batch_size_steps(steps: int, batch_sizes: list[int], batch_size: int) -> int:
    """Steps at `batch_size` that see as many samples as `steps` at the smallest of `batch_sizes` (at
    least one): every batch size then costs about the same time."""
    return max(1, round(steps * min(batch_sizes) / batch_size))


def run_comparison(base: TrainConfig, rows: list[Row] | list[str], out: Path | str, *,
                   progress: bool = True) -> Comparison:
    """Train `base` once per row (or recipe name) into out/<row>/ (metrics only, no checkpoints) and probe
    underflow. A row whose run diverges trains on to the end: its NaN losses are the comparison's result."""
    out = Path(out)
    rows = [r if isinstance(r, Row) else Row(r, r, base.optim, base.rounding) for r in rows]
    results = []
    meta: dict[str, Any] = {}
    for row in rows:
        cfg = base.replace(**row.changes(), out=str(out / row.name))
        result = RecipeResult(row.recipe, row.name,
                              optimizer=optimizers.describe(row.optim, row.rounding, mp.Policy.from_recipe(row.recipe)))
        try:
            trainer = Trainer(cfg, progress=progress, save_checkpoints=False, stop_on_divergence=False)
        except (RuntimeError, NotImplementedError) as e:  # the recipe cannot run here (hardware, kernels)
            result.error = _record_error(out / row.name, e)
            results.append(result)
            continue
        if not meta:   # the comparison's task: its rows may differ (the faults comparison's clean reference)
            meta = {**_describe(trainer), "task": base.task, "loss_factor": base.loss_factor}
        try:
            result.summary = trainer.run()
            x, y = (t.to(trainer.device) for t in trainer.data.train_batch(cfg.steps))
            fp16_scale = (result.summary.final_scale or 1.0) if computes_in_fp16(trainer.policy) else None
            result.underflow = probe_underflow(trainer.model, x, y, loss_factor=cfg.loss_factor, scale=fp16_scale)
            converter = fp8_coverage.converter(trainer.policy)
            if converter is not None:
                result.fp8_layers = fp8_coverage.fp8_coverage(trainer.model)
                result.fp8_note = fp8_coverage.describe(cfg, converter, trainer.model, "this row computes")
        except (RuntimeError, NotImplementedError) as e:
            result.error = _record_error(out / row.name, e)
        results.append(result)
        del trainer
        gc.collect()
        if base.device == "cuda":
            torch.cuda.empty_cache()
    return Comparison(base, results, meta)


def _describe(trainer: Trainer) -> dict[str, Any]:
    cfg = trainer.cfg
    n_params = sum(p.numel() for p in trainer.model.parameters())
    meta = {"model": cfg.model, "model_config": repr(cfg.model_config()), "parameters": n_params,
            "steps": cfg.steps, "batch_size": cfg.batch_size, "seed": cfg.seed, "task": cfg.task,
            "loss_factor": cfg.loss_factor, "device": _device_name(cfg.device), "torch": torch.__version__}
    corpus = getattr(trainer.data, "corpus", None)
    if corpus is not None:
        meta.update(corpus=f"{corpus.n_files} *.py files of {corpus.root}", train_bytes=len(corpus.train),
                    val_bytes=len(corpus.val), unigram_entropy=corpus.unigram_entropy())
    else:
        meta.update(corpus="UCI handwritten digits (sklearn.datasets.load_digits)")
    return meta


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import os
    import platform
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _record_error(directory: Path, error: BaseException) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "error.txt").write_text("".join(traceback.format_exception(error)))
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
