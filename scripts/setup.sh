#!/usr/bin/env bash
# Creates .venv with a CPU build of torch pinned (an unpinned torch would pull a multi-GB CUDA build)
# and installs mixprec into it with its optional extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all]"
