"""What the precision table costs: mixprec's recipes against plain torch.autocast, same model, same process.

    python benchmarks/bench_core.py --device cuda [--compile] [--json FILE]
    python benchmarks/bench_core.py --device cpu

CUDA: a 12-layer d=1024 GPT (16 heads, B=8, T=1024, vocab 50304, SDPA attention, separate head):
  anchor bf16 = torch.autocast(bf16) eager/compiled, anchor fp16 = torch.autocast(fp16) + GradScaler;
  ours = mp.prepare + mp.autocast + mp.LossScaler (the whole table enforced). Fused AdamW for both.
CPU: a 4-layer d=256 GPT (T=128, B=8, byte vocabulary): FP32, mixprec fp16-mixed (emulated FP16),
  mixprec bf16-mixed and torch.autocast bf16.
Each pair runs interleaved (anchor, ours, anchor, ours, ...) and reports the median tokens/s ratio.
Results: benchmarks/results/core.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import mixprec as mp
from mixprec.train.models import GPT, GPTConfig


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One training configuration: a model, its optimizer, and how a step runs."""

    def __init__(self, name, model, device, step_context, scaler=None, compile_model=False):
        self.name, self.device = name, device
        self.model = torch.compile(model) if compile_model else model
        fused = device == "cuda"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        self.context = step_context
        self.scaler = scaler
        self.times: list[float] = []

    def step(self, idx, targets):
        with self.context():
            logits = self.model(idx)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def timed(self, idx, targets, steps):
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step(idx, targets)
        _sync(self.device)
        self.times.append((time.perf_counter() - start) / steps)


def _pair(anchor: Runner, ours: Runner, idx, targets, warmup: int, steps: int, rounds: int) -> dict:
    for r in (anchor, ours):
        if r.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            r.step(idx, targets)
        r.peak = torch.cuda.max_memory_allocated() / 2**30 if r.device == "cuda" else float("nan")
    for _ in range(rounds):
        anchor.timed(idx, targets, steps)
        ours.timed(idx, targets, steps)
    tokens = idx.numel()
    ratios = [a / o for a, o in zip(anchor.times, ours.times)]
    return {"anchor": anchor.name, "ours": ours.name,
            "anchor_tokens_per_s": tokens / statistics.median(anchor.times),
            "ours_tokens_per_s": tokens / statistics.median(ours.times),
            "ratio_median": statistics.median(ratios), "ratios": ratios,  # ours speed / anchor speed
            "anchor_peak_gib": anchor.peak, "ours_peak_gib": ours.peak}


def _dynamo_counters():
    from torch._dynamo.utils import counters
    return counters


def _graph_breaks() -> int:
    return sum(_dynamo_counters()["graph_break"].values())


def bench_cuda(args) -> list[dict]:
    cfg = GPTConfig(vocab_size=50304, seq_len=1024, n_layer=12, n_head=16, d_model=1024, attention="sdpa",
                    head="separate")
    torch.manual_seed(0)
    base = GPT(cfg).cuda()
    idx = torch.randint(0, cfg.vocab_size, (8, cfg.seq_len), device="cuda")
    targets = torch.roll(idx, -1, 1)
    results = []
    modes = [False, True] if args.compile else [False]
    for compiled in modes:
        for recipe, dtype in (("bf16-mixed", torch.bfloat16), ("fp16-mixed", torch.float16)):
            torch._dynamo.reset()
            _dynamo_counters().clear()
            policy = mp.Policy.from_recipe(recipe)
            anchor_scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
            anchor = Runner(f"torch.autocast({dtype})" + (" + GradScaler" if anchor_scaler else ""),
                            copy.deepcopy(base), "cuda", lambda d=dtype: torch.autocast("cuda", dtype=d),
                            anchor_scaler, compiled)
            ours_model = mp.prepare(copy.deepcopy(base), policy)
            ours = Runner(f"mixprec {recipe}", ours_model, "cuda", lambda p=policy: mp.autocast(p),
                          mp.LossScaler.for_policy(policy), compiled)
            res = _pair(anchor, ours, idx, targets, args.warmup, args.steps, args.rounds)
            res.update(recipe=recipe, compiled=compiled, graph_breaks=_graph_breaks() if compiled else None)
            results.append(res)
            print(json.dumps(res), flush=True)
            del anchor, ours, ours_model
            torch.cuda.empty_cache()
    return results


def bench_cpu(args) -> list[dict]:
    cfg = GPTConfig(vocab_size=256, seq_len=128, n_layer=4, n_head=4, d_model=256, attention="manual")
    torch.manual_seed(0)
    base = GPT(cfg)
    idx = torch.randint(0, 256, (8, cfg.seq_len))
    targets = torch.roll(idx, -1, 1)
    results = []
    fp32 = lambda: Runner("fp32", copy.deepcopy(base), "cpu", contextlib.nullcontext)  # noqa: E731
    for recipe in ("fp16-mixed", "bf16-mixed"):
        policy = mp.Policy.from_recipe(recipe)
        ours = Runner(f"mixprec {recipe}", mp.prepare(copy.deepcopy(base), policy), "cpu",
                      lambda p=policy: mp.autocast(p), mp.LossScaler.for_policy(policy))
        res = _pair(fp32(), ours, idx, targets, args.warmup, args.steps, args.rounds)
        res.update(recipe=recipe, compiled=False)
        results.append(res)
        print(json.dumps(res), flush=True)
    autocast_bf16 = Runner("torch.autocast(bf16)", copy.deepcopy(base), "cpu",
                           lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    policy = mp.Policy.from_recipe("bf16-mixed")
    ours = Runner("mixprec bf16-mixed", mp.prepare(copy.deepcopy(base), policy), "cpu", lambda: mp.autocast(policy))
    res = _pair(autocast_bf16, ours, idx, targets, args.warmup, args.steps, args.rounds)
    res.update(recipe="bf16-mixed", compiled=False)
    results.append(res)
    print(json.dumps(res), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models (CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", default=None, help="write the results (and device, torch, date) here")
    args = parser.parse_args()
    results = bench_cuda(args) if args.device == "cuda" else bench_cpu(args)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print("\n| anchor | mixprec | compiled | anchor tok/s | mixprec tok/s | ratio (median) | peak GiB anchor/ours |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['anchor']} | {r['ours']} | {r['compiled']} | {r['anchor_tokens_per_s']:,.0f} | "
              f"{r['ours_tokens_per_s']:,.0f} | {r['ratio_median']:.3f}x | "
              f"{r['anchor_peak_gib']:.2f} / {r['ours_peak_gib']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
