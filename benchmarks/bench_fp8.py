"""FP8 benchmarks for a Hopper (or newer) GPU; every figure is a ratio against an anchor run in the same process.

    python benchmarks/bench_fp8.py quantize   Triton quantize kernels vs a device-to-device copy (HBM ceiling)
    python benchmarks/bench_fp8.py linear     Float8Linear fwd+bwd at n^3 vs nn.Linear in BF16 (autocast),
                                              eager and compiled, beside torchao float8
    python benchmarks/bench_fp8.py gpt        train step of the mixprec GPT (4 layers, d=4096, B=4, T=1024,
                                              vocab 50304) under torch.compile: BF16 autocast vs mixprec FP8
                                              recipes vs torchao float8; tokens/s and peak memory

`--warm-only` runs each variant just far enough to fill the compile caches (inductor's FX graph cache
and Triton's kernel cache, both on disk), so that several such processes can compile in parallel before
one process times the variants (benchmarks/run_gpu.sh does this). The accuracy run is `mixprec compare`
(benchmarks/results/fp8.md). `--device cpu` with small sizes checks the code paths (emulated FP8,
perf_counter timing); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mixprec.fp8 import Float8Config, backend_info, convert, quantize  # noqa: E402
from mixprec.train.models import GPT, GPTConfig  # noqa: E402

MIXPREC_RECIPES = ("tensorwise", "rowwise", "blockwise")
TORCHAO_RECIPES = ("tensorwise", "rowwise")
# quantize case (name prefix) -> the Triton kernels behind it in mixprec.fp8._kernels, whose autotuned
# configs the rows record; a name the library no longer has is skipped
TUNED_KERNELS = {"1x128": ("_quantize_1x128_t_kernel",), "128x128": ("_quantize_128x128_t_kernel",),
                 "tensorwise amax pass": ("_amax_kernel",), "tensorwise cast": ("_cast_t_kernel",),
                 "tensorwise amax + cast": ("_amax_kernel", "_cast_t_kernel"),
                 "rowwise row+column": ("_row_col_amax_kernel",), "rowwise cast": ("_cast_rowwise_t_kernel",),
                 "rowwise amax + cast": ("_row_col_amax_kernel", "_cast_rowwise_t_kernel")}


# ---- timing and printing -----------------------------------------------------------------------
def time_ms(fn, device: str, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of fn(): CUDA events through triton's do_bench, else perf_counter."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_time_ms(fn, calls: int = 20) -> float:
    """Median milliseconds of fn() without the host: CUDA graphs of `calls` x (L2 flush, fn()) and of
    `calls` x (L2 flush), the second's time taken from the first's. time_ms (do_bench) flushes L2 too,
    but it also counts the GPU's wait for the host whenever the host takes longer to launch a call than
    the GPU takes to run the flush before it (small kernels, a busy host).

    The flush reads 256 MiB, leaving L2 full of clean lines. A flush that writes (do_bench's) leaves dirty
    lines that the timed kernel pays to write back, which deflates kernels that only read (amax passes).
    """
    buffer = torch.empty(256 << 20, dtype=torch.int8, device="cuda")   # 256 MiB, past any GPU's L2

    def flush_l2():
        return torch.amax(buffer)

    def replay_ms(body) -> float:
        body()                                    # warm (and autotune) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                body()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
        return statistics.median(times)

    return replay_ms(lambda: (flush_l2(), fn())) - replay_ms(flush_l2)


def round_ratio(anchor_ms: list[float], ms: list[float]) -> float:
    """The median over rounds of each round's anchor time over this variant's (one round: the plain ratio)."""
    return round(statistics.median(a / b for a, b in zip(anchor_ms, ms)), 3)


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) + " |" for r in rows]
    return "\n".join(lines)


def failure(err: BaseException) -> str:
    """The first line of an error, short enough for a table cell; a variant that fails is reported, not hidden
    (the whole traceback goes to stderr)."""
    traceback.print_exception(err)
    return f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:110] if str(err).strip() else ''}"


# ---- quantize kernels -----------------------------------------------------------------------------
def _config_text(config) -> str:
    """A Triton config, compactly: "BR=64 BK=128 w4"."""
    if config is None:
        return "?"
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"w{config.num_warps}"])


def _tuning(autotuned) -> dict[str, float]:
    """The median milliseconds the autotuner measured for each config when it chose (its last key)."""
    timings = getattr(autotuned, "configs_timings", None) or {}
    return {_config_text(c): round(t[0] if isinstance(t, (list, tuple)) else t, 4) for c, t in timings.items()}


def run_quantize(args) -> list[dict]:
    """Each Triton quantize kernel's bandwidth (bytes it must move / time) against a D2D copy's."""
    dev, n = args.device, args.n
    src = torch.randn(n * n * 4, device=dev, dtype=torch.bfloat16)   # 8192: 512 MiB, far past the L2
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), dev)
    copy_bw = 2 * src.numel() * 2 / copy_ms / 1e6                      # read + write, GB/s
    # the graph timings' anchor: a copy as large as x (a 512 MiB copy after a 256 MiB flush measured
    # 0.40 ms in the graph against 0.26 ms by do_bench; x's size agreed with do_bench within 7%)
    part = n * n
    copy_part = lambda: dst[:part].copy_(src[:part])    # noqa: E731
    graph_copy_bw = 2 * part * 2 / graph_time_ms(copy_part) / 1e6 if dev == "cuda" else None
    del src, dst
    rows = [dict(kernel=f"D2D copy (bf16, {4 * n * n * 2 >> 20} MiB), the anchor", ms=round(copy_ms, 4),
                 GBps=round(copy_bw), of_copy=1.0, graph_of_copy=1.0 if graph_copy_bw else None)]
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, n, device=dev, dtype=torch.float32)
    e = n * n
    tuned = {}
    if dev == "cuda":
        from mixprec.fp8 import _kernels as kernels
        amax = kernels.tensor_amax(x)
        cases = [
            ("1x128 + 128x1 (x and x^T), bf16 in", lambda: kernels.quantize_1x128_t(x, "fp8_e4m3"),
             2 * e + 2 * e + 2 * 4 * e // 128),
            ("128x128 + transposed codes, fp32 in", lambda: kernels.quantize_128x128_t(w, "fp8_e4m3"), 4 * e + 2 * e),
            ("tensorwise amax pass, bf16 in", lambda: kernels.tensor_amax(x), 2 * e),
            ("tensorwise cast + transposed codes", lambda: kernels.quantize_tensor_t(x, "fp8_e4m3", amax=amax),
             2 * e + 2 * e),
            ("tensorwise amax + cast (online)", lambda: kernels.quantize_tensor_t(x, "fp8_e4m3"), 2 * e + 2 * e + 2 * e),
        ]
        # the autotuned kernels behind each case: the config each picked goes into the row (the autotuner
        # picks per process, and the same kernels have run at 0.37 and 0.70 of copy bandwidth in two)
        tuned = {prefix: [k for k in (getattr(kernels, name, None) for name in names) if k is not None]
                 for prefix, names in TUNED_KERNELS.items()}
        try:
            row_col = kernels.row_col_amax(x)
        except Exception as err:    # reported as a row; the kernels above still run
            rows.append(dict(kernel="rowwise row+column amax pass, bf16 in", note=failure(err)))
        else:
            cases += [
                ("rowwise row+column amax pass, bf16 in", lambda: kernels.row_col_amax(x), 2 * e),
                ("rowwise cast + transposed codes, pow2", lambda: kernels.quantize_rowwise_t(
                    x, "fp8_e4m3", power_of_2=True, amax=row_col), 2 * e + 2 * e),
                ("rowwise amax + cast (online), pow2",
                 lambda: kernels.quantize_rowwise_t(x, "fp8_e4m3", power_of_2=True), 2 * e + 2 * e + 2 * e),
            ]
    else:   # the PyTorch path the kernels replace: exercises this function's code on a CPU
        cases = [(f"{g} (PyTorch ops)", lambda g=g: quantize(x, "fp8_e4m3", g), 2 * e + e)
                 for g in ("1x128", "128x128", "tensorwise", "rowwise")]
    for name, fn, nbytes in cases:
        try:
            ms = time_ms(fn, dev)
        except Exception as err:
            rows.append(dict(kernel=name, note=failure(err)))
            continue
        bw = nbytes / ms / 1e6
        behind = [k for prefix, ks in tuned.items() if name.startswith(prefix) for k in ks]
        row = dict(kernel=name, ms=round(ms, 4), GBps=round(bw), of_copy=round(bw / copy_bw, 3),
                   note="; ".join(_config_text(getattr(k, "best_config", None)) for k in behind),
                   autotune_ms=[_tuning(k) for k in behind])
        if dev == "cuda":
            try:
                graph_ms = graph_time_ms(fn)
                row.update(graph_ms=round(graph_ms, 4), graph_of_copy=round(nbytes / graph_ms / 1e6 / graph_copy_bw, 3))
            except Exception as err:
                row["note"] += f"; graph timing {failure(err)}"
        rows.append(row)
    print(table(rows, ["kernel", "ms", "GBps", "of_copy", "graph_ms", "graph_of_copy", "note"]), flush=True)
    return rows


# ---- Float8Linear vs nn.Linear ------------------------------------------------------------------------
def linear_variants(args) -> list[tuple[str, str, str]]:
    """(name, kind, mode): kind 'bf16', 'mixprec-<recipe>' or 'torchao-<recipe>'; mode eager or compiled."""
    out = [("nn.Linear bf16 autocast", "bf16", "eager"), ("nn.Linear bf16 autocast", "bf16", "compiled")]
    for mode in ("eager", "compiled"):
        out += [(f"mixprec {r}", f"mixprec-{r}", mode) for r in MIXPREC_RECIPES]
    out += [(f"torchao {r}", f"torchao-{r}", "compiled") for r in TORCHAO_RECIPES]   # meant to run compiled
    if args.variants:   # also picks explicit backends: mixprec-tensorwise@cublas:compiled
        wanted = args.variants.split(",")
        out = [v for v in out if f"{v[1]}:{v[2]}" in wanted]
        out += [(f"mixprec {w.split(':')[0].removeprefix('mixprec-')}", w.split(":")[0], w.split(":")[1])
                for w in wanted if "@" in w]
    return out


def mixprec_config(kind: str) -> Float8Config:
    """'mixprec-<recipe>' or 'mixprec-<recipe>@<backend>' (e.g. mixprec-tensorwise@cublas) as a config."""
    recipe, _, backend = kind.removeprefix("mixprec-").partition("@")
    return Float8Config(recipe=recipe, backend=backend or "auto")


def make_linear(kind: str, k: int, n: int, device: str) -> nn.Module:
    """A Linear with FP32 master weights (as in training), converted as `kind` says."""
    layer = nn.Sequential(nn.Linear(k, n, bias=False, device=device))
    if kind.startswith("mixprec-"):
        convert(layer, mixprec_config(kind), filter=lambda *_: True)
    elif kind.startswith("torchao-"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        convert_to_float8_training(layer, config=Float8LinearConfig.from_recipe_name(kind.split("-")[1]))
    return layer


def linear_step(layer: nn.Module, run, x: torch.Tensor, dy: torch.Tensor):
    """One forward + backward of `layer` (called through `run`: itself or its compiled form) under BF16
    autocast, gradients cleared first: what the layer benchmarks time."""
    def step():
        x.grad = None
        layer[0].weight.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            y = run(x)
        y.backward(dy)
    return step


def print_kernel_profile(title: str, fn, steps: int = 3) -> None:
    """GPU kernels of `steps` calls of fn, by total time: shows where a variant's milliseconds go."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    print(f"kernel profile of {title}, {steps} steps:", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70), flush=True)


# kernel name fragments -> category, first match wins. Inductor's kernels come first: their names list
# the ops they fused (triton_poi_fused_fp8_quantize_1x128_t_gelu_..., triton_..._scaled_mm_...), which
# would match the later categories. cuBLAS/CUTLASS GEMMs carry sm90/gemm/xmma/nvjet.
KERNEL_CATEGORIES = [("inductor triton", ("triton_",)),
                     ("fp8 quantize (mixprec)", ("_quantize_", "_amax_kernel", "_cast_t_kernel",
                                                  "_row_col_amax", "_cast_rowwise")),
                     ("attention", ("flash", "fmha", "attention")),
                     ("optimizer", ("adam", "multi_tensor")),
                     ("gemm", ("gemm", "xmma", "nvjet", "cutlass", "sm90_", "scaled_mm")),
                     ("torch elementwise/reduce", ("elementwise", "reduce_kernel", "vectorized", "softmax",
                                                   "nll_loss", "embedding", "index")),
                     ("other", ("",))]


def kernel_breakdown(fn, steps: int = 2, top: int = 25) -> dict:
    """GPU time per step by kernel category, and the top kernels: where a variant's milliseconds go."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for ev in prof.key_averages():
        us = ev.self_device_time_total
        if us > 0:
            kernels[ev.key] = (us / 1e3 / steps, ev.count // steps)
    by_cat = {}
    for name, (ms, _) in kernels.items():
        cat = next(c for c, frags in KERNEL_CATEGORIES if any(f in name.lower() for f in frags))
        by_cat[cat] = by_cat.get(cat, 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(ms_per_step_by_category={c: round(v, 3) for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
                top_kernels=[dict(name=n[:120], ms_per_step=round(ms, 3), calls_per_step=c) for n, (ms, c) in ranked])


def steady_ms(fn, device: str, window_ms: float = 40.0) -> float:
    """Milliseconds per call of fn() called back to back (no flush, no sync) for about window_ms: training's
    steady state. On a GPU at its power cap this is the fair figure: during do_bench's L2 flush between
    calls the GPU draws less power, which favours the shorter (FP8) calls (results/fp8.md)."""
    if device != "cuda":
        return time_ms(fn, device)
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    calls = max(5, int(window_ms / max((time.perf_counter() - t0) * 1e3, 1e-3)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def run_linear(args) -> list[dict]:
    """Each variant's forward + backward timed two ways: do_bench (an L2 flush before each call) and back to
    back (steady_ms); with --rounds N > 1 all variants are built first and timed in N interleaved rounds,
    each ratio the median over rounds of the round's ratio to the BF16 times."""
    dev, n = args.device, args.n
    m = k = n
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    flop = 3 * 2 * m * n * k
    interleaved = args.rounds > 1 and not args.warm_only
    failed, built = [], []     # built: dict(name, kind, mode, step, ms and steady: one time per round each)
    torch._dynamo.reset()
    for name, kind, mode in linear_variants(args):
        if not interleaved:   # built variants keep their compiled code: no reset between them
            torch._dynamo.reset()
        torch.manual_seed(0)
        try:
            layer = make_linear(kind, k, n, dev)
            run = torch.compile(layer, backend=args.compile_backend) if mode == "compiled" else layer

            step = linear_step(layer, run, x, dy)
            step()
            if args.warm_only:
                step()
                print(f"warmed {name} ({mode})", flush=True)
                continue
            built.append(dict(name=name, kind=kind, mode=mode, step=step, ms=[], steady=[]))
            if not interleaved:
                built[-1]["ms"].append(time_ms(step, dev, warmup=5, rep=40))
                built[-1]["steady"].append(steady_ms(step, dev))
        except Exception as err:
            failed.append(dict(variant=name, mode=mode, note=failure(err)))
            print(failed[-1], flush=True)
    for r in range(args.rounds if interleaved else 0):
        for v in list(built):
            try:
                v["ms"].append(time_ms(v["step"], dev, warmup=5, rep=40))
                v["steady"].append(steady_ms(v["step"], dev))
            except Exception as err:     # reported, and the other variants go on
                failed.append(dict(variant=v["name"], mode=v["mode"], note=failure(err)))
                built.remove(v)
        print(f"round {r + 1}: " + ", ".join(f"{v['name']} ({v['mode']}) {v['ms'][-1]:.3f} / {v['steady'][-1]:.3f} ms"
                                             for v in built), flush=True)
    anchor = {v["mode"]: v["ms"] for v in built if v["kind"] == "bf16"}
    steady_anchor = {v["mode"]: v["steady"] for v in built if v["kind"] == "bf16"}
    rows = []
    for v in built:
        ms = statistics.median(v["ms"])
        note = backend_info(mixprec_config(v["kind"]).backend, dev).split(":")[0] \
            if v["kind"].startswith("mixprec") else ""
        row = dict(variant=v["name"], mode=v["mode"], ms=round(ms, 3), TFLOPs=round(flop / ms / 1e9),
                   vs_bf16_eager=round_ratio(anchor["eager"], v["ms"]) if "eager" in anchor else None,
                   vs_bf16_same_mode=round_ratio(anchor[v["mode"]], v["ms"]) if v["mode"] in anchor else None,
                   steady_ms=round(statistics.median(v["steady"]), 3),
                   steady_vs_bf16_eager=round_ratio(steady_anchor["eager"], v["steady"])
                   if "eager" in steady_anchor else None,
                   note=note)
        if interleaved:
            row["ms_rounds"] = [round(t, 3) for t in v["ms"]]
            row["steady_ms_rounds"] = [round(t, 3) for t in v["steady"]]
        rows.append(row)
        print(row, flush=True)
        if args.profile and dev == "cuda":
            print_kernel_profile(f"{v['name']} ({v['mode']})", v["step"])
    rows += failed
    if not args.warm_only:
        print(table(rows, ["variant", "mode", "ms", "TFLOPs", "vs_bf16_eager", "vs_bf16_same_mode", "steady_ms",
                           "steady_vs_bf16_eager", "note"]), flush=True)
        if interleaved:
            print(table(rows, ["variant", "mode", "ms_rounds", "steady_ms_rounds"]), flush=True)
    return rows


# ---- end to end GPT ---------------------------------------------------------------------------------------
def gpt_variants(args) -> list[tuple[str, str]]:
    out = [("bf16 autocast", "bf16")]
    out += [(f"mixprec fp8-{r}", f"mixprec-{r}") for r in MIXPREC_RECIPES]
    out += [(f"torchao float8 {r}", f"torchao-{r}") for r in TORCHAO_RECIPES]
    if args.variants:   # also picks explicit backends: mixprec-tensorwise@cublas
        wanted = args.variants.split(",")
        out = [v for v in out if v[1] in wanted]
        out += [(f"mixprec fp8-{w.removeprefix('mixprec-')}", w) for w in wanted if "@" in w]
    return out


def make_gpt(kind: str, args) -> GPT:
    cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq, n_layer=args.layers, n_head=args.heads,
                    d_model=args.d, attention="sdpa", head="separate")
    model = GPT(cfg).to(args.device)
    if kind.startswith("mixprec-"):   # default filter: the head (lm_head) stays BF16
        convert(model, mixprec_config(kind))
    elif kind.startswith("torchao-"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(kind.split("-")[1]),
                                   module_filter_fn=lambda mod, fqn: fqn != "lm_head")
    if args.compile_scope == "blocks":
        for block in model.blocks:        # one compiled graph, reused by every block
            block.compile(backend=args.compile_backend)
    return model


def _peak_above(steady: int, fn):
    """(fn(), the most memory allocated above `steady` bytes while it ran)."""
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - steady


def memory_breakdown(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> dict:
    """Where one training step's memory goes (GiB, after the timed steps): what stays between steps
    (weights, optimizer state), what the forward leaves saved for the backward, the peaks inside the
    forward and the backward, the gradients the backward leaves, and the optimizer step's peak; all but
    the first above the steady state."""
    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x).float().square().mean()

    gib = 2 ** 30
    torch.cuda.synchronize()
    steady = torch.cuda.memory_allocated()
    loss, forward_peak = _peak_above(steady, forward)
    saved = torch.cuda.memory_allocated() - steady
    _, backward_peak = _peak_above(steady, loss.backward)
    del loss
    grads = torch.cuda.memory_allocated() - steady
    _, optimizer_peak = _peak_above(steady, opt.step)
    opt.zero_grad(set_to_none=True)
    return dict(steady_GiB=round(steady / gib, 2), saved_for_backward_GiB=round(saved / gib, 2),
                forward_peak_GiB=round(forward_peak / gib, 2), backward_peak_GiB=round(backward_peak / gib, 2),
                grads_GiB=round(grads / gib, 2), optimizer_peak_GiB=round(optimizer_peak / gib, 2))


def _replay(events):
    """The allocator's live blocks (address -> alloc event) and their total bytes after each event."""
    live, total = {}, 0
    for event in events:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        yield live, total


def live_at_peak(step_fn, top: int = 12) -> list[dict]:
    """What one call of step_fn has allocated at its moment of peak memory, grouped by the allocating
    line of the innermost frame outside torch (from the CUDA caching allocator's event trace)."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    try:
        step_fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][0]
    totals = [total for _, total in _replay(events)]     # first pass: when the peak is; second: what is live then
    peak_at = max(range(len(totals)), key=totals.__getitem__, default=None)
    at_peak = {} if peak_at is None else next(live for i, (live, _) in enumerate(_replay(events)) if i == peak_at)
    peak = totals[peak_at] if totals else 0
    groups: dict[str, list[int]] = {}
    for event in at_peak.values():
        frames = [f for f in event.get("frames", []) if "/torch/" not in f["filename"]]
        where = f"{Path(frames[0]['filename']).name}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"
        groups.setdefault(where, []).append(event["size"])
    rows = sorted(({"where": k, "count": len(v), "GiB": round(sum(v) / 2**30, 3)} for k, v in groups.items()),
                  key=lambda r: -r["GiB"])
    return [dict(peak_above_step_start_GiB=round(peak / 2**30, 3))] + rows[:top]


def _first_nonfinite(losses: list[torch.Tensor]) -> int | None:
    """The first step (1-based) whose loss is inf or NaN; None when all are finite."""
    finite = torch.stack(losses).isfinite().tolist()
    return None if all(finite) else finite.index(False) + 1


class _GPTRun:
    """One GPT variant built, compiled and warmed: its model, optimizer, step function and measurements."""

    def __init__(self, name: str, kind: str, args, x: torch.Tensor, y: torch.Tensor):
        self.name, self.kind, self.x = name, kind, x
        dev = args.device
        base = torch.cuda.memory_allocated() if dev == "cuda" else 0
        torch.manual_seed(0)
        self.model = model = make_gpt(kind, args)
        self.n_fp8 = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
        self.opt = opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")

        def forward_loss(x, y):
            with torch.autocast(dev, dtype=torch.bfloat16):
                logits = model(x)
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

        if args.compile_scope == "step":   # the whole forward and the loss in one graph
            forward_loss = torch.compile(forward_loss, backend=args.compile_backend)

        def train_step():
            loss = forward_loss(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        self.train_step = train_step
        t0 = time.perf_counter()
        self.losses = [train_step().detach() for _ in range(2 if args.warm_only else 3)]
        if dev == "cuda":
            torch.cuda.synchronize()
        self.warm_s = time.perf_counter() - t0
        # what stays between steps (weights, optimizer state): the base of this variant's peak when other
        # variants stay resident beside it (--rounds)
        self.steady = torch.cuda.memory_allocated() - base if dev == "cuda" else 0
        self.ms, self.peak = [], 0.0

    def time_steps(self, steps: int, device: str) -> None:
        """Time `steps` steps (no sync inside the window); record ms per step and this variant's peak."""
        if device == "cuda":
            torch.cuda.synchronize()
            others = torch.cuda.memory_allocated() - self.steady
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                self.losses.append(self.train_step().detach())    # read after the window
            end.record()
            torch.cuda.synchronize()
            self.ms.append(start.elapsed_time(end) / steps)
            self.peak = max(self.peak, (torch.cuda.max_memory_allocated() - others) / 2**30)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                self.losses.append(self.train_step().detach())
            self.ms.append((time.perf_counter() - t0) * 1e3 / steps)
            self.peak = float("nan")

    def diagnose(self, args) -> dict:
        """Memory breakdown, and where asked the kernel profile and the allocator trace; a diagnosis that
        fails is reported in its field and costs nothing of the timing."""
        out = {}
        if args.device != "cuda":
            return out
        try:
            out = memory_breakdown(self.model, self.x, self.opt)
            out["steady_GiB"] = round(self.steady / 2**30, 2)     # this variant's own, others resident or not
        except Exception as err:
            out = dict(note=failure(err))
        if args.profile:
            try:
                out["kernels"] = kernel_breakdown(self.train_step)
                print(self.name, "GPU ms per step by category:", out["kernels"]["ms_per_step_by_category"],
                      *out["kernels"]["top_kernels"], sep="\n  ", flush=True)
            except Exception as err:
                out["kernels"] = failure(err)
        if args.memory_trace:
            try:
                out["live_at_peak"] = live_at_peak(self.train_step)
                print(self.name, "live at peak:", *out["live_at_peak"], sep="\n  ", flush=True)
            except Exception as err:
                out["live_at_peak"] = failure(err)
        return out


def run_gpt(args) -> list[dict]:
    """Each variant's train step timed; with --rounds N > 1 all variants stay resident and are timed in N
    interleaved rounds of --steps steps (drifting clocks and temperature then reach every variant alike),
    each ratio the median over rounds of the round's ratio to the round's BF16 time."""
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev, generator=gen)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev, generator=gen)
    tokens = args.batch * args.seq
    interleaved = args.rounds > 1 and not args.warm_only
    failed, runs = [], []

    def release(run):
        run.model = run.opt = run.train_step = None
        if dev == "cuda":
            torch.cuda.empty_cache()

    torch._dynamo.reset()
    for name, kind in gpt_variants(args):
        if not interleaved:       # resident variants keep their compiled code: no reset between them
            torch._dynamo.reset()
        try:
            run = _GPTRun(name, kind, args, x, y)
            if args.warm_only:
                print(f"warmed {name} in {run.warm_s:.0f} s", flush=True)
                release(run)
                continue
            if not interleaved:
                run.time_steps(args.steps, dev)
                run.memory = run.diagnose(args)
                release(run)
            runs.append(run)
        except Exception as err:
            failed.append(dict(variant=name, note=failure(err)))
            print(failed[-1], flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
    if args.warm_only:
        return failed
    if interleaved:
        for r in range(args.rounds):
            for run in list(runs):
                try:
                    run.time_steps(args.steps, dev)
                except Exception as err:     # reported, and the other variants go on
                    failed.append(dict(variant=run.name, note=failure(err)))
                    runs.remove(run)
                    release(run)
            print(f"round {r + 1}: " + ", ".join(f"{run.name} {run.ms[-1]:.2f} ms" for run in runs), flush=True)
        for run in runs:
            run.memory = run.diagnose(args)
            release(run)
    anchor = next((run for run in runs if run.kind == "bf16"), runs[0] if runs else None)
    rows = []
    for run in runs:
        ms = statistics.median(run.ms)
        row = dict(variant=run.name, fp8_linears=run.n_fp8, ms_per_step=round(ms, 2),
                   tokens_per_s=round(tokens / ms * 1e3), vs_bf16=round_ratio(anchor.ms, run.ms),
                   peak_GiB=round(run.peak, 2), peak_vs_bf16=round(run.peak / anchor.peak, 3),
                   first_loss=round(run.losses[0].item(), 4), loss=round(run.losses[-1].item(), 4),
                   nonfinite_from_step=_first_nonfinite(run.losses), warmup_s=round(run.warm_s, 1), **run.memory)
        if interleaved:
            row.update(ms_rounds=[round(v, 2) for v in run.ms],
                       vs_bf16_rounds=[round(a / b, 3) for a, b in zip(anchor.ms, run.ms)])
        rows.append(row)
        print(row, flush=True)
    rows += failed
    print(table(rows, ["variant", "fp8_linears", "ms_per_step", "tokens_per_s", "vs_bf16", "peak_GiB",
                       "peak_vs_bf16", "first_loss", "loss", "nonfinite_from_step", "warmup_s", "note"]), flush=True)
    if interleaved:
        print(table(rows, ["variant", "ms_rounds", "vs_bf16_rounds"]), flush=True)
    print(table(rows, ["variant", "steady_GiB", "saved_for_backward_GiB", "forward_peak_GiB",
                       "backward_peak_GiB", "grads_GiB", "optimizer_peak_GiB"]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quantize", "linear", "gpt"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--n", type=int, default=8192, help="quantize: n x n tensors; linear: M = N = K = n")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--steps", type=int, default=10, help="gpt: timed steps after 3 warm-up steps (per round)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="linear, gpt: with N > 1 build all variants first and time them in N interleaved "
                         "rounds (ratios: medians over rounds); gpt keeps every variant resident, about 14 "
                         "GiB each at the default sizes")
    ap.add_argument("--variants", default="", help="comma-separated subset (gpt: bf16,mixprec-blockwise,...; "
                                                   "linear: kind:mode, e.g. mixprec-blockwise:eager)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-scope", default="step", choices=["step", "blocks"],
                    help="gpt: compile the whole forward and the loss (default), or each block (one graph "
                         "reused by all; the loss then runs eagerly)")
    ap.add_argument("--profile", action="store_true",
                    help="linear: print each variant's GPU kernel times; gpt: GPU time per step by kernel "
                         "category and the top kernels")
    ap.add_argument("--memory-trace", action="store_true",
                    help="gpt: what is allocated at one step's peak, by allocating line (allocator trace)")
    ap.add_argument("--warm-only", action="store_true", help="fill the compile caches, time nothing")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               command="python " + " ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M"))
    try:
        import torchao
        env["torchao"] = torchao.__version__
    except ImportError:
        env["torchao"] = None
    print(env, flush=True)
    rows = {"quantize": run_quantize, "linear": run_linear, "gpt": run_gpt}[args.what](args)
    if args.json and not args.warm_only:
        Path(args.json).write_text(json.dumps(dict(env=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
