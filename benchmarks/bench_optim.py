"""AdamW step time and state memory: mixprec's low-bit AdamW against torch, bitsandbytes and torchao.

    python benchmarks/bench_optim.py --device cuda [--json out.json]
    python benchmarks/bench_optim.py --smoke                            # CPU, tiny sizes: checks the script

All in one process:
  1. one AdamW step over N FP32 parameters (default 268M: 16 x 4096x4096, fixed random gradients),
     median time (triton.testing.do_bench on CUDA) of: torch fused AdamW (the anchor), torch foreach
     AdamW, mixprec with fp32/bf16/int8/int4/fp8 state, bitsandbytes AdamW8bit, torchao AdamW8bit
     (--torchao-all: AdamW4bit/AdamWFp8 too), those that import; ratio to the anchor and to the 8-bit
     peers, state bytes per parameter, achieved bandwidth (bytes a perfect kernel moves / time);
  2. peak memory of a training step of the 12-layer d=1024 GPT (B=8, T=1024, BF16 autocast, FP32
     weights) with torch fused AdamW, mixprec fp32 state and mixprec int8 state.
Results: benchmarks/results/optim.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import mixprec.optim as mo

# Bytes moved per parameter per step (each input read once, each output written once):
# fused FP32 AdamW reads p, g, m, v and writes p, m, v (7 x 4 B); low-bit states read and write codes
# plus one FP32 absmax per block for each moment.
NAPKIN_BYTES = {
    "fp32": 4 + 4 + 4 + 4 + 4 + 4 + 4,
    "bf16": 4 + 4 + 2 + 2 + 4 + 2 + 2,
    "int8": 4 + 4 + 2 * (1 + 4 / 256) + 4 + 2 * (1 + 4 / 256),
    "fp8": 4 + 4 + 2 * (1 + 4 / 256) + 4 + 2 * (1 + 4 / 256),
    "int4": 4 + 4 + 2 * (0.5 + 4 / 128) + 4 + 2 * (0.5 + 4 / 128),
}
# Targets: step time over torch fused AdamW's, and state bytes per parameter.
TIME_TARGETS = {"int8": 1.3, "int4": 1.4, "bf16": 1.0}
BYTES_TARGETS = {"int8": 2.05, "int4": 1.1, "bf16": 4.0, "fp8": 2.1}
ANCHOR = "torch fused AdamW (anchor)"


def _tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a state tensor, looking inside tensor subclasses (torchao's quantized states)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes_per_param(opt: torch.optim.Optimizer, numel: int) -> float:
    """Bytes of every state tensor but the step counters, per parameter (bitsandbytes' 256-entry code
    tables, 2 KB a tensor, are counted)."""
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step" and v.numel() > 1:
                total += _tensor_bytes(v)
    return total / numel


def _optimizers(device: str, torchao_all: bool):
    """(name, napkin key, factory) for every optimizer that can be built here; missing ones say why."""
    found, missing = [], {}
    fused = device == "cuda"  # torch's fused AdamW runs on CPU too, but the anchor is the GPU one
    found.append((ANCHOR, "fp32", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=fused)))
    found.append(("torch foreach AdamW", "fp32", lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True)))
    for sd in ("fp32", "bf16", "int8", "int4", "fp8"):
        found.append((f"mixprec AdamW state={sd}", sd, lambda ps, sd=sd: mo.AdamW(ps, lr=1e-4, state_dtype=sd)))
    try:
        import bitsandbytes as bnb
        found.append(("bitsandbytes AdamW8bit", "int8", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)))
    except Exception as e:  # noqa: BLE001 - record any import failure honestly
        missing["bitsandbytes"] = f"{type(e).__name__}: {e}"[:300]
    try:
        try:
            from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8
        except ImportError:
            from torchao.prototype.low_bit_optim import AdamW4bit, AdamW8bit, AdamWFp8
        found.append(("torchao AdamW8bit", "int8", lambda ps: AdamW8bit(ps, lr=1e-4)))
        if torchao_all:
            found.append(("torchao AdamW4bit", "int4", lambda ps: AdamW4bit(ps, lr=1e-4)))
            found.append(("torchao AdamWFp8", "fp8", lambda ps: AdamWFp8(ps, lr=1e-4)))
    except Exception as e:  # noqa: BLE001
        missing["torchao"] = f"{type(e).__name__}: {e}"[:300]
    return found, missing


def _median_ms(fn, device: str, rep_ms: float) -> float:
    """Median time of fn() in ms: device events (do_bench, L2 flushed between calls) on CUDA, a clock on CPU."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=max(10, rep_ms // 6), rep=rep_ms, return_mode="median")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_step(device: str, n_tensors: int, rows: int, cols: int, time_budget_s: float, rep_ms: float,
               torchao_all: bool) -> dict:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(rows, cols, device=device) * 0.02) for _ in range(n_tensors)]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    numel = sum(p.numel() for p in params)
    found, missing = _optimizers(device, torchao_all)
    results, start = [], time.time()
    for name, key, make in found:
        if time.time() - start > time_budget_s:
            missing[name] = f"skipped: the {time_budget_s:.0f} s budget of this section was spent"
            continue
        opt = None
        for p, g in zip(params, grads):  # the same gradients for everyone (an optimizer may free them)
            p.grad = g
        try:
            opt = make(params)
            t0 = time.time()
            for _ in range(3):  # compile / build tables / allocate state
                opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            warm_s = time.time() - t0
            ms = _median_ms(opt.step, device, rep_ms)
            ms2 = _median_ms(opt.step, device, rep_ms)
            results.append(dict(name=name, key=key, ms=ms, ms_repeat=ms2,
                                bytes_per_param=state_bytes_per_param(opt, numel),
                                napkin_bytes=NAPKIN_BYTES[key], first_steps_s=warm_s))
            print(f"{name:32s} {ms:8.3f} ms (again {ms2:8.3f})  {results[-1]['bytes_per_param']:.3f} B/param  "
                  f"first 3 steps {warm_s:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            missing[name] = f"{type(e).__name__}: {e}"[:300]
            print(f"{name}: FAILED {missing[name]}", flush=True)
        finally:
            opt = None
            if device == "cuda":
                torch.cuda.empty_cache()
    by_name = {r["name"]: r for r in results}
    anchor = by_name[ANCHOR]["ms"]
    peers = {k: by_name[k]["ms"] for k in ("bitsandbytes AdamW8bit", "torchao AdamW8bit") if k in by_name}
    for r in results:
        r["ratio_vs_fused"] = r["ms"] / anchor
        r["achieved_TBps"] = r["napkin_bytes"] * numel / (r["ms"] * 1e-3) / 1e12
        for peer, peer_ms in peers.items():
            r[f"speedup_vs {peer}"] = peer_ms / r["ms"]
    return dict(numel=numel, shape=[n_tensors, rows, cols], rows=results, missing=missing)


def bench_gpt_memory(device: str, n_layer: int, d_model: int, n_head: int, batch: int, seq: int,
                     vocab: int) -> list[dict]:
    import torch.nn.functional as F

    from mixprec.train.models import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=vocab, seq_len=seq, n_layer=n_layer, n_head=n_head, d_model=d_model,
                    attention="sdpa")
    cuda = device == "cuda"
    out = []
    for name, make in (("torch fused AdamW (fp32 state)", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=cuda)),
                       ("mixprec AdamW fp32 state", lambda ps: mo.AdamW(ps, lr=1e-4, state_dtype="fp32")),
                       ("mixprec AdamW int8 state", lambda ps: mo.AdamW(ps, lr=1e-4, state_dtype="int8"))):
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        opt = make(model.parameters())
        idx = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(4):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.time()
            with torch.autocast(device, dtype=torch.bfloat16):
                logits = model(idx)
            loss = F.cross_entropy(logits.float().flatten(0, 1), idx.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.time() - t0)
        n = sum(p.numel() for p in model.parameters())
        row = dict(name=name, params=n, state_bytes_per_param=state_bytes_per_param(opt, n),
                   state_GiB=state_bytes_per_param(opt, n) * n / 2 ** 30, step_s=min(times[1:]), loss=loss.item())
        if cuda:
            row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
            row["after_step_GiB"] = torch.cuda.memory_allocated() / 2 ** 30
        out.append(row)
        print(row, flush=True)
        del model, opt, logits, loss
        if cuda:
            torch.cuda.empty_cache()
    return out


def print_tables(out: dict) -> None:
    step = out["step"]
    peers = [k for k in ("bitsandbytes AdamW8bit", "torchao AdamW8bit") if any(r["name"] == k for r in step["rows"])]
    print(f"\n{step['numel'] / 1e6:.0f}M params ({' x '.join(map(str, step['shape']))}), "
          f"{out['device']}, torch {out['torch']}")
    head = f"{'optimizer':32s} {'ms':>8s} {'x fused':>8s} " + "".join(f"{'vs ' + p.split()[0]:>14s}" for p in peers)
    print(head + f" {'B/param':>8s} {'TB/s':>6s}  target")
    for r in step["rows"]:
        key = r["key"] if r["name"].startswith("mixprec") else None
        target = []
        if key in TIME_TARGETS:
            target.append(f"<= {TIME_TARGETS[key]}x {'met' if r['ratio_vs_fused'] <= TIME_TARGETS[key] else 'MISSED'}")
        if key in BYTES_TARGETS:
            ok = r["bytes_per_param"] <= BYTES_TARGETS[key] + 1e-9
            target.append(f"<= {BYTES_TARGETS[key]} B {'met' if ok else 'MISSED'}")
        print(f"{r['name']:32s} {r['ms']:8.3f} {r['ratio_vs_fused']:8.3f} "
              + "".join(f"{r['speedup_vs ' + p]:13.2f}x" for p in peers)
              + f" {r['bytes_per_param']:8.3f} {r['achieved_TBps']:6.2f}  {'; '.join(target)}")
    for k, v in step["missing"].items():
        print(f"not run: {k}: {v}")
    for r in out.get("gpt_memory", []):
        peak = f"peak {r['peak_GiB']:.2f} GiB" if "peak_GiB" in r else "peak n/a (CPU)"
        print(f"GPT {r['params'] / 1e6:.0f}M {r['name']:32s} {peak}, state {r['state_GiB']:.3f} GiB "
              f"({r['state_bytes_per_param']:.3f} B/param), step {r['step_s'] * 1e3:.0f} ms, loss {r['loss']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check that every piece runs")
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--size", type=int, default=4096, help="each tensor is size x size")
    ap.add_argument("--rep-ms", type=float, default=300.0, help="do_bench's repeat time per measurement")
    ap.add_argument("--step-budget-s", type=float, default=200.0, help="time for the step section")
    ap.add_argument("--torchao-all", action="store_true", help="also torchao AdamW4bit and AdamWFp8")
    ap.add_argument("--no-gpt", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = "cpu" if args.smoke else args.device
    tensors, size = (2, 128) if args.smoke else (args.tensors, args.size)
    gpt = dict(n_layer=2, d_model=64, n_head=4, batch=2, seq=32, vocab=256) if args.smoke else \
        dict(n_layer=12, d_model=1024, n_head=16, batch=8, seq=1024, vocab=50304)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}", flush=True)
    out = {"torch": torch.__version__, "device": name, "command": " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d %H:%M"),
           "step": bench_step(device, tensors, size, size, args.step_budget_s, args.rep_ms, args.torchao_all)}
    if not args.no_gpt:
        out["gpt_memory"] = bench_gpt_memory(device, **gpt)
        out["gpt_config"] = gpt
    print_tables(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
