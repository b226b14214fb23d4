#!/usr/bin/env bash
# One device call for issue 2 (and the reruns issues 3 and 5 asked for): CUDA tests of the core, the core
# benchmark (eager and compiled, bf16 and fp16), the trainer benchmark. Logs and JSON under $OUT.
# Usage on the lent GPU, from the repository root: bash benchmarks/core_gpu.sh
set -o pipefail
OUT=${OUT:-/tmp/core_gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch; print("torch", torch.__version__)' | tee -a "$OUT/device.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda --tb=short tests/test_head_loss.py \
    tests/test_precision_table.py tests/test_optim_kernel.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
timeout 240 python3 benchmarks/bench_core.py --device cuda --compile --steps 5 --rounds 3 \
    --out "$OUT/core.json" 2>&1 | grep -v '^{' | tail -7 | tee "$OUT/core.log"
timeout 120 python3 benchmarks/bench_train.py --out /tmp/bench_train --json "$OUT/train.json" --repeats 2 \
    2>&1 | tail -12 | tee "$OUT/train.log"
