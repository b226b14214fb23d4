"""What the Lightning plugin costs a training step: `lightning.Fabric(plugins=[MixprecPrecision(recipe)])`
against the same loop written by hand with mixprec, on the 12-layer d=1024 GPT (benchmarks/_gpt_loop.py),
eager, fused AdamW, gradient clipping at 1.0, in the same process (interleaved rounds of 50 steps).

  hand     mp.prepare + mp.autocast, LossScaler: scale, backward, unscale_, clip_grad_norm_, step, update
  fabric   Fabric.setup(model, optimizer) with MixprecPrecision: fabric.backward,
           fabric.clip_gradients(..., error_if_nonfinite=False) as the README writes it, optimizer.step (the
           plugin scales, unscales, skips and updates)
  fabric-checked  the same with Fabric's default error_if_nonfinite=True, which reads the norm on the host
           every step (a synchronisation the hand-written loop does not have)

  hand-twin  the hand-written loop again, on a second model built the same way: the noise floor of a ratio
Fabric is Lightning's thin loop: the Trainer adds its own logging and callbacks, which are not the plugin's.

    PYTHONPATH=src python3 benchmarks/bench_integrations.py [--json FILE] [--recipe fp16-mixed]
    PYTHONPATH=src python3 benchmarks/bench_integrations.py --dry-run     # tiny model on the CPU
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import mixprec as mp
from _gpt_loop import GPTSetup, arguments, environment, median_ratio, timed_rounds
from mixprec.train.models import build_model, model_config

WINDOW = 50


def main() -> None:
    args = arguments(__doc__, "integrations")
    device = args.device
    import lightning

    from mixprec.integrations.lightning import MixprecPrecision

    setup = GPTSetup(device=device, recipe=args.recipe, dry_run=args.dry_run)
    window = 4 if args.dry_run else WINDOW

    model, policy = setup.model()
    optimizer = setup.optimizer(model)
    scaler = mp.LossScaler.for_policy(policy)
    loss_fn = setup.loss_fn(model, policy)

    def hand_loop(model, optimizer, scaler, loss_fn):
        def hand(i: int) -> None:
            loss = loss_fn(*setup.batch_at(i))
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        return hand

    hand = hand_loop(model, optimizer, scaler, loss_fn)
    twin, _ = setup.model()
    hand_twin = hand_loop(twin, setup.optimizer(twin), mp.LossScaler.for_policy(policy), setup.loss_fn(twin, policy))

    fabric = lightning.Fabric(accelerator=device, devices=1, plugins=[MixprecPrecision(args.recipe)])
    torch.manual_seed(0)
    f_model = build_model(model_config("gpt", **setup.sizes))
    f_model, f_optimizer = fabric.setup(f_model, setup.optimizer(f_model.to(device)))

    def fabric_loop(error_if_nonfinite: bool):
        def with_fabric(i: int) -> None:
            loss = f_model(*setup.batch_at(i))
            fabric.backward(loss)
            fabric.clip_gradients(f_model, f_optimizer, max_norm=1.0, error_if_nonfinite=error_if_nonfinite)
            f_optimizer.step()
            f_optimizer.zero_grad(set_to_none=True)
        return with_fabric

    steps = {"hand": hand, "fabric": fabric_loop(False), "fabric-checked": fabric_loop(True), "hand-twin": hand_twin}
    for step in steps.values():
        setup.window(step, 3 if args.dry_run else 10)
    times = timed_rounds(setup, steps, window, args.rounds, start=0)
    result = {**environment(device), "recipe": args.recipe, "lightning": lightning.__version__,
              "sizes": setup.sizes, "batch": setup.batch, "window_steps": window, "rounds": args.rounds,
              "seconds": times, "ms_per_step_hand": min(times["hand"]) / window * 1e3,
              "fabric_plugin_overhead": median_ratio(times["fabric"], times["hand"]) - 1,
              "fabric_checked_overhead": median_ratio(times["fabric-checked"], times["hand"]) - 1,
              "twin_difference": median_ratio(times["hand-twin"], times["hand"]) - 1}
    print(json.dumps({k: result[k] for k in ("device", "recipe", "ms_per_step_hand", "fabric_plugin_overhead",
                                             "fabric_checked_overhead", "twin_difference")},
                     indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
