"""The `mixprec` command (also `python -m mixprec`): parsing and dispatch. The commands' work is in
mixprec.train (commands.py and the modules it calls).

    mixprec --version
    mixprec recipes
    mixprec explain  [--model gpt|cnn|lstm|gru] [--recipe R] [sizes]
    mixprec train    --model M --recipe R --steps N [--optim O] [--rounding nearest|stochastic|kahan] ...
    mixprec train    ... --nproc N [--dp ddp|fsdp2]      (N data-parallel processes through torchrun)
    mixprec compare  --recipes R1,R2 [--optims O1,O2] [--size cpu|gpu] ...
    mixprec train|compare ... [--guard off|skip|rollback|zclip] [--spike-sigma K] [--window N]
                     [--embedding-grad-shrink ALPHA] [--task faults]
    mixprec bench    --model llama|gpt2|resnet50|vit|gpt --recipe bf16-mixed|fp16-mixed [--compile] ...
    mixprec diagnose [--model gpt|cnn|lstm|gru | --run DIR] [--recipe R] [--loss-scale S] [--batch-size B] --out DIR

Mistakes a user can make (an unknown model, recipe, optimizer or device, --device cuda without a GPU,
--steps 0, --lr inf, a flag that does not apply to the model or recipe, a --seq-len that cannot fit,
resuming a run of another model, recipe or optimizer or a damaged checkpoint, a missing corpus, an --out
that is a file or not writable or already holds a run, an FP8 recipe that converts no layer of the
model) end with one line naming the valid choices and exit code 2, never a traceback. Exit codes:

    0    done
    2    a usage error (one line on stderr), nothing trained
    3    the run diverged (a non-finite loss, or every step skipped by the loss scaler): stopped, the last
         good checkpoint kept
    130  SIGINT (Ctrl-C), 143 SIGTERM: `train` finishes its step, saves a checkpoint and says where
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

import torch

from mixprec import __version__
from mixprec.distributed import DATA_PARALLEL
from mixprec.train import commands, diagnose_command
from mixprec.train.bench import BENCH_DEVICES, BENCH_MODELS, BENCH_RECIPES
from mixprec.train.config import DEVICES, TASKS
from mixprec.train.experiments import DEFAULT_GPU_RECIPES, DEFAULT_RECIPES, SIZES
from mixprec.train.guarding import add_guard_arguments
from mixprec.train.models import MODELS
from mixprec.train.optimizers import OPTIMS, ROUNDINGS
from mixprec.train.stops import Interrupted, raise_on_signals

EXIT_USAGE = 2
EXIT_DIVERGED = commands.EXIT_DIVERGED
EXIT_SIGNAL_BASE = commands.EXIT_SIGNAL_BASE


class UsageError(Exception):
    """A mistake in the command line or its environment: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(message)


def _add_size_arguments(p: argparse.ArgumentParser) -> None:
    sizes = p.add_argument_group("model sizes (defaults fit a 2-core CPU); a size another model takes is refused")
    sizes.add_argument("--n-layer", type=int, help="GPT blocks / RNN layers (GPT 4, RNN 1)")
    sizes.add_argument("--n-head", type=int, help="GPT attention heads (4)")
    sizes.add_argument("--d-model", type=int, help="GPT width / RNN embedding width (128)")
    sizes.add_argument("--seq-len", type=int, help="GPT/RNN context length in bytes (128)")
    sizes.add_argument("--positions", help="GPT positions: learned or rotary (learned)")
    sizes.add_argument("--head", help="GPT output head: tied (to the token embedding) or separate (tied)")
    sizes.add_argument("--attention", help="GPT attention: manual (mixprec.ops.attention, FP32 softmax) or sdpa "
                                           "(torch's fused kernel) (manual)")
    sizes.add_argument("--channels", type=int, help="CNN channels (32)")
    sizes.add_argument("--hidden", type=int, help="LSTM/GRU hidden size (256)")


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by train and compare. Defaults are None: TrainConfig's defaults apply, and a
    resumed run can tell which flags were given."""
    p.add_argument("--model", help=f"one of: {', '.join(MODELS)} (default gpt)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences (or images) per step (default 16)")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 2e-3)")
    p.add_argument("--device", help=f"one of: {', '.join(DEVICES)} (default cpu)")
    p.add_argument("--seed", type=int, help="initial weights and batch order (default 0)")
    p.add_argument("--task", help=f"one of: {', '.join(TASKS)}; small-grad multiplies the loss by 2**-14; faults "
                                  f"injects a corrupt batch, a NaN gradient and an LR spike")
    p.add_argument("--eval-every", type=int, help="validate every N steps")
    p.add_argument("--eval-batches", type=int, help="validation batches (default 8)")
    p.add_argument("--log-every", type=int, help="read the loss and write metrics every N steps (default 10)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    p.add_argument("--grad-clip", type=float, help="global gradient-norm clip (default 1.0)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default 10%% of steps)")
    p.add_argument("--optim", help=f"one of: {', '.join(OPTIMS)} (default adamw: torch's AdamW, fused on CUDA; "
                                   f"adamw-<state>: mixprec.optim.AdamW with its moments in that format)")
    p.add_argument("--rounding", help=f"how BF16 parameters updated in place take the update (bf16-true): "
                                      f"{', '.join(ROUNDINGS)} (default stochastic)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model: its graphs are compiled once, then each step costs the "
                        "host little (the loss stays eager)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_size_arguments(p)
    add_guard_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixprec", description="Mixed precision training for PyTorch: FP16, BF16 and FP8.")
    parser.add_argument("--version", action="store_true", help="print mixprec's version (and torch's) and exit")
    commands_ = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{" + ",".join(_COMMANDS) + "}")
    commands_.add_parser("recipes", help="list the named recipes (precision policies)")

    explain = commands_.add_parser("explain", help="what runs in which precision under a recipe",
                                   description="Print mp.explain: the precision table of a recipe and, with "
                                               "--model, where each module of the built-in model lands.")
    explain.add_argument("--model", help=f"one of: {', '.join(MODELS)} (default: the table alone)")
    explain.add_argument("--recipe", help="a recipe from `mixprec recipes` (default bf16-mixed)")
    _add_size_arguments(explain)

    train = commands_.add_parser("train", help="train one model under one recipe",
                                 description="Train a model on embedded data (the Python standard library's "
                                             "source for gpt/lstm/gru, the UCI digits for cnn) under a recipe.")
    train.add_argument("--recipe", help="a recipe from `mixprec recipes` (default bf16-mixed)")
    train.add_argument("--policy", metavar="FILE", help="train under the policy in a JSON file (e.g. the "
                                                        "recommended_policy.json of `mixprec diagnose`) instead "
                                                        "of a --recipe; the run keeps it for --resume")
    _add_run_arguments(train)
    train.add_argument("--ckpt-every", type=int, help="checkpoint every N steps; 0: only at the end (default 100); "
                                                      "always at the end and on Ctrl-C or SIGTERM")
    train.add_argument("--out", help="output directory (default runs/<model>-<recipe>); one holding a run is "
                                     "refused unless --resume or --overwrite")
    train.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoint is in DIR (same model, "
                                                       "recipe, optimizer and sizes)")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its "
                                                                "checkpoints, metrics and config are deleted)")
    train.add_argument("--allow-no-fp8", action="store_true", help="train an FP8 or INT8 recipe even when it "
                                                                   "converts no Linear layer of the model (it then "
                                                                   "computes as bf16-mixed)")
    train.add_argument("--nproc", type=int, help="processes to train over, data-parallel on this machine (default "
                                                 "1); --batch-size stays the global batch, split evenly among them. "
                                                 "gloo on the CPU, one GPU each with --device cuda (NCCL)")
    train.add_argument("--dp", help=f"with --nproc: one of: {', '.join(DATA_PARALLEL)} (default ddp; fsdp2 shards "
                                    f"parameters, gradients and optimizer state)")

    compare = commands_.add_parser("compare", help="the same run under several recipes (or optimizers), side by side",
                                   description="Train the same model, seed, data order and steps under each "
                                               "recipe (and optimizer); print a table and write table.md/.csv, "
                                               "curves.json and loss_curves.png.")
    compare.add_argument("--recipes", help=f"comma-separated recipes (default {','.join(DEFAULT_RECIPES)}; "
                                           f"--size gpu: {','.join(DEFAULT_GPU_RECIPES)})")
    compare.add_argument("--optims", help=f"comma-separated optimizers from: {', '.join(OPTIMS)}: each recipe "
                                          f"with each, rows named recipe+optim")
    compare.add_argument("--size", help=f"one of: {', '.join(SIZES)} (default gpu with --device cuda, else cpu). "
                                        f"gpu: a 12-layer d_model 1024 GPT, 8 x 1024 tokens a step, lr 6e-4, where "
                                        f"mixed precision beats FP32 and FP8 layers convert; flags override it")
    _add_run_arguments(compare)
    compare.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2,3: the comparison once per seed "
                                         "(in OUT/seed-<s>/), then each row's difference to the reference "
                                         "as mean and spread over the seeds (OUT/seeds.md): one run's "
                                         "difference is partly run-to-run noise")
    compare.add_argument("--batch-sizes", help="comma-separated batch sizes, e.g. 16,64,256: the comparison once "
                                               "per batch size (rows named recipe@b, in OUT/bs-<b>/), each row "
                                               "against the reference at its batch size (OUT/batch_sizes.md), and "
                                               "the ops whose FP32 ranges the batch size moves. Without --steps "
                                               "every batch size trains as many samples as the smallest does")
    compare.add_argument("--out", help="output directory (default runs/compare-<model>[-<task>]); one holding a "
                                       "run is refused unless --overwrite")
    compare.add_argument("--overwrite", action="store_true", help="replace the comparison already in --out")

    bench = commands_.add_parser("bench", help="a training step against torch.autocast, on a GPU",
                                 description="Tokens (or images) per second and peak memory of a model under a "
                                             "recipe, mp.prepare + mp.autocast against plain torch.autocast in the "
                                             "same process, in interleaved rounds; prints each round and the ratio, "
                                             "writes JSON.")
    bench.add_argument("--model", default="gpt", help=f"one of: {', '.join(BENCH_MODELS)} (default %(default)s)")
    bench.add_argument("--recipe", default="bf16-mixed", help=f"one of: {', '.join(BENCH_RECIPES)} "
                                                              f"(default %(default)s)")
    bench.add_argument("--compile", action="store_true", help="both variants under torch.compile")
    bench.add_argument("--fused-head-loss", action="store_true",
                       help="llama, gpt2: mixprec's copy computes the loss from the head's input (no logits kept; "
                            "mixprec.integrations.transformers.fuse_head_loss)")
    bench.add_argument("--steps", type=int, default=10, help="steps per variant per round (default %(default)s)")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default %(default)s)")
    bench.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first (default %(default)s)")
    bench.add_argument("--device", default="cuda", help=f"one of: {', '.join(BENCH_DEVICES)} (default %(default)s; "
                                                        f"cpu: a slow functional run, not a measurement)")
    bench.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model and a batch of 2: checks "
                                                           "that the command runs, measures nothing")
    bench.add_argument("--profile", metavar="DIR", help="after the timing, profile 3 more steps of each variant: "
                                                       "Chrome traces and kernels.md, the kernels side by side")
    bench.add_argument("--json", metavar="FILE", help="where to write the result (default "
                                                      "runs/bench-<model>-<recipe>-<eager|compiled>.json)")
    _add_diagnose_parser(commands_)
    return parser


def _add_diagnose_parser(commands_: argparse._SubParsersAction) -> None:
    diagnose = commands_.add_parser("diagnose", help="where a built-in model's values under- and overflow, and the "
                                                     "policy that follows",
                                    description="mp.diagnose on a built-in model at its initial weights (or a "
                                                "trained run's, --run) and one batch of its embedded data: a table "
                                                "sorted by risk (printed and "
                                                "report.txt), report.html with PNG figures, report.json and "
                                                "recommended_policy.json (for `mixprec train --policy`).")
    diagnose.add_argument("--model", help=f"one of: {', '.join(MODELS)} (default gpt)")
    diagnose.add_argument("--run", metavar="DIR", help="diagnose the trained weights of a `mixprec train` run "
                                                       "(DIR/checkpoint.pt) on the batch it would train on next, "
                                                       "under its own policy unless --recipe is given")
    diagnose.add_argument("--recipe", help="a recipe to measure against FP32: SQNR per module and the precision "
                                           "audit (default: none, the FP32 ranges alone; with --run, the run's)")
    diagnose.add_argument("--loss-scale", type=float, help="diagnose the gradients of loss x S, what a scaled FP16 "
                                                           "backward holds (default: unscaled)")
    diagnose.add_argument("--batch-size", type=int, help="sequences (or images) in the batch (default 16)")
    diagnose.add_argument("--seed", type=int, help="initial weights and the batch, as `train --seed` (default 0)")
    diagnose.add_argument("--device", help=f"one of: {', '.join(DEVICES)} (default cpu)")
    diagnose.add_argument("--out", help="output directory (default runs/diagnose-<model>[-<recipe>]); one holding "
                                        "files is refused unless --overwrite")
    diagnose.add_argument("--overwrite", action="store_true", help="replace the diagnosis already in --out")
    _add_size_arguments(diagnose)


# command -> (set-up that checks and writes nothing, or None; the work)
_COMMANDS: dict[str, tuple[Callable | None, Callable]] = {
    "recipes": (None, commands.recipes),
    "explain": (commands.setup_explain, commands.explain),
    "train": (commands.setup_train, commands.train),
    "compare": (commands.setup_compare, commands.compare),
    "bench": (commands.setup_bench, commands.bench),
    "diagnose": (diagnose_command.setup_diagnose, diagnose_command.diagnose),
}


def _setup(setup: Callable | None, args: argparse.Namespace):
    """Run a command's set-up; the errors a user causes there (bad values, a missing corpus or
    checkpoint, a missing package) become UsageErrors. Errors in the work itself are not caught: they
    are bugs to see."""
    if setup is None:
        return None
    try:
        return setup(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `mixprec` command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _usage_error(_subcommand(argv), str(e))
    if args.version:
        print(f"mixprec {__version__} (torch {torch.__version__})")
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    args.argv = argv
    setup, run = _COMMANDS[args.command]
    try:
        with raise_on_signals():
            return run(_setup(setup, args), args)
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


def _subcommand(argv: Sequence[str]) -> str:
    return next((a for a in argv if a in _COMMANDS), "")


def _usage_error(command: str, message: str) -> int:
    prefix = f"mixprec {command}" if command else "mixprec"
    print(f"{prefix}: error: {message}", file=sys.stderr)
    return EXIT_USAGE
