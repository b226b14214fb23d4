"""What each `mixprec` subcommand does, for mixprec.cli to dispatch to.

Every command is a pair: `setup_<command>(args)` checks everything that can be checked before work
starts, writes nothing, and raises ValueError, TypeError or FileNotFoundError (one line naming the bad
value and the valid choices) for a mistake the user can fix; `<command>(job, args)` does the work,
prints, and returns the exit code. `args` is the parsed command line (argparse.Namespace).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mixprec as mp
from mixprec.policy import Policy, recipes as known_recipes
from mixprec.train import guarding
from mixprec.train.config import TrainConfig, resumed_config
from mixprec.train.models import MODEL_SIZES, build_model, model_config
from mixprec.train.stops import Diverged, Interrupted

EXIT_DIVERGED = 3
EXIT_SIGNAL_BASE = 128     # a signal ends the command with 128 + its number, the shell's convention (130, 143)
PLOT_HINT = "pip install 'mixprec[plot]'"
SIZE_FLAGS = tuple(sorted({f for sizes in MODEL_SIZES.values() for f in sizes}))
# TrainConfig fields that train and compare take from flags of the same name
CONFIG_FLAGS = ("model", "steps", "batch_size", "lr", "device", "seed", "task", "eval_every", "eval_batches",
                "log_every", "weight_decay", "grad_clip", "warmup", "compile", "optim", "rounding", *SIZE_FLAGS)
CONFIG_FLAGS += (*guarding.GUARD_FLAGS, "diagnose_events")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (flags left out are None)."""
    return {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k, None) is not None}


def require_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda needs a CUDA GPU, but torch {torch.__version__} sees none "
                         f"(torch.cuda.is_available() is False); use --device cpu")


def _same_dir(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# ---- recipes, explain ----------------------------------------------------------------------------
def recipes(job: None, args: argparse.Namespace) -> int:
    width = max(len(name) for name in known_recipes())
    for name in known_recipes():
        print(f"{name:<{width}}  {Policy.from_recipe(name).describe()}")
    return 0


def setup_explain(args: argparse.Namespace) -> str:
    """What mp.explain prints for the recipe, and for the built-in model at the given sizes if --model."""
    policy = Policy.from_recipe(args.recipe or "bf16-mixed")
    sizes = {k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k, None) is not None}
    if args.model is None:
        if sizes:
            raise ValueError(f"--{next(iter(sizes)).replace('_', '-')} sets a size of a model: give --model "
                             f"(one of: {', '.join(MODEL_SIZES)})")
        return mp.explain(policy)
    return mp.explain(policy, build_model(model_config(args.model, **sizes)))


def explain(text: str, args: argparse.Namespace) -> int:
    print(text)
    return 0


# ---- train ---------------------------------------------------------------------------------------
def setup_train(args: argparse.Namespace):
    """The Trainer of `mixprec train`, after every check that fails fast; writes nothing."""
    from mixprec.train.checkpoint import DamagedCheckpoint, load_checkpoint
    from mixprec.train.fp8_coverage import refuse_no_conversion
    from mixprec.train.memory import check_fits
    from mixprec.train.outputs import check_writable, refuse_existing_run
    from mixprec.train import data_parallel
    from mixprec.train.trainer import Trainer

    overrides = config_overrides(args)
    if args.recipe is not None:
        overrides["recipe"] = args.recipe
    if getattr(args, "policy", None) is not None:
        overrides.update(policy_file_overrides(args.policy, args.recipe))
    if args.ckpt_every is not None:
        overrides["ckpt_every"] = args.ckpt_every
    state = None
    if args.resume is not None:
        overrides["out"] = args.out or args.resume
        if args.overwrite and _same_dir(overrides["out"], args.resume):
            raise ValueError(f"--overwrite would delete the run that --resume {args.resume} continues; give one "
                             f"of them (or another --out)")
        warn = lambda line: print(f"mixprec train: warning: {line}", file=sys.stderr, flush=True)  # noqa: E731
        state = (data_parallel.read_state(args.resume, warn) if data_parallel.holds_run(args.resume)
                 else load_checkpoint(args.resume, warn=warn))
        cfg = resumed_config(state["config"], overrides, args.resume)
        if cfg.steps <= state["step"]:
            raise ValueError(f"--resume {args.resume} is at step {state['step']} of {cfg.steps}: nothing to do; "
                             f"give --steps larger than {state['step']} to train on")
    else:
        model, recipe = overrides.get("model", "gpt"), overrides.get("recipe", "bf16-mixed")
        if getattr(args, "policy", None) is not None:   # not the recipe's name: a run of that recipe may be there
            recipe = Path(args.policy).stem
        overrides["out"] = args.out or str(Path("runs") / f"{model}-{recipe}")
        cfg = TrainConfig(**overrides)
    guarding.check_applies(args, {cfg.guard})
    if args.allow_no_fp8 and not cfg.precision_policy().converters:
        raise ValueError(f"--allow-no-fp8 applies to FP8 and INT8 recipes; recipe {cfg.recipe} converts no layers: "
                         f"drop --allow-no-fp8")
    check_writable(cfg.out)
    if not args.overwrite and not (args.resume is not None and _same_dir(cfg.out, args.resume)):
        refuse_existing_run(cfg.out, resumable=True)
    require_device(cfg.device)
    check_fits(cfg)
    if data_parallel.requested(args, state):   # --nproc N: the launcher's checks and job, or a rank's trainer
        return data_parallel.setup(cfg, args, state)
    try:
        trainer = Trainer(cfg, resume=state, progress=not args.quiet)
    except DamagedCheckpoint as e:   # the state loaded is not the state saved
        raise ValueError(f"--resume {args.resume}: {e}") from e
    if state is None and not args.allow_no_fp8:
        refuse_no_conversion(cfg, trainer.policy, trainer.model)
    return trainer


def policy_file_overrides(path: str, recipe: str | None) -> dict[str, Any]:
    """The TrainConfig fields of `train --policy FILE`: the policy as plain values, and its name as the
    run's recipe label. ValueError (one line) for a missing or malformed file, or a --recipe beside it."""
    from mixprec.diagnostics.recommend import load_policy, policy_to_dict

    if recipe is not None:
        raise ValueError(f"give --recipe or --policy, not both (got --recipe {recipe} and --policy {path}): the "
                         f"policy file sets everything a recipe does")
    policy = load_policy(path)
    # stored as read back, so that the same policy written differently (key order, defaults left out) matches on --resume
    return {"policy": policy_to_dict(policy), "recipe": policy.name or "policy"}


def train(trainer, args: argparse.Namespace) -> int:
    from mixprec.train import optimizers
    from mixprec.train.fp8_coverage import describe
    from mixprec.train.data_parallel import Launch
    from mixprec.train.outputs import clear_run

    if isinstance(trainer, Launch):   # --nproc N: the ranks train
        return trainer.start()
    cfg, out = trainer.cfg, Path(trainer.cfg.out)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    precision = f"recipe {cfg.recipe}" if cfg.policy is None else f"policy {cfg.recipe} from a file"
    print(f"mixprec train: {cfg.model} ({n_params:,} parameters), {precision} "
          f"({trainer.policy.describe()}), {cfg.steps} steps on {cfg.device}" + (", compiled" if cfg.compile else "")
          + (f", resuming at step {trainer.step}" if trainer.step else "") + f"; output in {cfg.out}", flush=True)
    print(f"optimizer: {cfg.optim}, {optimizers.describe(cfg.optim, cfg.rounding, trainer.policy)}", flush=True)
    for label, config in (("FP8", trainer.policy.fp8), ("INT8", trainer.policy.int8)):
        if config is not None:
            print(f"{label}: {describe(cfg, config, trainer.model)}", flush=True)
    if args.overwrite:
        clear_run(out)
    try:
        summary = trainer.run()
    except Interrupted as stop:
        print(f"mixprec train: {_stopped_message(stop, out)}", file=sys.stderr, flush=True)
        return EXIT_SIGNAL_BASE + stop.signum
    except Diverged as diverged:
        kept = (f"the last good checkpoint, {diverged.checkpoint} (step {diverged.checkpoint_step}), is kept as it was"
                if diverged.checkpoint else "no checkpoint was saved before it")
        print(f"mixprec train: the run diverged at step {diverged.step}: {diverged.reason}; {kept}; metrics: "
              f"{out / 'metrics.jsonl'}. Try a lower --lr (this run's: {cfg.lr:g})", file=sys.stderr, flush=True)
        _plot(trainer, out)
        return EXIT_DIVERGED
    scale = "-" if summary.final_scale is None else f"{summary.final_scale:g}"
    print(f"done: step {summary.steps_done}, train loss {summary.final_train_loss:.4f}, validation loss "
          f"{summary.final_val_loss:.4f}, {summary.items_per_s:,.0f} {summary.item_name}/s, "
          f"{summary.skipped_steps} steps skipped, loss scale {scale}")
    print(f"checkpoint: {trainer.checkpoint_file}; metrics: {out / 'metrics.jsonl'}")
    if trainer.guard is not None:
        print(f"guard ({cfg.guard}): {len(summary.guard_events)} events: {guarding.summarize_events(summary.guard_events)}")
    _plot(trainer, out, summary)
    return 0


def _plot(trainer, out: Path, summary=None) -> None:
    """OUT/curves.png (loss and gradient norm, the guard's events marked) from the process that writes the
    run's files, also for a run that diverged: where it went wrong is what the plot shows."""
    from mixprec.train.curves import plot_run

    if not trainer.write_metrics:
        return
    plot = plot_run(summary or trainer.summary(), out / "curves.png")
    print(f"plot: {plot}" if plot else f"plot: not written: matplotlib is not installed; get it with {PLOT_HINT}",
          flush=True)


def _stopped_message(stop: Interrupted, out: Path) -> str:
    """One line: what a signal interrupted, what is on disk, and how to go on."""
    resume = f"; continue with: mixprec train --resume {out}"
    if stop.saved_now:
        return f"interrupted by {stop.name} at step {stop.step}: checkpoint saved to {stop.checkpoint}{resume}"
    at_once = f"stopped at once by a second {stop.name} after step {stop.step}"   # steps done; the next one is lost
    if stop.checkpoint is not None:
        return f"{at_once}: the last checkpoint is {stop.checkpoint} (step {stop.checkpoint_step}){resume}"
    return f"{at_once}: no checkpoint was saved"


# ---- compare -------------------------------------------------------------------------------------
@dataclass
class CompareJob:
    base: TrainConfig             # the first row's config; each row replaces recipe, optim and rounding
    rows: list                    # experiments.Row
    out: Path
    seeds: list[int] | None
    size: str
    by_batch_size: dict[int, TrainConfig] | None = None   # --batch-sizes: each batch size's base config


def setup_compare(args: argparse.Namespace) -> CompareJob:
    from mixprec.train import experiments
    from mixprec.train.data import batches_for
    from mixprec.train.memory import check_fits
    from mixprec.train.outputs import check_writable, refuse_existing_run

    seeds = None
    if args.seeds is not None:
        if args.seed is not None:
            raise ValueError(f"give --seed or --seeds, not both (got --seed {args.seed} and --seeds {args.seeds})")
        seeds = experiments.parse_seeds(args.seeds)
    optims = None
    if args.optims is not None:
        if args.optim is not None:
            raise ValueError(f"give --optim or --optims, not both (got --optim {args.optim} and --optims "
                             f"{args.optims})")
        optims = experiments.parse_optims(args.optims)
    batch_sizes = _parse_batch_sizes(args)
    given = config_overrides(args)
    model, task = given.get("model", "gpt"), given.get("task", "default")
    size = args.size or ("gpu" if given.get("device") == "cuda" else "cpu")
    preset = {**experiments.size_preset(size, model), **(experiments.FAULTS_PRESET if task == "faults" else {})}
    overrides = {**preset, **given}
    default_recipes = (experiments.FAULTS_RECIPES if task == "faults" else
                       experiments.DEFAULT_GPU_RECIPES if size == "gpu" else experiments.DEFAULT_RECIPES)
    names = experiments.parse_recipes(args.recipes) if args.recipes is not None else list(default_recipes)
    overrides.setdefault("eval_every", max(1, overrides["steps"] // experiments.COMPARE_EVALS))
    rows = experiments.comparison_rows(names, optims, overrides.pop("optim", "adamw"), overrides.pop("rounding", None))
    if task == "faults":
        rows = experiments.fault_rows(rows, overrides.pop("guard", None))
    guarding.check_applies(args, {row.guard or overrides.get("guard", "off") for row in rows})
    out = Path(args.out or Path("runs") / ("compare-" + model + ("" if task == "default" else f"-{task}")))
    first = rows[0]
    base = TrainConfig(**overrides, recipe=first.recipe, optim=first.optim, rounding=first.rounding, out=str(out),
                       ckpt_every=0)
    for row in rows[1:]:   # every row is valid before the first one trains
        base.replace(**row.changes())
    for seed in seeds or ():
        base.replace(seed=seed)
    by_batch_size = _batch_size_configs(base, batch_sizes, given, out) if batch_sizes else None
    check_writable(out)
    if not args.overwrite:
        refuse_existing_run(out, resumable=False)
    require_device(base.device)
    for cfg in (by_batch_size or {0: base}).values():
        check_fits(cfg)
    batches_for(base.model, batch_size=base.batch_size, seq_len=base.seq_len_or_default, seed=base.seed)  # data present?
    return CompareJob(base, rows, out, seeds, size, by_batch_size)


def compare(job: CompareJob, args: argparse.Namespace) -> int:
    from mixprec.train.experiments import run_comparison
    from mixprec.train.outputs import clear_run
    from mixprec.train.report import describe, markdown_table, notes, write_outputs

    base, out, seeds = job.base, job.out, job.seeds
    steps = (", ".join(f"{c.steps} steps at batch size {b}" for b, c in job.by_batch_size.items())
             if job.by_batch_size else f"{base.steps} steps each")
    print(f"mixprec compare: {base.model} ({job.size} size), {', '.join(r.name for r in job.rows)}, {steps} on "
          f"{base.device}" + (f", seeds {', '.join(map(str, seeds))}" if seeds else "") + f"; output in {out}",
          flush=True)
    if args.overwrite:
        clear_run(out)
    try:
        if seeds:
            return _compare_over_seeds(job, progress=not args.quiet)
        if job.by_batch_size:
            return _compare_over_batch_sizes(job, progress=not args.quiet)
        comparison = run_comparison(base, job.rows, out, progress=not args.quiet)
    except Interrupted as stop:
        print(f"mixprec compare: interrupted by {stop.name}: no table was written; the rows trained so far "
              f"have their metrics in {out}", file=sys.stderr, flush=True)
        return EXIT_SIGNAL_BASE + stop.signum
    paths = write_outputs(comparison, out)
    print()
    print(describe(comparison))
    print()
    print(markdown_table(comparison))
    for line in notes(comparison):
        print(line)
    print()
    print(f"table: {paths['table_md']} and {paths['table_csv']}; curves: {paths['curves']}")
    print(f"plot: {paths['plot']}" if paths["plot"] else
          f"plot: not written: matplotlib is not installed; get it with {PLOT_HINT}")
    return 0


def _compare_over_seeds(job: CompareJob, *, progress: bool) -> int:
    """The comparison once per seed into out/seed-<s>/, then each row's difference to the reference
    over the seeds (out/seeds.md, seeds.json)."""
    from mixprec.train.experiments import run_comparison
    from mixprec.train.report import markdown_table, write_outputs, write_seed_summary

    comparisons = {}
    for seed in job.seeds:
        seed_out = job.out / f"seed-{seed}"
        comparisons[seed] = run_comparison(job.base.replace(seed=seed, out=str(seed_out)), job.rows, seed_out,
                                           progress=progress)
        write_outputs(comparisons[seed], seed_out)
        print(f"\nseed {seed}:\n{markdown_table(comparisons[seed])}", flush=True)
    paths = write_seed_summary(comparisons, job.out)
    print()
    print(paths["seeds_md"].read_text())
    print(f"summary: {paths['seeds_md']} and {paths['seeds_json']}; each seed's table, curves and plot in "
          f"{job.out / 'seed-<s>'}")
    return 0


# ---- compare --batch-sizes -----------------------------------------------------------------------
def _parse_batch_sizes(args: argparse.Namespace) -> list[int] | None:
    from mixprec.train import experiments

    if getattr(args, "batch_sizes", None) is None:
        return None
    for flag, value in (("--batch-size", args.batch_size), ("--seeds", args.seeds)):
        if value is not None:
            raise ValueError(f"give {flag} or --batch-sizes, not both (got {flag} {value} and --batch-sizes "
                             f"{args.batch_sizes})")
    return experiments.parse_batch_sizes(args.batch_sizes)


def _batch_size_configs(base: TrainConfig, batch_sizes: list[int], given: dict[str, Any],
                        out: Path) -> dict[int, TrainConfig]:
    """Each batch size's base config, into out/bs-<b>/. Without --steps, each trains as many samples as
    the size's steps at the smallest batch size (experiments.batch_size_steps)."""
    from mixprec.train import experiments

    configs = {}
    for b in batch_sizes:
        steps = given.get("steps") or experiments.batch_size_steps(base.steps, batch_sizes, b)
        eval_every = given.get("eval_every") or max(1, steps // experiments.COMPARE_EVALS)
        configs[b] = base.replace(batch_size=b, steps=steps, eval_every=eval_every, out=str(out / f"bs-{b}"))
    return configs


def _compare_over_batch_sizes(job: CompareJob, *, progress: bool) -> int:
    """The comparison once per batch size into out/bs-<b>/ (rows named recipe@b), each row against the
    reference at its own batch size (out/batch_sizes.md, .json); and the FP32 ranges at each batch size,
    with the ops whose ranges moved."""
    from mixprec.diagnostics import describe_range_shifts
    from mixprec.train.diagnose_command import diagnose_batch_sizes
    from mixprec.train.experiments import Row, run_comparison
    from mixprec.train.report import markdown_table, write_batch_size_summary, write_outputs

    print("diagnosing the initial model at each batch size ...", flush=True)
    shifts = describe_range_shifts(diagnose_batch_sizes(job.base, list(job.by_batch_size)))
    comparisons = {}
    for b, cfg in job.by_batch_size.items():
        rows = [Row(f"{r.name}@{b}", r.recipe, r.optim, r.rounding) for r in job.rows]
        comparisons[b] = run_comparison(cfg, rows, Path(cfg.out), progress=progress)
        write_outputs(comparisons[b], cfg.out)
        print(f"\nbatch size {b}:\n{markdown_table(comparisons[b])}", flush=True)
    paths = write_batch_size_summary(comparisons, shifts, job.out)
    print()
    print(paths["batch_sizes_md"].read_text())
    print(f"summary: {paths['batch_sizes_md']} and {paths['batch_sizes_json']}; each batch size's table, curves "
          f"and plot in {job.out / 'bs-<b>'}")
    return 0


# ---- bench ---------------------------------------------------------------------------------------
def setup_bench(args: argparse.Namespace) -> dict[str, Any]:
    """run_bench's arguments and the JSON path, checked: the device first (no GPU: exit 2 at once)."""
    from mixprec.train import bench
    from mixprec.train.outputs import check_writable

    kwargs = dict(model=args.model, recipe=args.recipe, compile=args.compile, steps=args.steps, rounds=args.rounds,
                  warmup=args.warmup, device=args.device, tiny=args.tiny, fused_head_loss=args.fused_head_loss)
    bench.check_arguments(**{k: v for k, v in kwargs.items() if k != "compile"})
    mode = "compiled" if args.compile else "eager"
    tags = f"{mode}{'-fused' if args.fused_head_loss else ''}{'-tiny' if args.tiny else ''}"
    path = Path(args.json or Path("runs") / f"bench-{args.model}-{args.recipe}-{tags}.json")
    if path.is_dir():
        raise ValueError(f"--json {path} is a directory; give a file path")
    check_writable(path.parent, "--json's directory")
    if args.profile is not None:
        check_writable(args.profile, "--profile")
        kwargs["profile_dir"] = Path(args.profile)
    return {"kwargs": kwargs, "json": path}


def bench(job: dict[str, Any], args: argparse.Namespace) -> int:
    from mixprec.train.bench import run_bench

    k = job["kwargs"]
    fused = ", fused head loss" if k["fused_head_loss"] else ""
    print(f"mixprec bench: {k['model']}{' (tiny)' if k['tiny'] else ''}{fused}, {k['recipe']}, "
          f"{'compiled' if k['compile'] else 'eager'}, on {k['device']}: {k['rounds']} interleaved rounds of "
          f"{k['steps']} steps after {k['warmup']} warm-up steps, mixprec against torch.autocast", flush=True)
    try:
        result = run_bench(**k, progress=lambda line: print(line, flush=True))
    except Interrupted as stop:
        print(f"mixprec bench: interrupted by {stop.name}: nothing was written", file=sys.stderr, flush=True)
        return EXIT_SIGNAL_BASE + stop.signum
    memory = (f"peak memory {result['peak_memory_ratio']:.3f}x" if result["peak_memory_ratio"] is not None
              else "peak memory: measured on CUDA only")
    print(f"mixprec / torch.autocast: {result['ratio']:.3f}x {result['item_name']}/s (median of the "
          f"{len(result['ratios'])} per-round ratios); {memory}")
    path: Path = job["json"]
    path.parent.mkdir(parents=True, exist_ok=True)
    command = "mixprec " + " ".join(getattr(args, "argv", sys.argv[1:]))
    path.write_text(json.dumps({**result, "command": command}, indent=1) + "\n")
    print(f"json: {path}")
    if "profile" in result:
        print(f"profile: {Path(result['profile']['dir']) / 'kernels.md'} (and a Chrome trace per variant there)")
    return 0
