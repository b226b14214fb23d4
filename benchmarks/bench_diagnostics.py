"""What mp.diagnose costs: one diagnosis of the 12-layer d=1024 GPT (benchmarks/_gpt_loop.py), and the
DiagnosisMonitor running every 100 steps of training.

  diagnose        mp.diagnose(model, batch, None, policy=recipe): the FP32 forward and backward with hooks,
                  every format, FP8 what-if scaling and the SQNR run under the policy; timed cold (first
                  call) and warm (second), and with audit=True (the precision audit) once
  monitor         training windows of 100 steps (compiled model, fused AdamW) with a DiagnosisMonitor(every=100)
                  against the same loop without it (interleaved rounds): one sampled step per window, so the
                  ratio is the amortised cost at that cadence
  monitor-idle    the same with a monitor that never samples after its first step: what its hooks cost the
                  steps it does not sample; monitor minus monitor-idle is the cost of one sampled step

    PYTHONPATH=src python3 benchmarks/bench_diagnostics.py [--json FILE] [--eager] [--rounds 3]
    PYTHONPATH=src python3 benchmarks/bench_diagnostics.py --dry-run     # tiny model on the CPU
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

import mixprec as mp
from _gpt_loop import GPTSetup, arguments, environment, median_ratio, timed_rounds
from mixprec.diagnostics.monitor import DiagnosisMonitor

WINDOW = 100


def main() -> None:
    args = arguments(__doc__, "diagnostics")
    device = args.device
    setup = GPTSetup(device=device, recipe=args.recipe, compile=not args.eager and not args.dry_run,
                     dry_run=args.dry_run)
    window = 4 if args.dry_run else WINDOW

    model, policy = setup.model()
    x, y = setup.batch_at(0)
    diagnose_s = {}
    for label, audit in (("cold", False), ("warm", False), ("with_audit", True)):
        setup.sync()
        t0 = time.perf_counter()
        report = mp.diagnose(model, ((x, y), y), None, policy=policy, audit=audit)
        setup.sync()
        diagnose_s[label] = time.perf_counter() - t0
        print(f"diagnose ({label}): {diagnose_s[label]:.2f} s, {len(report.layers)} modules", flush=True)
    del model, report

    loops = {}
    cadence = {"plain": None, "monitor": window, "monitor-idle": 10 ** 9}
    for name, every in cadence.items():
        model, policy = setup.model()
        monitor = DiagnosisMonitor(model, every=every) if every else None   # hooks before compile
        optimizer = setup.optimizer(model)
        loss_fn = setup.loss_fn(model, policy)

        def step(i: int, model=model, optimizer=optimizer, loss_fn=loss_fn, monitor=monitor) -> None:
            loss = loss_fn(*setup.batch_at(i))
            loss.backward()
            if monitor is not None:
                monitor.step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loops[name] = (step, monitor)
    print("warm-up (compiles both models, sampled and not)", flush=True)
    for step, _ in loops.values():
        setup.window(step, window)   # a full window: the monitor's sampled step compiles too

    times = timed_rounds(setup, {name: step for name, (step, _) in loops.items()}, window, args.rounds, start=window)
    samples = loops["monitor"][1].samples
    result = {**environment(device), "recipe": args.recipe, "compiled": setup.compile, "sizes": setup.sizes,
              "batch": setup.batch, "diagnose_seconds": diagnose_s, "monitor_every": window,
              "monitor_samples": samples, "window_steps": window, "rounds": args.rounds, "seconds": times,
              "ms_per_step_plain": min(times["plain"]) / window * 1e3,
              "monitor_overhead": median_ratio(times["monitor"], times["plain"]) - 1,
              "monitor_idle_overhead": median_ratio(times["monitor-idle"], times["plain"]) - 1,
              "sampled_step_extra_ms": statistics.median(
                  m - i for m, i in zip(times["monitor"], times["monitor-idle"])) * 1e3}
    print(json.dumps({k: result[k] for k in ("device", "diagnose_seconds", "ms_per_step_plain", "monitor_overhead",
                                             "monitor_idle_overhead", "sampled_step_extra_ms", "monitor_samples")},
                     indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
