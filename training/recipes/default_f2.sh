#!/usr/bin/env bash
# The next default model (issue 18): the f=2 autoencoder of the study, and a U-Net trained from scratch on its
# 4x32x32 latents. Written to $RUN (runs/default2 by default); stage 2 exports $RUN/unet/checkpoint-fp32, which
# `python -m training.evaluate` scores (training/recipes/evaluate_default.sh with CKPT=...).
#
#   stage 1  KL-f2 autoencoder, 64x64 px -> 4x32x32 latents, block channels (32, 64), 0.62M params, L1 pixel loss
#            only (no perceptual or GAN term: the study found neither helps the shape score), 4,000 steps at
#            batch 16 on 32x32 crops, 2 threads. Measured 2026-12-02: validation PSNR 37.46 dB, evaluator
#            reconstruction shape 0.966 on 256 images (the shipped f=4 autoencoder: 32.57 dB, 0.739), 28 min
#            beside other jobs (0.22 s per step alone).
#   stage 2  U-Net (32, 32, 64, 128), cross-attention at 8x8 and 4x4 only, 4.24M params, with the 2-layer 64-wide
#            text encoder trained jointly (as the shipped model), v-prediction, zero terminal SNR, no min-SNR
#            weighting, and the low-noise timesteps drawn 3x as often from the start (what the shipped model's
#            stage 2b fine-tune taught), batch 32, 2 threads: 0.48-0.50 s per step alone.
#            Measured 2026-12-02 (8,500 steps, 69 min alone; docs/default-model/eval_f2_step8500.json): from 20%
#            noise it finishes shapes at 0.88-0.89 (the shipped model: 0.58), but from pure noise colour and position
#            stay at chance (0.2 / 0.1): with the bias from the start the high-noise steps, where layout is decided,
#            were drawn 1 time in 4. The export of that run is checkpoints/default-f2; the next stage to try is a
#            fine-tune of it with --timestep_bias=later.
#            Tried since, neither committed: that fine-tune (2,100 steps), and a run from scratch with uniform draws
#            (6,494 steps). Both left colour and position at chance. `python -m training.evaluate CKPT --guidance ''
#            --text-gain 100,500,800,900,980` shows why: these U-Nets read the caption only at t >= 900. The README's
#            Training section has the table.
# The decoder fine-tune (stage 1b of default.sh) is not needed here: stage 1 trains with the L1 loss throughout.
# Each stage writes atomic training state every 50 steps; rerunning this script resumes where it stopped.
# Usage: bash training/recipes/default_f2.sh   (RUN=... PY=... UNET_STEPS=... UNET_MINUTES=... override)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/default2}
resume() { if [ -f "$1/train_state.safetensors" ]; then echo --resume; fi; }

if [ ! -f "$RUN/vae/vae/model.safetensors" ]; then
  $PY -m training.cli train vae --out_dir="$RUN/vae" --block_out_channels=32,64 --latent_channels=4 \
    --perceptual_weight=0 --disc_weight=0 --pixel_loss=l1 --batch_size=16 --max_steps=4000 --lr=5e-4 \
    --warmup_steps=50 --eval_every=1000 --eval_images=128 --ckpt_every=50 --scale_images=1024 \
    --threads=${THREADS:-2} --progress=false $(resume "$RUN/vae")
fi

$PY -m training.cli train unet --out_dir="$RUN/unet" --vae="$RUN/vae/vae" --train_length=8000 \
  --block_out_channels=32,32,64,128 --attention=false,false,true,true --layers_per_block=1 --head_dim=32 \
  --text_hidden_size=64 --text_layers=2 --text_heads=2 --text_intermediate_size=256 \
  --prediction_type=v_prediction --zero_snr=true --min_snr_gamma=0 \
  --timestep_bias=earlier --timestep_bias_portion=0.5 --timestep_bias_multiplier=3 \
  --batch_size=32 --max_steps=${UNET_STEPS:-8500} --lr=8e-4 --warmup_steps=100 --ema_decay=0.998 \
  --eval_every=1000 --eval_prompts=8 --sample_steps=20 --ckpt_every=50 \
  --export_dir="$RUN/unet/checkpoint-fp32" --export_dtype=fp32 --threads=${THREADS:-2} \
  --max_minutes=${UNET_MINUTES:-0} --progress=false $(resume "$RUN/unet")
