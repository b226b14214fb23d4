"""Where mixprec's step differs from torch.autocast's, kernel by kernel (CUDA, eager).

    python benchmarks/profile_core.py [--recipe bf16-mixed] [--compile] [--vocab 256 --head tied]

(--vocab 256 --head tied: the model of benchmarks/bench_train.py, the trainer's benchmark)

Profiles two steps of the bench_core GPT under each, sums CUDA time per kernel name and prints the
kernels whose time differs most, with each step's GPU total and wall time (a wall time well above
the GPU total means the step is bound by the host).
"""
from __future__ import annotations

import argparse
import collections
import copy
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import mixprec as mp
from mixprec.train.models import GPT, GPTConfig


def kernel_times(model, context, scaler, idx, steps=2, warmup=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with context():
            loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    times = collections.Counter()
    counts = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name[:90]] += e.device_time_total / steps / 1000  # ms per step
            counts[e.name[:90]] += 1
    return times, counts, wall * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="bf16-mixed", choices=["bf16-mixed", "fp16-mixed"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--head", default="separate", choices=["separate", "tied"])
    args = parser.parse_args()
    cfg = GPTConfig(vocab_size=args.vocab, seq_len=1024, n_layer=12, n_head=16, d_model=1024, attention="sdpa",
                    head=args.head)
    torch.manual_seed(0)
    base = GPT(cfg).cuda()
    idx = torch.randint(0, cfg.vocab_size, (8, cfg.seq_len), device="cuda")
    policy = mp.Policy.from_recipe(args.recipe)
    dtype = policy.compute_dtype
    wrap = torch.compile if args.compile else (lambda m: m)
    anchor = kernel_times(wrap(copy.deepcopy(base)), lambda: torch.autocast("cuda", dtype=dtype),
                          torch.amp.GradScaler("cuda") if dtype == torch.float16 else None, idx)
    ours = kernel_times(wrap(mp.prepare(copy.deepcopy(base), policy)), lambda: mp.autocast(policy),
                        mp.LossScaler.for_policy(policy), idx)
    for name, (times, counts, wall) in (("torch.autocast", anchor), ("mixprec", ours)):
        print(f"{name}: GPU {sum(times.values()):.2f} ms/step, wall {wall:.2f} ms/step, "
              f"{sum(counts.values()) // 2} kernels/step")
    names = set(anchor[0]) | set(ours[0])
    diffs = sorted(names, key=lambda n: -abs(ours[0][n] - anchor[0][n]))
    print(f"\n| kernel | anchor ms (n) | mixprec ms (n) | diff |\n|---|---|---|---|")
    for n in diffs[:args.top]:
        print(f"| {n} | {anchor[0][n]:.3f} ({anchor[1][n] // 2}) | {ours[0][n]:.3f} ({ours[1][n] // 2}) | "
              f"{ours[0][n] - anchor[0][n]:+.3f} |")


if __name__ == "__main__":
    main()
