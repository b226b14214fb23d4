"""The trainer's overhead on a GPU: `mixprec train` against a bare loop, in the same process.

Model: a 12-layer d=1024 GPT (16 heads, T=1024, B=8, SDPA attention, learned positions, tied head),
bytes of the Python standard library as data, bf16 recipes.

Variants (the order rotates each repeat, see below):
  A  bare loop:  torch.autocast(bf16), fused AdamW, grad-norm clip, same batches; no logging
  B  mixprec loop: the same loop with mp.prepare + mp.autocast (the library's precision rules, op rows by
     its function mode: op_rules="intercept", the default) and the LossScaler (a pass-through for BF16),
     still no logging: isolates the rules' cost from the trainer's
  N  the same with op_rules="autocast" (the op rows left to torch.autocast's CUDA lists, no Python per op)
     and mp.ops.cross_entropy, as the trainer runs on CUDA
  C  the trainer: mixprec.train.Trainer as `mixprec train` runs it (progress bar, metrics.jsonl every
     10 steps, validation every 100 steps, checkpoint cadence 500, so none inside the timed window)

Each variant runs WARMUP steps, then TIMED steps (default 60) timed with torch.cuda.synchronize +
perf_counter. The trainer's window holds its default cadence: a metrics write (and TensorBoard when
installed) every 10 steps, plain progress lines (stderr is not a terminal here), and a validation (8
batches) when the window reaches step 100. Validation is work the bare loop does not do, so its time
is taken out of the window (as the trainer's own tokens/s does); logging and progress stay in. The
run's final checkpoint (after the window) is timed: the copy to CPU memory that the loop waits for is
amortised over the default cadence of 500 steps; the write itself runs in a background thread. The
headline ratio is trainer / bare loop.

A step here is close to bound by the host, and the same window can move by 10-25 % within a process,
more than the overheads measured (benchmarks/results/train.md). So one untimed bare run warms the GPU
up first, many short windows are taken (6 repeats by default), the order of the variants rotates each
repeat (A B N C, B N C A, ...), and each variant's best window is reported beside the median of the
per-repeat ratios, the figure to read.

Before the windows, the host time of one forward (model and loss, under each variant's autocast) is
measured alone: the clock stops when the forward returns, before the GPU finishes it, so it is the
Python and launch cost per forward that a loop bound by its host pays.

--compile runs every variant with the model under torch.compile (`mixprec train --compile`; the loss
stays eager): the precision rules' function mode is then traced into the graph instead of running on
the host for every op of every step.

    PYTHONPATH=src python3 benchmarks/bench_train.py [--out DIR] [--json FILE] [--recipe bf16-mixed]
    PYTHONPATH=src python3 benchmarks/bench_train.py --compile     # the same, compiled
    PYTHONPATH=src python3 benchmarks/bench_train.py --dry-run     # tiny model on the CPU: checks the script
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mixprec as mp
from mixprec.train.config import TrainConfig
from mixprec.train.data import batches_for
from mixprec.train.models import build_model
from mixprec.train.trainer import ADAM_EPS, BETAS, Trainer

WARMUP = 10
SIZES = dict(n_layer=12, n_head=16, d_model=1024, seq_len=1024, attention="sdpa")
BATCH = 8
# --dry-run: a tiny model on the CPU, to check the script itself before spending GPU time
DRY_SIZES = dict(n_layer=1, n_head=2, d_model=32, seq_len=32, attention="sdpa")
DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class StepTrace:
    """Per step of a timed window: when the host reached the step's boundary, and when the GPU did (a
    CUDA event, no sync). A step whose GPU interval is long while the host's was short ran slow on the
    GPU; a long GPU interval that follows a long host interval is the GPU waiting for the host."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, torch.cuda.Event | None]] = []

    def mark(self) -> None:
        event = None
        if DEVICE == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((time.perf_counter(), event))

    def summary(self) -> dict:
        """Host and GPU milliseconds per step (call after the window's sync)."""
        host = [(b[0] - a[0]) * 1e3 for a, b in zip(self.marks, self.marks[1:])]
        gpu = [a[1].elapsed_time(b[1]) for a, b in zip(self.marks, self.marks[1:])] if DEVICE == "cuda" else []
        stats = lambda v: dict(median=round(statistics.median(v), 2), max=round(max(v), 2),  # noqa: E731
                               sum=round(sum(v), 1)) if v else {}
        return dict(host_ms=stats(host), gpu_ms=stats(gpu), host_each=[round(h, 2) for h in host],
                    gpu_each=[round(g, 2) for g in gpu])


def _config(out: str, recipe: str, steps: int, compile: bool = False) -> TrainConfig:
    return TrainConfig(model="gpt", recipe=recipe, steps=steps, batch_size=BATCH, device=DEVICE, out=out,
                       warmup=WARMUP, compile=compile, **SIZES)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=BETAS, eps=ADAM_EPS, fused=DEVICE == "cuda")


def _variant_model(cfg: TrainConfig, op_rules: str | None) -> tuple[torch.nn.Module, mp.Policy]:
    """The seeded model of a loop variant (prepared by mixprec unless op_rules is None) and its policy."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_config()).to(DEVICE)
    policy = mp.Policy.from_recipe(cfg.recipe)
    return (model if op_rules is None else mp.prepare(model, policy)), policy


def _forward_loss(model, policy: mp.Policy, op_rules: str | None, x, y) -> torch.Tensor:
    """A variant's training forward and loss: torch.autocast alone (op_rules None), else mp.autocast with
    that op_rules (and mp.ops.cross_entropy where the function mode is off, as the trainer does)."""
    if op_rules is None:
        context, loss_fn = torch.autocast(DEVICE, dtype=policy.compute_dtype), F.cross_entropy
    else:
        context = mp.autocast(policy, device_type=DEVICE, op_rules=op_rules)
        loss_fn = mp.ops.cross_entropy if op_rules == "autocast" else F.cross_entropy
    with context:
        logits = model(x)
        return loss_fn(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def bare_loop(cfg: TrainConfig, data, steps: int, op_rules: str | None, trace: StepTrace | None = None) -> float:
    """Seconds for `steps` steps after WARMUP, of a hand-written loop; op_rules None: torch.autocast
    alone, else mixprec with that mp.autocast op_rules."""
    model, policy = _variant_model(cfg, op_rules)
    optimizer = _optimizer(model, cfg)
    forward_model = torch.compile(model) if cfg.compile else model
    scaler = torch.amp.GradScaler(enabled=policy.compute_dtype == torch.float16) if op_rules is None \
        else mp.LossScaler.for_policy(policy)
    start = 0.0
    for step in range(WARMUP + steps):
        if step == WARMUP:
            _sync()
            start = time.perf_counter()
        if trace is not None and step >= WARMUP:
            trace.mark()
        x, y = (t.to(DEVICE, non_blocking=True) for t in data.train_batch(step))
        loss = _forward_loss(forward_model, policy, op_rules, x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if trace is not None:
        trace.mark()
    _sync()
    return time.perf_counter() - start


def trainer_run(cfg: TrainConfig, steps: int, trace: StepTrace | None = None) -> tuple[float, float, dict[str, float]]:
    """(seconds for the timed steps, trainer's own tokens/s, the final checkpoint's seconds: the copy
    to CPU memory the loop waits for, and the background write)."""
    marks: dict[int, float] = {}
    validation: dict[int, float] = {}

    def on_step(step: int) -> None:
        if trace is not None and WARMUP <= step <= WARMUP + steps:
            trace.mark()
        if step in (WARMUP, WARMUP + steps):
            _sync()
            marks[step] = time.perf_counter()
            validation[step] = trainer.validation_seconds

    trainer = Trainer(cfg, progress=True, on_step=on_step)
    summary = trainer.run()
    checkpoint_s = {"blocking": trainer.checkpoints.snapshot_seconds, "write": trainer.checkpoints.write_seconds}
    del trainer
    window = marks[WARMUP + steps] - marks[WARMUP]
    return window - (validation[WARMUP + steps] - validation[WARMUP]), summary.items_per_s, checkpoint_s


def host_forward_ms(cfg: TrainConfig, data, op_rules: str | None, repeats: int = 20) -> float:
    """Median host milliseconds of one training forward (model and loss, launches only: the clock stops
    when the forward returns, before the GPU finishes it; a sync between forwards)."""
    model, policy = _variant_model(cfg, op_rules)
    x, y = (t.to(DEVICE) for t in data.train_batch(0))
    samples = []
    for _ in range(repeats + 3):
        _sync()
        start = time.perf_counter()
        loss = _forward_loss(model, policy, op_rules, x, y)
        samples.append((time.perf_counter() - start) * 1e3)
        del loss
    _sync()
    return statistics.median(samples[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_train", help="the trainer's run directories")
    parser.add_argument("--json", help="where to write the results (default OUT/bench_train.json)")
    parser.add_argument("--recipe", default="bf16-mixed")
    parser.add_argument("--timed", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model in every variant (`mixprec train --compile`)")
    parser.add_argument("--step-trace", action="store_true",
                        help="record host and GPU time of every timed step (CUDA events, no sync) into the JSON")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the script only")
    args = parser.parse_args()
    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
        SIZES.update(DRY_SIZES)
    elif not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU (it measures the trainer's overhead on one); "
                         "--dry-run checks the script on the CPU")
    steps = args.timed
    cfg = _config(str(Path(args.out) / args.recipe), args.recipe, WARMUP + steps, compile=args.compile)
    data = batches_for("gpt", batch_size=BATCH, seq_len=SIZES["seq_len"], seed=cfg.seed)
    tokens = steps * BATCH * SIZES["seq_len"]
    # the mixprec loops' op_rules ("mixprec-autocast" only on CUDA: it needs device_type="cuda")
    loops = {"mixprec": "intercept", **({"mixprec-autocast": "autocast"} if DEVICE == "cuda" else {})}
    times: dict[str, list[float]] = {"bare": [], **{name: [] for name in loops}, "trainer": []}
    own, ckpt, traces = [], [], []
    host_ms = {"bare": host_forward_ms(cfg, data, None), **{n: host_forward_ms(cfg, data, r) for n, r in loops.items()}}
    print("host ms per forward (launches):", {k: round(v, 2) for k, v in host_ms.items()}, flush=True)
    bare_loop(cfg, data, min(steps, 30), op_rules=None)     # untimed: clocks and allocator warm up
    order = list(times)
    for repeat in range(args.repeats):
        for name in order[repeat % len(order):] + order[:repeat % len(order)]:
            gc.collect()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            trace = StepTrace() if args.step_trace else None
            if name == "trainer":
                seconds, rate, checkpoint_s = trainer_run(cfg, steps, trace)
                own.append(rate)
                ckpt.append(checkpoint_s)
            else:
                seconds = bare_loop(cfg, data, steps, op_rules=loops.get(name), trace=trace)
            times[name].append(seconds)
            if trace is not None:
                traces.append(dict(variant=name, repeat=repeat, seconds=seconds, **trace.summary()))
                print(f"  host ms/step {traces[-1]['host_ms']}, GPU ms/step {traces[-1]['gpu_ms']}", flush=True)
            print(f"{name:16s} {tokens / seconds:10,.0f} tokens/s", flush=True)
    best = {k: tokens / min(v) for k, v in times.items()}
    step_s = min(times["trainer"]) / steps
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    result = {"device": device, "torch": torch.__version__, "recipe": args.recipe, "compiled": args.compile,
              "sizes": SIZES, "batch": BATCH, "timed_steps": steps, "tokens_per_s": best,
              "all_seconds": times, "trainer_own_tokens_per_s": own, "checkpoint_seconds": ckpt,
              "trainer_vs_bare": best["trainer"] / best["bare"],
              "trainer_vs_bare_each_repeat": [b / t for b, t in zip(times["bare"], times["trainer"])],
              "trainer_vs_bare_median_of_repeats": statistics.median(
                  b / t for b, t in zip(times["bare"], times["trainer"])),
              "trainer_vs_mixprec_loop": best["trainer"] / best["mixprec"],
              "mixprec_loop_vs_bare": best["mixprec"] / best["bare"],
              **({"mixprec_autocast_loop_vs_bare": best["mixprec-autocast"] / best["bare"],
                  "mixprec_autocast_loop_vs_bare_median_of_repeats": statistics.median(
                      b / t for b, t in zip(times["bare"], times["mixprec-autocast"]))}
                 if "mixprec-autocast" in best else {}),
              "checkpoint_blocking_amortised_at_500": min(c["blocking"] for c in ckpt) / (500 * step_s),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None,
              "host_forward_ms": host_ms, "step_traces": traces}
    json_path = Path(args.json) if args.json else Path(args.out) / "bench_train.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}, torch {result['torch']}, GPT {SIZES}, B={BATCH}, {args.recipe}, "
          f"{'compiled' if args.compile else 'eager'}, {steps} timed steps, best of {args.repeats}")
    print("| loop | tokens/s | vs bare |\n| --- | --- | --- |")
    labels = {"bare": "bare loop, torch.autocast", "mixprec": "bare loop, mp.prepare + mp.autocast",
              "mixprec-autocast": "the same, op_rules='autocast'", "trainer": "mixprec train (Trainer)"}
    for name in times:
        print(f"| {labels[name]} | {best[name]:,.0f} | {best[name] / best['bare']:.3f}x |")
    print("trainer / bare, each repeat: " + ", ".join(f"{r:.3f}x" for r in result["trainer_vs_bare_each_repeat"])
          + f"; median {result['trainer_vs_bare_median_of_repeats']:.3f}x")
    blocking, write = min(c["blocking"] for c in ckpt), min(c["write"] for c in ckpt)
    print(f"trainer / mixprec loop: {result['trainer_vs_mixprec_loop']:.3f}x; checkpoint: the loop waits "
          f"{blocking:.2f} s (= {result['checkpoint_blocking_amortised_at_500']:.1%} of 500 steps), "
          f"written in the background in {write:.2f} s")


if __name__ == "__main__":
    main()
