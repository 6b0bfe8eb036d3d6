#!/usr/bin/env bash
# The GPU run in one call. First what decides everything else (bench/gpu_checks.py probe): the GPU,
# its driver and compute capability, and whether tensorrt, cuda.bindings and onnxruntime(-gpu)
# import, with their versions. Then only what can run, in this order:
#   1. a CUDA round-trip through cuda-bindings;
#   2. the GPU TensorRT test (build, run with and without a CUDA graph, parity at min/opt/max shapes,
#      then a second build on the same timing cache): tests/test_tensorrt.py -m gpu;
#   3. onnxruntime CUDA on one graph against CPU;
#   4. the rest, bench/device_bench.py: torch reference at SD 1.5 shape (random weights, 512x512,
#      30 steps, CFG, fp16, SDPA) with per-step U-Net time, each runtime backend that can run (the
#      others get a "not available: why" row), and the U-Net FLOP rate against the fp16 matmul peak.
# A step that fails is reported and the next one still runs; the exit status says whether any failed.
#
#   bash bench/device.sh                  # on the GPU machine (about 5 minutes with the onnxruntime CPU row)
#   bash bench/device.sh --skip-ort-cpu   # GPU rows only (about 1 minute)
#   bash bench/device.sh --cpu-smoke      # the probe, then tiny models on the CPU; also what runs without CUDA
#
# Extra arguments go to bench/device_bench.py (--json PATH writes the result as JSON too).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  # the project's venv where there is one; the machine's python (CUDA torch) on the lent GPU machine
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

FLAGS=$(mktemp)
trap 'rm -f "$FLAGS"' EXIT
echo "== probe"
"$PY" bench/gpu_checks.py probe --env "$FLAGS"
# shellcheck disable=SC1090
. "$FLAGS"
for arg in "$@"; do [ "$arg" = --cpu-smoke ] && HAVE_GPU=0; done

failed=0
step() {  # step NAME CONDITION WHY-NOT COMMAND...: run COMMAND when CONDITION is 1, else say why not
  local name=$1 can=$2 why=$3; shift 3
  echo "== $name"
  if [ "$can" != 1 ]; then echo "skipped: $why"; return 0; fi
  "$@" || { echo "FAILED: $name (exit $?)"; failed=1; }
}
nogpu="no CUDA GPU here (or --cpu-smoke)"
step "CUDA round-trip" "$((HAVE_GPU & HAVE_CUDA_BINDINGS))" "$nogpu, or cuda.bindings does not import" \
  "$PY" bench/gpu_checks.py roundtrip
step "TensorRT GPU test and a second build on its timing cache" "$((HAVE_GPU & HAVE_TRT))" \
  "$nogpu, or tensorrt does not import" "$PY" -m pytest -q -rs -m gpu tests/test_tensorrt.py
step "onnxruntime CUDA vs CPU" "$((HAVE_GPU & HAVE_ORT_CUDA))" "$nogpu, or onnxruntime has no CUDA provider" \
  "$PY" bench/gpu_checks.py ort-cuda
echo "== device_bench"
"$PY" bench/device_bench.py "$@" || failed=1
exit "$failed"
