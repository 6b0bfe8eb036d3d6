#!/usr/bin/env bash
# The GPU benchmark in one call (bench/device_bench.py): torch reference at SD 1.5 shape (random
# weights, 512x512, 30 steps, CFG, fp16, SDPA) with per-step U-Net time, each runtime backend that
# can run on the machine (the others get a "not available: why" row), and the U-Net FLOP rate
# against the card's measured fp16 matmul peak. Prints a markdown table.
#
#   bash bench/device.sh                  # on the GPU machine (about 5 minutes with the onnxruntime CPU row)
#   bash bench/device.sh --skip-ort-cpu   # GPU rows only (about 1 minute)
#   bash bench/device.sh --cpu-smoke      # tiny models on the CPU; also what runs where there is no CUDA
#
# Extra arguments go to bench/device_bench.py (--json PATH writes the result as JSON too).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  # the project's venv where there is one; the machine's python (CUDA torch) on the lent GPU machine
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/device_bench.py "$@"
