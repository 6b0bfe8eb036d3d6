#!/usr/bin/env bash
# Prompt adherence of the shipped model: guidance 1, 3 and 7.5 on 64 prompts with training combinations
# (the validation split) and 64 with held-out combinations; 20 DDIM steps (the checkpoint's scheduler); then real
# validation images noised to 20% and 40% of the schedule and denoised with their captions (STRENGTHS="" skips it).
# Writes OUT/eval.json (OUT=runs/default/eval by default) and the sample grids beside it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CKPT=${CKPT:-engines/default}
OUT=${OUT:-runs/default/eval}
mkdir -p "$OUT"
OMP_NUM_THREADS=${THREADS:-1} $PY -c "
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from training.train_unet import evaluate_checkpoint
r = evaluate_checkpoint('$CKPT', n=${N:-64}, steps=${STEPS:-20}, out_dir='$OUT', denoise_strengths=tuple([${STRENGTHS-0.2, 0.4}]))
open('$OUT/eval.json', 'w').write(json.dumps(r, indent=2))
print(json.dumps(r, indent=2))
"
