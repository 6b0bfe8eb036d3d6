"""Model evaluation on the built-in shapes data: generate from captions, score against their ground truth.

    python -m training.evaluate CHECKPOINT --n 64 --steps 20 --out runs/default/eval --strengths 0.2,0.4
    python -m training.evaluate CHECKPOINT --n 64 --guidance 3 --text-gain 100,500,800,900,980
    python -m training.evaluate BUNDLE --n 64 --guidance 3           # an exported bundle, through ldm_runtime
    python -m training.evaluate BUNDLE --backend openvino --engine-option precision=bf16

Images come from `training.sample` (the checkpoint's own scheduler), or for a bundle folder (one with a
manifest.json: fp32, fp16 or int8, any backend) from `ldm_runtime.Pipeline` with the same seeds, and are
scored by `training.scorer.evaluate_images`. "val" prompts use (colour, kind) combinations seen in training
(new samples); "heldout" prompts each name at least one combination never seen in training.
The training loop calls `evaluate_prompts` on its fixed prompts.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from training import common
from training.checkpoint import CheckpointError, LatentDiffusion, load_models
from training.data import ShapesDataset
from training.sample import sample, sample_img2img, tokenizer_for
from training.scorer import evaluate_images

logger = logging.getLogger(__name__)

SCORE_KEYS = ("colour", "shape", "position", "size", "count", "background", "all")  # what the evaluations report

# (prompts, steps, guidance_scale, seed) -> float images (B, H, W, 3) in [0, 1]
Generate = Callable[[list[str], int, float, int], np.ndarray]


def _rounded(scores: dict) -> dict:
    return {k: round(v, 3) for k, v in scores.items()}


@torch.no_grad()
def evaluate_prompts(ld: LatentDiffusion, prompts: list[str], attrs: list | None, steps: int, guidance_scale: float,
                     seed: int, grid: Path) -> dict:
    """Sample the fixed prompts (fixed seed), save the grid, and score it when the ground truth is known."""
    images = sample(ld, prompts, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed)
    common.save_grid(images, grid, ncols=max(1, (len(prompts) + 1) // 2))
    (grid.with_suffix(".txt")).write_text("\n".join(prompts) + "\n")
    if not attrs:
        return {}
    r = evaluate_images(list(images), attrs)
    return {k: r[k] for k in ("colour", "shape", "position", "count", "background")}


def evaluate_checkpoint(checkpoint: str | Path, n: int = 64, guidance_scales: tuple[float, ...] = (1.0, 3.0, 7.5),
                        steps: int = 20, seed: int = 0, batch: int = 16, out_dir: str | Path | None = None,
                        denoise_strengths: tuple[float, ...] = (), text_gain_timesteps: tuple[int, ...] = ()) -> dict:
    """Prompt adherence of a checkpoint on the built-in data: {split: {guidance: scores}}.

    Also "vae_reconstruction" (the ceiling for generated images) and, for each of `denoise_strengths`,
    `denoise_scores` at every guidance scale: results["denoise"][strength][guidance]; with
    `text_gain_timesteps`, `text_gain` at them: results["text_gain"]. With `out_dir`,
    the first 16 images of each setting are saved as a grid PNG.
    """
    ld = load_models(checkpoint)
    size = ld.default_size[0]
    results: dict = {"vae_reconstruction": vae_reconstruction_scores(ld.vae, size, n, seed)}
    if text_gain_timesteps:
        results["text_gain"] = text_gain(ld, text_gain_timesteps, n, seed)
    logger.info("VAE reconstructions of %d validation images (the ceiling for generated ones): %s", n,
                _rounded(results["vae_reconstruction"]))
    for split in ("val", "heldout"):
        results[split] = {str(gs): text_to_image_scores(ld, split, gs, n, steps, seed, batch, out_dir)
                          for gs in guidance_scales}
    for strength in denoise_strengths:
        per = results.setdefault("denoise", {})[f"{strength:g}"] = {}
        for gs in guidance_scales:
            per[str(gs)] = denoise_scores(ld, strength, n, gs, steps, seed, batch)
            logger.info("denoising real latents from strength %g, guidance %g: %s", strength, gs, _rounded(per[str(gs)]))
    return results


@torch.no_grad()
def text_to_image_scores(ld: LatentDiffusion, split: str, guidance_scale: float, n: int = 64, steps: int = 20,
                         seed: int = 0, batch: int = 16, out_dir: str | Path | None = None) -> dict:
    """The scores of images generated from the captions of the first `n` samples of `split`."""
    def generate(prompts: list[str], steps: int, guidance_scale: float, seed: int) -> np.ndarray:
        return sample(ld, prompts, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed)

    return generated_scores(generate, ld.default_size[0], split, guidance_scale, n, steps, seed, batch, out_dir)


def bundle_generator(bundle: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                     **options: Any) -> tuple[Generate, int]:
    """A `Generate` over an exported bundle (``ldm_runtime.Pipeline``, the bundle's own scheduler), and its image size.
    Same seeds, same draws as `training.sample`: an fp32 bundle gives the torch models' images."""
    from ldm_runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, backend=backend, device=device, **options)

    def generate(prompts: list[str], steps: int, guidance_scale: float, seed: int) -> np.ndarray:
        return np.asarray(pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed,
                               output_type="np").images, np.float32)

    return generate, int(pipe.manifest.default_size[0])


def generated_scores(generate: Generate, size: int, split: str, guidance_scale: float, n: int = 64, steps: int = 20,
                     seed: int = 0, batch: int = 16, out_dir: str | Path | None = None) -> dict:
    """The scores of the images `generate` makes from the captions of the first `n` samples of `split`
    (batches of `batch` prompts, batch a with seed `seed + a`)."""
    ds = ShapesDataset(split, size=size, length=n, seed=seed)
    pairs = [ds.attrs(i) for i in range(n)]
    images = np.concatenate([generate([c for _, c in pairs[a:a + batch]], steps, guidance_scale, seed + a)
                             for a in range(0, n, batch)])
    r = evaluate_images(list(images), [a for a, _ in pairs])
    scores = {k: r[k] for k in SCORE_KEYS}
    logger.info("%s guidance %g: %s", split, guidance_scale, _rounded(scores))
    if out_dir is not None:
        common.save_grid(images[:16], Path(out_dir) / f"eval_{split}_g{guidance_scale:g}.png", ncols=8)
    return scores


@torch.no_grad()
def denoise_scores(ld: LatentDiffusion, strength: float, n: int = 64, guidance_scale: float = 3.0, steps: int = 20,
                   seed: int = 0, batch: int = 16) -> dict:
    """The scorer on real validation images encoded, noised to `strength` of the schedule and denoised
    with their own captions (img2img through `training.sample`). This separates finishing a shape the
    latents already hold (low strength) from creating one (text to image): a U-Net that scores well
    below `vae_reconstruction_scores` here loses shapes in the last, low-noise steps."""
    ds = ShapesDataset("val", size=ld.default_size[0], length=n, seed=seed)
    items = [ds.sample(i) for i in range(n)]
    images = np.concatenate([
        sample_img2img(ld, [c for _, c, _ in items[a:a + batch]], np.stack([im for im, _, _ in items[a:a + batch]]),
                       strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed + a)
        for a in range(0, n, batch)])
    r = evaluate_images(list(images), [a for _, _, a in items])
    return {k: r[k] for k in SCORE_KEYS}


def _alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """alpha_bar_t of the checkpoint's training schedule, as its DDIM scheduler reads the config."""
    from ldm_runtime.schedulers import make_scheduler

    return torch.from_numpy(make_scheduler("ddim", scheduler_config).alphas_cumprod).float()


@torch.no_grad()
def text_gain(ld: LatentDiffusion, timesteps: tuple[int, ...] = (100, 300, 500, 700, 800, 900, 980), n: int = 64,
              seed: int = 0) -> dict:
    """How much the U-Net reads its caption at each noise level: the training loss (the scheduler's
    prediction type, mean squared error) on `n` real validation latents noised to timestep t, with the true
    captions ("cond"), with each image given another image's caption ("wrong") and with the empty prompt
    ("empty"); "gain" is empty - cond. A text-to-image model needs a large gain at the high timesteps, where
    pure noise holds nothing of the layout; a gain near 0 there means the U-Net is an unconditional denoiser
    and generated objects cannot follow the prompt, whatever it does from real latents (`denoise_scores`).
    The same noise is used for the three captions. {str(t): {"cond", "wrong", "empty", "gain"}}."""
    ds = ShapesDataset("val", size=ld.default_size[0], length=n, seed=seed)
    x = torch.stack([torch.as_tensor(np.asarray(ds[i][0])) for i in range(n)])
    captions = [ds[i][1] for i in range(n)]
    mean = torch.cat([ld.vae.encode(x[a:a + 32])[0] for a in range(0, n, 32)])
    z0 = (mean - (ld.vae.config.shift_factor or 0.0)) * ld.vae.config.scaling_factor
    tok = tokenizer_for(ld)
    cond = ld.text_encoder(torch.from_numpy(tok(captions)))
    contexts = {"cond": cond, "wrong": cond.roll(1, dims=0), "empty": ld.text_encoder(torch.from_numpy(tok([""] * n)))}
    ac = _alphas_cumprod(ld.scheduler_config)
    v_pred = ld.scheduler_config.get("prediction_type", "epsilon") == "v_prediction"
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in timesteps:
        if not 0 <= t < len(ac):
            raise ValueError(f"text_gain: timestep {t} is outside the schedule's [0, {len(ac) - 1}]")
        ab = ac[t]
        noise = torch.randn(z0.shape, generator=g)
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        target = ab.sqrt() * noise - (1 - ab).sqrt() * z0 if v_pred else noise
        tt = torch.full((n,), float(t))
        r = {k: float(((ld.unet(z_t, tt, c) - target) ** 2).mean()) for k, c in contexts.items()}
        r["gain"] = r["empty"] - r["cond"]
        out[str(t)] = r
        logger.info("text gain at t=%d: %s", t, {k: round(v, 4) for k, v in r.items()})
    return out


@torch.no_grad()
def vae_reconstruction_scores(vae, size: int, n: int = 64, seed: int = 0, per_image: bool = False) -> dict:
    """The scorer on the VAE's reconstructions (posterior mean) of real validation images: what the
    autoencoder keeps of colour, shape, ... is an upper bound for what any generated image can score.
    ``per_image``: `evaluate_images`' whole result (per-object booleans too) and the images' ``attrs``."""
    ds = ShapesDataset("val", size=size, length=n, seed=seed)
    attrs = [ds.attrs(i)[0] for i in range(n)]
    x = torch.stack([torch.as_tensor(np.asarray(ds[i][0])) for i in range(n)])
    r = torch.cat([vae.decode(vae.encode(x[a:a + 32])[0]) for a in range(0, n, 32)])
    images = ((r.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    scores = evaluate_images(list(images), attrs)
    return {**scores, "attrs": attrs} if per_image else {k: scores[k] for k in SCORE_KEYS}


def evaluate_bundle(bundle: str | Path, n: int = 64, guidance_scales: tuple[float, ...] = (1.0, 3.0, 7.5),
                    steps: int = 20, seed: int = 0, batch: int = 16, out_dir: str | Path | None = None,
                    backend: str = "onnxruntime", device: str = "cpu", **options: Any) -> dict:
    """Prompt adherence of an exported bundle as it deploys: {split: {guidance: scores}}, as `evaluate_checkpoint`
    (no VAE ceiling or denoise diagnostic: those need the torch models). ``options``: engine options."""
    generate, size = bundle_generator(bundle, backend, device, **options)
    results: dict = {"bundle": str(bundle), "backend": backend, "options": {k: str(v) for k, v in options.items()}}
    for split in ("val", "heldout"):
        results[split] = {str(gs): generated_scores(generate, size, split, gs, n, steps, seed, batch, out_dir)
                          for gs in guidance_scales}
    return results


def _floats(text: str) -> tuple[float, ...]:
    """"0.2, 0.4" or "0.2,0.4" -> (0.2, 0.4); "" -> ()."""
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    """"100, 900" -> (100, 900); "" -> ()."""
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    """`python -m training.evaluate CHECKPOINT [...]`: print the results as JSON (and write OUT/eval.json)."""
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder (or a diffusers folder) trained on the built-in data, "
                   "or a bundle exported from one (a folder with manifest.json)")
    p.add_argument("--n", type=int, default=64, help="prompts per split")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=_floats, default=(1.0, 3.0, 7.5), help="guidance scales, comma-separated")
    p.add_argument("--strengths", type=_floats, default=(), help="img2img strengths for denoise_scores (none: skip)")
    p.add_argument("--text-gain", type=_ints, default=(), metavar="T,...",
                   help="timesteps at which to measure the loss with true, wrong and empty captions (text_gain)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="folder for eval.json and the sample grids")
    p.add_argument("--backend", default="onnxruntime", help="for a bundle: the ldm_runtime backend")
    p.add_argument("--device", default="cpu", help="for a bundle: the device")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="for a bundle: an engine option (threads=2, precision=bf16, ...), repeatable")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    is_bundle = (Path(args.checkpoint) / "manifest.json").is_file()
    if not is_bundle and (args.engine_option or args.backend != "onnxruntime" or args.device != "cpu"):
        p.error(f"--backend, --device and --engine-option are for bundles; {args.checkpoint} has no manifest.json")
    if is_bundle and (args.strengths or args.text_gain):
        p.error("--strengths and --text-gain need the torch models (a checkpoint folder), not a bundle")
    try:
        if is_bundle:
            from ldm_runtime.cliargs import UsageError, parse_engine_options
            from ldm_runtime.manifest import BundleError

            try:
                r = evaluate_bundle(args.checkpoint, n=args.n, guidance_scales=args.guidance, steps=args.steps,
                                    seed=args.seed, batch=args.batch, out_dir=args.out, backend=args.backend,
                                    device=args.device, **parse_engine_options(args.engine_option))
            except (BundleError, UsageError, ValueError) as e:
                print(f"training.evaluate: {e}", file=sys.stderr)
                return 2
        else:
            r = evaluate_checkpoint(args.checkpoint, n=args.n, guidance_scales=args.guidance, steps=args.steps,
                                    seed=args.seed, batch=args.batch, out_dir=args.out,
                                    denoise_strengths=args.strengths, text_gain_timesteps=args.text_gain)
    except CheckpointError as e:
        print(f"training.evaluate: {e}", file=sys.stderr)
        return 2
    text = json.dumps(r, indent=2)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eval.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
