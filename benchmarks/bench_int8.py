"""INT8 training benchmarks for a GPU with INT8 tensor cores (compute capability 8.0+); every figure is a
ratio against the BF16 anchor measured in the same process.

    python benchmarks/bench_int8.py [gemm|gpt|all]   (default all)

gemm   the GEMMs of a d=4096 GPT's linear layers, M = 8192 tokens, (K, N) = (4096, 12288) qkv,
       (4096, 4096) proj, (4096, 16384) MLP up, (16384, 4096) MLP down: BF16 torch.mm (the anchor), FP8
       E4M3 torch._scaled_mm with rowwise scales (operands quantized beforehand), torch._int_mm alone
       (int32 out), mixprec.int8.gemm.mm_nt on given codes (int32 GEMM + FP32 scaling, eager and compiled),
       and mixprec.int8.int8_matmul (rowwise quantization of both BF16 operands + GEMM + scaling, eager and
       compiled); the same through the Triton GEMM that scales in its epilogue (backend "triton"). CUDA
       events after warm-up, the median of several runs; TFLOP/s = 2 M N K / time.
gpt    a train step of the mixprec GPT (4 layers, d=4096, 32 heads, B=4, T=1024, vocab 50304, SDPA, separate
       head: bench_fp8.py's model) under torch.compile, BF16 autocast with each recipe's Linear conversion
       (Policy.from_recipe(r).converters, the default filter: the head stays BF16): bf16-mixed (none, the
       anchor), fp8-rowwise, int8-rowwise, int8-switchback (backend auto: the Triton GEMM on Hopper; each
       INT8 recipe also as <recipe>+int_mm: torch._int_mm and the scaling in PyTorch ops), and torchao's INT8
       mixed-precision training (torchao.prototype.quantized_training.int8_mixed_precision_training on the
       same layers) when torchao imports. Variants are built, compiled and warmed first, then timed in interleaved rounds;
       ratios are medians of per-round ratios. Where the GPU cannot hold every variant at once (each keeps
       about 14 GiB of FP32 weights and AdamW state), they are timed in groups beside the resident anchor.

Every variant runs in try/except: one that fails is a row saying why. `--quick` is a short smoke run
(two GEMM shapes, one layer, fewer rounds). `--device cpu --quick` runs every code path at toy sizes
(emulated INT8, no compile, perf_counter timing): its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mixprec as mp  # noqa: E402
from bench_fp8 import _first_nonfinite, failure, round_ratio, table  # noqa: E402
from mixprec.int8 import backend_info, int8_matmul  # noqa: E402
from mixprec.int8.gemm import Operand, mm_nt  # noqa: E402
from mixprec.int8.quantize import quantize as int8_quantize  # noqa: E402
from mixprec.train.bench import graph_break_count  # noqa: E402
from mixprec.train.models import GPT, GPTConfig  # noqa: E402

GEMM_SHAPES = ((4096, 12288), (4096, 4096), (4096, 16384), (16384, 4096))   # (K, N) of qkv, proj, up, down
GPT_RECIPES = ("bf16-mixed", "fp8-rowwise", "int8-rowwise", "int8-switchback", "int8-rowwise+int_mm",
               "int8-switchback+int_mm")
BACKEND_SUFFIX = "+"   # <recipe>+<backend>: the recipe with Int8Config(backend=<backend>) in place of auto's choice
TORCHAO = "torchao-int8-mp"
STEADY_BYTES_PER_PARAM = 12      # what a variant keeps between steps: FP32 weights and two FP32 AdamW moments
GRAD_BYTES_PER_PARAM = 4         # the FP32 gradients of the one variant stepping (freed by zero_grad)
MEMORY_HEADROOM = 16 * 2 ** 30   # activations (~5 GiB at the default sizes), workspaces, allocator slack


# ---- timing ---------------------------------------------------------------------------------------------
def time_ms(fn, device: str, warmup: int, runs: int, calls: int) -> float:
    """Median over `runs` of the mean milliseconds of `calls` back-to-back fn() (CUDA events) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


# ---- GEMMs ------------------------------------------------------------------------------------------------
def gemm_cases(a: torch.Tensor, b: torch.Tensor, compile_: bool) -> list[tuple[str, object]]:
    """(name, fn) for one shape: a (M, K) and b (N, K) in BF16, y = a @ b^T."""
    dev = a.device.type
    backend = "int_mm" if dev == "cuda" else "emulate"
    qa, sa = int8_quantize(a, "rowwise")
    qb, sb = int8_quantize(b, "rowwise")
    ops = (Operand(qa, sa), Operand(qb, sb))
    bt_int8 = qb.t()   # column-major (K, N): cuBLASLt's INT8 layout

    def mm_codes():
        return mm_nt(*ops, out_dtype=torch.bfloat16, backend=backend)

    def quantize_mm():
        return int8_matmul(a, b, out_dtype=torch.bfloat16, backend=backend)

    def triton_codes():
        return mm_nt(*ops, out_dtype=torch.bfloat16, backend="triton")

    def triton_quantize_mm():
        return int8_matmul(a, b, out_dtype=torch.bfloat16, backend="triton")

    cases = [("bf16 torch.mm", lambda: torch.mm(a, b.t())),
             ("fp8 e4m3 torch._scaled_mm, rowwise scales", fp8_rowwise_case(a, b)),
             ("int8 torch._int_mm alone (int32 out)", lambda: torch._int_mm(qa, bt_int8)),
             ("int8 mm_nt on codes (GEMM + scaling), eager", mm_codes),
             ("int8 int8_matmul (quantize + GEMM + scaling), eager", quantize_mm)]
    if dev == "cuda":
        cases.append(("int8 Triton GEMM on codes (scaling in its epilogue)", triton_codes))
    if compile_:
        cases += [("int8 mm_nt on codes, compiled", torch.compile(mm_codes, dynamic=False)),
                  ("int8 int8_matmul, compiled", torch.compile(quantize_mm, dynamic=False))]
        if dev == "cuda":
            cases.append(("int8 int8_matmul with the Triton GEMM, compiled",
                          torch.compile(triton_quantize_mm, dynamic=False)))
    return cases


def fp8_rowwise_case(a: torch.Tensor, b: torch.Tensor):
    """torch._scaled_mm on E4M3 operands quantized beforehand: rowwise dequantization scales (M, 1) and (1, N)."""
    fp8 = torch.float8_e4m3fn

    def quant(x):
        scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
        return (x.float() / scale).to(fp8), scale

    qa, sa = quant(a)
    qb, sb = quant(b)
    bt, sbt = qb.t(), sb.t().contiguous()   # b column-major, as _scaled_mm wants
    return lambda: torch._scaled_mm(qa, bt, scale_a=sa, scale_b=sbt, out_dtype=torch.bfloat16)


def run_gemm(args) -> list[dict]:
    dev = args.device
    shapes = GEMM_SHAPES[:2] if args.quick else GEMM_SHAPES
    m = args.tokens
    if dev == "cpu":   # toy sizes: every code path, no meaning
        m, shapes = 64, tuple((k // 32, n // 32) for k, n in shapes)
    warmup, runs, calls = (3, 3, 5) if args.quick or dev == "cpu" else (10, 7, 20)
    rows = []
    for k, n in shapes:
        torch.manual_seed(0)
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        flop = 2 * m * n * k
        try:
            cases = gemm_cases(a, b, compile_=args.compile)
        except Exception as err:
            rows.append(dict(shape=f"{m}x{k}x{n}", variant="(setup)", note=failure(err)))
            continue
        anchor = None
        for name, fn in cases:
            row = dict(shape=f"M={m} K={k} N={n}", variant=name)
            try:
                ms = time_ms(fn, dev, warmup, runs, calls)
            except Exception as err:   # e.g. FP8 on a GPU without it: a row saying why
                row["note"] = failure(err)
                rows.append(row)
                continue
            anchor = anchor if anchor is not None else (ms if name.startswith("bf16") else None)
            row.update(ms=round(ms, 4), TFLOPs=round(flop / ms / 1e9, 1),
                       vs_bf16=round(anchor / ms, 3) if anchor else None)
            rows.append(row)
            print(row, flush=True)
        del a, b, cases
        if dev == "cuda":
            torch.cuda.empty_cache()
    print(table(rows, ["shape", "variant", "ms", "TFLOPs", "vs_bf16", "note"]), flush=True)
    return rows


# ---- GPT end to end ---------------------------------------------------------------------------------------
def gpt_config(args) -> GPTConfig:
    return GPTConfig(vocab_size=args.vocab, seq_len=args.seq, n_layer=args.layers, n_head=args.heads,
                     d_model=args.d, attention="sdpa", head="separate")


def make_gpt(kind: str, args) -> tuple[nn.Module, int]:
    """The GPT under `kind` (a recipe, or TORCHAO) and its number of low-precision Linear layers."""
    model = GPT(gpt_config(args)).to(args.device)
    if kind == TORCHAO:
        from torchao.prototype.quantized_training import int8_mixed_precision_training
        from torchao.quantization import quantize_
        # the layers mixprec's default filter converts (the head stays BF16), so both convert alike
        # module_swap: torchao 0.17's default (a tensor-subclass weight) registers its F.linear override where
        # __torch_function__ does not look, so its layers silently run plain BF16 matmuls
        names = set(int8_names(model))
        quantize_(model, int8_mixed_precision_training(module_swap=True), filter_fn=lambda mod, fqn: fqn in names)
        swapped = sum(type(m).__name__ == "Int8MixedPrecisionTrainingLinear" for m in model.modules())
        if swapped != len(names):
            raise RuntimeError(f"torchao converted {swapped} of the {len(names)} Linear layers")
        return model, swapped
    if BACKEND_SUFFIX in kind:
        recipe, backend = kind.split(BACKEND_SUFFIX)
        policy = mp.Policy.from_recipe(recipe, int8=mp.int8.Int8Config(recipe=recipe.removeprefix("int8-"),
                                                                       backend=backend))
    else:
        policy = mp.Policy.from_recipe(kind)
    for converter in policy.converters:   # the recipe's Linear conversion only; autocast is the step's
        model = converter.convert_model(model)
    low = sum(type(m).__name__ in ("Float8Linear", "Int8Linear") for m in model.modules())
    return model, low


def int8_names(model: nn.Module) -> list[str]:
    rule = mp.int8.default_filter(model, mp.int8.Int8Config())
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and rule(name, m) is None]


class GPTRun:
    """One variant built, compiled and warmed: its step function and its timings."""

    def __init__(self, kind: str, args, x: torch.Tensor, y: torch.Tensor):
        self.kind, self.note = kind, ""
        dev = args.device
        base = torch.cuda.memory_allocated() if dev == "cuda" else 0
        torch.manual_seed(0)
        self.model, self.low = make_gpt(kind, args)
        model = self.model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")

        def forward_loss(x, y):
            with torch.autocast(dev, dtype=torch.bfloat16):
                logits = model(x)
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

        if args.compile:
            forward_loss = torch.compile(forward_loss)

        def step():
            loss = forward_loss(x, y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return loss.detach()

        self.step = step
        t0 = time.perf_counter()
        breaks = graph_break_count()
        try:
            self.losses = [step()]
        except (RuntimeError, TypeError, NotImplementedError) as err:
            if dev != "cuda":
                raise
            # a tensor-subclass weight (torchao's) that the fused AdamW kernel refuses: the foreach one, noted
            # (the step failed before updating anything, or the retry's loss shows it)
            self.opt.zero_grad(set_to_none=True)
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            self.note = f"AdamW foreach (fused refused: {type(err).__name__})"
            self.losses = [step()]
        self.losses += [step() for _ in range(2)]
        if dev == "cuda":
            torch.cuda.synchronize()
        self.warm_s = time.perf_counter() - t0
        self.graph_breaks = graph_break_count() - breaks if args.compile else None
        # what this variant keeps between steps: its peak is counted above the other resident variants
        self.steady = torch.cuda.memory_allocated() - base if dev == "cuda" else 0
        self.ms: list[float] = []
        self.peak = math.nan

    def time_steps(self, steps: int, device: str) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
            others = torch.cuda.memory_allocated() - self.steady
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        start = end = None
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(steps):
            self.losses.append(self.step())
        if device == "cuda":
            end.record()
            torch.cuda.synchronize()
            self.ms.append(start.elapsed_time(end) / steps)
            peak = (torch.cuda.max_memory_allocated() - others) / 2**30
            self.peak = peak if math.isnan(self.peak) else max(self.peak, peak)
        else:
            self.ms.append((time.perf_counter() - t0) * 1e3 / steps)

    def release(self) -> None:
        self.model = self.opt = self.step = None


def gpt_kinds(args) -> list[str]:
    """The variants to time, the anchor (bf16-mixed) first."""
    kinds = list(GPT_RECIPES) + [TORCHAO]
    if args.device != "cuda":   # the GPU backends run on GPUs only
        kinds = [k for k in kinds if BACKEND_SUFFIX not in k]
    if args.variants:
        wanted = args.variants.split(",")
        kinds = ["bf16-mixed"] + [k for k in kinds if k in wanted and k != "bf16-mixed"]
    return kinds


def group_size(args) -> int:
    """How many variants besides the resident anchor the GPU holds at once (all of them off CUDA)."""
    if args.device != "cuda":
        return 1 << 30
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(gpt_config(args)).parameters())
    free = torch.cuda.get_device_properties(0).total_memory - MEMORY_HEADROOM - GRAD_BYTES_PER_PARAM * n_params
    return max(1, int(free // (STEADY_BYTES_PER_PARAM * n_params)) - 1)


def torchao_missing() -> str | None:
    """Why torchao's INT8 mixed-precision training cannot run here, or None."""
    try:
        from torchao.prototype.quantized_training import int8_mixed_precision_training  # noqa: F401
        from torchao.quantization import quantize_  # noqa: F401
    except Exception as err:   # absent, or without the prototype
        return (f"torchao not importable here ({type(err).__name__}: {str(err).strip().splitlines()[0][:80] if str(err).strip() else ''}); "
                f"benchmarks/run_gpu.sh installs it from the wheels in .whl/ when they are there")
    return None


def variant_groups(kinds: list[str], size: int) -> list[list[str]]:
    """kinds in groups of at most `size` (at least one group). torchao's conversion changes process-wide
    state that makes the variants compiled before it recompile (a GPU run failed that way), so it gets a
    group of its own, after the others are timed."""
    ours = [k for k in kinds if k != TORCHAO]
    groups = [ours[i:i + size] for i in range(0, len(ours), size)] + ([[TORCHAO]] if TORCHAO in kinds else [])
    return groups or [[]]


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_gpt(args) -> list[dict]:
    """The anchor stays resident; the other variants are built in groups that fit beside it, and each group
    is timed with the anchor in --rounds interleaved rounds; each ratio is the median over its rounds."""
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev, generator=gen)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev, generator=gen)
    tokens = args.batch * args.seq
    kinds = gpt_kinds(args)
    rows, failed = [], []
    missing = torchao_missing() if TORCHAO in kinds else None
    if missing:
        kinds.remove(TORCHAO)
        failed.append(dict(variant=TORCHAO, note=missing))
    torch._dynamo.reset()
    try:
        anchor = GPTRun("bf16-mixed", args, x, y)
    except Exception as err:
        rows.append(dict(variant="bf16-mixed", note=failure(err)))
        print(table(rows + failed, ["variant", "note"]), flush=True)
        return rows + failed
    others = kinds[1:]
    size = group_size(args)
    groups = variant_groups(others, size)
    print(f"built the anchor bf16-mixed (warm-up {anchor.warm_s:.1f} s); other variants in groups beside it: "
          f"{groups}", flush=True)
    for g, group in enumerate(groups):
        runs = [anchor]
        for kind in group:
            try:
                runs.append(GPTRun(kind, args, x, y))
                print(f"built {kind}: {runs[-1].low} low-precision Linear layers, warm-up {runs[-1].warm_s:.1f} s",
                      flush=True)
            except Exception as err:
                failed.append(dict(variant=kind, group=g, note=failure(err)))
                _free(dev)
        first = len(anchor.ms)
        for r in range(args.rounds):
            for run in list(runs):
                try:
                    run.time_steps(args.steps, dev)
                except Exception as err:   # reported; the others go on
                    failed.append(dict(variant=run.kind, group=g, note=failure(err)))
                    runs.remove(run)
                    run.release()
            print(f"group {g} round {r + 1}: " + ", ".join(f"{run.kind} {run.ms[-1]:.2f} ms" for run in runs),
                  flush=True)
        if anchor not in runs:
            break
        anchor_ms = anchor.ms[first:]
        for run in runs:
            if run is anchor and g > 0:
                continue
            ms = run.ms[first:] if run is anchor else run.ms
            same = run is not anchor and run.losses[0].item() == anchor.losses[0].item()
            row = dict(variant=run.kind, group=g, low_linears=run.low, ms_per_step=round(statistics.median(ms), 2),
                       tokens_per_s=round(tokens / statistics.median(ms) * 1e3),
                       vs_bf16=round_ratio(anchor_ms, ms), vs_bf16_rounds=[round(a / b, 3) for a, b in zip(anchor_ms, ms)],
                       ms_rounds=[round(v, 2) for v in ms],
                       peak_GiB=round(run.peak, 2) if not math.isnan(run.peak) else None,
                       first_loss=round(run.losses[0].item(), 4), loss=round(run.losses[-1].item(), 4),
                       nonfinite_from_step=_first_nonfinite(run.losses), warmup_s=round(run.warm_s, 1),
                       graph_breaks=run.graph_breaks,
                       note="; ".join(n for n in (run.note, "first loss equals bf16-mixed's exactly: did its low "
                                                  "precision run?" if same else "") if n))
            rows.append(row)
            print(row, flush=True)
        for run in runs:
            if run is not anchor:
                run.release()
        del runs
        _free(dev)
    anchor.release()
    rows += failed
    print(table(rows, ["variant", "group", "low_linears", "ms_per_step", "tokens_per_s", "vs_bf16", "peak_GiB",
                       "first_loss", "loss", "nonfinite_from_step", "warmup_s", "graph_breaks", "note"]), flush=True)
    print(table(rows, ["variant", "group", "ms_rounds", "vs_bf16_rounds"]), flush=True)
    return rows


# ---- main -------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=["all", "gemm", "gpt"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="a short smoke run: 2 GEMM shapes, 1 layer, 2 rounds of 3 steps")
    ap.add_argument("--tokens", type=int, default=8192, help="gemm: M, the tokens of a step")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--steps", type=int, default=10, help="gpt: timed steps per round (after 3 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=5, help="gpt: interleaved rounds; ratios are medians over them")
    ap.add_argument("--variants", default="", help=f"gpt: comma-separated subset of {', '.join(GPT_RECIPES)}, "
                                                   f"{TORCHAO} (bf16-mixed, the anchor, always runs)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="eager only (the default on the CPU)")
    ap.add_argument("--json", default=None, help="write the environment and every row here")
    args = ap.parse_args(argv)
    if args.device == "cpu":   # toy sizes: the code paths only
        args.compile = False
        args.d, args.layers, args.heads, args.seq, args.vocab, args.batch = 256, 1, 4, 32, 256, 2
        args.steps, args.rounds = 1, 2
    elif args.quick:
        args.layers, args.steps, args.rounds = 1, 3, 2
    return args


def environment(args) -> dict:
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, command="python " + " ".join(sys.argv),
               date=time.strftime("%Y-%m-%d %H:%M"),
               device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    if args.device == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        env["int8_backend"] = backend_info("auto", args.device)
    except Exception as err:
        env["int8_backend"] = failure(err)
    try:
        import torchao
        env["torchao"] = torchao.__version__
    except Exception as err:
        env["torchao"] = f"not available: {type(err).__name__}"
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_int8.py: no CUDA GPU visible; use --device cpu --quick for the code paths", file=sys.stderr)
        return 1
    env = environment(args)
    print(env, flush=True)
    out = dict(env=env, args=vars(args))
    t0 = time.perf_counter()
    if args.what in ("all", "gemm"):
        out["gemm"] = run_gemm(args)
    if args.what in ("all", "gpt"):
        out["gpt"] = run_gpt(args)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"done in {out['wall_s']} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
