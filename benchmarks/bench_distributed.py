"""What the FP32 gradient reduction costs under DDP on one GPU: the 12-layer d=1024 GPT
(benchmarks/_gpt_loop.py) with BF16 parameters (bf16-true, so DDP's buckets are BF16), world size 1.

  bf16-reduce   DDP(mp.prepare(model)) as torch ships it: buckets averaged in BF16
  fp32-hook     the same, then mp.prepare(ddp): mixprec's FP32 all-reduce hook (upcast each bucket, divide,
                all-reduce in FP32, copy back)

With one rank the all-reduce moves nothing over a wire: what is timed is the hook's casts, copies and the
collective's launch, the part one GPU can measure (several GPUs add the doubled bytes on the wire). One
process group (NCCL; gloo for --dry-run), interleaved rounds of 50 steps, eager (DDP's hooks run outside
any graph), torch's fused AdamW.

    PYTHONPATH=src python3 benchmarks/bench_distributed.py [--json FILE] [--rounds 3]
    PYTHONPATH=src python3 benchmarks/bench_distributed.py --dry-run     # tiny model on the CPU, gloo
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import mixprec as mp
from _gpt_loop import GPTSetup, arguments, environment, median_ratio, timed_rounds

WINDOW = 50


def main() -> None:
    args = arguments(__doc__, "distributed")
    device = args.device
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=0, world_size=1)
    try:
        setup = GPTSetup(device=device, recipe="bf16-true", dry_run=args.dry_run)
        window = 4 if args.dry_run else WINDOW
        steps, hooks = {}, {}
        for name in ("bf16-reduce", "fp32-hook"):
            model, policy = setup.model()
            ddp = DDP(model, device_ids=[0] if device == "cuda" else None)
            if name == "fp32-hook":
                ddp = mp.prepare(ddp, policy)
            hooks[name] = getattr(ddp, "_mixprec_reduce_hook", None)
            optimizer = setup.optimizer(ddp)
            loss_fn = setup.loss_fn(ddp, policy)

            def step(i: int, optimizer=optimizer, loss_fn=loss_fn) -> None:
                loss_fn(*setup.batch_at(i)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            steps[name] = step
        if hooks["fp32-hook"] is None:
            raise SystemExit("mp.prepare registered no FP32 reduction hook on the DDP module: nothing to measure")
        for step in steps.values():
            setup.window(step, 3 if args.dry_run else 10)
        times = timed_rounds(setup, steps, window, args.rounds, start=0)
        params = sum(p.numel() for p in model.parameters())
        result = {**environment(device), "recipe": "bf16-true", "world_size": 1, "sizes": setup.sizes,
                  "batch": setup.batch, "parameters": params, "hooks": hooks, "window_steps": window,
                  "rounds": args.rounds, "seconds": times,
                  "ms_per_step_bf16_reduce": min(times["bf16-reduce"]) / window * 1e3,
                  "fp32_hook_overhead": median_ratio(times["fp32-hook"], times["bf16-reduce"]) - 1,
                  "bytes_on_wire_per_step": {"bf16-reduce": 2 * params, "fp32-hook": 4 * params}}
        print(json.dumps({k: result[k] for k in ("device", "hooks", "ms_per_step_bf16_reduce",
                                                 "fp32_hook_overhead")}, indent=1))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
