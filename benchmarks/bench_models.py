"""Models nobody here wrote, mixprec against torch.autocast: every (model, recipe, mode) of `mixprec bench`
in one process after another, one JSON for benchmarks/results/core.md.

    PYTHONPATH=src python3 benchmarks/bench_models.py [--json FILE] [--models llama,resnet50] [--quick]
    PYTHONPATH=src python3 benchmarks/bench_models.py --dry-run     # tiny models on the CPU: checks the script

Each case is `mixprec.train.bench.run_bench` (interleaved rounds, ratio = median of per-round ratios); a case
that fails is a row with its error, and the others still run.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from mixprec.train.bench import BENCH_MODELS, BENCH_RECIPES, run_bench

# (model, recipe, compiled, fused head loss): the rows of core.md's table; the Hugging Face causal LMs also with
# their loss computed from the head's input (mixprec.integrations.transformers.fuse_head_loss)
CASES = [(m, r, c, f) for m in ("llama", "resnet50", "gpt2", "vit", "gpt") for r in BENCH_RECIPES for c in (False, True)
         for f in ((False, True) if m in ("llama", "gpt2") else (False,))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="runs/bench_models.json")
    parser.add_argument("--models", default=",".join(BENCH_MODELS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5 steps (default 5 of 10)")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU: checks the script only")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_models.py measures on a CUDA GPU; --dry-run checks the script on the CPU")
    models = args.models.split(",")
    unknown = sorted(set(models) - set(BENCH_MODELS))
    if unknown:
        raise SystemExit(f"unknown --models {', '.join(unknown)}; choose from: {', '.join(BENCH_MODELS)}")
    steps, rounds = (5, 3) if args.quick or args.dry_run else (10, 5)
    rows = []
    for model, recipe, compiled, fused in CASES:
        if model not in models or (args.dry_run and (compiled or model in ("resnet50", "vit"))):
            continue   # the dry run: eager, and the models that need no torchvision
        start = time.perf_counter()
        label = f"{model:9s} {recipe:11s} {'compiled' if compiled else 'eager':8s} {'fused' if fused else '':5s}"
        try:
            result = run_bench(model, recipe, compile=compiled, steps=steps, rounds=rounds, warmup=3,
                               device=device, tiny=args.dry_run, fused_head_loss=fused, progress=lambda line: None)
            rows.append(result)
            print(f"{label} {result['ratio']:.3f}x peak memory {result['peak_memory_ratio'] or float('nan'):.3f}x "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        except Exception as err:   # one failing case is a row, not the end of the run
            rows.append({"model": model, "recipe": recipe, "compile": compiled, "fused_head_loss": fused,
                         "error": repr(err), "traceback": traceback.format_exc()})
            print(f"{label} failed: {err!r}", flush=True)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
