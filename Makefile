# The README's two commands: `make compare` (set up + main job) and `make test` (set up + tests).
.PHONY: setup compare test test-cuda bench-gpu clean

setup:
	bash scripts/setup.sh

compare: setup
	.venv/bin/mixprec compare

test: setup
	.venv/bin/python -m pytest tests -m "not cuda"

test-cuda:
	python3 -m pytest tests -m cuda

bench-gpu:
	bash benchmarks/run_gpu.sh

clean:
	rm -rf .venv runs .pytest_cache
