# The README's two commands: `make compare` (set up + main job) and `make test` (set up + tests).
.PHONY: setup compare test test-cuda bench clean

setup:
	bash scripts/setup.sh

compare: setup
	.venv/bin/mixprec compare

test: setup
	.venv/bin/python -m pytest tests -m "not cuda"

test-cuda:
	python3 -m pytest tests -m cuda

clean:
	rm -rf .venv runs .pytest_cache
