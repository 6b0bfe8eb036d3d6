"""The CPU peer, side by side in one run: our runtime on onnxruntime fp32 and on OpenVINO (f32, and bf16
where the CPU has it), the int8 bundle (``ldm quantize``'s ``bundle-int8/`` beside ``bundle/``, when it
exists) on onnxruntime and on OpenVINO, diffusers' StableDiffusionPipeline, and optimum-intel's
OVStableDiffusionPipeline when given an OpenVINO folder it exported (``--optimum``, run by a Python that
has optimum-intel).

Every contestant gets the same prompt, initial latents, DDIM schedule, steps and guidance
(``output_type="np"``); after a 2-step warm-up each, the repeats go round the contestants in turn,
the starting one rotating per repeat. Reported per step count: median seconds per image, diffusers /
contestant (> 1: faster than diffusers), and the image's PSNR against our onnxruntime fp32 image.

    python bench/cpu_peer.py engines/bench-mid --steps 10,20 --repeats 3 --threads 2
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

log = logging.getLogger("cpu_peer")
SCHEDULER = "ddim"
Run = Callable[[np.ndarray, int], np.ndarray]  # (latents, steps) -> images (B, H, W, 3) in [0, 1]


def ours(bundle: str, backend: str, guidance_scale: float, **options: Any) -> Run:
    from ldm_runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, backend=backend, **options)
    pipe.open_engines()
    return lambda latents, steps: pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale,
                                       scheduler=SCHEDULER, latents=latents, seed=0, output_type="np").images


def _ddim_for(pipe: Any) -> Any:
    """diffusers' DDIMScheduler configured as our ``ddim`` row says, on the folder's scheduler config."""
    import diffusers

    from ldm_runtime.schedulers import diffusers_config_for, scheduler_class

    config = diffusers_config_for(SCHEDULER, dict(pipe.scheduler.config))
    return getattr(diffusers, scheduler_class(SCHEDULER).diffusers_class).from_config(config)


def diffusers_pipeline(folder: str, threads: int, guidance_scale: float) -> Run:
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = _ddim_for(pipe)
    pipe.set_progress_bar_config(disable=True)

    def run(latents: np.ndarray, steps: int) -> np.ndarray:
        with torch.inference_mode():
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale,
                        latents=torch.from_numpy(latents.copy()), output_type="np").images
    return run


def optimum_pipeline(folder: str, threads: int, guidance_scale: float) -> Run:
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    pipe = OVStableDiffusionPipeline.from_pretrained(folder, compile=False,
                                                     ov_config={"INFERENCE_NUM_THREADS": str(threads),
                                                                "INFERENCE_PRECISION_HINT": "f32"})
    pipe.scheduler = _ddim_for(pipe)
    pipe.compile()

    def run(latents: np.ndarray, steps: int) -> np.ndarray:
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale,
                    latents=torch.from_numpy(latents.copy()), output_type="np").images
    return run


def contestants(model: Path, threads: int, guidance_scale: float, optimum: str | None) -> tuple[dict[str, Run], list[str]]:
    """The runs to compare, and a line for each contestant that could not run here (and why)."""
    bundle, int8 = str(model / "bundle"), model / "bundle-int8"
    runs: dict[str, Run] = {"ours onnxruntime fp32": ours(bundle, "onnxruntime", guidance_scale, threads=threads)}
    skipped = []
    has_int8 = (int8 / "manifest.json").is_file()
    if has_int8:
        runs["ours onnxruntime int8"] = ours(str(int8), "onnxruntime", guidance_scale, threads=threads)
    else:
        skipped.append(f"int8: no {int8} (ldm quantize {bundle} --out {int8})")
    try:
        from ldm_runtime.backends.openvino import cpu_capabilities, cpu_name

        runs["ours openvino f32"] = ours(bundle, "openvino", guidance_scale, threads=threads, precision="f32")
        if "BF16" in cpu_capabilities():
            runs["ours openvino bf16"] = ours(bundle, "openvino", guidance_scale, threads=threads, precision="bf16")
            if has_int8:  # OpenVINO runs the QDQ nodes as int8 kernels; what stays in float runs in bf16
                runs["ours openvino int8+bf16"] = ours(str(int8), "openvino", guidance_scale, threads=threads,
                                                       precision="bf16")
        else:
            skipped.append(f"ours openvino bf16: this CPU ({cpu_name()}) reports no BF16 in "
                           f"OPTIMIZATION_CAPABILITIES {cpu_capabilities()}")
            if has_int8:
                runs["ours openvino int8+f32"] = ours(str(int8), "openvino", guidance_scale, threads=threads,
                                                      precision="f32")
    except RuntimeError as e:  # openvino not installed
        skipped.append(f"ours openvino: {e}")
    runs["diffusers fp32"] = diffusers_pipeline(str(model / "diffusers"), threads, guidance_scale)
    if optimum:
        try:
            runs["optimum-intel f32"] = optimum_pipeline(optimum, threads, guidance_scale)
        except ImportError as e:
            skipped.append(f"optimum-intel: {e}")
    else:
        skipped.append("optimum-intel: no --optimum folder given")
    return runs, skipped


def warm_up(runs: dict[str, Run], latents: np.ndarray) -> None:
    """A 2-step image from each: first-run costs (allocation, OpenVINO's first inference) stay out of the timing."""
    for run in runs.values():
        run(latents, 2)


def race(runs: dict[str, Run], latents: np.ndarray, steps: int, repeats: int) -> dict[str, dict[str, Any]]:
    """``repeats`` rounds over ``runs`` with a rotating first runner; each keeps its last image."""
    names = list(runs)
    images: dict[str, np.ndarray] = {}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            images[n] = runs[n](latents, steps)
            seconds[n].append(time.perf_counter() - t0)
        log.info("%d steps, repeat %d: %s", steps, r, ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names))
    from export.parity import psnr_db

    ref, base = images[names[0]], statistics.median(seconds["diffusers fp32"])
    return {n: {"seconds": statistics.median(seconds[n]), "runs_s": seconds[n],
                "vs_diffusers": base / statistics.median(seconds[n]),
                "psnr_db_vs_ours_fp32": psnr_db(images[n], ref) if n != names[0] else None} for n in names}


def to_markdown(r: dict[str, Any]) -> str:
    lines = []
    for steps, table in r["results"].items():
        lines += [f"**{steps} DDIM steps**, {r['size']}, CFG {r['guidance_scale']}, {r['threads']} threads", "",
                  "| contestant | s/image (median) | vs diffusers | PSNR vs ours fp32 |", "|---|---|---|---|"]
        for name, row in table.items():
            psnr = "ref" if row["psnr_db_vs_ours_fp32"] is None else f"{row['psnr_db_vs_ours_fp32']:.1f} dB"
            lines.append(f"| {name} | {row['seconds']:.2f} | **{row['vs_diffusers']:.2f}x** | {psnr} |")
        lines.append("")
    lines += [f"- not run: {s}" for s in r["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Our CPU backends against diffusers (and optimum-intel), alternating.")
    p.add_argument("model", help="folder holding bundle/ and diffusers/ (bench/make_models.py)")
    p.add_argument("--steps", default="10,20", help="comma-separated step counts (default 10,20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--optimum", default=None, help="an OVStableDiffusionPipeline folder exported from diffusers/")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    model = Path(args.model)
    runs, skipped = contestants(model, args.threads, args.guidance_scale, args.optimum)
    man = json.loads((model / "bundle" / "manifest.json").read_text())
    h, w = man["default_size"]["height"], man["default_size"]["width"]
    f = man["latent"]["vae_scale_factor"]
    latents = np.random.default_rng(0).standard_normal((1, man["latent"]["channels"], h // f, w // f),
                                                        dtype=np.float32)
    r = {"model": str(model), "size": f"{h}x{w}", "guidance_scale": args.guidance_scale, "threads": args.threads,
         "scheduler": SCHEDULER, "repeats": args.repeats, "skipped": skipped, "machine": machine_info(), "results": {}}
    warm_up(runs, latents)
    for steps in (int(s) for s in args.steps.split(",")):
        r["results"][steps] = race(runs, latents, steps, args.repeats)
        r["machine"]["loadavg_1m_end"] = machine_info().get("loadavg_1m")
        if args.json:  # after each step count: a long run leaves what it measured
            Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
