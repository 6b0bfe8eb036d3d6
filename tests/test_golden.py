"""Golden fixtures: our models and the runtime against references that diffusers/transformers computed once.

``tests/golden/make_golden.py`` wrote the ``.npz`` files with the library versions recorded in
each (``versions``). Weights come from numpy (``numpy_weights``), not torch's generator, so this
file rebuilds the very same models by parameter name without diffusers or transformers, and a
new release of either cannot move the reference. The live comparisons are
``test_unet.py``, ``test_vae.py``, ``test_text_encoder.py`` and ``test_parity_diffusers.py``.

The shipped model has its own golden image: the ``make demo`` command's seed-0 output.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import CLIP_BPE, REPO  # noqa: E402
from export.bundle import export_bundle  # noqa: E402
from ldm_runtime import Pipeline  # noqa: E402
from training.models.text_encoder import CLIPTextEncoder, TextEncoderConfig  # noqa: E402
from training.models.unet import UNet, UNetConfig  # noqa: E402
from training.models.vae import AutoencoderKL, VAEConfig  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden"
MODEL_TOL = 1e-4  # max abs, fp32 torch on CPU (as the live parity tests)
PIPELINE_TOL = 2e-3  # max abs on the "np" output (CONTRACT.md); includes the float16 storage (<= 2.5e-4)
# the shipped model's 64x64 demo image (uint8): measured bit-identical over reruns, 1/2/default
# threads and the CPU-variant or portable graphs; the bounds leave room for other CPU kernels
DEMO_MAX_ABS, DEMO_MIN_PSNR = 4, 40.0
SCHEDULERS = ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
SHIPPED_CKPT = REPO / "checkpoints" / "default"
DEMO = dict(prompt="a large red circle in the center on a blue background", seed=0, guidance_scale=3.0,
            num_inference_steps=30)  # Makefile's demo: ldm generate's defaults otherwise


def numpy_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights by name, drawn in sorted-name order from ``default_rng(seed)``.

    Scaled to keep activations O(1): fan-in scaling for matrices and kernels, norm scales near 1,
    small biases, unit-variance token/position embeddings. Nothing is left at a default init, so
    a swapped bias or norm would show.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        r = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("_embedding.weight"):
            out[name] = r
        elif len(shape) > 1:
            out[name] = r / np.float32(np.sqrt(np.prod(shape[1:])))
        elif "norm" in name and name.endswith("weight"):
            out[name] = 1 + np.float32(0.1) * r
        else:
            out[name] = np.float32(0.1) * r
    return out


def fill_(model: torch.nn.Module, seed: int, names: dict[str, str] | None = None) -> list[str]:
    """Set every parameter of ``model`` from ``numpy_weights``; ``names`` maps its names to ours.

    Returns the sorted (our) parameter names, which the fixtures record.
    """
    params = dict(model.named_parameters())
    ours = {(names or {}).get(n, n): n for n in params}
    weights = numpy_weights({k: tuple(params[n].shape) for k, n in ours.items()}, seed)
    with torch.no_grad():
        for k, n in ours.items():
            params[n].copy_(torch.from_numpy(weights[k]))
    return sorted(ours)


def load(name: str) -> dict:
    with np.load(GOLDEN / f"{name}.npz") as f:
        return {k: f[k] for k in f.files}


def text(a: np.ndarray):
    """A JSON value stored as a 0-d string array."""
    return json.loads(str(a))


def build(fixture: dict, config_cls, model_cls, mapper: str) -> torch.nn.Module:
    model = model_cls(getattr(config_cls, mapper)(text(fixture["config"]))).eval()
    assert fill_(model, int(fixture["seed"])) == text(fixture["param_names"])
    return model


def unet_from(fixture: dict) -> UNet:
    return build(fixture, UNetConfig, UNet, "from_diffusers")


def vae_from(fixture: dict) -> AutoencoderKL:
    return build(fixture, VAEConfig, AutoencoderKL, "from_diffusers")


def text_encoder_from(fixture: dict) -> CLIPTextEncoder:
    return build(fixture, TextEncoderConfig, CLIPTextEncoder, "from_transformers")


def check(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> None:
    want = want.astype(np.float32)
    d = float(np.abs(got - want).max())
    print(f"{what}: max abs diff {d:.2e} (tolerance {tol:.0e}, reference std {want.std():.3f})")
    assert got.shape == want.shape
    assert want.std() > 0.05  # not a comparison between near-constant outputs
    assert d <= tol


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_unet_matches_golden():
    g = load("unet")
    with torch.no_grad():
        got = unet_from(g)(*(torch.from_numpy(g[k]) for k in ("sample", "timestep", "encoder_hidden_states")))
    check(got.numpy(), g["out"], MODEL_TOL, f"unet vs diffusers {text(g['versions'])['diffusers']}")


def test_vae_matches_golden():
    g = load("vae")
    vae = vae_from(g)
    with torch.no_grad():
        mean, logvar = vae.encode(torch.from_numpy(g["image"]))
        decoded = vae.decode(torch.from_numpy(g["latents"]))
    what = f"vae vs diffusers {text(g['versions'])['diffusers']}"
    check(mean.numpy(), g["mean"], MODEL_TOL, f"{what}: encoder mean")
    check(logvar.numpy(), g["logvar"], MODEL_TOL, f"{what}: encoder logvar")
    check(decoded.numpy(), g["decoded"], MODEL_TOL, f"{what}: decoder")


def test_text_encoder_matches_golden():
    g = load("text_encoder")
    with torch.no_grad():
        got = text_encoder_from(g)(torch.from_numpy(g["input_ids"]))
    check(got.numpy(), g["last_hidden_state"], MODEL_TOL,
          f"text encoder vs transformers {text(g['versions'])['transformers']}")


def write_diffusers_folder(root: Path) -> Path:
    """The tiny diffusers pipeline folder of the fixtures, from their configs and numpy weights."""
    from safetensors.torch import save_file

    for name, filename, build_from in (("unet", "diffusion_pytorch_model", unet_from),
                                       ("vae", "diffusion_pytorch_model", vae_from),
                                       ("text_encoder", "model", text_encoder_from)):
        fixture = load(name)
        model = build_from(fixture)
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(str(fixture["config"]))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(root / name / f"{filename}.safetensors"))
    (root / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(CLIP_BPE / name, root / "tokenizer" / name)
    for path, content in text(load("pipeline")["folder"]).items():  # model_index, scheduler, tokenizer configs
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(content))
    return root


@pytest.fixture(scope="module")
def golden_pipe(tmp_path_factory) -> Pipeline:
    tmp = tmp_path_factory.mktemp("golden")
    folder = write_diffusers_folder(tmp / "tiny-sd")
    # portable graphs only (half the export time): test_pipeline.py and test_bench.py hold the CPU
    # variants to them, and test_parity_diffusers.py runs the default bundle against diffusers
    bundle = export_bundle(folder, tmp / "bundle", precision="fp32", components=("text_encoder", "unet", "vae_decoder"),
                           cpu_variants=False)
    return Pipeline.load(bundle, threads=1)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_pipeline_matches_golden(golden_pipe, scheduler):
    g = load("pipeline")
    kw = text(g["call"])
    if scheduler == "euler_a":
        # stochastic: diffusers drew the same numpy stream the runtime draws from `seed`, z_T first
        z = np.random.default_rng(kw["seed"]).standard_normal(g["latents"].shape, dtype=np.float32)
        assert np.array_equal(z, g["euler_a_latents"])
        got = golden_pipe(**kw, scheduler=scheduler, output_type="np").images
    else:
        kw.pop("seed")
        got = golden_pipe(**kw, scheduler=scheduler, latents=g["latents"], output_type="np").images
    assert got.dtype == np.float32
    check(got, g[f"image_{scheduler}"], PIPELINE_TOL,
          f"pipeline {scheduler} vs diffusers {text(g['versions'])['diffusers']}")


@pytest.fixture(scope="session")
def shipped_bundle(tmp_path_factory) -> Path:
    """The shipped checkpoint exported as ``make demo`` does (fp32), once per session."""
    return export_bundle(SHIPPED_CKPT, tmp_path_factory.mktemp("shipped") / "bundle", precision="fp32")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.slow  # exporting the shipped checkpoint: ~20 s of CPU, about a minute on a busy machine
def test_shipped_model_demo_image(shipped_bundle):
    from PIL import Image

    got = np.asarray(Pipeline.load(shipped_bundle, threads=1)(**DEMO).images[0])
    want = np.asarray(Image.open(GOLDEN / "demo.png").convert("RGB"))
    d, p = int(np.abs(got.astype(np.int16) - want).max()), psnr(got, want)
    print(f"shipped model, demo prompt, seed 0: max abs diff {d} (<= {DEMO_MAX_ABS}), PSNR {p:.1f} dB "
          f"(>= {DEMO_MIN_PSNR})")
    assert got.shape == want.shape == (64, 64, 3)
    assert want.std() > 10  # the golden image is a picture, not a flat colour
    assert d <= DEMO_MAX_ABS and p >= DEMO_MIN_PSNR
