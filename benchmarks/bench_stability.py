"""What mp.StabilityGuard costs a training step: the 12-layer d=1024 GPT (benchmarks/_gpt_loop.py) under a
recipe, compiled by default, one model and one fused AdamW shared by every variant (interleaved rounds):

  clip            loss.backward(); clip_grad_norm_(1.0); optimizer.step()       (the loop without a guard)
  guard-skip      guard.step(loss) with ladder ("skip",), max_norm 1.0, no snapshots
  guard-skip-eager  the same with fuse=False: the guard's statistics as eager kernels, not compiled
  guard-zclip     the same with ZClip (z 2.5) as well
  guard-rollback  the default ladder (skip, then rollback) with a snapshot every 100 steps (pinned host
                  memory): a window of 100 steps holds exactly one snapshot, so its cost is amortised at
                  the default cadence

Each window is 100 steps; the ratio reported is the median over rounds of variant time / clip time.
Host syncs: 10 steps of each variant under torch.cuda.set_sync_debug_mode("warn"), warnings counted.

    PYTHONPATH=src python3 benchmarks/bench_stability.py [--json FILE] [--eager] [--rounds 3]
    PYTHONPATH=src python3 benchmarks/bench_stability.py --dry-run     # tiny model on the CPU
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

import mixprec as mp
from _gpt_loop import GPTSetup, arguments, environment, median_ratio, timed_rounds

WINDOW = 100


def main() -> None:
    args = arguments(__doc__, "stability")
    device = args.device
    setup = GPTSetup(device=device, recipe=args.recipe, compile=not args.eager and not args.dry_run,
                     dry_run=args.dry_run)
    window = 4 if args.dry_run else WINDOW
    model, policy = setup.model()
    optimizer = setup.optimizer(model)
    scaler = mp.LossScaler.for_policy(policy)
    loss_fn = setup.loss_fn(model, policy)
    params = [p for p in model.parameters() if p.requires_grad]
    guards = {
        "guard-skip": mp.StabilityGuard(model, optimizer, ladder=("skip",), snapshot_every=0, max_norm=1.0),
        "guard-skip-eager": mp.StabilityGuard(model, optimizer, ladder=("skip",), snapshot_every=0, max_norm=1.0,
                                              fuse=False),
        "guard-zclip": mp.StabilityGuard(model, optimizer, ladder=("skip",), snapshot_every=0, max_norm=1.0,
                                         zclip=2.5),
        "guard-rollback": mp.StabilityGuard(model, optimizer, snapshot_every=window, max_norm=1.0),
    }

    def clip_step(i: int) -> None:
        loss = loss_fn(*setup.batch_at(i))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def guarded(guard: mp.StabilityGuard):
        def step(i: int) -> None:
            loss = loss_fn(*setup.batch_at(i))
            scaler.scale(loss).backward()
            guard.step(loss, scaler=scaler, batch=i)
            optimizer.zero_grad(set_to_none=True)
        return step

    steps = {"clip": clip_step, **{name: guarded(g) for name, g in guards.items()}}
    print("warm-up (compiles the model)", flush=True)
    for name, step in steps.items():
        setup.window(step, 3 if args.dry_run else 10)

    syncs = {}
    if device == "cuda":
        for name, step in steps.items():
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    setup.window(step, 10)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs[name] = sum("synchroniz" in str(w.message) for w in caught)
        print("host syncs in 10 steps:", syncs, flush=True)

    times = timed_rounds(setup, steps, window, args.rounds, start=0)
    ratios = {name: median_ratio(times[name], times["clip"]) for name in guards}
    for g in guards.values():
        g.flush()
    events = {name: len(g.events) for name, g in guards.items()}
    result = {**environment(device), "recipe": args.recipe, "compiled": setup.compile, "sizes": setup.sizes,
              "batch": setup.batch, "window_steps": window, "rounds": args.rounds, "seconds": times,
              "ms_per_step_clip": min(times["clip"]) / window * 1e3,
              "overhead_vs_clip": {k: v - 1 for k, v in ratios.items()}, "host_syncs_in_10_steps": syncs,
              "events": events}
    print(json.dumps({k: result[k] for k in ("device", "ms_per_step_clip", "overhead_vs_clip",
                                             "host_syncs_in_10_steps")}, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
