"""FP8 benchmarks (H100) and the FP8-vs-BF16 accuracy run (CPU or GPU).

    python benchmarks/bench_fp8.py quantize            Triton quantize kernels vs a device-to-device copy
    python benchmarks/bench_fp8.py linear              Float8Linear fwd+bwd at 8192^3 vs nn.Linear in BF16
    python benchmarks/bench_fp8.py gpt                 4-layer d=4096 GPT train step, compiled: BF16,
                                                       mixprec FP8 recipes, torchao float8 (same process)
    python benchmarks/bench_fp8.py accuracy --device cpu|cuda --steps N
                                                       byte-level GPT on Python stdlib source: final
                                                       validation loss of BF16 vs the FP8 recipes

Every speed figure is a ratio against the anchor measured in the same process. Results print as a
table and, with --json PATH, are written for benchmarks/results/fp8.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mixprec.fp8 import Float8Config, backend_info, convert  # noqa: E402


# ---- a minimal GPT (pre-norm, GELU MLP, no biases, untied head) --------------------------------
# BF16 emulation for CPUs without fast BF16 GEMMs (this one runs them ~30x slower than FP32): what
# autocast would compute in BF16 (linear, attention) gets BF16-rounded inputs and outputs, FP32 math.
EMULATE_BF16 = False


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float() if EMULATE_BF16 else t


class Linear(nn.Linear):
    """nn.Linear, with BF16 rounding of inputs, weight and output when EMULATE_BF16 is set."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16(F.linear(bf16(x), bf16(self.weight)))


class Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = Linear(d, 3 * d, bias=False)
        self.proj = Linear(d, d, bias=False)
        self.fc = Linear(d, 4 * d, bias=False)
        self.fc_out = Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        a = bf16(F.scaled_dot_product_attention(bf16(q), bf16(k), bf16(v), is_causal=True))
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_layer: int, n_head: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = Linear(d, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:   # GPT-2 init; residual projections scaled by depth
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def head_filter(name: str, module: nn.Module) -> bool:
    return "lm_head" not in name


# ---- timing helpers ---------------------------------------------------------------------------
def bench_ms(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of fn() with CUDA events (warm-up excluded)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) + " |" for r in rows]
    return "\n".join(lines)


# ---- quantize kernels -------------------------------------------------------------------------
def run_quantize() -> list[dict]:
    from mixprec.fp8 import kernels
    n = 8192
    src = torch.randn(n * n * 4, device="cuda", dtype=torch.bfloat16)   # 512 MiB: far past the L2
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * 2 / copy_ms / 1e9                        # read + write, TB/s
    del src, dst
    rows = [dict(kernel="D2D copy (bf16, 512 MiB)", ms=f"{copy_ms:.3f}", TBps=f"{copy_bw:.2f}", of_copy="1.00")]
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, n, device="cuda", dtype=torch.float32)
    e = n * n
    cases = [
        ("1x128 + 128x1 transposed, bf16 in", lambda: kernels.quantize_1x128_t(x, "fp8_e4m3"),
         2 * e + 2 * e + 2 * 4 * e / 128),
        ("128x128 + transposed, fp32 in", lambda: kernels.quantize_128x128_t(w, "fp8_e4m3"), 4 * e + 2 * e),
        ("tensorwise amax pass, bf16 in", lambda: kernels.tensor_amax(x), 2 * e),
        ("tensorwise cast + transposed", lambda: kernels.quantize_tensor_t(x, "fp8_e4m3", amax=amax), 2 * e + 2 * e),
        ("tensorwise both passes (online)", lambda: kernels.quantize_tensor_t(x, "fp8_e4m3"), 2 * e + 2 * e + 2 * e),
    ]
    amax = kernels.tensor_amax(x)
    for name, fn, nbytes in cases:
        ms = bench_ms(fn)
        bw = nbytes / ms / 1e9
        rows.append(dict(kernel=name, ms=f"{ms:.3f}", TBps=f"{bw:.2f}", of_copy=f"{bw / copy_bw:.2f}"))
    print(table(rows, ["kernel", "ms", "TBps", "of_copy"]))
    return rows


# ---- Float8Linear vs nn.Linear ------------------------------------------------------------------
def run_linear() -> list[dict]:
    m = n = k = 8192
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    base = nn.Linear(k, n, bias=False, device="cuda")            # FP32 master weight, as in training

    def step(layer):
        def fn():
            x.grad = None
            layer.weight.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
            y.backward(dy)
        return fn

    flop = 3 * 2 * m * n * k
    rows = []
    anchor = {}
    variants = [("nn.Linear bf16 autocast", lambda: base, None)]
    for recipe in ("tensorwise", "rowwise", "blockwise"):
        for backend in ("triton", "cublas"):
            variants.append((f"mixprec {recipe} ({backend})",
                             lambda r=recipe, b=backend: convert(nn.Sequential(base), Float8Config(recipe=r, backend=b),
                                                                 filter=lambda *_: True)[0], None))
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        for recipe in ("tensorwise", "rowwise"):
            variants.append((f"torchao {recipe}", lambda r=recipe: convert_to_float8_training(
                nn.Sequential(nn.Linear(k, n, bias=False, device="cuda")),
                config=Float8LinearConfig.from_recipe_name(r))[0], None))
    except ImportError as e:
        print("torchao not available:", e)
    for name, make, _ in variants:
        for mode in ("eager", "compiled"):
            if name.startswith("torchao") and mode == "eager":
                continue   # torchao float8 is meant to run compiled
            torch._dynamo.reset()
            layer = make()
            if name.startswith("torchao"):
                layer.weight.data.copy_(base.weight.data)
            fn_layer = torch.compile(layer) if mode == "compiled" else layer
            try:
                ms = bench_ms(step(fn_layer if mode == "eager" else _Wrap(fn_layer, layer)), warmup=5, rep=30)
            except Exception as err:  # report, don't hide, a variant that fails
                rows.append(dict(variant=name, mode=mode, ms="failed", note=str(err).splitlines()[0][:80]))
                continue
            if name.startswith("nn.Linear"):
                anchor[mode] = ms
            ref = anchor.get(mode, anchor.get("eager"))
            rows.append(dict(variant=name, mode=mode, ms=f"{ms:.3f}", TFLOPs=f"{flop / ms / 1e9:.0f}",
                             speedup=f"{ref / ms:.2f}x"))
    print(table(rows, ["variant", "mode", "ms", "TFLOPs", "speedup", "note"]))
    return rows


class _Wrap:
    """A compiled module with the weight attribute step() clears."""

    def __init__(self, fn, layer):
        self.fn, self.weight = fn, layer.weight

    def __call__(self, x):
        return self.fn(x)


# ---- end to end GPT -----------------------------------------------------------------------------
def run_gpt(steps: int = 10, vocab: int = 50304) -> list[dict]:
    d, n_layer, n_head, seq, batch = 4096, 4, 32, 1024, 4
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
    y = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
    variants = [("bf16 autocast", None)]
    variants += [(f"mixprec fp8-{r}", r) for r in ("tensorwise", "rowwise", "blockwise")]
    variants += [(f"torchao {r}", f"torchao-{r}") for r in ("tensorwise", "rowwise")]
    rows, anchor = [], None
    for name, recipe in variants:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(vocab, d, n_layer, n_head, seq).cuda()
        note = ""
        try:
            if recipe and recipe.startswith("torchao"):
                from torchao.float8 import Float8LinearConfig, convert_to_float8_training
                convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe.split("-")[1]),
                                           module_filter_fn=lambda m, fqn: "lm_head" not in fqn)
            elif recipe:
                convert(model, Float8Config(recipe=recipe))
                note = backend_info("auto", "cuda").split(":")[0]
            for block in model.blocks:
                block.compile()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

            def train_step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = loss_fn(model, x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            t0 = time.perf_counter()
            for _ in range(3):
                train_step()
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                loss = train_step()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / steps
        except Exception as err:
            rows.append(dict(variant=name, note=f"failed: {str(err).splitlines()[0][:90]}"))
            del model
            torch.cuda.empty_cache()
            continue
        tok_s = batch * seq / ms * 1e3
        anchor = anchor or tok_s
        rows.append(dict(variant=name, ms_per_step=f"{ms:.1f}", tokens_per_s=f"{tok_s / 1e3:.1f}k",
                         vs_bf16=f"{tok_s / anchor:.3f}x", peak_GiB=f"{torch.cuda.max_memory_allocated() / 2**30:.1f}",
                         loss=f"{loss.item():.3f}", warmup_s=f"{warm_s:.0f}", note=note))
        del model, opt
        torch.cuda.empty_cache()
    print(table(rows, ["variant", "ms_per_step", "tokens_per_s", "vs_bf16", "peak_GiB", "loss", "warmup_s", "note"]))
    return rows


# ---- accuracy: FP8 recipes vs BF16 on Python source ------------------------------------------------
def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """Python stdlib .py files as bytes; every 10th file (by a hash of its path) is validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        if "site-packages" in rel or "test" in rel.split("/")[0]:
            continue
        data = path.read_bytes()
        (val if zlib.crc32(rel.encode()) % 10 == 0 else train).append(data)
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()
    return as_tensor(train), as_tensor(val)


def run_accuracy(device: str, steps: int, batch: int, d: int, recipes: tuple[str, ...], seq: int = 128,
                 compile_blocks: bool = False) -> list[dict]:
    global EMULATE_BF16
    EMULATE_BF16 = device == "cpu"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=not EMULATE_BF16)
    train, val = stdlib_bytes()
    gen = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, train.numel() - seq - 1, (steps, batch), generator=gen)
    val_starts = torch.randint(0, val.numel() - seq - 1, (64, 32), generator=gen)
    window = lambda data, s: (torch.stack([data[i:i + seq] for i in s.tolist()]).to(device),
                              torch.stack([data[i + 1:i + seq + 1] for i in s.tolist()]).to(device))
    val_batches = [window(val, s) for s in val_starts]
    rows = []
    print(f"accuracy: {train.numel() / 1e6:.1f} MB train, {val.numel() / 1e6:.1f} MB val bytes; "
          f"GPT d={d} 4 layers, batch {batch}x{seq}, {steps} steps on {device}"
          f"{' (BF16 emulated by rounding)' if EMULATE_BF16 else ''}", flush=True)
    for recipe in recipes:
        torch.manual_seed(0)
        model = GPT(256, d, 4, 4, seq).to(device)
        if recipe != "bf16":   # min_features=d: every Linear of the blocks goes FP8 (the head stays BF16)
            convert(model, Float8Config(recipe=recipe.split("-")[1], min_features=min(d, 256)))
        if compile_blocks:
            for block in model.blocks:
                block.compile()
        n_fp8 = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
        t0 = time.perf_counter()
        for step in range(steps):
            xb, yb = window(train, starts[step])
            with autocast:
                loss = loss_fn(model, xb, yb)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % max(1, steps // 5) == 0:
                print(f"  {recipe} step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        with torch.no_grad(), autocast:
            val_loss = sum(loss_fn(model, xb, yb).item() for xb, yb in val_batches) / len(val_batches)
        rows.append(dict(recipe=recipe, fp8_linears=n_fp8, train_loss=f"{loss.item():.4f}", val_loss=val_loss,
                         seconds=f"{time.perf_counter() - t0:.0f}"))
        print(f"  {recipe}: val loss {val_loss:.4f}", flush=True)
    ref = rows[0]["val_loss"]
    for r in rows:
        r["vs_bf16"] = f"{100 * (r['val_loss'] - ref) / ref:+.3f}%"
        r["val_loss"] = f"{r['val_loss']:.4f}"
    print(table(rows, ["recipe", "fp8_linears", "train_loss", "val_loss", "vs_bf16", "seconds"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quantize", "linear", "gpt", "accuracy"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--recipes", default="bf16,fp8-blockwise,fp8-tensorwise,fp8-rowwise")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               command=" ".join(sys.argv))
    print(env, flush=True)
    if args.what == "quantize":
        rows = run_quantize()
    elif args.what == "linear":
        rows = run_linear()
    elif args.what == "gpt":
        rows = run_gpt(steps=args.steps or 10, vocab=args.vocab)
    else:
        rows = run_accuracy(args.device, args.steps or 300, args.batch, args.d, tuple(args.recipes.split(",")),
                            compile_blocks=args.compile)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(env=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
