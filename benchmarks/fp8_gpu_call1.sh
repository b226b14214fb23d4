# Device call 1 for issue 4: CUDA tests, quantize kernels, Float8Linear at 8192^3. Writes logs to $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/ao/*.whl || exit
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/pt/*.whl
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee $OUT/gpu.txt
timeout 240 python3 -m pytest -q -p no:cacheprovider --maxfail=20 tests/test_fp8_cuda.py 2>&1 | tee $OUT/cuda_tests.log | grep -E "^E  |passed|failed|Error" | head -40
timeout 60 python3 benchmarks/bench_fp8.py quantize --json $OUT/quantize.json 2>&1 | tee $OUT/quantize.log | tail -8
timeout 220 python3 benchmarks/bench_fp8.py linear --json $OUT/linear.json 2>&1 | tee $OUT/linear.log | grep -v Warning | tail -22
