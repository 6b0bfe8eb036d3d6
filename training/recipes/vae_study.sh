#!/usr/bin/env bash
# The autoencoder study (issue 18): what limits the shape score of the autoencoder's reconstructions.
#
# Every variant trains from scratch on the built-in shapes data with the same schedule: 3,000 steps at batch 16
# on 32x32 crops, L1 pixel loss, lr 5e-4 cosine, no perceptual or GAN term unless the variant says so, one torch
# thread each, two variants at a time. Then `python -m training.vae_study` scores each one's reconstructions of
# 256 validation images with the evaluator (shape per kind and size) and measures its validation PSNR; the shipped
# autoencoder (checkpoints/default/vae: stage 1 with the perceptual and GAN terms, then the L1 decoder fine-tune)
# is the first row.
#
# Usage: bash training/recipes/vae_study.sh            (RUN=... PY=... VARIANTS="c4 c8" override the defaults)
# Each run resumes where it stopped; the table goes to $RUN/study.json and stdout.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/vae-study}
VARIANTS=${VARIANTS:-"c4 c8 c16 f2"}  # also: w8 (wider), c8-gan (stage 1's perceptual and GAN terms)
COMMON="--pixel_loss=l1 --batch_size=16 --max_steps=${STEPS:-3000} --lr=5e-4 --warmup_steps=50 --eval_every=1000 \
  --eval_images=128 --ckpt_every=100 --scale_images=1024 --threads=1 --progress=false"

flags() {
  case "$1" in
    c4) echo "--latent_channels=4 --perceptual_weight=0 --disc_weight=0" ;;    # the shipped shape, L1 only
    c8) echo "--latent_channels=8 --perceptual_weight=0 --disc_weight=0" ;;    # twice the latent channels
    c16) echo "--latent_channels=16 --perceptual_weight=0 --disc_weight=0" ;;  # four times
    f2) echo "--block_out_channels=32,64 --latent_channels=4 --perceptual_weight=0 --disc_weight=0" ;;  # f=2
    w8) echo "--block_out_channels=64,128,128 --latent_channels=8 --perceptual_weight=0 --disc_weight=0" ;;  # wider
    c8-gan) echo "--latent_channels=8 --perceptual_weight=0.1 --disc_start=2000 --disc_weight=0.1" ;;  # stage 1's terms
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

train() {
  local v=$1 out="$RUN/$1"
  if [ -f "$out/vae/model.safetensors" ]; then return 0; fi
  local resume=""
  if [ -f "$out/train_state.safetensors" ]; then resume=--resume; fi
  # shellcheck disable=SC2046
  $PY -m training.cli train vae --out_dir="$out" $(flags "$v") $COMMON $resume > "$RUN/$v.log" 2>&1
}

mkdir -p "$RUN"
set -- $VARIANTS
while [ $# -gt 0 ]; do
  train "$1" &
  a=$!
  b=""
  if [ $# -gt 1 ]; then train "$2" & b=$!; fi
  wait "$a"
  if [ -n "$b" ]; then wait "$b"; fi
  shift; [ $# -gt 0 ] && shift
done

folders=(checkpoints/default/vae)
for v in $VARIANTS; do folders+=("$RUN/$v/vae"); done
$PY -m training.vae_study "${folders[@]}" --n 256 --threads 2 --out "$RUN/study.json"
