#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what it runs): one command, one Markdown table.
#   bash benchmarks/gpu_check.sh            on a machine with a CUDA GPU (under 8 minutes on one H100)
#   bash benchmarks/gpu_check.sh --dry-run  every stage on the CPU at toy sizes (CI runs this)
# Needs no network and no install: moeformer is taken from src/, with the Python that has torch
# (the project's .venv where there is one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" benchmarks/gpu_check.py "$@"
