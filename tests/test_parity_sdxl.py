"""The runtime against diffusers' SDXL pipelines on tiny random SDXL folders (real CLIP vocabulary).

``tiny_sdxl_dir`` / ``tiny_sdxl_refiner_dir`` (``build_tiny_sdxl``, saved with ``save_pretrained``)
are exported to fp32 bundles and run on onnxruntime CPU; diffusers' ``StableDiffusionXLPipeline`` and
``StableDiffusionXLImg2ImgPipeline`` run the same folders in torch with the matching scheduler
swapped in. Initial noise goes in as ``latents=``; img2img's posterior draw and noise come from the
runtime's numpy generator, in its order (``NumpyRandn``, as in test_parity_diffusers.py). Each case
prints its max abs difference on the "np" output; the bound is 2e-3.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_parity_diffusers import DIFFUSERS_SCHEDULERS, NumpyRandn, check, latents  # noqa: E402

from export.bundle import export_bundle  # noqa: E402
from ldm_runtime.pipeline import Img2ImgPipeline, Pipeline  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PROMPT = "a red circle on a blue background"
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


class XL:
    """One SDXL folder in diffusers (``ref``, text to image or image to image) and its bundle in the runtime."""

    def __init__(self, folder, bundle, img2img: bool = False):
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
        self.ref = cls.from_pretrained(str(folder))
        self.ref.set_progress_bar_config(disable=True)
        self.config = dict(self.ref.scheduler.config)
        self.pipe = (Img2ImgPipeline if img2img else Pipeline).load(bundle, threads=1)

    def use(self, name: str, pipe=None, **config):
        """``pipe`` (default ``ref``) with scheduler ``name`` on the folder's config updated by ``config``."""
        cls, extra = DIFFUSERS_SCHEDULERS[name]
        pipe = pipe or self.ref
        pipe.scheduler = getattr(diffusers, cls).from_config({**self.config, **config}, **extra)
        return pipe


@pytest.fixture(scope="module")
def xl(tiny_sdxl_dir, tiny_sdxl_bundle) -> XL:
    return XL(tiny_sdxl_dir, tiny_sdxl_bundle)


def run_both(s: XL, scheduler: str, **kw) -> tuple[np.ndarray, np.ndarray]:
    ours = s.pipe(scheduler=scheduler, output_type="np", **kw).images
    ref_kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    with torch.no_grad():
        ref = s.use(scheduler)(output_type="np", **ref_kw).images
    return ours, ref


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m"])
def test_schedulers_match_diffusers(xl, scheduler):
    # negative_prompt None on a force_zeros_for_empty_prompt folder: all-zero negatives
    assert xl.pipe.conditioning.force_zeros_for_empty_prompt and xl.ref.config.force_zeros_for_empty_prompt
    ours, ref = run_both(xl, scheduler, prompt=PROMPT, num_inference_steps=4, guidance_scale=5.0, latents=latents(1))
    check(ours, ref, f"sdxl {scheduler}")


def test_two_prompts_different_negatives_and_second_prompts(xl):
    kw = dict(prompt=["a red circle", "a green square on grass"], prompt_2=["a blue cat", "rain"],
              negative_prompt=["blue", "blurry, dark"], negative_prompt_2=["noise", ""], num_images_per_prompt=2,
              num_inference_steps=3, guidance_scale=6.0, latents=latents(4))
    ours, ref = run_both(xl, "euler", **kw)
    check(ours, ref, "sdxl 2 prompts x 2 images, negatives and second prompts")


def test_explicit_empty_negative_is_encoded_not_zeroed(xl):
    ours, ref = run_both(xl, "euler", prompt=PROMPT, negative_prompt="", num_inference_steps=3, guidance_scale=5.0,
                         latents=latents(1))
    check(ours, ref, 'sdxl negative_prompt ""')
    zeros = xl.pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=latents(1), output_type="np").images
    assert np.abs(zeros - ours).max() > 10 * 2e-3  # the two negatives differ, and the test can tell


def test_non_square_with_micro_conditioning(xl):
    # 40x72 px -> 5x9 latents; every size argument away from its default (diffusers uses the negative
    # sizes only when both negative_original_size and negative_target_size are given)
    kw = dict(prompt=PROMPT, height=40, width=72, original_size=(96, 128), crops_coords_top_left=(8, 16),
              target_size=(48, 80), negative_original_size=(64, 64), negative_crops_coords_top_left=(4, 0),
              negative_target_size=(40, 72), negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0,
              latents=latents(1, 5, 9))
    ours, ref = run_both(xl, "euler", **kw)
    check(ours, ref, "sdxl 40x72, original_size/crops/target_size")


def test_turbo_style_one_trailing_step_at_guidance_zero(xl):
    # what SDXL-Turbo ships: trailing spacing; guidance 0 runs no unconditional pass
    trailing = {**xl.pipe.scheduler_config, "timestep_spacing": "trailing"}
    pipe = Pipeline(xl.pipe.manifest, options=xl.pipe.options)
    pipe.engines.update(xl.pipe.engines)
    pipe.scheduler_config = trailing
    ours = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, scheduler="euler", latents=latents(1),
                output_type="np").images
    ref_pipe = xl.use("euler", timestep_spacing="trailing")
    with torch.no_grad():
        ref = ref_pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(latents(1)),
                       output_type="np").images
    assert float(ref_pipe.scheduler.timesteps[0]) == 999.0
    check(ours, ref, "sdxl turbo-style: 1 trailing step, guidance 0")


def test_negative_none_without_force_zeros(tiny_sdxl_dir, tmp_path_factory):
    from conftest import build_tiny_sdxl

    folder = build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-nozeros") / "tiny-sdxl", force_zeros_for_empty_prompt=False)
    bundle = export_bundle(folder, tmp_path_factory.mktemp("sdxl-nozeros-bundle") / "bundle", precision="fp32",
                           components=TEXT_COMPONENTS)
    s = XL(folder, bundle)
    assert not s.pipe.conditioning.force_zeros_for_empty_prompt
    ours, ref = run_both(s, "euler", prompt=PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=latents(1))
    check(ours, ref, "sdxl negative_prompt None without force_zeros_for_empty_prompt")


def gradient_image(h: int = 64, w: int = 64):
    from PIL import Image

    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8))


def img2img_both(s: XL, monkeypatch, scheduler: str, seed: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    """Ours with ``seed``; diffusers' img2img with its posterior draw and noise from the same numpy stream."""
    import diffusers.models.autoencoders.vae as vae_mod

    ours = s.pipe(**kw, scheduler=scheduler, seed=seed, output_type="np").images
    randn = NumpyRandn(np.random.default_rng(seed))
    monkeypatch.setattr(vae_mod, "randn_tensor", randn)
    monkeypatch.setattr(sys.modules[type(s.ref).__module__], "randn_tensor", randn)
    with torch.no_grad():
        ref = s.use(scheduler)(**kw, output_type="np").images
    assert randn.shapes == [(1, 4, 8, 8), (1, 4, 8, 8)]  # posterior draw, then the noise
    return ours, ref


def test_img2img_on_the_base_matches_diffusers(tiny_sdxl_dir, tiny_sdxl_bundle, monkeypatch):
    s = XL(tiny_sdxl_dir, tiny_sdxl_bundle, img2img=True)
    ours, ref = img2img_both(s, monkeypatch, "euler", 4, prompt=PROMPT, image=gradient_image(), strength=0.6,
                             num_inference_steps=5, guidance_scale=5.0, negative_prompt="blurry")
    check(ours, ref, "sdxl img2img (base) euler")


def test_refiner_with_aesthetic_scores_matches_diffusers(tiny_sdxl_refiner_dir, tiny_sdxl_refiner_bundle, monkeypatch):
    s = XL(tiny_sdxl_refiner_dir, tiny_sdxl_refiner_bundle, img2img=True)
    assert s.pipe.conditioning.requires_aesthetics_score and s.ref.config.requires_aesthetics_score
    ours, ref = img2img_both(s, monkeypatch, "ddim", 7, prompt=PROMPT, image=gradient_image(), strength=0.5,
                             num_inference_steps=6, guidance_scale=5.0, aesthetic_score=7.5,
                             negative_aesthetic_score=1.5, original_size=(128, 96), crops_coords_top_left=(4, 8))
    check(ours, ref, "sdxl refiner img2img, aesthetic scores")


@pytest.mark.parametrize("field", ["tokenizer", "tokenizer_2"])
def test_tokenizers_give_transformers_ids(xl, tiny_sdxl_dir, field):
    """Each bundle tokenizer against transformers' on the folder's: tokenizer_2 pads with "!" (id 0)."""
    from transformers import CLIPTokenizer

    theirs = CLIPTokenizer.from_pretrained(str(tiny_sdxl_dir / field))
    prompts = [PROMPT, "", "a cat, a dog & 3 birds!"]
    want = theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    got = xl.pipe.tokenizers[field](prompts)
    assert np.array_equal(got, want)
    assert (got[1, 2:] == theirs.pad_token_id).all()  # the empty prompt: BOS, EOS, then padding
    assert (theirs.pad_token == "!") == (field == "tokenizer_2") == (theirs.pad_token_id == 0)
