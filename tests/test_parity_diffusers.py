"""The runtime against diffusers' own pipelines on a tiny random Stable Diffusion (real CLIP vocabulary).

The diffusers folder (``tiny_diffusers_dir``, saved with ``save_pretrained`` as safetensors) is
exported with ``ldm export``'s library entry point to an fp32 bundle and run on onnxruntime CPU;
diffusers runs the same folder in torch with the matching scheduler class swapped in through
``from_config``. Initial noise is passed as ``latents=``; where diffusers draws noise itself
(the steps of euler_a, lcm and tcd, img2img's posterior sample and noise) its ``randn_tensor`` is
replaced by draws from the same seeded numpy generator the runtime uses, in the runtime's order.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from export.bundle import export_bundle  # noqa: E402
from ldm_runtime import guidance  # noqa: E402
from ldm_runtime.pipeline import Img2ImgPipeline, Pipeline  # noqa: E402
from ldm_runtime.schedulers import SCHEDULERS, scheduler_class  # noqa: E402

# the live oracle: slow tier; tests/test_golden.py checks the same images against stored references
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TOL = 2e-3  # max abs on the "np" output (CONTRACT.md)
PROMPT = "a red circle on a blue background"

# our name -> (diffusers class, extra from_config keys), from the runtime's one table; the config
# itself is the bundle's (PNDM's)
DIFFUSERS_SCHEDULERS = {name: (scheduler_class(name).diffusers_class, scheduler_class(name).diffusers_kwargs)
                        for name in SCHEDULERS}




class Setup:
    def __init__(self, folder: Path, bundle: Path):
        from diffusers import StableDiffusionPipeline

        self.sd = StableDiffusionPipeline.from_pretrained(str(folder))
        self.sd.set_progress_bar_config(disable=True)
        self.config = dict(self.sd.scheduler.config)
        self.pipe = Pipeline.load(bundle, threads=1)

    def use(self, name: str, pipe=None):
        cls, extra = DIFFUSERS_SCHEDULERS[name]
        pipe = pipe or self.sd
        pipe.scheduler = getattr(diffusers, cls).from_config(self.config, **extra)
        return pipe


@pytest.fixture(scope="module")
def sd(tiny_diffusers_dir, tmp_path_factory) -> Setup:
    config = json.loads((tiny_diffusers_dir / "scheduler" / "scheduler_config.json").read_text())
    v = "v" if config["prediction_type"] == "v_prediction" else "eps"
    # the v-prediction folder only runs text to image: skip exporting its encoder
    comps = ("text_encoder", "unet", "vae_decoder") + (("vae_encoder",) if v == "eps" else ())
    bundle = export_bundle(tiny_diffusers_dir, tmp_path_factory.mktemp(f"sd-{v}") / "bundle", precision="fp32",
                           components=comps)
    return Setup(tiny_diffusers_dir, bundle)


class NumpyRandn:
    """Stands in for diffusers' ``randn_tensor``: float32 normals from a seeded numpy generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.shapes = rng, []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        self.shapes.append(tuple(shape))
        return torch.from_numpy(self.rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype or torch.float32)


def run_both(s: Setup, scheduler: str, **kw) -> tuple[np.ndarray, np.ndarray]:
    ours = s.pipe(scheduler=scheduler, output_type="np", **kw).images
    dk = dict(kw)
    if "latents" in dk:
        dk["latents"] = torch.from_numpy(dk["latents"])
    dk.pop("seed", None)
    with torch.no_grad():
        ref = s.use(scheduler)(output_type="np", **dk).images
    return ours, ref


def latents(batch: int, h: int = 8, w: int = 8, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, h, w), dtype=np.float32)


def check(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    d = float(np.abs(ours - ref).max())
    print(f"{what}: max abs diff {d:.2e} (image std {ours.std():.3f})")
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert ours.std() > 1e-3
    assert d <= TOL


STOCHASTIC = ("euler_a", "lcm")  # and tcd with eta > 0; its default eta 0 is deterministic


@pytest.mark.parametrize("scheduler", [s for s in DIFFUSERS_SCHEDULERS if s not in STOCHASTIC])
def test_schedulers_match_diffusers(sd, scheduler):
    ours, ref = run_both(sd, scheduler, prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5, latents=latents(1))
    check(ours, ref, scheduler)


@pytest.mark.parametrize("scheduler, eta, draws", [("euler_a", 0.0, 4), ("lcm", 0.0, 3), ("tcd", 0.3, 3)])
def test_stochastic_schedulers_match_diffusers_with_the_same_noise(sd, monkeypatch, scheduler, eta, draws):
    # euler_a draws on every step, lcm and tcd on all but the last; diffusers' SD pipeline passes eta to tcd
    seed = 9
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)  # what the runtime draws first from `seed`
    randn = NumpyRandn(rng)  # then one draw per noised step
    cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler][0])
    monkeypatch.setattr(sys.modules[cls.__module__], "randn_tensor", randn)
    ours = sd.pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, scheduler=scheduler, seed=seed, eta=eta,
                   output_type="np").images
    with torch.no_grad():
        ref = sd.use(scheduler)(PROMPT, num_inference_steps=4, guidance_scale=7.5, latents=torch.from_numpy(z),
                                eta=eta, output_type="np").images
    assert randn.shapes == [(1, 4, 8, 8)] * draws
    check(ours, ref, f"{scheduler} eta {eta} (same noise)")


def test_two_prompts_different_negatives_non_square(sd):
    # 40x72 px -> 5x9 latents; two prompts with their own negative prompts, two images each
    kw = dict(prompt=["a red circle", "a green square on grass"], negative_prompt=["blue", "blurry, dark"],
              num_inference_steps=4, guidance_scale=6.0, height=40, width=72, num_images_per_prompt=2,
              latents=latents(4, 5, 9))
    ours, ref = run_both(sd, "dpmpp_2m", **kw)
    check(ours, ref, "2 prompts x 2 images, 40x72, negatives")


def test_guidance_one_matches_diffusers(sd):
    ours, ref = run_both(sd, "ddim", prompt=[PROMPT, "a cat"], num_inference_steps=3, guidance_scale=1.0,
                         latents=latents(2))
    check(ours, ref, "guidance 1.0")


def test_guidance_rescale_matches_diffusers(sd):
    ours, ref = run_both(sd, "euler", prompt=PROMPT, num_inference_steps=3, guidance_scale=9.0,
                         guidance_rescale=0.7, latents=latents(1))
    check(ours, ref, "guidance_rescale 0.7")


def test_guidance_rescale_formula_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    pred = np.random.default_rng(0).standard_normal((4, 4, 5, 9), dtype=np.float32) * np.float32(2.0)
    ours = guidance.combine(pred, 7.5, 0.6)  # (2B, C, h, w) -> (B, C, h, w)
    uncond, text = torch.from_numpy(pred).chunk(2)
    ref = rescale_noise_cfg(uncond + 7.5 * (text - uncond), text, guidance_rescale=0.6).numpy()
    d = float(np.abs(ours - ref).max())
    print(f"combine + rescale vs diffusers' rescale_noise_cfg: max abs diff {d:.2e}")
    assert ours.shape == (2, 4, 5, 9) and d <= 1e-5


def test_twenty_steps_bundle_scheduler(sd):
    # scheduler=None: the bundle's own (PNDM from the diffusers folder) against diffusers' own
    ours = sd.pipe(PROMPT, num_inference_steps=20, guidance_scale=7.5, latents=latents(1), output_type="np").images
    assert sd.pipe.scheduler_name == "pndm"
    with torch.no_grad():
        ref = sd.use("pndm")(PROMPT, num_inference_steps=20, guidance_scale=7.5, latents=torch.from_numpy(latents(1)),
                             output_type="np").images
    check(ours, ref, "pndm, 20 steps")


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_img2img_matches_diffusers(sd, scheduler, monkeypatch):
    """diffusers' posterior sample and noise come from the runtime's numpy generator, in its order."""
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as i2i_mod
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    yy, xx = np.mgrid[0:64, 0:64]
    image = Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8))
    kw = dict(prompt=PROMPT, image=image, strength=0.6, num_inference_steps=5, guidance_scale=7.5,
              negative_prompt="blurry")
    seed = 4
    ours = Img2ImgPipeline(sd.pipe.manifest, options=sd.pipe.options)(
        **kw, scheduler=scheduler, seed=seed, output_type="np").images
    randn = NumpyRandn(np.random.default_rng(seed))
    monkeypatch.setattr(vae_mod, "randn_tensor", randn)
    monkeypatch.setattr(i2i_mod, "randn_tensor", randn)
    i2i = StableDiffusionImg2ImgPipeline(**sd.sd.components)
    i2i.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = sd.use(scheduler, i2i)(**kw, output_type="np").images
    assert randn.shapes == [(1, 4, 8, 8), (1, 4, 8, 8)]  # posterior draw, then the noise
    check(ours, ref, f"img2img {scheduler}")


# last in the file: the v-prediction folder replaces the epsilon one in the module-scoped ``sd``
@pytest.mark.parametrize("tiny_diffusers_dir", ["v_prediction"], indirect=True)
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_v_prediction_matches_diffusers(sd, scheduler):
    assert sd.pipe.scheduler_config["prediction_type"] == "v_prediction" == sd.config["prediction_type"]
    ours, ref = run_both(sd, scheduler, prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5, latents=latents(1))
    check(ours, ref, f"v_prediction {scheduler}")


# -- SD-Turbo-style use: a folder whose scheduler spaces its timesteps "trailing", 1 to 4 steps, guidance 0 --
@pytest.fixture(scope="module")
def turbo(tmp_path_factory) -> Setup:
    from conftest import build_tiny_diffusers

    folder = build_tiny_diffusers(tmp_path_factory.mktemp("turbo") / "tiny-sd-turbo")
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(cfg_path.read_text())
    # what SD-Turbo ships: EulerDiscreteScheduler with trailing spacing (SDXL-Turbo: the ancestral one)
    config.update({"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"})
    cfg_path.write_text(json.dumps(config))
    bundle = export_bundle(folder, tmp_path_factory.mktemp("turbo-bundle") / "bundle", precision="fp32",
                           components=("text_encoder", "unet", "vae_decoder"))
    return Setup(folder, bundle)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_style_trailing_guidance_zero_matches_diffusers(turbo, monkeypatch, scheduler, steps):
    assert turbo.pipe.scheduler_name == "euler"  # the bundle's own, from the folder
    seed = 5
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    randn = NumpyRandn(rng)  # euler_a draws once per step, the last one included (diffusers' RNG stream)
    cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler][0])
    monkeypatch.setattr(sys.modules[cls.__module__], "randn_tensor", randn)
    ours = turbo.pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, scheduler=scheduler, seed=seed,
                      output_type="np").images
    ref_pipe = turbo.use(scheduler)
    with torch.no_grad():
        ref = ref_pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=torch.from_numpy(z),
                       output_type="np").images
    # trailing spacing reaches timestep 999 at one step; the first sigma is sigma max
    assert float(ref_pipe.scheduler.timesteps[0]) == 999.0
    assert randn.shapes == ([(1, 4, 8, 8)] * steps if scheduler == "euler_a" else [])
    check(ours, ref, f"turbo-style {scheduler}, {steps} steps, guidance 0")
