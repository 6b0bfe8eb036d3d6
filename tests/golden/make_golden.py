"""Write the golden fixtures of tests/test_golden.py from diffusers and transformers (run once, then commit).

    .venv/bin/python tests/golden/make_golden.py            # the four .npz files of the parity families
    .venv/bin/python tests/golden/make_golden.py --demo     # demo.png from the shipped checkpoint

The tiny models are the ones of ``tests/conftest.py`` (``build_tiny_diffusers``), their weights
replaced by ``numpy_weights``; each file records the library versions that produced it. Rerun
only on purpose (a reviewed change of reference), never to make a failing test pass.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

import diffusers  # noqa: E402
import transformers  # noqa: E402
from conftest import build_tiny_diffusers  # noqa: E402
from test_golden import DEMO, GOLDEN, SCHEDULERS, SHIPPED_CKPT, fill_  # noqa: E402
from test_parity_diffusers import DIFFUSERS_SCHEDULERS, PROMPT, NumpyRandn  # noqa: E402

SEEDS = {"unet": 101, "vae": 102, "text_encoder": 103}  # weight seeds
CALL = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=7.5, seed=9)
VERSIONS = json.dumps({"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                       "torch": torch.__version__, "numpy": np.__version__})


def save(name: str, **arrays) -> None:
    path = GOLDEN / f"{name}.npz"
    np.savez_compressed(path, versions=np.array(VERSIONS), **arrays)
    print(f"{path.relative_to(TESTS.parent)}: {path.stat().st_size:,} bytes")


def model_arrays(name: str, folder: Path, model: torch.nn.Module, names: dict[str, str] | None = None) -> dict:
    param_names = fill_(model, SEEDS[name], names)
    return dict(seed=np.array(SEEDS[name]), param_names=np.array(json.dumps(param_names)),
                config=np.array((folder / name / "config.json").read_text()))


def unet(folder: Path, model) -> None:
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((2, 4, 9, 13), dtype=np.float32)  # odd size: the up path follows the skips
    timestep = np.array([17.25, 503.5], dtype=np.float32)
    context = rng.standard_normal((2, 11, 32), dtype=np.float32)
    arrays = model_arrays("unet", folder, model)
    out = model(torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(context)).sample
    save("unet", **arrays, sample=sample, timestep=timestep, encoder_hidden_states=context, out=out.numpy())


def vae(folder: Path, model) -> None:
    rng = np.random.default_rng(2)
    image = rng.uniform(-1, 1, (1, 3, 24, 40)).astype(np.float32)
    latents = rng.standard_normal((1, 4, 3, 5), dtype=np.float32)
    arrays = model_arrays("vae", folder, model)
    post = model.encode(torch.from_numpy(image)).latent_dist
    decoded = model.decode(torch.from_numpy(latents)).sample
    save("vae", **arrays, image=image, latents=latents, mean=post.mean.numpy(), logvar=post.logvar.numpy(),
         decoded=decoded.numpy())


def prompt_ids(config: transformers.CLIPTextConfig) -> np.ndarray:
    """Two rows laid out like tokenized prompts: bos, words, eos, then eos (SD 1.x) or 0 (SD 2.x) padding."""
    ids = np.random.default_rng(3).integers(0, config.vocab_size - 2, (2, config.max_position_embeddings))
    ids[:, 0] = config.bos_token_id
    for row, (n, pad) in enumerate([(6, config.eos_token_id), (30, 0)]):
        ids[row, n:] = pad
        ids[row, n] = config.eos_token_id
    return ids.astype(np.int64)


def text_encoder(folder: Path, model) -> None:
    names = {n: "text_model." + n for n, _ in model.named_parameters() if not n.startswith("text_model.")}
    arrays = model_arrays("text_encoder", folder, model, names)
    ids = prompt_ids(model.config)
    out = model(torch.from_numpy(ids)).last_hidden_state
    save("text_encoder", **arrays, input_ids=ids, last_hidden_state=out.numpy())


def run(sd, config: dict, scheduler: str, latents: np.ndarray) -> np.ndarray:
    """diffusers' image for ``scheduler``, built from ``config`` (the folder's own, PNDM's) as the runtime does."""
    cls, extra = DIFFUSERS_SCHEDULERS[scheduler]
    sd.scheduler = getattr(diffusers, cls).from_config(config, **extra)
    kw = {k: v for k, v in CALL.items() if k != "seed"}
    return sd(**kw, latents=torch.from_numpy(latents), output_type="np").images


def euler_a(sd, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """euler_a with the runtime's noise: z_T, then one draw per step, from ``default_rng(seed)``."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea

    rng = np.random.default_rng(CALL["seed"])
    z = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    original, ea.randn_tensor = ea.randn_tensor, NumpyRandn(rng)
    try:
        return z, run(sd, config, "euler_a", z)
    finally:
        ea.randn_tensor = original


def pipeline(folder: Path, sd) -> None:
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    config = dict(sd.scheduler.config)
    images = {s: run(sd, config, s, latents) for s in SCHEDULERS if s != "euler_a"}
    z, images["euler_a"] = euler_a(sd, config)
    files = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json",
             "tokenizer/special_tokens_map.json")
    listing = {f: json.loads((folder / f).read_text()) for f in files if (folder / f).is_file()}
    save("pipeline", folder=np.array(json.dumps(listing)), call=np.array(json.dumps(CALL)), latents=latents,
         euler_a_latents=z, **{f"image_{s}": image.astype(np.float16) for s, image in images.items()})


def families() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_diffusers(Path(tmp) / "tiny-sd")
        sd = diffusers.StableDiffusionPipeline.from_pretrained(str(folder))
        sd.set_progress_bar_config(disable=True)
        unet(folder, sd.unet)
        vae(folder, sd.vae)
        text_encoder(folder, sd.text_encoder)
        pipeline(folder, sd)


def demo() -> None:
    """The shipped checkpoint's demo image, through ldm export (fp32) and the runtime on onnxruntime CPU."""
    from export.bundle import export_bundle
    from ldm_runtime import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipe = Pipeline.load(export_bundle(SHIPPED_CKPT, Path(tmp) / "bundle", precision="fp32"))
        image = pipe(**DEMO).images[0]
    image.save(GOLDEN / "demo.png")
    print(f"tests/golden/demo.png: {(GOLDEN / 'demo.png').stat().st_size:,} bytes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", action="store_true", help="write demo.png from the shipped checkpoint instead")
    torch.set_num_threads(1)
    with torch.no_grad():
        demo() if p.parse_args().demo else families()


if __name__ == "__main__":
    main()
