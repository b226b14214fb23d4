# Device call 1 for issue 5: the cuda-marked optim tests, then bench_optim.py (268M-param AdamW step vs
# torch fused / bitsandbytes / torchao, state bytes, GPT peak memory). Logs and JSON go to $OUT.
# run(command="bash benchmarks/optim_gpu_call1.sh", carry=[".whl"])
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/ao/*.whl .whl/bnb/*.whl || exit
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv | tee $OUT/optim_gpu.txt
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a $OUT/optim_gpu.txt
timeout ${TEST_S:-110} python3 -m pytest -q -p no:cacheprovider -m cuda -rfE tests/test_optim_kernel.py 2>&1 \
  | tee $OUT/optim_cuda_tests.log | grep -E "^E   |^FAILED|^ERROR|passed|failed" | head -30
timeout ${BENCH_S:-200} python3 benchmarks/bench_optim.py --device cuda --step-budget-s 120 --json $OUT/optim.json 2>&1 \
  | tee $OUT/optim_bench.log | grep -vi "warn\|failed to load" | tail -32
