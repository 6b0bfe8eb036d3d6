#!/usr/bin/env bash
# Prompt adherence of the shipped model: guidance 1, 3 and 7.5 on 64 prompts with training combinations
# (the validation split) and 64 with held-out combinations; 20 DDIM steps (the checkpoint's scheduler); then real
# validation images noised to 20% and 40% of the schedule and denoised with their captions (STRENGTHS="" skips it).
# Writes OUT/eval.json (OUT=runs/default/eval by default) and the sample grids beside it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CKPT=${CKPT:-checkpoints/default}
OUT=${OUT:-runs/default/eval}
OMP_NUM_THREADS=${THREADS:-1} $PY -m training.evaluate "$CKPT" --n "${N:-64}" --steps "${STEPS:-20}" --out "$OUT" \
  --strengths "${STRENGTHS-0.2, 0.4}"
