"""The runtime pipeline against the torch reference sampler (training/sample.py) on our tiny models.

One fp32 bundle exported from ``tiny_checkpoint_dir`` (64x64 default, VAE factor 8), run on
onnxruntime CPU; the oracle is the same models in torch driven by the same schedulers. Also:
determinism, CFG batching, the negative-prompt cache, callbacks, img2img, bad input, NaN
detection and the ``ldm generate`` command.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ldm_runtime import guidance  # noqa: E402
from ldm_runtime.generate import ProgressBar  # noqa: E402
from ldm_runtime.generate import main as generate_main  # noqa: E402
from ldm_runtime.images import read_parameters  # noqa: E402
from ldm_runtime.manifest import BundleError, Manifest  # noqa: E402
from ldm_runtime.pipeline import Img2ImgPipeline, NonFiniteOutputError, Pipeline, PipelineInputError  # noqa: E402
from ldm_runtime.schedulers import SCHEDULERS  # noqa: E402
from training.checkpoint import load_models  # noqa: E402
from training.sample import sample, sample_img2img  # noqa: E402

TOL = 1e-3  # max abs on the "np" output, fp32 bundle vs torch
PROMPT = "a red circle on a blue background"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(tiny_fp32_bundle) -> Path:
    return tiny_fp32_bundle


@pytest.fixture(scope="module")
def models(tiny_checkpoint_dir):
    return load_models(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def pipe(bundle) -> Pipeline:
    return Pipeline.load(bundle, threads=1)


def fresh(pipe: Pipeline, cls=Pipeline) -> Pipeline:
    """A new pipeline (own cache and engine table) on the already-open engines."""
    p = cls(pipe.manifest, options=pipe.options)
    p.engines.update(pipe.engines)
    return p


def noise(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


class Recorder:
    """An Engine that forwards to another and records the shapes it was fed; ``poison`` injects NaN/Inf."""

    def __init__(self, engine, poison_call: int | None = None, value: float = np.nan):
        self.engine, self.name = engine, engine.name
        self.inputs, self.outputs = engine.inputs, engine.outputs
        self.calls: list[dict[str, tuple]] = []
        self.poison_call, self.value = poison_call, value

    def run(self, feeds):
        self.calls.append({k: tuple(v.shape) for k, v in feeds.items()})
        out = self.engine.run(feeds)
        if self.poison_call is not None and len(self.calls) - 1 == self.poison_call:
            name = next(iter(out))
            out[name] = out[name].copy()
            out[name].flat[3] = self.value
        return out


# -- parity with the torch reference ------------------------------------------------------------

@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_matches_torch_reference(pipe, models, scheduler):
    kw = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0, scheduler=scheduler)
    if scheduler in ("euler_a", "lcm"):
        kw["seed"] = 3  # stochastic: noise from the same seeded numpy generator on both sides
    else:
        kw["latents"] = noise((1, 4, 8, 8))
    ours = pipe(**kw, output_type="np").images
    ref = sample(models, **kw)
    d = float(np.abs(ours - ref).max())
    print(f"{scheduler}: max abs diff {d:.2e} (image std {ours.std():.3f})")
    assert ours.shape == ref.shape == (1, 64, 64, 3) and ours.dtype == np.float32
    assert ours.std() > 1e-3  # not a flat image: the comparison means something
    assert d <= TOL


@pytest.mark.parametrize("scheduler, eta, steps", [("lcm", 0.0, 1), ("lcm", 0.0, 4), ("tcd", 0.0, 4),
                                                   ("tcd", 0.3, 4), ("tcd", 1.0, 2)])
def test_few_step_schedulers_match_torch_reference(pipe, models, scheduler, eta, steps):
    # lcm, and tcd with eta > 0, draw their step noise from the call's seeded generator, after z_T
    kw = dict(prompt=["a red circle", "a cat"], negative_prompt="blurry", num_inference_steps=steps,
              guidance_scale=5.0, scheduler=scheduler, eta=eta, seed=21)
    ours = pipe(**kw, output_type="np").images
    ref = sample(models, **kw)
    d = float(np.abs(ours - ref).max())
    print(f"{scheduler} eta {eta}, {steps} steps: max abs diff {d:.2e} (image std {ours.std():.3f})")
    assert ours.shape == ref.shape == (2, 64, 64, 3) and ours.std() > 1e-3
    assert d <= TOL
    if eta:  # the noise matters: another seed gives another image
        other = pipe(**{**kw, "seed": 22}, output_type="np").images
        assert np.abs(other - ours).max() > 1e-3


def test_batch_negatives_rescale_odd_size_match_reference(pipe, models):
    # 40x72 px -> 5x9 latents (odd sizes), 2 prompts x 2 images, per-prompt negatives, guidance rescale
    kw = dict(prompt=["a red circle", "a green square"], negative_prompt=["blue", ""], num_inference_steps=3,
              guidance_scale=5.0, guidance_rescale=0.7, scheduler="dpmpp_2m", height=40, width=72,
              num_images_per_prompt=2, seed=7)
    ours = pipe(**kw, output_type="np").images
    ref = sample(models, **kw)
    d = float(np.abs(ours - ref).max())
    print(f"batch 2x2, 40x72, rescale 0.7: max abs diff {d:.2e}")
    assert ours.shape == (4, 40, 72, 3)
    assert d <= TOL
    assert np.abs(ours[0] - ours[1]).max() > 1e-3  # same prompt, different noise
    no_rescale = pipe(**{**kw, "guidance_rescale": 0.0}, output_type="np").images
    assert np.abs(no_rescale - ours).max() > 1e-4  # the rescale changes the result


# -- determinism, batching, cache, callback --------------------------------------------------

def test_same_seed_same_bytes(pipe):
    kw = dict(prompt=PROMPT, num_inference_steps=3, scheduler="euler_a", guidance_scale=4.0)
    a = pipe(**kw, seed=123, output_type="np")
    b = pipe(**kw, seed=123, output_type="np")
    c = pipe(**kw, seed=124, output_type="np")
    assert a.seed == b.seed == 123
    assert a.images.tobytes() == b.images.tobytes()
    assert np.abs(a.images - c.images).max() > 1e-3
    pa, pb = (pipe(**kw, seed=5).images[0] for _ in range(2))
    assert pa.tobytes() == pb.tobytes() and pa.size == (64, 64) and pa.mode == "RGB"
    picked = pipe(**kw, output_type="np")  # no seed: one is picked and reported
    again = pipe(**kw, seed=picked.seed, output_type="np")
    assert picked.images.tobytes() == again.images.tobytes()


@pytest.mark.parametrize("scale, rows", [(1.0, 2), (0.5, 2), (7.5, 4)])
def test_unet_batch_follows_guidance(pipe, models, scale, rows):
    p = fresh(pipe)
    unet = p.engines["unet"] = Recorder(pipe.engine("unet"))
    text = p.engines["text_encoder"] = Recorder(pipe.engine("text_encoder"))
    kw = dict(prompt=["a red circle", "a blue square"], num_inference_steps=3, guidance_scale=scale, scheduler="ddim",
              latents=noise((2, 4, 8, 8)))
    out = p(**kw, output_type="np").images
    assert [c["sample"][0] for c in unet.calls] == [rows] * 3  # one U-Net call per step, B or 2B rows
    assert len(text.calls) == (1 if scale <= 1 else 2)  # no negative prompt encoded without guidance
    if scale == 1.0:
        d = float(np.abs(out - sample(models, **kw)).max())
        print(f"guidance 1.0: max abs diff {d:.2e}")
        assert d <= TOL


def test_negative_prompt_cache(pipe):
    p = fresh(pipe)
    text = p.engines["text_encoder"] = Recorder(pipe.engine("text_encoder"))
    kw = dict(prompt=["a", "b", "c"], negative_prompt=["ugly", "ugly", "dark"], num_inference_steps=2, seed=0,
              output_type="np")
    first = p(**kw).images
    assert [c["input_ids"] for c in text.calls] == [(3, 77), (2, 77)]  # distinct negatives encoded once
    second = p(**kw).images
    assert [c["input_ids"] for c in text.calls[2:]] == [(3, 77)]  # negatives from the cache
    assert p.negative_cache.hits == 2 and p.negative_cache.misses == 2
    assert first.tobytes() == second.tobytes()
    p(**{**kw, "negative_prompt": None})  # the empty prompt: a new entry
    assert [c["input_ids"] for c in text.calls[3:]] == [(3, 77), (1, 77)]


def test_embedding_cache_is_lru():
    cache = guidance.EmbeddingCache(maxsize=2)
    encoded = []

    def enc(ids):
        encoded.append(len(ids))
        return ids[:, :, None].astype(np.float32)

    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    cache.encode(ids[:2], enc)
    cache.encode(ids[:1], enc)  # refresh row 0
    cache.encode(ids[2:], enc)  # evicts row 1, the least recently used
    out = cache.encode(ids, enc)
    assert encoded == [2, 1, 1] and len(cache) == 2
    np.testing.assert_array_equal(out[..., 0], ids)


@pytest.mark.parametrize("scheduler", ["pndm", "ddim"])
def test_callback_once_per_step(pipe, scheduler):
    seen = []
    out = pipe(PROMPT, num_inference_steps=5, scheduler=scheduler, seed=2, output_type="np",
               callback=lambda step, t, z: seen.append((step, t, z.copy())))
    assert [s for s, _, _ in seen] == list(range(5))
    assert all(z.shape == (1, 4, 8, 8) and z.dtype == np.float32 for _, _, z in seen)
    # the last callback sees the final latents: decoding them gives the output
    final = (np.clip(pipe.decode_latents(seen[-1][2]) / 2 + 0.5, 0, 1)).transpose(0, 2, 3, 1)
    assert np.abs(final - out.images).max() == 0.0


# -- image to image ---------------------------------------------------------------------------

def _test_image() -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.stack([xx * 4, yy * 4, ((xx - 32) ** 2 + (yy - 32) ** 2 < 200) * 255], axis=-1)
    return img.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m", "lcm", "tcd"])
def test_img2img_matches_reference(pipe, models, scheduler):
    from PIL import Image

    p = fresh(pipe, Img2ImgPipeline)
    image = _test_image()
    kw = dict(prompt=["a red circle", "a cat"], strength=0.6, num_inference_steps=5, guidance_scale=5.0,
              scheduler=scheduler, seed=11)
    ours = p(image=image, **kw, output_type="np").images
    ref = sample_img2img(models, image=image, **kw)
    d = float(np.abs(ours - ref).max())
    print(f"img2img {scheduler}: max abs diff {d:.2e}")
    assert ours.shape == (2, 64, 64, 3) and d <= TOL
    # the same picture as PIL, as float in [0, 1]: the same pixels in, the same bytes out
    via_pil = p(image=Image.fromarray(image), **kw, output_type="np").images
    via_float = p(image=image.astype(np.float32) / 255, **kw, output_type="np").images
    assert via_pil.tobytes() == ours.tobytes() == via_float.tobytes()
    assert "vae_encoder" in p.engines


def test_text_to_image_does_not_open_vae_encoder(bundle):
    p = Pipeline.load(bundle, threads=1)
    p(PROMPT, num_inference_steps=1, seed=0)
    assert sorted(p.engines) == ["text_encoder", "unet", "vae_decoder"]


# -- bad input: one clear error each, before any model runs ------------------------------------

BAD_CALLS = [
    (dict(scheduler="heun"), r"unknown scheduler 'heun'; expected one of ddim, pndm, euler, euler_a, dpmpp_2m"),
    (dict(height=60), r"height must be a positive multiple of 8 .* got 60"),
    (dict(width=0), r"width must be a positive multiple of 8"),
    (dict(prompt=[]), r"prompt is an empty list"),
    (dict(prompt=123), r"prompt must be a str or a list of str, got int"),
    (dict(negative_prompt=["a", "b"]), r"negative_prompt has 2 entries but there are 1 prompts"),
    (dict(latents=np.zeros((1, 4, 8, 7), np.float32)), r"latents must be float32 \[1, 4, 8, 8\].*got float32 \[1, 4, 8, 7\]"),
    (dict(latents=np.zeros((1, 4, 8, 8), np.float64)), r"latents must be float32 \[1, 4, 8, 8\].*got float64"),
    (dict(num_images_per_prompt=2, latents=np.zeros((1, 4, 8, 8), np.float32)), r"latents must be float32 \[2, 4, 8, 8\]"),
    (dict(num_inference_steps=0), r"num_inference_steps must be an int >= 1, got 0"),
    (dict(num_inference_steps=1001), r"scheduler 'pndm': num_inference_steps must be an integer in \[1, 1000\]"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt must be an int >= 1"),
    (dict(output_type="latent"), r"output_type must be one of"),
    (dict(guidance_rescale=1.5), r"guidance_rescale must be a number in \[0, 1\]"),
    (dict(seed=-1), r"seed must be None or an int >= 0"),
    (dict(scheduler="lcm", num_inference_steps=51),
     r"scheduler 'lcm': num_inference_steps=51 is more than original_inference_steps=50"),
    (dict(scheduler="tcd", eta=1.5), r"eta must be a number in \[0, 1\], got 1.5"),
    (dict(scheduler="ddim", eta=0.5), r"eta=0.5: scheduler 'ddim' is deterministic DDIM \(eta 0\) only"),
    (dict(scheduler="euler", eta=0.2), r"eta=0.2: scheduler 'euler' takes no eta"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CALLS, ids=[m.split()[0] + f"-{i}" for i, (_, m) in enumerate(BAD_CALLS)])
def test_bad_input_is_refused_before_any_model(bundle, kwargs, message):
    p = Pipeline.load(bundle, threads=1)
    with pytest.raises(PipelineInputError, match=message):
        p(**{"prompt": PROMPT, **kwargs})
    assert p.engines == {}  # no engine was even opened


@pytest.mark.parametrize("kwargs, message", [
    (dict(strength=0.0), r"strength must be in \(0, 1\]"),
    (dict(strength=0.1, num_inference_steps=5), r"no denoising step would run"),
    (dict(strength=0.1, num_inference_steps=6, scheduler="lcm"), r"the 5 timesteps that strength 0.1 keeps"),
    (dict(scheduler="tcd", eta=-0.5), r"eta must be a number in \[0, 1\], got -0.5"),
    (dict(image=np.zeros((60, 64, 3), np.uint8)), r"multiples of 8 .* got 60x64"),
    (dict(image=np.zeros((3, 64, 64, 3), np.uint8)), r"got 3 images for 1 prompts"),
    (dict(image=np.full((64, 64, 3), 2.0, np.float32)), r"float image must be finite and in \[0, 1\]"),
    (dict(image="cat.png"), r"image must be a PIL image"),
])
def test_img2img_bad_input(bundle, kwargs, message):
    p = Img2ImgPipeline.load(bundle, threads=1)
    with pytest.raises(PipelineInputError, match=message):
        p(**{"prompt": PROMPT, "image": _test_image(), **kwargs})
    assert p.engines == {}


def test_bundle_problems(bundle, tmp_path):
    broken = shutil.copytree(bundle, tmp_path / "b")
    with open(broken / "unet.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    # on onnxruntime CPU the pipeline reads the CPU variant (unet.cpu.onnx), so only the portable graph's
    # readers see this file: those are the ones that must refuse it
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Pipeline.load(broken, cpu_variant=False)
    (broken / "unet.onnx").unlink()
    with pytest.raises(BundleError, match="missing file 'unet.onnx'"):
        Pipeline.load(broken, cpu_variant=False)
    shutil.copy(bundle / "unet.onnx", broken / "unet.onnx")
    (broken / "unet.cpu.onnx").unlink()  # what Pipeline.load reads by default
    with pytest.raises(BundleError, match="missing file 'unet.cpu.onnx'"):
        Pipeline.load(broken)
    shutil.copy(bundle / "unet.cpu.onnx", broken / "unet.cpu.onnx")
    data = json.loads((broken / "manifest.json").read_text())
    del data["components"]["vae_encoder"]
    (broken / "manifest.json").write_text(json.dumps(data))
    Pipeline.load(broken)  # text to image does not need the encoder
    with pytest.raises(BundleError, match=r"lacks \['vae_encoder'\]"):
        Img2ImgPipeline.load(broken)


def test_engine_shape_hook_refuses_before_running(bundle):
    """Backends with fixed shape ranges (TensorRT profiles) refuse a size through ``check_shapes``."""

    class Profiled:
        name, inputs, outputs, ran = "unet", (), (), False

        def check_shapes(self, shapes):
            h, w = shapes.get("sample", (0, 0, 0, 0))[2:]
            if max(h, w) > 8:
                raise ValueError(f"unet: latent {h}x{w} is outside the engine profile (max 8x8)")

        def run(self, feeds):
            self.ran = True

    p = Pipeline(Manifest.load(bundle), backend="tensorrt", device="cuda")
    for name in ("text_encoder", "vae_decoder"):
        p.engines[name] = Profiled()
    p.engines["unet"] = unet = Profiled()
    with pytest.raises(ValueError, match="outside the engine profile"):
        p(PROMPT, height=72, width=64)
    assert not unet.ran


@pytest.mark.parametrize("component, call, value, where", [
    ("unet", 2, np.nan, r"unet output 'out_sample' has 1 NaN and 0 Inf values .* at step 2 \(timestep"),
    ("text_encoder", 0, np.inf, r"text_encoder output 'last_hidden_state' has 0 NaN and 1 Inf .* at encode_prompt"),
    ("vae_decoder", 0, np.nan, r"vae_decoder output 'image' has 1 NaN .* at decode"),
])
def test_nonfinite_output_names_component_and_step(pipe, component, call, value, where):
    p = fresh(pipe)
    p.engines[component] = Recorder(pipe.engine(component), poison_call=call, value=value)
    with pytest.raises(NonFiniteOutputError, match=where):
        p(PROMPT, num_inference_steps=4, seed=0, scheduler="ddim")


# -- ldm generate ---------------------------------------------------------------------------

def test_generate_writes_pngs_with_parameters(bundle, pipe, tmp_path, capsys):
    rc = generate_main([str(bundle), "a red circle", "--steps", "2", "--seed", "5", "--num-images", "2",
                        "--guidance-scale", "3", "--negative-prompt", "blue", "--out", str(tmp_path / "img.png")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    paths = out.out.split()
    assert paths == [str(tmp_path / "img-0.png"), str(tmp_path / "img-1.png")]
    params = read_parameters(paths[1])
    assert params["prompt"] == "a red circle" and params["negative_prompt"] == "blue"
    assert (params["seed"], params["steps"], params["scheduler"], params["guidance_scale"]) == (5, 2, "pndm", 3.0)
    assert (params["height"], params["width"], params["index"]) == (64, 64, 1)
    assert params["bundle"] == Manifest.load(bundle).sha256
    # the recorded parameters reproduce the image
    again = pipe(params["prompt"], negative_prompt=params["negative_prompt"], num_inference_steps=params["steps"],
                 guidance_scale=params["guidance_scale"], scheduler=params["scheduler"], seed=params["seed"],
                 num_images_per_prompt=params["num_images"]).images[params["index"]]
    from PIL import Image

    with Image.open(paths[1]) as im:
        assert np.asarray(im).tobytes() == np.asarray(again).tobytes()


def test_generate_tcd_eta_is_recorded_and_reproduces(bundle, pipe, tmp_path, capsys):
    rc = generate_main([str(bundle), "a red circle", "--steps", "3", "--seed", "4", "--scheduler", "tcd",
                        "--eta", "0.3", "--out", str(tmp_path / "tcd.png")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    params = read_parameters(out.out.strip())
    assert (params["scheduler"], params["eta"]) == ("tcd", 0.3)
    again = pipe("a red circle", num_inference_steps=3, scheduler="tcd", eta=params["eta"], seed=4).images[0]
    from PIL import Image

    with Image.open(out.out.strip()) as im:
        assert np.asarray(im).tobytes() == np.asarray(again).tobytes()


def test_generate_without_seed_records_one(bundle, tmp_path, capsys):
    assert generate_main([str(bundle), "a dog", "--steps", "1", "--out", str(tmp_path / "a")]) == 0
    first = Path(capsys.readouterr().out.strip())
    seed = read_parameters(first)["seed"]
    assert isinstance(seed, int) and first.name == f"ldm-{seed}-0.png"
    assert generate_main([str(bundle), "a dog", "--steps", "1", "--seed", str(seed), "--out", str(tmp_path / "b")]) == 0
    second = Path(capsys.readouterr().out.strip())
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--height", "60"], "height must be a positive multiple of 8"),
    (["--scheduler", "heun"], "unknown scheduler 'heun'; expected one of ddim, pndm"),
    (["--steps", "x"], "argument --steps: invalid int value"),
    (["--steps", "0"], "num_inference_steps must be an int >= 1"),
    (["--scheduler", "euler", "--eta", "0.3"], "scheduler 'euler' takes no eta"),
    (["--scheduler", "tcd", "--eta", "2"], "eta must be a number in [0, 1], got 2.0"),
])
def test_generate_bad_input_exit_2(bundle, tmp_path, capsys, args, message):
    rc = generate_main([str(bundle), "a dog", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.png"))


def test_generate_missing_bundle_exit_2(tmp_path, capsys):
    assert generate_main([str(tmp_path / "nope"), "a dog"]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and len(err.strip().splitlines()) == 1


def test_progress_bar_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe_ = Tty(), io.StringIO()
    for bar in (ProgressBar(3, tty), ProgressBar(3, pipe_)):
        for i in range(3):
            bar(i)
    assert "3/3" in tty.getvalue() and tty.getvalue().count("\r") == 3
    assert pipe_.getvalue() == ""


def test_ldm_generate_cli_imports_no_torch(bundle, tmp_path):
    code = ("import sys\nfrom ldm_runtime.cli import main\n"
            f"rc = main(['generate', {str(bundle)!r}, 'a dog', '--steps', '1', '--out', {str(tmp_path)!r}])\n"
            "bad = [m for m in ('torch', 'transformers', 'diffusers', 'training', 'export') if m in sys.modules]\n"
            "assert rc == 0 and not bad, (rc, bad)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(list(tmp_path.glob("ldm-*-0.png"))) == 1
