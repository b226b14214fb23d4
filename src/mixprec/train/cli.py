"""The `mixprec` command: `recipes`, `train` and `compare` (also `python -m mixprec`).

Mistakes a user can make (an unknown model, recipe or device, --device cuda without a GPU, --steps 0,
--lr inf, a --seq-len that cannot fit, resuming a run of another model or recipe or a damaged
checkpoint, a missing corpus, an --out that is a file or not writable or already holds a run, an FP8
recipe that converts no layer of the model) end with one line naming the valid choices and exit code 2,
never a traceback. Exit codes:

    0    done
    2    a usage error (one line on stderr), nothing trained
    3    the run diverged (a non-finite loss, or every step skipped by the loss scaler): stopped, the last
         good checkpoint kept
    130  SIGINT (Ctrl-C), 143 SIGTERM: `train` finishes its step, saves a checkpoint and says where
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from mixprec.policy import Policy, recipes
from mixprec.train.config import DEVICES, TASKS, TrainConfig, resumed_config
from mixprec.train.models import MODELS
from mixprec.train.stops import Diverged, Interrupted, raise_on_signals

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_SIGNAL_BASE = 128     # a signal ends the command with 128 + its number, the shell's convention (130, 143)
COMPARE_STEPS = 300        # the default main job: a few hundred steps, a loss well below the byte-unigram entropy
COMPARE_EVALS = 6          # validation points on compare's curves


class UsageError(Exception):
    """A mistake in the command line or its environment: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(message)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by train and compare. Defaults are None: TrainConfig's defaults apply, and a
    resumed run can tell which flags were given."""
    p.add_argument("--model", help=f"one of: {', '.join(MODELS)} (default gpt)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences (or images) per step (default 16)")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 2e-3)")
    p.add_argument("--device", help=f"one of: {', '.join(DEVICES)} (default cpu)")
    p.add_argument("--seed", type=int, help="initial weights and batch order (default 0)")
    p.add_argument("--task", help=f"one of: {', '.join(TASKS)}; small-grad multiplies the loss by 2**-14")
    p.add_argument("--eval-every", type=int, help="validate every N steps")
    p.add_argument("--eval-batches", type=int, help="validation batches (default 8)")
    p.add_argument("--log-every", type=int, help="read the loss and write metrics every N steps (default 10)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--grad-clip", type=float, help="global gradient-norm clip (default 1.0)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 10%% of steps)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model: its graphs are compiled once, then each step costs the "
                        "host little (the loss stays eager)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    sizes = p.add_argument_group("model sizes (defaults fit a 2-core CPU)")
    sizes.add_argument("--n-layer", type=int, help="GPT blocks / RNN layers (GPT 4, RNN 1)")
    sizes.add_argument("--n-head", type=int, help="GPT attention heads (4)")
    sizes.add_argument("--d-model", type=int, help="GPT width / RNN embedding width (128)")
    sizes.add_argument("--seq-len", type=int, help="context length in bytes (128)")
    sizes.add_argument("--positions", help="GPT positions: learned or rotary (learned)")
    sizes.add_argument("--head", help="GPT output head: tied (to the token embedding) or separate (tied)")
    sizes.add_argument("--attention", help="GPT attention: manual (mixprec.ops.attention, FP32 softmax) or sdpa "
                                           "(torch's fused kernel) (manual)")
    sizes.add_argument("--channels", type=int, help="CNN channels (32)")
    sizes.add_argument("--hidden", type=int, help="LSTM/GRU hidden size (256)")


_CONFIG_FLAGS = ("model", "steps", "batch_size", "lr", "device", "seed", "task", "eval_every", "eval_batches",
                 "log_every", "weight_decay", "grad_clip", "warmup", "n_layer", "n_head", "d_model", "seq_len",
                 "positions", "head", "attention", "channels", "hidden", "compile")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixprec", description="Mixed precision training for PyTorch: FP16, BF16 and FP8.")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{recipes,train,compare}")
    commands.add_parser("recipes", help="list the named recipes (precision policies)")

    train = commands.add_parser("train", help="train one model under one recipe",
                                description="Train a model on embedded data (the Python standard library's "
                                            "source for gpt/lstm/gru, the UCI digits for cnn) under a recipe.")
    train.add_argument("--recipe", help="a recipe from `mixprec recipes` (default bf16-mixed)")
    _add_run_arguments(train)
    train.add_argument("--ckpt-every", type=int, help="checkpoint every N steps; 0: only at the end (default 100); "
                                                      "always at the end and on Ctrl-C or SIGTERM")
    train.add_argument("--out", help="output directory (default runs/<model>-<recipe>); one holding a run is "
                                     "refused unless --resume or --overwrite")
    train.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoint is in DIR")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its "
                                                                "checkpoints, metrics and config are deleted)")
    train.add_argument("--allow-no-fp8", action="store_true", help="train an FP8 recipe even when it converts no "
                                                                   "Linear layer of the model (it then computes "
                                                                   "as bf16-mixed)")

    compare = commands.add_parser("compare", help="the same run under several recipes, side by side",
                                  description="Train the same model, seed, data order and steps under each "
                                              "recipe; print a table and write table.md/.csv, curves.json "
                                              "and loss_curves.png.")
    compare.add_argument("--recipes", default=",".join(_default_recipes()),
                         help="comma-separated recipes (default %(default)s)")
    _add_run_arguments(compare)
    compare.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2,3: the comparison once per seed "
                                         "(in OUT/seed-<s>/), then each recipe's difference to the reference "
                                         "as mean and spread over the seeds (OUT/seeds.md): one run's "
                                         "difference is partly run-to-run noise")
    compare.add_argument("--out", help="output directory (default runs/compare-<model>[-<task>]); one holding a "
                                       "run is refused unless --overwrite")
    compare.add_argument("--overwrite", action="store_true", help="replace the comparison already in --out")
    return parser


def _default_recipes() -> tuple[str, ...]:
    from mixprec.train.experiments import DEFAULT_RECIPES
    return DEFAULT_RECIPES


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k, None) is not None}


def _require_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda needs a CUDA GPU, but torch {torch.__version__} sees none "
                         f"(torch.cuda.is_available() is False); use --device cpu")


# ---- commands ----------------------------------------------------------------------------------
def _cmd_recipes(args: argparse.Namespace) -> int:
    width = max(len(name) for name in recipes())
    for name in recipes():
        print(f"{name:<{width}}  {Policy.from_recipe(name).describe()}")
    return 0


def _setup_train(args: argparse.Namespace):
    """Everything that can be checked before training, in the order that fails fastest; writes nothing."""
    from mixprec.train.checkpoint import DamagedCheckpoint, load_checkpoint
    from mixprec.train.fp8_coverage import describe, fp8_coverage
    from mixprec.train.memory import check_fits
    from mixprec.train.outputs import check_writable, refuse_existing_run
    from mixprec.train.trainer import Trainer

    overrides = _config_overrides(args)
    if args.recipe is not None:
        overrides["recipe"] = args.recipe
    if args.ckpt_every is not None:
        overrides["ckpt_every"] = args.ckpt_every
    state = None
    if args.resume is not None:
        overrides["out"] = args.out or args.resume
        if args.overwrite and _same_dir(overrides["out"], args.resume):
            raise ValueError(f"--overwrite would delete the run that --resume {args.resume} continues; give one "
                             f"of them (or another --out)")
        state = load_checkpoint(args.resume, warn=lambda line: print(f"mixprec train: warning: {line}",
                                                                     file=sys.stderr, flush=True))
        cfg = resumed_config(state["config"], overrides, args.resume)
        if cfg.steps <= state["step"]:
            raise UsageError(f"--resume {args.resume} is at step {state['step']} of {cfg.steps}: nothing to do; "
                             f"give --steps larger than {state['step']} to train on")
    else:
        model, recipe = overrides.get("model", "gpt"), overrides.get("recipe", "bf16-mixed")
        overrides["out"] = args.out or str(Path("runs") / f"{model}-{recipe}")
        cfg = TrainConfig(**overrides)
    check_writable(cfg.out)
    if not args.overwrite and not (args.resume is not None and _same_dir(cfg.out, args.resume)):
        refuse_existing_run(cfg.out, resumable=True)
    _require_device(cfg.device)
    check_fits(cfg)
    try:
        trainer = Trainer(cfg, resume=state, progress=not args.quiet)
    except DamagedCheckpoint as e:   # the state loaded is not the state saved
        raise ValueError(f"--resume {args.resume}: {e}") from e
    fp8 = trainer.policy.fp8
    if fp8 is not None and fp8_coverage(trainer.model)[0] == 0 and state is None and not args.allow_no_fp8:
        raise ValueError(describe(cfg, fp8, trainer.model, "this run would compute") + "; or give --recipe "
                         "bf16-mixed (the same computation), or --allow-no-fp8 to train it anyway")
    return trainer


def _same_dir(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _setup(setup, args: argparse.Namespace):
    """Run a command's set-up; the errors a user causes there (bad values, a missing corpus or
    checkpoint) become UsageErrors. Errors while training are not caught: they are bugs to see."""
    try:
        return setup(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e


def _cmd_train(args: argparse.Namespace) -> int:
    from mixprec.train.fp8_coverage import describe
    from mixprec.train.outputs import clear_run

    trainer = _setup(_setup_train, args)
    cfg, out = trainer.cfg, Path(trainer.cfg.out)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    print(f"mixprec train: {cfg.model} ({n_params:,} parameters), recipe {cfg.recipe} "
          f"({trainer.policy.describe()}), {cfg.steps} steps on {cfg.device}" + (", compiled" if cfg.compile else "")
          + (f", resuming at step {trainer.step}" if trainer.step else "") + f"; output in {cfg.out}", flush=True)
    if trainer.policy.fp8 is not None:
        print(f"FP8: {describe(cfg, trainer.policy.fp8, trainer.model)}", flush=True)
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
        return EXIT_DIVERGED
    scale = "-" if summary.final_scale is None else f"{summary.final_scale:g}"
    print(f"done: step {summary.steps_done}, train loss {summary.final_train_loss:.4f}, validation loss "
          f"{summary.final_val_loss:.4f}, {summary.items_per_s:,.0f} {summary.item_name}/s, "
          f"{summary.skipped_steps} steps skipped, loss scale {scale}")
    print(f"checkpoint: {out / 'checkpoint.pt'}; metrics: {out / 'metrics.jsonl'}")
    return 0


def _stopped_message(stop: Interrupted, out: Path) -> str:
    """One line: what a signal interrupted, what is on disk, and how to go on."""
    resume = f"; continue with: mixprec train --resume {out}"
    if stop.saved_now:
        return f"interrupted by {stop.name} at step {stop.step}: checkpoint saved to {stop.checkpoint}{resume}"
    at_once = f"stopped at once by a second {stop.name} after step {stop.step}"   # steps done; the next one is lost
    if stop.checkpoint is not None:
        return f"{at_once}: the last checkpoint is {stop.checkpoint} (step {stop.checkpoint_step}){resume}"
    return f"{at_once}: no checkpoint was saved"


def _setup_compare(args: argparse.Namespace) -> tuple[TrainConfig, list[str], Path, list[int] | None]:
    from mixprec.train.data import batches_for
    from mixprec.train.experiments import parse_recipes, parse_seeds
    from mixprec.train.memory import check_fits
    from mixprec.train.outputs import check_writable, refuse_existing_run

    names = parse_recipes(args.recipes)
    seeds = None
    if args.seeds is not None:
        if args.seed is not None:
            raise ValueError(f"give --seed or --seeds, not both (got --seed {args.seed} and --seeds {args.seeds})")
        seeds = parse_seeds(args.seeds)
    overrides = _config_overrides(args)
    overrides.setdefault("steps", COMPARE_STEPS)
    overrides.setdefault("eval_every", max(1, overrides["steps"] // COMPARE_EVALS))
    model, task = overrides.get("model", "gpt"), overrides.get("task", "default")
    out = Path(args.out or Path("runs") / ("compare-" + model + ("" if task == "default" else f"-{task}")))
    base = TrainConfig(**overrides, recipe=names[0], out=str(out), ckpt_every=0)
    for seed in seeds or ():
        base.replace(seed=seed)   # each seed is valid before the first one trains
    check_writable(out)
    if not args.overwrite:
        refuse_existing_run(out, resumable=False)
    _require_device(base.device)
    check_fits(base)
    batches_for(base.model, batch_size=base.batch_size, seq_len=base.seq_len_or_default, seed=base.seed)  # data present?
    return base, names, out, seeds


def _cmd_compare(args: argparse.Namespace) -> int:
    from mixprec.train.experiments import run_comparison
    from mixprec.train.report import describe, markdown_table, notes, write_outputs

    from mixprec.train.outputs import clear_run

    base, names, out, seeds = _setup(_setup_compare, args)
    print(f"mixprec compare: {base.model}, recipes {', '.join(names)}, {base.steps} steps each on {base.device}"
          + (f", seeds {', '.join(map(str, seeds))}" if seeds else "") + f"; output in {out}", flush=True)
    if args.overwrite:
        clear_run(out)
    try:
        if seeds:
            return _compare_over_seeds(base, names, out, seeds, progress=not args.quiet)
        comparison = run_comparison(base, names, out, progress=not args.quiet)
    except Interrupted as stop:
        print(f"mixprec compare: interrupted by {stop.name}: no table was written; the recipes trained so far "
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
    print(f"plot: {paths['plot']}" if paths["plot"] else "plot: not written (matplotlib is not installed)")
    return 0


def _compare_over_seeds(base: TrainConfig, names: list[str], out: Path, seeds: list[int], *, progress: bool) -> int:
    """The comparison once per seed into out/seed-<s>/, then each recipe's difference to the reference
    over the seeds (out/seeds.md, seeds.json)."""
    from mixprec.train.experiments import run_comparison
    from mixprec.train.report import markdown_table, write_outputs, write_seed_summary

    comparisons = {}
    for seed in seeds:
        seed_out = out / f"seed-{seed}"
        comparisons[seed] = run_comparison(base.replace(seed=seed, out=str(seed_out)), names, seed_out,
                                           progress=progress)
        write_outputs(comparisons[seed], seed_out)
        print(f"\nseed {seed}:\n{markdown_table(comparisons[seed])}", flush=True)
    paths = write_seed_summary(comparisons, out)
    print()
    print(paths["seeds_md"].read_text())
    print(f"summary: {paths['seeds_md']} and {paths['seeds_json']}; each seed's table, curves and plot in "
          f"{out / 'seed-<s>'}")
    return 0


_COMMANDS = {"recipes": _cmd_recipes, "train": _cmd_train, "compare": _cmd_compare}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `mixprec` command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _usage_error(_subcommand(argv), str(e))
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        with raise_on_signals():
            return _COMMANDS[args.command](args)
    except UsageError as e:
        return _usage_error(args.command, str(e))
    except Interrupted as stop:   # outside the training loop: nothing is being written
        print(f"mixprec {args.command}: interrupted by {stop.name} before training started: nothing was written",
              file=sys.stderr, flush=True)
        return EXIT_SIGNAL_BASE + stop.signum
    except OSError as e:   # a file the run reads or writes (a full disk, a permission): the file and why
        if e.filename is None:
            raise
        return _usage_error(args.command, f"{e.filename}: {e.strerror}")


def _subcommand(argv: Sequence[str] | None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    return next((a for a in argv if a in _COMMANDS), "")


def _usage_error(command: str, message: str) -> int:
    prefix = f"mixprec {command}" if command else "mixprec"
    print(f"{prefix}: error: {message}", file=sys.stderr)
    return EXIT_USAGE
