"""LoRA at load time: what a LoRA costs to load and to run, against the plain bundle and against diffusers.

    python bench/lora.py engines/bench-mid --rank 16 --steps 10 --repeats 3 --threads 2

``MODEL`` is a folder with ``bundle/`` and ``diffusers/`` (what bench/make_models.py writes). The
script writes a peft-format LoRA of rank ``--rank`` on every attention projection of the U-Net
(to_q, to_k, to_v, to_out.0; alpha = 2 x rank, saved with its metadata) into ``--out``, then, in
this process, alternating after one untimed round:
- load: ``Pipeline.load`` + ``open_engines`` without and with the LoRA, and diffusers'
  ``from_pretrained`` + ``load_lora_weights`` + ``fuse_lora`` (medians, seconds);
- generation: one image of ``--steps`` steps at the bundle's size without and with the LoRA (same
  seed), and the max abs difference of the LoRA image to diffusers' fused pipeline on the same latents.
Prints one JSON object and writes it to ``--out/lora.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.proc import machine_info  # noqa: E402
from bench.runtime import PROMPT  # noqa: E402

log = logging.getLogger("bench.lora")
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(diffusers_dir: Path, out: Path, rank: int, seed: int = 0) -> Path:
    """A rank-``rank`` peft LoRA on every U-Net attention projection (alpha 2 x rank, B != 0), as diffusers saves it."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(diffusers_dir / "unet"))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ATTENTION, init_lora_weights=False)
    unet.add_adapter(config)
    layers = {k: v * 0.1 for k, v in get_peft_model_state_dict(unet).items()}  # a moderate change of the image
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=layers, weight_name="lora.safetensors",
                                              unet_lora_adapter_metadata=config.to_dict())
    return out / "lora.safetensors"


def ours_load(bundle: Path, loras: list, threads: int) -> Any:
    from ldm_runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, threads=threads, loras=loras)
    pipe.open_engines()
    return pipe


def diffusers_load(diffusers_dir: Path, lora: Path | None) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(diffusers_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.fuse_lora(lora_scale=1.0)
    return pipe


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def alternate(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Each of ``runs`` once untimed, then ``repeats`` rounds in rotating order; seconds per run."""
    for fn in runs.values():
        fn()
    names, times = list(runs), {k: [] for k in runs}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(runs[name])[0])
    return times


def summary(times: dict[str, list[float]]) -> dict[str, Any]:
    return {k: {"median_s": round(statistics.median(v), 4), "runs_s": [round(x, 4) for x in v]} for k, v in times.items()}


def run(model: Path, out: Path, rank: int, steps: int, repeats: int, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    bundle, diffusers_dir = model / "bundle", model / "diffusers"
    lora = make_lora(diffusers_dir, out, rank)
    spec = [(str(lora), 1.0)]
    result: dict[str, Any] = {"model": str(model), "lora": {"file": str(lora), "rank": rank, "targets": ATTENTION},
                              "steps": steps, "repeats": repeats, "threads": threads, "machine": machine_info()}
    log.info("load times")
    result["load"] = summary(alternate({
        "ours_plain": lambda: ours_load(bundle, [], threads),
        "ours_with_lora": lambda: ours_load(bundle, spec, threads),
        "diffusers_from_pretrained_load_fuse": lambda: diffusers_load(diffusers_dir, lora),
    }, repeats))
    plain, fused = ours_load(bundle, [], threads), ours_load(bundle, spec, threads)
    result["fused_weights"] = sum(len(fused.loras.for_graph(c, g)) for c, g in _graphs(fused))
    h, w = plain.manifest.default_size
    z = np.random.default_rng(0).standard_normal((1, plain.latent_channels, h // plain.vae_scale_factor,
                                                  w // plain.vae_scale_factor), dtype=np.float32)

    def generate(pipe: Any) -> Callable[[], Any]:
        return lambda: pipe(PROMPT, num_inference_steps=steps, latents=z, output_type="np").images

    log.info("generation times, %d steps at %dx%d", steps, h, w)
    result["generate"] = summary(alternate({"ours_plain": generate(plain), "ours_with_lora": generate(fused)}, repeats))
    ref = diffusers_load(diffusers_dir, lora)
    with torch.no_grad():
        ref_img = ref(PROMPT, num_inference_steps=steps, latents=torch.from_numpy(z), output_type="np").images
    ours_img, base_img = generate(fused)(), generate(plain)()
    result["max_abs_vs_diffusers_fused"] = float(np.abs(ours_img - ref_img).max())
    result["max_abs_lora_vs_plain"] = float(np.abs(ours_img - base_img).max())
    result["machine"]["loadavg_1m_end"] = machine_info().get("loadavg_1m")
    return result


def _graphs(pipe: Any) -> list[tuple[str, str]]:
    from ldm_runtime.lora_apply import lora_graphs

    graphs = lora_graphs(pipe.manifest, pipe.required_components, pipe.backend, pipe.device,
                         bool(pipe.options.cpu_variant))
    return [(c, graphs[c]) for c in pipe.loras.components()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/lora.py", description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="folder with bundle/ and diffusers/ (bench/make_models.py)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench-out/lora"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    result = run(a.model, a.out, a.rank, a.steps, a.repeats, a.threads)
    text = json.dumps(result, indent=2)
    (a.out / "lora.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
