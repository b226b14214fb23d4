"""The model, data and timing shared by the benchmarks of the tools around a training step (the stability
guard, the diagnosis monitor, the DDP reduction hook): the 12-layer d=1024 GPT of mixprec's own
benchmarks (16 heads, T=1024, B=8, SDPA attention, tied head), bytes of the Python standard library.

    setup = GPTSetup(device="cuda", recipe="bf16-mixed", compile=True)
    model, policy = setup.model()                      # seeded, prepared under the recipe
    step = setup.make_step(model, policy, optimizer, after_backward=...)
    seconds = setup.window(step, steps=100)            # synchronized wall time of `steps` steps

`--dry-run` in the scripts shrinks the model to a few thousand parameters on the CPU: it checks the
script, it measures nothing.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from typing import Callable

import torch

import mixprec as mp
from mixprec.train.data import batches_for
from mixprec.train.models import build_model, model_config

SIZES = dict(n_layer=12, n_head=16, d_model=1024, seq_len=1024, attention="sdpa")
DRY_SIZES = dict(n_layer=1, n_head=2, d_model=32, seq_len=32, attention="sdpa")
BATCH = 8


class GPTSetup:
    def __init__(self, *, device: str, recipe: str = "bf16-mixed", compile: bool = False, dry_run: bool = False,
                 batch: int = BATCH) -> None:
        self.device, self.recipe, self.compile = device, recipe, compile
        self.sizes = DRY_SIZES if dry_run else SIZES
        self.batch = 2 if dry_run else batch
        self.data = batches_for("gpt", batch_size=self.batch, seq_len=self.sizes["seq_len"], seed=0)
        self.tokens_per_step = self.batch * self.sizes["seq_len"]

    def model(self, recipe: str | None = None) -> tuple[torch.nn.Module, mp.Policy]:
        torch.manual_seed(0)
        policy = mp.Policy.from_recipe(recipe or self.recipe)
        model = mp.prepare(build_model(model_config("gpt", **self.sizes)).to(self.device), policy)
        return model, policy

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=self.device == "cuda")

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device, non_blocking=True) for t in self.data.train_batch(step))

    def loss_fn(self, model: torch.nn.Module, policy: mp.Policy) -> Callable:
        """(x, y) -> loss under mp.autocast; the model's blocks compiled when asked (the fused head +
        loss runs eagerly, as `mixprec train --compile`)."""
        forward = torch.compile(model) if self.compile else model

        def loss(x, y):
            with mp.autocast(policy, device_type=self.device):
                return forward(x, y)
        return loss

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def window(self, step: Callable[[int], None], steps: int, start: int = 0) -> float:
        """Seconds of `steps` calls of step(i), synchronized before and after."""
        self.sync()
        t0 = time.perf_counter()
        for i in range(start, start + steps):
            step(i)
        self.sync()
        return time.perf_counter() - t0


def arguments(doc: str, name: str) -> argparse.Namespace:
    """The options every script here takes: --json, --rounds, --dry-run (a tiny model on the CPU); exits
    with a message when there is no GPU and no --dry-run."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", default=f"runs/bench_{name}.json")
    parser.add_argument("--recipe", default="bf16-mixed")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (where the script compiles)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script only")
    args = parser.parse_args()
    args.device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(f"bench_{name}.py measures on a CUDA GPU; --dry-run checks the script on the CPU")
    return args


def timed_rounds(setup: "GPTSetup", steps: dict[str, Callable[[int], None]], window: int, rounds: int,
                 start: int = 0) -> dict[str, list[float]]:
    """Seconds of a `window`-step window of each variant per round (interleaved), on fresh batches."""
    offset = [start]

    def timed(step):
        def run(_round: int) -> float:
            offset[0] += window
            return setup.window(step, window, start=offset[0])
        return run

    return interleaved({name: timed(step) for name, step in steps.items()}, rounds)


def interleaved(variants: dict[str, Callable[[int], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant's timed window once per round, rotating the order each round (a GPU's clocks
    drift within a process; rotation spreads the drift over every variant). Returns seconds per round."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(variants[name](r))
            print(f"  round {r} {name:24s} {times[name][-1]:.3f} s", flush=True)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[r] / denominator[r]."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
            "torch": torch.__version__, "mixprec": mp.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%d")}
