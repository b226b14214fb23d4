"""AdamW step time and state memory: mixprec's low-bit AdamW against torch, bitsandbytes and torchao.

    python benchmarks/bench_optim.py --device cuda [--json out.json]     # the lent H100
    python benchmarks/bench_optim.py --codes-study                      # CPU: how the codes were chosen

CUDA, all in one process:
  1. one AdamW step over 268M FP32 parameters (16 x 4096x4096, fixed random gradients), median time
     (triton.testing.do_bench) of: torch fused AdamW (the anchor), torch foreach AdamW, mixprec with
     fp32/bf16/int8/int4/fp8 state, bitsandbytes AdamW8bit, torchao AdamW8bit/AdamW4bit/AdamWFp8
     (those that import); ratio to the anchor, state bytes per parameter, achieved bandwidth;
  2. peak memory of a training step of the 12-layer d=1024 GPT (B=8, T=1024, BF16 autocast, FP32
     weights) with torch fused AdamW, mixprec fp32 state and mixprec int8 state.
Codes study (CPU): parameter deviation from torch.optim.AdamW after 100 steps of an MLP's minibatch
  gradients (tests/test_optim_accuracy.py's task) for candidate codes of each moment, the other exact.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import mixprec.optim as mo

N_TENSORS, ROWS, COLS = 16, 4096, 4096
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


def _tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a state tensor, looking inside tensor subclasses (torchao's quantized states)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes_per_param(opt: torch.optim.Optimizer, numel: int) -> float:
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step" and v.numel() > 1:
                total += _tensor_bytes(v)
    return total / numel


def _optimizers():
    """(name, napkin key, factory) for every optimizer that can be built here; missing ones say why."""
    found, missing = [], {}
    found.append(("torch fused AdamW (anchor)", "fp32", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)))
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
        found.append(("torchao AdamW4bit", "int4", lambda ps: AdamW4bit(ps, lr=1e-4)))
        found.append(("torchao AdamWFp8", "fp8", lambda ps: AdamWFp8(ps, lr=1e-4)))
    except Exception as e:  # noqa: BLE001
        missing["torchao"] = f"{type(e).__name__}: {e}"[:300]
    return found, missing


def bench_step(time_budget_s: float) -> dict:
    import triton.testing

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(ROWS, COLS, device="cuda") * 0.02) for _ in range(N_TENSORS)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    found, missing = _optimizers()
    rows, start = [], time.time()
    for name, key, make in found:
        if time.time() - start > time_budget_s:
            missing[name] = f"skipped: the {time_budget_s:.0f} s budget of this section was spent"
            continue
        try:
            opt = make(params)
            t0 = time.time()
            for _ in range(3):  # compile / build tables / allocate state
                opt.step()
            torch.cuda.synchronize()
            warm_s = time.time() - t0
            ms = triton.testing.do_bench(opt.step, warmup=50, rep=300, return_mode="median")
            ms2 = triton.testing.do_bench(opt.step, warmup=10, rep=300, return_mode="median")
            rows.append(dict(name=name, ms=ms, ms_repeat=ms2, bytes_per_param=state_bytes_per_param(opt, numel),
                             napkin_bytes=NAPKIN_BYTES[key], first_steps_s=warm_s))
            print(f"{name:32s} {ms:7.3f} ms (again {ms2:7.3f})  {rows[-1]['bytes_per_param']:.3f} B/param", flush=True)
        except Exception as e:  # noqa: BLE001
            missing[name] = f"{type(e).__name__}: {e}"[:300]
            print(f"{name}: FAILED {missing[name]}", flush=True)
        finally:
            opt = None
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3 if p.grad is None else p.grad
            torch.cuda.empty_cache()
    anchor = rows[0]["ms"]
    for r in rows:
        r["ratio_vs_fused"] = r["ms"] / anchor
        r["achieved_TBps"] = r["napkin_bytes"] * numel / (r["ms"] * 1e-3) / 1e12
    return dict(numel=numel, rows=rows, missing=missing)


def bench_gpt_memory() -> list[dict]:
    import torch.nn.functional as F

    from mixprec.train.models import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=50304, seq_len=1024, n_layer=12, n_head=16, d_model=1024, attention="sdpa")
    out = []
    for name, make in (("torch fused AdamW (fp32 state)", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
                       ("mixprec AdamW fp32 state", lambda ps: mo.AdamW(ps, lr=1e-4, state_dtype="fp32")),
                       ("mixprec AdamW int8 state", lambda ps: mo.AdamW(ps, lr=1e-4, state_dtype="int8"))):
        torch.manual_seed(0)
        model = GPT(cfg).cuda()
        opt = make(model.parameters())
        idx = torch.randint(0, cfg.vocab_size, (8, 1024), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(4):
            torch.cuda.synchronize()
            t0 = time.time()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(idx)
            loss = F.cross_entropy(logits.float().flatten(0, 1), idx.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.time() - t0)
        n = sum(p.numel() for p in model.parameters())
        out.append(dict(name=name, params=n, peak_GiB=torch.cuda.max_memory_allocated() / 2 ** 30,
                        state_bytes_per_param=state_bytes_per_param(opt, n), step_s=min(times[1:]),
                        loss=loss.item()))
        print(out[-1], flush=True)
        del model, opt, logits, loss
        torch.cuda.empty_cache()
    return out


def codes_study() -> list[tuple[str, str, float]]:
    """Deviation from torch AdamW for candidate codes of one moment (the other kept FP32)."""
    import sys
    from dataclasses import dataclass
    from pathlib import Path

    from mixprec.optim import codes as C
    from mixprec.optim import adamw as A

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import test_optim_accuracy as acc  # the task the accuracy test uses

    @dataclass(frozen=True)
    class Exact:  # no quantization: stores the scaled FP32 value
        name: str = "exact"
        max_value: float = 1.0
        bits: int = 32
        signed: bool = True

        def encode(self, u):
            return u.float().clone()

        def decode(self, c):
            return c.float()

    def mf(signed, e, m, sub):
        return C.Minifloat(f"E{e}M{m}", signed=signed, exp_bits=e, man_bits=m, subnormals=sub)

    candidates = [
        ("8-bit m", "E2M5 (chosen)", mf(True, 2, 5, True), Exact()), ("8-bit m", "E3M4", mf(True, 3, 4, True), Exact()),
        ("8-bit m", "E4M3 (FP8)", C.FP8_M, Exact()),
        ("8-bit v", "E4M4, no zero (chosen)", Exact(), mf(False, 4, 4, False)),
        ("8-bit v", "E5M3, no zero", Exact(), mf(False, 5, 3, False)),
        ("8-bit v", "FP8 E4M3, floored (chosen for fp8)", Exact(), C.FP8_V),
        ("8-bit v", "FP8 E5M2", Exact(), C.NativeFloat8("e5m2", torch.float8_e5m2, 57344.0, signed=False)),
        ("4-bit m", "E2M1 (chosen)", mf(True, 2, 1, True), Exact()), ("4-bit m", "E3M0", mf(True, 3, 0, True), Exact()),
        ("4-bit m", "E1M2", mf(True, 1, 2, True), Exact()),
        ("4-bit v", "E2M2, no zero (chosen)", Exact(), mf(False, 2, 2, False)),
        ("4-bit v", "E3M1, no zero", Exact(), mf(False, 3, 1, False)),
        ("4-bit v", "E4M0, no zero", Exact(), mf(False, 4, 0, False)),
    ]
    results = []
    torch.set_num_threads(1)
    for i, (what, label, m_code, v_code) in enumerate(candidates):
        name = f"study{i}"
        block = 128 if what.startswith("4") else 256
        C.STATE_FORMATS[name] = C.StateFormat(name, m_code, v_code, block=block, bits=8)
        A.STATE_DTYPES = A.STATE_DTYPES + (name,)
        dev = acc._deviation_vs_torch(name)
        results.append((what, label, dev))
        print(f"{what:8s} {label:36s} {dev:.4f}", flush=True)
    for sd in ("int8", "fp8", "int4", "bf16"):
        dev = acc._deviation_vs_torch(sd)
        results.append(("both", sd, dev))
        print(f"both     {sd:36s} {dev:.4f}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda"])
    ap.add_argument("--codes-study", action="store_true", help="run the CPU codes study instead")
    ap.add_argument("--step-budget-s", type=float, default=200.0, help="time for the step section")
    ap.add_argument("--no-gpt", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.codes_study:
        out = {"codes_study": codes_study()}
    else:
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
        out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "step": bench_step(args.step_budget_s)}
        if not args.no_gpt:
            out["gpt_memory"] = bench_gpt_memory()
        print(f"\n{'optimizer':32s} {'ms':>7s} {'x fused':>8s} {'B/param':>8s} {'TB/s':>6s}")
        for r in out["step"]["rows"]:
            print(f"{r['name']:32s} {r['ms']:7.3f} {r['ratio_vs_fused']:8.2f} {r['bytes_per_param']:8.3f} "
                  f"{r['achieved_TBps']:6.2f}")
        for k, v in out["step"]["missing"].items():
            print(f"not run: {k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
