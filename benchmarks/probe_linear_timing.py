"""Where a Float8Linear step's time goes besides its kernels: one 8192^3 forward + backward timed four ways.

    do_bench       triton.testing.do_bench (an L2 flush before each call, events around each call): bench_fp8.py's
    back_to_back   calls between two events for ~40 ms, no flush, no sync (bench_fp8.steady_ms): training's
                   steady state
    graph          `steps` calls replayed from a CUDA graph: no host in the window
    kernels        the sum of the kernels' own times in a profile of 5 back-to-back calls, and the span
                   from the first kernel's start to the last one's end (span - kernels = GPU idle)

    python benchmarks/probe_linear_timing.py [--n 8192] [--rounds 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fp8 import linear_step, make_linear, steady_ms  # noqa: E402

VARIANTS = ("bf16", "mixprec-tensorwise", "mixprec-blockwise")


def make_step(kind: str, n: int):
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    layer = make_linear(kind, n, n, "cuda")
    return linear_step(layer, layer, x, dy)


def graph_ms(step, steps: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):      # warm on a side stream, as whole-network capture wants
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            step()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / steps)
    return statistics.median(times)


def kernel_ms(step, steps: int) -> tuple[float, float]:
    """(sum of kernel times, first start to last end), ms per step."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = [e for e in json.loads(Path(f.name).read_text())["traceEvents"] if e.get("cat") == "kernel"]
    busy = sum(e["dur"] for e in events) / 1e3
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1e3
    return busy / steps, span / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    steps = {k: make_step(k, args.n) for k in VARIANTS}
    for s in steps.values():
        s()
    ways = ("do_bench", "back_to_back", "graph", "kernels", "span")
    ms = {k: {w: [] for w in ways} for k in VARIANTS}
    for r in range(args.rounds):
        for k, s in steps.items():
            ms[k]["do_bench"].append(triton.testing.do_bench(s, warmup=5, rep=40, return_mode="median"))
            ms[k]["back_to_back"].append(steady_ms(s, "cuda"))
            try:
                ms[k]["graph"].append(graph_ms(s, args.steps))
            except Exception as err:    # capture of an eager autograd step may be refused
                print(k, "graph:", type(err).__name__, str(err)[:200], flush=True)
            busy, span = kernel_ms(s, 5)
            ms[k]["kernels"].append(busy)
            ms[k]["span"].append(span)
        print(f"round {r + 1}:", {k: {w: round(v[-1], 3) for w, v in d.items() if v} for k, d in ms.items()},
              flush=True)
    rows = []
    for k in VARIANTS:
        row = dict(variant=k)
        for w in ways:
            if ms[k][w]:
                row[w + "_ms"] = round(statistics.median(ms[k][w]), 3)
                if k != "bf16" and ms["bf16"][w]:
                    row[w + "_vs_bf16"] = round(statistics.median(
                        a / b for a, b in zip(ms["bf16"][w], ms[k][w])), 3)
        rows.append(row)
        print(row, flush=True)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               command="python benchmarks/probe_linear_timing.py " + " ".join(sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(env=env, rows=rows, ms=ms), indent=1))


if __name__ == "__main__":
    main()
