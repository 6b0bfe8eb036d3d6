#!/usr/bin/env bash
# Every figure of BENCHMARKS.md on this (shared, 2-core) machine, step by step.
#
# Each step stops the background training job (SIGSTOP; `pgrep -f "training.cli train .*--out_dir=runs/"`),
# waits until processes that are not niced use <= 10% of the CPUs over 2 s (up to QUIET_WAIT s),
# runs under SCHED_FIFO (see RT), and resumes the job (SIGCONT, also on exit or interrupt). The
# load and busy share at the start of each step go into its log. Results land in $OUT/<step>.*
#
#   bash bench/measure.sh                 # all steps
#   bash bench/measure.sh e2e compare     # some: models options variant load e2e e2e-default before pipeline loop spinstop guidance compare limit sdxl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/bench}  # runs/ is git-ignored
QUIET_WAIT=${QUIET_WAIT:-300}
# SCHED_FIFO (both sides of every comparison inherit it): a niced background job can then only use
# the gaps, instead of taking a core for a whole time slice in the middle of a parallel section,
# which doubled U-Net step times here. RT= (empty) measures at normal priority.
RT=${RT-chrt -f 10}
mkdir -p "$OUT"
MID=engines/bench-mid/bundle
DEF=engines/bench-default/bundle

PIDS=""
resume() { if [ -n "$PIDS" ]; then kill -CONT $PIDS 2>/dev/null || true; PIDS=""; fi; }
trap resume EXIT INT TERM
busy_pct() {  # share of CPU time spent by processes that are not niced (user + system), over 2 s
  local a b; read -r _ u n s i w x y z _ < /proc/stat; a=$((u+n+s+i+w+x+y+z)); b=$((u+s))
  sleep 2
  read -r _ u n s i w x y z _ < /proc/stat; echo $(( 100 * (u + s - b) / (u+n+s+i+w+x+y+z - a) ))
}
step() {  # step NAME COMMAND...: run paused, under $RT, logged
  local name=$1; shift
  PIDS=$(pgrep -f "training.cli train .*--out_dir=runs/" | tr '\n' ' ' || true)
  if [ -n "$PIDS" ]; then kill -STOP $PIDS; fi
  local busy=100 t=0
  while [ $t -lt "$QUIET_WAIT" ]; do busy=$(busy_pct); [ "$busy" -le 10 ] && break; t=$((t + 2)); done
  { echo "# $name: $(date -u +%FT%TZ); paused [$PIDS]; un-niced CPU busy ${busy}% over 2 s before the start;" \
         "loadavg $(cut -d' ' -f1-3 /proc/loadavg); run under: ${RT:-normal priority}"
    echo "# \$ $*"; } | tee "$OUT/$name.log"
  $RT "$@" 2>&1 | tee -a "$OUT/$name.log"
  resume
}
want() { [ $# -eq 0 ] || [[ " $SELECTED " == *" $1 "* ]]; }
SELECTED="$*"
set --

if want models; then
  [ -f $MID/manifest.json ] && [ -f $DEF/manifest.json ] || step models $PY bench/make_models.py
fi
if want options; then  # onnxruntime session options on the mid U-Net (CPU variant)
  step options-opt-level $PY bench/ab_engines.py $MID unet all:opt_level=all extended:opt_level=extended \
    basic:opt_level=basic --rounds 6 --json $OUT/options-opt-level.json
  step options-threads $PY bench/ab_engines.py $MID unet t2:threads=2 t1:threads=1 --rounds 6 --json $OUT/options-threads.json
  step options-misc $PY bench/ab_engines.py $MID unet default: nospin:spinning=false noarena:arena=false \
    nopattern:mem_pattern=false --rounds 6 --json $OUT/options-misc.json
fi
if want variant; then  # fused attention + external weights (export/optimize.py) against the portable graphs
  for c in unet vae_decoder text_encoder; do
    step variant-mid-$c $PY bench/ab_engines.py $MID $c portable:cpu_variant=false variant:cpu_variant=true \
      --rounds 6 --json $OUT/variant-mid-$c.json
  done
  step variant-default-unet $PY bench/ab_engines.py $DEF unet portable:cpu_variant=false variant:cpu_variant=true \
    --rounds 300 --json $OUT/variant-default-unet.json
fi
if want load; then  # where load time goes, before and after the load-time changes
  step load-mid $PY bench/load_parts.py $MID --repeats 5 --json $OUT/load-mid.json
  step load-default $PY bench/load_parts.py $DEF --repeats 5 --json $OUT/load-default.json
fi
if want e2e || want e2e-default; then  # ldm bench, as shipped (CPU variants, default options)
  step e2e-default .venv/bin/ldm bench $DEF --steps 10,30,50 --sizes 32,96,128 --repeats 5 --threads 2 --out $OUT/e2e-default
fi
if want e2e; then
  step e2e-mid .venv/bin/ldm bench $MID --steps 10,30,50 --sizes 192,320 --repeats 3 --threads 2 --out $OUT/e2e-mid
fi
if want before; then  # the same without the CPU variants (the portable graphs): the "before" of the variants
  step before-default .venv/bin/ldm bench $DEF --steps 10,30,50 --repeats 5 --threads 2 \
    --engine-option cpu_variant=false --out $OUT/before-default
  step before-mid .venv/bin/ldm bench $MID --steps 10,30 --repeats 3 --threads 2 --engine-option cpu_variant=false \
    --out $OUT/before-mid
fi
if want pipeline; then  # whole generations alternated in one process: the negative-prompt cache, guidance 1
  # (half batch) and the CPU variants, end to end (separate runs drift by 10-20% on this machine)
  step pipeline-default $PY bench/ab_pipeline.py $DEF --steps 20 --rounds 30 cached: nocache:negative_cache=false \
    guidance1:guidance_scale=1 portable:cpu_variant=false --json $OUT/pipeline-default.json
  step pipeline-mid $PY bench/ab_pipeline.py $MID --steps 20 --rounds 3 cached: nocache:negative_cache=false \
    guidance1:guidance_scale=1 portable:cpu_variant=false --json $OUT/pipeline-mid.json
fi
if want loop; then  # the per-step overhead, piece by piece, and the proposed guidance.combine change
  step loop-default $PY bench/loop_profile.py $DEF --steps 30 --images 20 --rounds 10
fi
if want spinstop; then  # onnxruntime's session.force_spinning_stop: idle threads stop busy-waiting when a run returns
  step spinstop-default $PY bench/ab_pipeline.py $DEF --steps 30 --rounds 30 spin: stop:spin_stop=true \
    --json $OUT/spinstop-default.json
  step spinstop-mid $PY bench/ab_pipeline.py $MID --steps 20 --rounds 3 spin: stop:spin_stop=true \
    --json $OUT/spinstop-mid.json
fi
if want guidance; then  # guidance 1 (half batch) and the negative-prompt cache, end to end, separate runs
  for m in default mid; do
    B=engines/bench-$m/bundle
    step guidance1-$m .venv/bin/ldm bench $B --steps 20 --repeats 3 --threads 2 --guidance-scale 1 --no-startup \
      --out $OUT/guidance1-$m
    step nocache-$m .venv/bin/ldm bench $B --steps 20 --repeats 3 --threads 2 --no-negative-cache --no-startup \
      --out $OUT/nocache-$m
    step cache-$m .venv/bin/ldm bench $B --steps 20 --repeats 3 --threads 2 --no-startup --out $OUT/cache-$m
  done
fi
if want compare; then  # the peer: diffusers on the same weights, alternating
  step compare-default $PY bench/compare_diffusers.py engines/bench-default --steps 30 --repeats 5 --threads 2 \
    --json $OUT/compare-default.json
  step compare-mid $PY bench/compare_diffusers.py engines/bench-mid --steps 20 --repeats 3 --threads 2 \
    --json $OUT/compare-mid.json
fi
if want limit; then  # FLOPs per U-Net step, peak fp32 matmul, fraction
  step limit-mid $PY bench/flops.py $MID --threads 2 --repeats 5 --matmul-n 2048 \
    --diffusers engines/bench-mid/diffusers --json $OUT/limit-mid.json
  step limit-default $PY bench/flops.py $DEF --threads 2 --repeats 20 --matmul-n 2048 \
    --diffusers engines/bench-default/diffusers --json $OUT/limit-default.json
fi
if want sdxl; then  # section 10: the SDXL-shaped mid model against diffusers' StableDiffusionXLPipeline
  SDXL=engines/bench-sdxl-mid
  [ -f $SDXL/bundle/manifest.json ] || step sdxl-models $PY bench/make_models.py sdxl-mid
  step compare-sdxl-mid $PY bench/compare_diffusers.py $SDXL --steps 10 --repeats 3 --threads 2 \
    --json $OUT/compare-sdxl-mid.json
  step compare-sdxl-mid-20 $PY bench/compare_diffusers.py $SDXL --steps 20 --repeats 2 --threads 2 --no-startup \
    --json $OUT/compare-sdxl-mid-20.json
  step limit-sdxl-mid $PY bench/flops.py $SDXL/bundle --threads 2 --repeats 3 --diffusers $SDXL/diffusers \
    --json $OUT/limit-sdxl-mid.json
fi
