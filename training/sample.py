"""The reference sampler: text (or image) to image with the torch models, the oracle the exported path must match.

The math that must agree everywhere exists once, in ``ldm_runtime``: the tokenizer and the
schedulers are used as they are (numpy <-> torch at the boundary), the random draws come from
the same ``np.random.default_rng(seed)`` in the same order as ``ldm_runtime.Pipeline``. The
model calls, classifier-free guidance and the latent <-> pixel scaling are written here in
torch, directly, so that they check the runtime's own.

    python -m training.sample CKPT "a red circle" --steps 30 --seed 0 --out red.png
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

import numpy as np
import torch

from ldm_runtime.guidance import guidance_scale_embedding, negative_prompts
from ldm_runtime.images import preprocess, save_png
from ldm_runtime.schedulers import make_scheduler
from ldm_runtime.tokenizer import CLIPTokenizer
from training.checkpoint import LatentDiffusion, load_models

logger = logging.getLogger(__name__)

Callback = Callable[[int, Any, np.ndarray], None]


def tokenizer_for(models: LatentDiffusion) -> CLIPTokenizer:
    cfg = models.tokenizer_config
    kw = {k: cfg[k] for k in ("model_max_length", "pad_token", "bos_token", "eos_token", "unk_token") if k in cfg}
    return CLIPTokenizer(models.tokenizer_dir / "vocab.json", models.tokenizer_dir / "merges.txt", **kw)


@torch.no_grad()
def encode_prompt(models: LatentDiffusion, tokenizer: CLIPTokenizer, prompts: list[str], n: int) -> torch.Tensor:
    """prompts -> (B * n, L, D), each prompt's row repeated n times in a row."""
    ids = torch.from_numpy(tokenizer(prompts))
    return models.text_encoder(ids).repeat_interleave(n, dim=0)


def guidance_embedding_dim(unet: torch.nn.Module) -> int | None:
    """The width of an LCM-distilled U-Net's guidance embedding; None for a U-Net guided by CFG (also for a
    stand-in module without a config, as tests use)."""
    return getattr(getattr(unet, "config", None), "time_cond_proj_dim", None)


@torch.no_grad()
def guided_eps(unet: torch.nn.Module, x: torch.Tensor, t: Any, cond: torch.Tensor, guidance_scale: float,
               guidance_rescale: float) -> torch.Tensor:
    """One U-Net call; with guidance on the [uncond; cond] batch, combined and optionally rescaled (Lin et al. 2023).

    An LCM-distilled U-Net (``time_cond_proj_dim``) takes the scale as its guidance embedding instead.
    """
    dim = guidance_embedding_dim(unet)
    if dim is not None:
        w = torch.from_numpy(guidance_scale_embedding(np.full(x.shape[0], guidance_scale), dim))
        return unet(x, torch.full((x.shape[0],), float(t)), cond, timestep_cond=w)
    if guidance_scale <= 1.0:
        return unet(x, torch.full((x.shape[0],), float(t)), cond)
    x2 = torch.cat([x, x])
    uncond, text = unet(x2, torch.full((x2.shape[0],), float(t)), cond).chunk(2)
    eps = uncond + guidance_scale * (text - uncond)
    if guidance_rescale > 0.0:
        dims = list(range(1, eps.ndim))
        rescaled = eps * (text.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
        eps = guidance_rescale * rescaled + (1.0 - guidance_rescale) * eps
    return eps


def _sample_loop(models: LatentDiffusion, sched: Any, timesteps: np.ndarray, z: np.ndarray, cond: torch.Tensor,
                 guidance_scale: float, guidance_rescale: float, rng: np.random.Generator,
                 callback: Callback | None, eta: float) -> np.ndarray:
    step_kwargs = sched.step_kwargs(eta)  # tcd's eta; ValueError for a non-zero eta elsewhere
    for i, t in enumerate(timesteps):
        x = torch.from_numpy(np.ascontiguousarray(sched.scale_model_input(z, t), dtype=np.float32))
        eps = guided_eps(models.unet, x, t, cond, guidance_scale, guidance_rescale)
        z = np.asarray(sched.step(eps.numpy(), t, z, generator=rng, **step_kwargs), dtype=np.float32)
        if callback is not None:
            callback(i, t, z)
    return z


@torch.no_grad()
def _decode(models: LatentDiffusion, z: np.ndarray) -> np.ndarray:
    """Scaled latents -> float32 (B, H, W, 3) in [0, 1]."""
    vc = models.vae_config
    latent = torch.from_numpy(z) / vc.scaling_factor
    if vc.shift_factor:
        latent = latent + vc.shift_factor
    image = (models.vae.decode(latent) / 2 + 0.5).clamp(0, 1)
    return image.permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def _setup(models, prompt, negative_prompt, num_inference_steps, guidance_scale, scheduler, num_images_per_prompt):
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt is an empty list")
    tok = tokenizer_for(models)
    cond = encode_prompt(models, tok, prompts, num_images_per_prompt)
    if guidance_scale > 1.0 and guidance_embedding_dim(models.unet) is None:  # LCM: no unconditional pass
        neg = encode_prompt(models, tok, negative_prompts(negative_prompt, len(prompts)), num_images_per_prompt)
        cond = torch.cat([neg, cond])
    sched = make_scheduler(scheduler or models.scheduler_name, models.scheduler_config)
    sched.set_timesteps(num_inference_steps)
    return prompts, cond, sched


def sample(
    models: LatentDiffusion,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    scheduler: str | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images_per_prompt: int = 1,
    seed: int | None = None,
    latents: np.ndarray | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> np.ndarray:
    """Text to image with the torch models; float32 (B, H, W, 3) in [0, 1]. Arguments as ``ldm_runtime.Pipeline``."""
    prompts, cond, sched = _setup(models, prompt, negative_prompt, num_inference_steps, guidance_scale, scheduler,
                                  num_images_per_prompt)
    dh, dw = models.default_size
    height, width = height or dh, width or dw
    f, c = models.vae_config.spatial_factor, models.vae_config.latent_channels
    rng = np.random.default_rng(seed)
    shape = (len(prompts) * num_images_per_prompt, c, height // f, width // f)
    if latents is None:
        latents = rng.standard_normal(shape, dtype=np.float32)
    elif latents.shape != shape:
        raise ValueError(f"latents must have shape {shape}, got {latents.shape}")
    z = latents.astype(np.float32) * np.float32(sched.init_noise_sigma)
    z = _sample_loop(models, sched, sched.timesteps, z, cond, guidance_scale, guidance_rescale, rng, callback, eta)
    return _decode(models, z)


@torch.no_grad()
def sample_img2img(
    models: LatentDiffusion,
    prompt: str | list[str],
    image: Any,
    strength: float = 0.8,
    negative_prompt: str | list[str] | None = None,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    scheduler: str | None = None,
    num_images_per_prompt: int = 1,
    seed: int | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> np.ndarray:
    """Image to image (SDEdit) with the torch models; arguments and draws as ``ldm_runtime.Img2ImgPipeline``."""
    prompts, cond, sched = _setup(models, prompt, negative_prompt, num_inference_steps, guidance_scale, scheduler,
                                  num_images_per_prompt)
    vc = models.vae_config
    pixels = torch.from_numpy(preprocess(image, vc.spatial_factor))  # (Bi, 3, H, W) in [-1, 1]
    rng = np.random.default_rng(seed)
    timesteps = sched.img2img_timesteps(num_inference_steps, strength)
    mean, logvar = models.vae.encode(pixels)
    eps = torch.from_numpy(rng.standard_normal(tuple(mean.shape), dtype=np.float32))
    posterior = mean + torch.exp(0.5 * logvar) * eps  # one draw from q(z | image)
    if vc.shift_factor:
        posterior = posterior - vc.shift_factor
    z0 = (posterior * vc.scaling_factor).numpy()
    batch = len(prompts) * num_images_per_prompt
    z0 = np.repeat(z0, batch // z0.shape[0], axis=0)
    noise = rng.standard_normal(z0.shape, dtype=np.float32)
    z = np.asarray(sched.add_noise(z0, noise, timesteps[:1]), dtype=np.float32)
    z = _sample_loop(models, sched, timesteps, z, cond, guidance_scale, guidance_rescale, rng, callback, eta)
    return _decode(models, z)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.sample", description="reference sampler (torch models)")
    p.add_argument("checkpoint", help="our checkpoint folder or a diffusers pipeline folder")
    p.add_argument("prompt")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", default="reference.png")
    a = p.parse_args(argv)
    models = load_models(a.checkpoint)
    images = sample(models, a.prompt, a.negative_prompt, a.steps, a.guidance_scale, scheduler=a.scheduler,
                    height=a.height, width=a.width, seed=a.seed)
    params = {"prompt": a.prompt, "negative_prompt": a.negative_prompt, "seed": a.seed, "steps": a.steps,
              "scheduler": a.scheduler or models.scheduler_name, "guidance_scale": a.guidance_scale,
              "sampler": "training.sample"}
    print(save_png(images[0], a.out, params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
