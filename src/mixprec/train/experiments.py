"""`mixprec compare`: the same run under several recipes, side by side.

Every recipe gets the same seed (so the same initial weights), the same batches in the same order and
the same number of steps; only the precision differs. After training, a probe step on the next
(unseen) training batch measures FP16 gradient underflow (see underflow.py).
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
from mixprec.train import fp8_coverage
from mixprec.train.trainer import RunSummary, Trainer
from mixprec.train.underflow import UnderflowCounts, probe_underflow

DEFAULT_RECIPES = ("fp32", "fp16-noscale", "fp16-mixed", "bf16-mixed")


@dataclass
class RecipeResult:
    recipe: str
    summary: RunSummary | None = None
    underflow: UnderflowCounts | None = None
    error: str | None = None      # a recipe that could not run (e.g. FP8 on hardware without it)
    fp8_layers: tuple[int, int] | None = None   # FP8 recipes: (Linear layers in FP8, Linear layers)
    fp8_note: str | None = None                 # FP8 recipes: what the recipe did to the model, in a line


@dataclass
class Comparison:
    """The results of one `compare`, with what is needed to read them."""

    base: TrainConfig
    results: list[RecipeResult]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> RecipeResult | None:
        """The row others are compared with: fp32 when it ran, else the first recipe that ran."""
        ran = [r for r in self.results if r.summary is not None]
        return next((r for r in ran if r.recipe == "fp32"), ran[0] if ran else None)


def computes_in_fp16(policy: mp.Policy) -> bool:
    """Whether the recipe's matmuls (and so its activation gradients) run in FP16."""
    return torch.float16 in (policy.compute_dtype, policy.param_dtype)


def parse_recipes(text: str) -> list[str]:
    """'fp32,bf16-mixed' -> ['fp32', 'bf16-mixed']; unknown names raise ValueError naming the choices."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--recipes is empty; give a comma-separated list from: {', '.join(known_recipes())}")
    for name in names:
        if name not in known_recipes():
            raise ValueError(f"Unknown recipe {name!r}; choose one of: {', '.join(known_recipes())}")
    if len(set(names)) != len(names):
        raise ValueError(f"--recipes names a recipe twice: {text}")
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


def run_comparison(base: TrainConfig, recipe_names: list[str], out: Path | str, *, progress: bool = True) -> Comparison:
    """Train `base` once per recipe into out/<recipe>/ (metrics only, no checkpoints) and probe underflow.
    A recipe whose run diverges trains on to the end: its NaN losses are the comparison's result."""
    out = Path(out)
    results = []
    meta: dict[str, Any] = {}
    for recipe in recipe_names:
        cfg = base.replace(recipe=recipe, out=str(out / recipe))
        result = RecipeResult(recipe)
        try:
            trainer = Trainer(cfg, progress=progress, save_checkpoints=False, stop_on_divergence=False)
        except (RuntimeError, NotImplementedError) as e:  # the recipe cannot run here (hardware, kernels)
            result.error = _record_error(out / recipe, e)
            results.append(result)
            continue
        if not meta:
            meta = _describe(trainer)
        try:
            result.summary = trainer.run()
            x, y = (t.to(trainer.device) for t in trainer.data.train_batch(cfg.steps))
            fp16_scale = (result.summary.final_scale or 1.0) if computes_in_fp16(trainer.policy) else None
            result.underflow = probe_underflow(trainer.model, x, y, loss_factor=cfg.loss_factor, scale=fp16_scale)
            if trainer.policy.fp8 is not None:
                result.fp8_layers = fp8_coverage.fp8_coverage(trainer.model)
                result.fp8_note = fp8_coverage.describe(cfg, trainer.policy.fp8, trainer.model, "this row computes")
        except (RuntimeError, NotImplementedError) as e:
            result.error = _record_error(out / recipe, e)
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
