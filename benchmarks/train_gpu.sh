#!/usr/bin/env bash
# One device call for issue 3: the trainer-vs-bare-loop benchmark (eager and compiled, with per-step
# host and GPU times), then `mixprec train` and
# `mixprec compare` on CUDA at small size (exit codes, TensorBoard files, CUDA peak memory).
# Usage on the lent GPU (from the repository root): bash benchmarks/train_gpu.sh   (logs under $OUT)
set -o pipefail
OUT=${OUT:-/tmp/train_gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0])' | tee -a "$OUT/device.txt"

python3 benchmarks/bench_train.py --step-trace --out /tmp/bench_train --json "$OUT/train.json" 2>&1 | tee "$OUT/bench.log"
python3 benchmarks/bench_train.py --compile --step-trace --repeats 4 --out /tmp/bench_train_c \
    --json "$OUT/train_compiled.json" 2>&1 | tee "$OUT/bench_compiled.log"

SMALL="--n-layer 2 --n-head 4 --d-model 256 --seq-len 128 --batch-size 16"
python3 -m mixprec train --device cuda --recipe fp16-mixed --steps 20 --log-every 5 --eval-every 10 \
    --out /tmp/train_cuda $SMALL > "$OUT/cli.log" 2>&1; echo "train exit $?" | tee -a "$OUT/cli.log"
ls /tmp/train_cuda /tmp/train_cuda/tensorboard 2>&1 | tee -a "$OUT/cli.log"
python3 -m mixprec compare --device cuda --recipes fp32,fp16-mixed,bf16-mixed,fp8-blockwise --steps 30 \
    --quiet --out /tmp/compare_cuda $SMALL >> "$OUT/cli.log" 2>&1; echo "compare exit $?" | tee -a "$OUT/cli.log"
cp /tmp/compare_cuda/table.md "$OUT/compare_cuda_table.md" 2>/dev/null
tail -n 25 "$OUT/cli.log"
