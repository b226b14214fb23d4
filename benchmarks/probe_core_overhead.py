"""Where mixprec's bf16-mixed differs from torch.autocast in time and memory: an ablation (CUDA).

    python benchmarks/probe_core_overhead.py

Runs the bench_core GPT (12 layers, d=1024, B=8, T=1024) eagerly under: plain torch.autocast; mixprec;
mixprec with the head rule off (lm_head allowed in half); mixprec with the op-rule mode off. Then times
the head GEMM alone: BF16 output vs FP32 output (torch.mm out_dtype), forward and backward shapes.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

import mixprec as mp
import importlib

mp_autocast = importlib.import_module("mixprec.autocast")  # the module (mixprec.autocast is also the function)
from mixprec.train.models import GPT, GPTConfig


def timed_steps(model, context, idx, steps=8, warmup=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with context():
            loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return idx.numel() / statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    cfg = GPTConfig(vocab_size=50304, seq_len=1024, n_layer=12, n_head=16, d_model=1024, attention="sdpa",
                    head="separate")
    torch.manual_seed(0)
    base = GPT(cfg).cuda()
    idx = torch.randint(0, cfg.vocab_size, (8, cfg.seq_len), device="cuda")
    policy = mp.Policy.from_recipe("bf16-mixed")
    rows = []
    for round_ in range(2):
        rows.append(("torch.autocast", *timed_steps(copy.deepcopy(base), lambda: torch.autocast("cuda", torch.bfloat16), idx)))
        rows.append(("mixprec", *timed_steps(mp.prepare(copy.deepcopy(base), policy), lambda: mp.autocast(policy), idx)))
        mp.rules.allow_half("lm_head")
        rows.append(("mixprec, head in half", *timed_steps(mp.prepare(copy.deepcopy(base), policy),
                                                           lambda: mp.autocast(policy), idx)))
        mp.rules.reset()
        original = mp_autocast.PrecisionMode.__torch_function__
        mp_autocast.PrecisionMode.__torch_function__ = lambda self, f, t, a=(), k=None: f(*a, **(k or {}))
        rows.append(("mixprec, op mode off", *timed_steps(mp.prepare(copy.deepcopy(base), policy),
                                                          lambda: mp.autocast(policy), idx)))
        mp_autocast.PrecisionMode.__torch_function__ = original
    print("| configuration | tokens/s | peak GiB |\n|---|---|---|")
    for name, tps, peak in rows:
        print(f"| {name} | {tps:,.0f} | {peak:.2f} |")

    x = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(50304, 1024, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(8192, 50304, device="cuda", dtype=torch.bfloat16)
    from triton.testing import do_bench
    cases = {
        "fwd x@w.T -> bf16": lambda: x @ w.t(),
        "fwd x@w.T -> fp32 (out_dtype)": lambda: torch.mm(x, w.t(), out_dtype=torch.float32),
        "bwd g.T@x -> bf16": lambda: g.t() @ x,
        "bwd g.T@x -> fp32 (out_dtype)": lambda: torch.mm(g.t(), x, out_dtype=torch.float32),
        "bwd g@w -> bf16": lambda: g @ w,
    }
    print("\n| head GEMM | ms |\n|---|---|")
    for name, fn in cases.items():
        print(f"| {name} | {do_bench(fn, return_mode='median'):.3f} |")


if __name__ == "__main__":
    main()
