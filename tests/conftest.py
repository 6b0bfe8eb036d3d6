"""Shared fixtures: tiny model folders of both kinds that ``ldm export`` takes as SRC.

- ``tiny_checkpoint_dir``: our checkpoint folder (``training.checkpoint.save_checkpoint``).
- ``tiny_diffusers_dir``: a diffusers ``StableDiffusionPipeline`` folder built from tiny
  diffusers/transformers models, saved with safetensors. Session-scoped; parametrise the
  scheduler's prediction type with
  ``@pytest.mark.parametrize("tiny_diffusers_dir", ["v_prediction"], indirect=True)``.

Both use a VAE with 4 levels (spatial factor 8, like Stable Diffusion's) and a 64x64 default
image, so latents are 8x8 and sizes such as 72x40 px (9x5 latents) are possible.
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLIP_BPE = REPO / "tests" / "data" / "clip-bpe"  # OpenAI CLIP's BPE files, kept for the tests

TINY_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "skip_prk_steps": True, "set_alpha_to_one": False,
                  "steps_offset": 1, "timestep_spacing": "leading"}
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
                 sample_size=8)
TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                sample_size=64)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77)


def tiny_latent_diffusion(seed: int = 0, scaling_factor: float = 0.5):
    """Our tiny models (random weights, fixed seed) as a ``LatentDiffusion``, default size 64x64."""
    import torch

    from training.checkpoint import LatentDiffusion
    from training.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
    from training.models.unet import UNet, UNetConfig
    from training.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    unet = UNet(UNetConfig(attention=(True, False), num_heads=2, **TINY_UNET))
    vae = AutoencoderKL(VAEConfig(scaling_factor=scaling_factor, **TINY_VAE))
    text = CLIPTextEncoder(TextEncoderConfig(**TINY_TEXT))
    for m in (unet, vae, text):
        m.eval()
    return LatentDiffusion(
        unet=unet, vae=vae, text_encoder=text, tokenizer_dir=CLIP_BPE,
        tokenizer_config={"model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
                          "eos_token": "<|endoftext|>"},
        scheduler_config={"_class_name": "PNDMScheduler", "prediction_type": "epsilon", "clip_sample": False,
                          **TINY_SCHEDULER},
        default_size=(64, 64))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module: tiny models on a shared 2-core machine, where OpenMP
    threads only contend (convolutions get many times slower)."""
    torch = pytest.importorskip("torch")

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Path:
    """Our checkpoint folder with tiny random models (see ``tiny_latent_diffusion``)."""
    from training.checkpoint import save_checkpoint

    return save_checkpoint(tiny_latent_diffusion(), tmp_path_factory.mktemp("ckpt") / "tiny-ckpt")


@pytest.fixture(scope="session")
def tiny_fp32_bundle(tiny_checkpoint_dir, tmp_path_factory) -> Path:
    """``tiny_checkpoint_dir`` exported once (fp32, every component, CPU variants); read-only for
    tests: copy it before changing anything in it."""
    from export.bundle import export_bundle

    return export_bundle(tiny_checkpoint_dir, tmp_path_factory.mktemp("tiny-fp32") / "bundle", precision="fp32")


def build_tiny_diffusers(path: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny ``StableDiffusionPipeline`` (random weights, fixed seed) to ``path``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, **TINY_UNET)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.5, **TINY_VAE)
    text = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    tokenizer = CLIPTokenizer(str(CLIP_BPE / "vocab.json"), str(CLIP_BPE / "merges.txt"), model_max_length=77)
    scheduler = PNDMScheduler(prediction_type=prediction_type, **TINY_SCHEDULER)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


TINY_SDXL_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, transformer_layers_per_block=(1, 2),
                      attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=8, norm_num_groups=8, sample_size=8,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
TINY_SDXL_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                       "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading"}


def build_tiny_sdxl(path: Path, refiner: bool = False, seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> Path:
    """Save a tiny ``StableDiffusionXLPipeline`` (random weights, fixed seed, real CLIP vocabulary) to ``path``.

    Two text encoders of width 32 (context 64; the second with a 32-wide projection) and a
    ``tokenizer_2`` that pads with ``!`` as SDXL's does; VAE scaling factor 0.13025 and
    ``force_upcast``. ``refiner=True``: a ``StableDiffusionXLImg2ImgPipeline`` with only
    ``text_encoder_2``/``tokenizer_2`` (context 32), 5 time ids and ``requires_aesthetics_score``.
    """
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    n_ids = 5 if refiner else 6
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(cross_attention_dim=32 if refiner else 64,
                                projection_class_embeddings_input_dim=n_ids * 8 + 32, **TINY_SDXL_UNET)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.13025, force_upcast=True, **TINY_VAE)
    text_cfg = dict(TINY_TEXT, hidden_act="gelu", projection_dim=32)
    text = None if refiner else CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    vocab, merges = str(CLIP_BPE / "vocab.json"), str(CLIP_BPE / "merges.txt")
    tokenizer = None if refiner else CLIPTokenizer(vocab, merges, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="!")
    parts = dict(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                 unet=unet, scheduler=EulerDiscreteScheduler(**TINY_SDXL_SCHEDULER), add_watermarker=False)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True,
                                                force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    else:
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny SDXL base pipeline folder (``build_tiny_sdxl``); read-only for tests."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_refiner_dir(tmp_path_factory) -> Path:
    """A tiny SDXL refiner folder (``build_tiny_sdxl(refiner=True)``: text_encoder_2 only, 5 time ids); read-only."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-refiner") / "tiny-sdxl-refiner", refiner=True)


@pytest.fixture(scope="session")
def tiny_sdxl_bundle(tiny_sdxl_dir, tmp_path_factory) -> Path:
    """``tiny_sdxl_dir`` exported once (fp32, every component, CPU variants); read-only for tests."""
    from export.bundle import export_bundle

    return export_bundle(tiny_sdxl_dir, tmp_path_factory.mktemp("sdxl-fp32") / "bundle", precision="fp32")


@pytest.fixture(scope="session")
def tiny_sdxl_refiner_bundle(tiny_sdxl_refiner_dir, tmp_path_factory) -> Path:
    """``tiny_sdxl_refiner_dir`` exported once (fp32, CPU variants); read-only for tests."""
    from export.bundle import export_bundle

    return export_bundle(tiny_sdxl_refiner_dir, tmp_path_factory.mktemp("sdxl-refiner-fp32") / "bundle",
                         precision="fp32")


@pytest.fixture(scope="session")
def tiny_diffusers_dir(request, tmp_path_factory) -> Path:
    """A tiny diffusers pipeline folder; ``request.param`` (if parametrised) is the prediction type."""
    prediction_type = getattr(request, "param", "epsilon")
    return build_tiny_diffusers(tmp_path_factory.mktemp(f"diffusers-{prediction_type}") / "tiny-sd", prediction_type)
