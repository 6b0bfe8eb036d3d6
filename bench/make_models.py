"""Build the benchmark models: a checkpoint folder, the same weights as a diffusers folder, and a bundle.

Each model under ``engines/bench-<name>/`` (git-ignored)::

    engines/bench-<name>/ckpt/        our checkpoint folder (training.checkpoint.save_checkpoint)
    engines/bench-<name>/diffusers/   the same weights in diffusers layout (export_diffusers), for the peer
    engines/bench-<name>/bundle/      fp32 bundle (export.bundle.export_bundle) with CPU variants
                                      (export.optimize.optimize_bundle), what ``ldm bench`` runs

- ``default``: the shipped default model (``checkpoints/default/``, trained by training/recipes/default.sh);
  while it does not exist, a random stand-in of the same shape (KL-f4 VAE 32/64/64, U-Net 32/64/128
  with head_dim 32 and attention at levels 1-2, a 2-layer 64-wide text encoder, 64x64 images,
  v-prediction DDIM with trailing timesteps), with the CLIP BPE vocabulary instead of the learned one.
- ``mid``: SD-shaped and mid-size, random weights: U-Net 128/256/256 (2 resnets per level, 8 heads,
  cross-attention at the first two levels and the mid block, as SD 1.x), f=8 VAE 64/128/256/256,
  a 6-layer 512-wide text encoder, 256x256 images, PNDM as SD 1.x ships it.
- ``sdxl-mid``: SDXL-shaped and mid-size, random weights, built as a diffusers ``StableDiffusionXLPipeline``
  (so there is no ``ckpt/``; ``ldm export`` imports the diffusers folder as users' SDXL folders are):
  U-Net 128/256/512 with 2 resnets per level, transformer depths 1/2/4 (the mid block 4) of 64-wide
  heads, linear projections and the ``text_time`` addition embedding (6 time ids of 256); two
  text encoders (4 layers of 256 and 4 layers of 512 with a 512-wide projection, context 768, the
  second tokenizer padding with ``!``); the f=8 VAE 64/128/256/256 with ``force_upcast`` and SDXL's
  scaling factor; 512x512 images, Euler as SDXL ships it.

    .venv/bin/python bench/make_models.py            # default and mid
    .venv/bin/python bench/make_models.py sdxl-mid
    .venv/bin/python bench/make_models.py mid --force
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from export.bundle import export_bundle  # noqa: E402
from export.optimize import optimize_bundle  # noqa: E402
from training.checkpoint import LatentDiffusion, export_diffusers, load_models, save_checkpoint  # noqa: E402
from training.models.text_encoder import CLIPTextEncoder, TextEncoderConfig  # noqa: E402
from training.models.unet import UNet, UNetConfig  # noqa: E402
from training.models.vae import AutoencoderKL, VAEConfig  # noqa: E402

log = logging.getLogger("make_models")

CLIP_BPE = REPO / "tests" / "data" / "clip-bpe"
TOKENIZER = {"model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
             "eos_token": "<|endoftext|>"}
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": True,
                "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
                "timestep_spacing": "leading", "clip_sample": False}
# what training/train_unet.py writes for the default recipe (v-prediction, zero terminal SNR)
DEFAULT_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                     "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                     "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "steps_offset": 0,
                     "set_alpha_to_one": False, "clip_sample": False}

CONFIGS = {
    "default": dict(
        unet=UNetConfig(in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), attention=(False, True, True),
                        layers_per_block=1, num_heads=None, head_dim=32, cross_attention_dim=64, norm_num_groups=32,
                        sample_size=16),
        vae=VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
                      mid_block_add_attention=False, sample_size=64, scaling_factor=1.0),
        text=TextEncoderConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                               hidden_act="gelu"),
        scheduler=DEFAULT_SCHEDULER, size=(64, 64)),
    "mid": dict(
        unet=UNetConfig(block_out_channels=(128, 256, 256), attention=(True, True, False), layers_per_block=2,
                        num_heads=8, cross_attention_dim=512, sample_size=32),
        vae=VAEConfig(block_out_channels=(64, 128, 256, 256), layers_per_block=2, latent_channels=4,
                      norm_num_groups=32, sample_size=256),
        text=TextEncoderConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8),
        scheduler=SD_SCHEDULER, size=(256, 256)),
}


SDXL_CONFIGS = {
    "sdxl-mid": dict(
        unet=dict(block_out_channels=(128, 256, 512), layers_per_block=2, transformer_layers_per_block=(1, 2, 4),
                  attention_head_dim=(2, 4, 8), use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=6 * 256 + 512,
                  cross_attention_dim=768, norm_num_groups=32, sample_size=64,
                  down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3),
        vae=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                 sample_size=512, scaling_factor=0.13025, force_upcast=True,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(vocab_size=49408, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=256),
        text_2=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                    num_attention_heads=8, max_position_embeddings=77, hidden_act="gelu", projection_dim=512),
        scheduler={"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading",
                   "prediction_type": "epsilon"}),
}


def save_random_sdxl(name: str, path: Path, seed: int = 0) -> dict[str, int]:
    """Save the random-weight diffusers ``StableDiffusionXLPipeline`` of ``SDXL_CONFIGS[name]`` at ``path``;
    returns each component's parameter count."""
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    c = SDXL_CONFIGS[name]
    torch.manual_seed(seed)
    parts = dict(unet=UNet2DConditionModel(**c["unet"]), vae=DAutoencoderKL(**c["vae"]),
                 text_encoder=CLIPTextModel(CLIPTextConfig(**c["text"])),
                 text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**c["text_2"])))
    vocab, merges = str(CLIP_BPE / "vocab.json"), str(CLIP_BPE / "merges.txt")
    pipe = StableDiffusionXLPipeline(**parts, tokenizer=CLIPTokenizer(vocab, merges, model_max_length=77),
                                     tokenizer_2=CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="!"),
                                     scheduler=EulerDiscreteScheduler(**c["scheduler"]), add_watermarker=False)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}


def build_sdxl(name: str, root: Path, force: bool = False) -> Path:
    """Write diffusers/ and bundle/ (fp32, CPU variants) under ``root / f"bench-{name}"``; returns that folder."""
    out = root / f"bench-{name}"
    if (out / "bundle" / "manifest.json").is_file() and not force:
        log.info("%s exists (use --force to rebuild)", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n = save_random_sdxl(name, out / "diffusers")
    log.info("%s: parameters %s", name, {k: f"{v / 1e6:.2f}M" for k, v in n.items()})
    (out / "SOURCE").write_text(f"random weights, diffusers StableDiffusionXLPipeline, config {name!r}\n")
    if (out / "bundle").exists():
        shutil.rmtree(out / "bundle")
    export_bundle(out / "diffusers", out / "bundle", precision="fp32")  # with CPU variants
    log.info("%s: built in %.0f s", out, time.perf_counter() - t0)
    return out


def random_models(name: str, seed: int = 0) -> LatentDiffusion:
    """Random-weight models of configuration ``name`` (see ``CONFIGS``)."""
    c = CONFIGS[name]
    torch.manual_seed(seed)
    unet, vae, text = UNet(c["unet"]), AutoencoderKL(c["vae"]), CLIPTextEncoder(c["text"])
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    return LatentDiffusion(unet=unet, vae=vae, text_encoder=text, tokenizer_dir=CLIP_BPE,
                           tokenizer_config=dict(TOKENIZER), scheduler_config=dict(c["scheduler"]),
                           default_size=c["size"], extra={"note": f"random weights, bench config {name!r}"})


def build(name: str, root: Path, force: bool = False, default_src: Path | None = None) -> Path:
    """Write ckpt/, diffusers/ and bundle/ under ``root / f"bench-{name}"``; returns that folder."""
    out = root / f"bench-{name}"
    marker = out / "bundle" / "manifest.json"
    src = default_src if name == "default" and default_src and (default_src / "ldm_checkpoint.json").is_file() else None
    if marker.is_file() and not force:
        log.info("%s exists (use --force to rebuild)", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if src is not None:
        log.info("%s: the trained default model from %s", name, src)
        ld = load_models(src)
        (out / "SOURCE").write_text(f"trained: {src}\n")
    else:
        if name == "default":
            log.warning("no trained default model at %s: building a same-shape random stand-in", default_src)
        ld = random_models(name)
        (out / "SOURCE").write_text(f"random stand-in, config {name!r}\n")
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in
         (("unet", ld.unet), ("vae", ld.vae), ("text_encoder", ld.text_encoder))}
    log.info("%s: parameters %s", name, {k: f"{v / 1e6:.2f}M" for k, v in n.items()})
    save_checkpoint(ld, out / "ckpt")
    export_diffusers(ld, out / "diffusers")
    export_bundle(out / "ckpt", out / "bundle", precision="fp32", models=ld)
    optimize_bundle(out / "bundle")  # CPU variants (fused attention, external weights); see export/optimize.py
    log.info("%s: built in %.0f s", out, time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", default=list(CONFIGS),
                   help=f"any of {', '.join([*CONFIGS, *SDXL_CONFIGS])} (default: {', '.join(CONFIGS)})")
    p.add_argument("--root", type=Path, default=REPO / "engines")
    p.add_argument("--default-src", type=Path, default=REPO / "checkpoints" / "default",
                   help="the trained default checkpoint (used when it exists)")
    p.add_argument("--force", action="store_true", help="rebuild even if the bundle exists")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    bad = [n for n in args.names if n not in CONFIGS and n not in SDXL_CONFIGS]
    if bad:
        p.error(f"unknown model(s) {bad}; expected any of {[*CONFIGS, *SDXL_CONFIGS]}")
    for name in args.names:
        print(build_sdxl(name, args.root, args.force) if name in SDXL_CONFIGS
              else build(name, args.root, args.force, args.default_src))
    return 0


if __name__ == "__main__":
    sys.exit(main())
