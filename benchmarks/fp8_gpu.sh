#!/bin/bash
# Issue 4 on the lent GPU, one call: CUDA tests, the GPU accuracy run, and the benchmarks of
# benchmarks/results/fp8.md. Needs .whl/ao (torchao 0.17.0) carried; writes logs and JSON to $OUT.
#   phase A (in parallel, nothing timed): CUDA tests, compile-cache warm-up
#   phase B (one process at a time, timed): quantize kernels (and quantize_variants.py's latest cases),
#   the host cost per quantize call and the weight-gradient GEMMs (probe_fp8.py), Float8Linear 8192^3,
#   GPT end to end, then the accuracy run (`mixprec compare`).
#   tests,quantize,variants,linear,gpt took 478 s on 2026-11-29 (session 6); all steps exceed one
#   10-minute device call. The linear and GPT variants are timed in FP8_ROUNDS interleaved rounds (default 5).
# FP8_GPU_STEPS=quantize,variants,lanes,probe,linear,gpt,tests,compare picks parts (default: all but lanes,
# the experiment of quantize_1x128_lanes.py); FP8_GPT_VARIANTS
# (space-separated) the GPT variants. A CPU dry run of the script:
# FP8_BENCH_ARGS="--device cpu --n 256 --d 256 --heads 4 --batch 2 --seq 64 --vocab 256 --steps 2
# --compile-backend aot_eager" FP8_COMPARE_ARGS="--device cpu --steps 3" with python3 the venv's.
set -u
T0=$(date +%s)
STEPS=${FP8_GPU_STEPS:-tests,compare,quantize,variants,probe,linear,gpt}
LOG=$OUT/run.log
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
has() { [[ ",$STEPS," == *",$1,"* ]]; }
EXTRA=${FP8_BENCH_ARGS:-}
CMP_ARGS=${FP8_COMPARE_ARGS:---device cuda}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/ao/*.whl || exit 1
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=4
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >> "$LOG"
python3 -c 'import torch, triton, torchao; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "torchao", torchao.__version__)' >> "$LOG" 2>&1
say "phase A: tests and warm-up in parallel"
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
# the linear and GPT variants are timed in interleaved rounds (GPT: all resident, about 14 GiB each)
rounds=${FP8_ROUNDS:-5}; [[ ${gpu_mib:-0} -lt 130000 ]] && rounds=1

LINEAR_COMPILED=bf16:compiled,mixprec-tensorwise:compiled,mixprec-rowwise:compiled,mixprec-blockwise:compiled,mixprec-tensorwise@cublas:compiled,torchao-tensorwise:compiled,torchao-rowwise:compiled
LINEAR_EAGER_FP8=mixprec-tensorwise:eager,mixprec-rowwise:eager,mixprec-blockwise:eager
GPT_VARIANTS=${FP8_GPT_VARIANTS:-"bf16 mixprec-tensorwise mixprec-blockwise mixprec-rowwise torchao-tensorwise torchao-rowwise"}
pids=()
if has tests; then
  timeout 200 python3 -m pytest -o addopts="" -q -p no:cacheprovider -n 4 -rf --timeout 150 tests/test_fp8_cuda.py tests/test_fp8_kernel_scales_cuda.py > "$OUT/cuda_tests.log" 2>&1 &
  pids+=($!)
fi
if has gpt; then
  # the compiled graph is the whole model's (--compile-scope step, the default): warm the 4 layers (six
  # variants at ~19 GiB each fit a 141 GiB H200); with --compile-scope blocks, or on a smaller GPU, one
  # layer: the same block graph (blocks) or at least the same Triton kernels (step), a quarter of the memory
  layers=4; [[ "$EXTRA" == *"--compile-scope blocks"* || ${gpu_mib:-0} -lt 130000 ]] && layers=1
  for v in $GPT_VARIANTS; do
    timeout 130 python3 benchmarks/bench_fp8.py gpt --warm-only --variants "$v" $EXTRA --layers $layers > "/tmp/warm_gpt_$v.log" 2>&1 &
    pids+=($!)
  done
fi
if has linear; then
  timeout 130 python3 benchmarks/bench_fp8.py linear --warm-only --variants "$LINEAR_COMPILED" $EXTRA > /tmp/warm_linear.log 2>&1 &
  pids+=($!)
  # eager FP8 variants: fills Triton's on-disk cache with each autotune config of the quantize kernels
  timeout 130 python3 benchmarks/bench_fp8.py linear --warm-only --variants "$LINEAR_EAGER_FP8" $EXTRA > /tmp/warm_linear_eager.log 2>&1 &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done
has tests && { grep -E "passed|failed|error" "$OUT/cuda_tests.log" | tail -3 | tee -a "$LOG"; }
tail -n 2 /tmp/warm_*.log >> "$LOG" 2>/dev/null
say "phase B: timed benchmarks"
# the GPU's clocks, power and temperature beside the timings (under a power cap the clocks drop)
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv -lms 250 > "$OUT/gpu_clocks.csv" 2>&1 &
smi=$!

has quantize && timeout 60 python3 benchmarks/bench_fp8.py quantize $EXTRA --json "$OUT/quantize.json" 2>&1 | grep -v Warning >> "$LOG"
has variants && timeout 120 python3 benchmarks/quantize_variants.py --json "$OUT/variants.json" 2>&1 | grep -v Warning >> "$LOG"
has lanes && timeout 120 python3 benchmarks/quantize_1x128_lanes.py --json "$OUT/lanes.json" 2>&1 | grep -v Warning >> "$LOG"
has probe && timeout 60 python3 benchmarks/probe_fp8.py host gemm --json "$OUT/probe.json" 2>&1 | grep -v Warning >> "$LOG"
say "quantize done"
has linear && timeout 150 python3 benchmarks/bench_fp8.py linear --variants "bf16:eager,$LINEAR_EAGER_FP8,$LINEAR_COMPILED" --rounds "$rounds" $EXTRA --json "$OUT/linear.json" 2>&1 | grep -v Warning >> "$LOG"
say "linear done"
if has gpt; then
  timeout 250 python3 benchmarks/bench_fp8.py gpt --variants "${GPT_VARIANTS// /,}" --rounds "$rounds" $EXTRA \
      --json "$OUT/gpt.json" 2>&1 | grep -v Warning >> "$LOG"
fi
kill $smi 2>/dev/null
say "gpt done"
# the accuracy run last and alone (in phase A it shared the GPU and did not finish in 130 s)
if has compare; then
  timeout 150 python3 -m mixprec compare $CMP_ARGS --recipes bf16-mixed,fp8-blockwise,fp8-tensorwise,fp8-rowwise \
      --d-model 256 --quiet --out /tmp/cmp > /tmp/compare.log 2>&1
  echo "exit $?" >> /tmp/compare.log
  cat /tmp/compare.log /tmp/cmp/table.md > "$OUT/compare_gpu.md" 2>&1
  cp /tmp/cmp/curves.json "$OUT/compare_gpu_curves.json" 2>/dev/null
  tail -12 "$OUT/compare_gpu.md" >> "$LOG"
  say "compare done"
fi
grep -E "^\|" "$LOG" | tail -40
