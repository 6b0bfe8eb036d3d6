"""The peer, side by side: our runtime against diffusers' pipeline (StableDiffusionPipeline, or
StableDiffusionXLPipeline for an SDXL folder: the class its ``model_index.json`` names) on the same weights.

Both run in this process on the CPU, fp32, alternating (ours first on even repeats, diffusers
first on odd ones) after a warm-up of each: same prompt, same initial latents (``latents=``),
same scheduler (the one both folders carry), same steps and guidance, ``output_type="np"``.
Reported: median seconds per image for each, the ratio diffusers / ours (> 1: we are faster),
the max abs difference of the two images (they must be the same picture), our runtime
overhead, and, each in fresh subprocesses, import + load time and peak RSS of a process that
loads and generates one image.

    python bench/compare_diffusers.py engines/bench-mid --steps 20 --repeats 3 --threads 2
    python bench/compare_diffusers.py engines/bench-sdxl-mid --steps 10 --repeats 3 --threads 2
    python bench/compare_diffusers.py --bundle B --diffusers D ...

``MODEL`` is a folder with ``bundle/`` and ``diffusers/`` in it (what bench/make_models.py writes).
Also reported: the bundle's bytes on disk against 4 bytes per parameter of the diffusers folder's
weights (what an fp32 bundle that stores every weight once comes to).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.proc import PEAK_RSS_SNIPPET, machine_info, startup_runs
from bench.runtime import PROMPT, parse_engine_options, time_startup
from ldm_runtime.timing import instrument

log = logging.getLogger("compare_diffusers")

# diffusers' start-up, the same steps as bench.runtime's child: imports, then from_pretrained,
# then one image for the peak RSS
_DIFFUSERS_CHILD = r"""
import json, sys, time
""" + PEAK_RSS_SNIPPET + r"""
t0 = time.perf_counter()
import torch
import diffusers
from diffusers import DiffusionPipeline
t1 = time.perf_counter()
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
pipe = DiffusionPipeline.from_pretrained(args["diffusers"], torch_dtype=torch.float32, **args["load_kwargs"])
pipe.set_progress_bar_config(disable=True)
t2 = time.perf_counter()
out = {"import_s": t1 - t0, "load_s": t2 - t1, "import_plus_load_s": t2 - t0,
       "rss_after_load_mb": peak_rss_mb()}
if args["steps"]:
    with torch.inference_mode():
        pipe(args["prompt"], num_inference_steps=args["steps"], guidance_scale=args["guidance_scale"],
             generator=torch.Generator().manual_seed(0), output_type="np")
    out["first_image_s"] = time.perf_counter() - t2
out["peak_rss_mb"] = peak_rss_mb()
print("RESULT " + json.dumps(out))
"""


def load_kwargs(folder: str | Path) -> dict[str, Any]:
    """``from_pretrained`` keywords for the pipeline class the folder names: SD's safety checker off."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return ({"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {})


def diffusers_startup(folder: str, threads: int, repeats: int, steps: int, guidance_scale: float) -> dict[str, Any]:
    args = {"diffusers": str(folder), "threads": threads, "steps": steps, "prompt": PROMPT,
            "guidance_scale": guidance_scale, "load_kwargs": load_kwargs(folder)}
    return startup_runs(_DIFFUSERS_CHILD, args, repeats)


def weight_bytes(bundle: str | Path, diffusers_dir: str | Path) -> dict[str, Any]:
    """Bundle bytes on disk (every file) against 4 bytes per parameter in the diffusers folder's safetensors."""
    from safetensors import safe_open

    params = 0
    for f in Path(diffusers_dir).glob("*/*.safetensors"):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                params += int(np.prod(st.get_slice(k).get_shape()))
    on_disk = sum(f.stat().st_size for f in Path(bundle).rglob("*") if f.is_file())
    return {"bundle_bytes": on_disk, "params": params, "fp32_weight_bytes": 4 * params,
            "bundle_over_fp32_weights": on_disk / (4 * params)}


def compare(bundle: str, diffusers_dir: str, steps: int = 20, repeats: int = 3, warmup: int = 1, threads: int = 2,
            guidance_scale: float = 7.5, prompt: str = PROMPT, seed: int = 0, startup: bool = True,
            engine_options: dict | None = None) -> dict[str, Any]:
    """Time ours and diffusers' alternately on the same inputs; see the module docstring."""
    import torch
    from diffusers import DiffusionPipeline

    from ldm_runtime.pipeline import Pipeline

    machine = machine_info()
    torch.set_num_threads(threads)
    opts = {"threads": threads, **(engine_options or {})}
    ours = Pipeline.load(bundle, **opts)
    clock = instrument(ours)
    theirs = DiffusionPipeline.from_pretrained(diffusers_dir, torch_dtype=torch.float32, **load_kwargs(diffusers_dir))
    theirs.set_progress_bar_config(disable=True)
    h, w = ours.manifest.default_size
    latents = np.random.default_rng(seed).standard_normal(ours.latent_shape(1, h, w), dtype=np.float32)
    sched = (ours.scheduler_name, type(theirs.scheduler).__name__)

    def run_ours():
        clock.reset()
        t0 = time.perf_counter()
        img = ours(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents, seed=seed,
                   output_type="np").images
        return time.perf_counter() - t0, clock.total, img

    def run_theirs():
        t0 = time.perf_counter()
        with torch.inference_mode():
            img = theirs(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                         latents=torch.from_numpy(latents.copy()), output_type="np").images
        return time.perf_counter() - t0, None, img

    for _ in range(warmup):
        run_ours()
        run_theirs()
    t_ours, t_inside, t_theirs = [], [], []
    img_ours = img_theirs = None
    for r in range(repeats):
        for who in ((run_ours, run_theirs) if r % 2 == 0 else (run_theirs, run_ours)):
            sec, inside, img = who()
            if who is run_ours:
                t_ours.append(sec)
                t_inside.append(inside)
                img_ours = img
            else:
                t_theirs.append(sec)
                img_theirs = img
        log.info("repeat %d: ours %.3f s, diffusers %.3f s", r, t_ours[-1], t_theirs[-1])
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    overhead = [a - b for a, b in zip(t_ours, t_inside)]
    result: dict[str, Any] = {
        "bundle": str(bundle), "diffusers": str(diffusers_dir), "pipeline": type(theirs).__name__, "steps": steps,
        "size": f"{h}x{w}",
        "guidance_scale": guidance_scale, "threads": threads, "schedulers": list(sched), "repeats": repeats,
        "ours_s": mo, "diffusers_s": mt, "speedup": mt / mo,
        "ours_overhead_pct": 100.0 * statistics.median([o / t for o, t in zip(overhead, t_ours)]),
        "image_max_abs_diff": float(np.abs(np.asarray(img_ours) - np.asarray(img_theirs)).max()),
        "ours_runs_s": t_ours, "diffusers_runs_s": t_theirs,
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
        "machine": machine, "weights": weight_bytes(bundle, diffusers_dir),
    }
    del theirs, ours
    if startup:
        s_ours = time_startup(bundle, opts, repeats, steps=steps, guidance_scale=guidance_scale)
        s_theirs = diffusers_startup(diffusers_dir, threads, repeats, steps, guidance_scale)
        result["startup"] = {"ours": s_ours, "diffusers": s_theirs,
                             "import_plus_load_ratio": s_ours["import_plus_load_s"] / s_theirs["import_plus_load_s"],
                             "peak_rss_ratio": s_ours["peak_rss_mb"] / s_theirs["peak_rss_mb"]}
    return result


def to_markdown(r: dict[str, Any]) -> str:
    lines = [f"| model | size | steps | scheduler | ours (s/image) | diffusers (s/image) | speed-up | ours overhead | "
             "image max abs diff |", "|---|---|---|---|---|---|---|---|---|",
             f"| `{r['bundle']}` | {r['size']} | {r['steps']} | {r['schedulers'][0]} / {r['schedulers'][1]} | "
             f"{r['ours_s']:.3f} | {r['diffusers_s']:.3f} | **{r['speedup']:.2f}x** | {r['ours_overhead_pct']:.2f}% | "
             f"{r['image_max_abs_diff']:.1e} |"]
    st = r.get("startup")
    if st:
        o, d = st["ours"], st["diffusers"]
        lines += ["", "| | import | load | import + load | peak RSS (load + 1 image) |", "|---|---|---|---|---|",
                  f"| ours | {o['import_ldm_runtime_s'] + o['import_pipeline_s']:.3f} s | {o['load_s']:.3f} s | "
                  f"{o['import_plus_load_s']:.3f} s | {o['peak_rss_mb']:.0f} MiB |",
                  f"| diffusers | {d['import_s']:.3f} s | {d['load_s']:.3f} s | {d['import_plus_load_s']:.3f} s | "
                  f"{d['peak_rss_mb']:.0f} MiB |",
                  f"| ours / diffusers | | | **{st['import_plus_load_ratio']:.2f}** | **{st['peak_rss_ratio']:.2f}** |"]
    wb = r.get("weights")
    if wb:
        lines += ["", f"Bundle on disk {wb['bundle_bytes'] / 2**20:.1f} MiB for {wb['params'] / 1e6:.2f}M parameters "
                  f"({wb['fp32_weight_bytes'] / 2**20:.1f} MiB in fp32): **{wb['bundle_over_fp32_weights']:.3f}x**."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Our runtime vs diffusers' pipeline (SD or SDXL) on the same weights.")
    p.add_argument("model", nargs="?", help="folder holding bundle/ and diffusers/ (bench/make_models.py)")
    p.add_argument("--bundle", default=None)
    p.add_argument("--diffusers", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--no-startup", action="store_true")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra engine option for our runtime, repeatable (see ldm bench --help)")
    p.add_argument("--json", default=None, help="write the result here too")
    args = p.parse_args(argv)
    bundle = args.bundle or (args.model and str(Path(args.model) / "bundle"))
    folder = args.diffusers or (args.model and str(Path(args.model) / "diffusers"))
    if not bundle or not folder:
        p.error("give MODEL, or both --bundle and --diffusers")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    r = compare(bundle, folder, args.steps, args.repeats, args.warmup, args.threads, args.guidance_scale,
                startup=not args.no_startup, engine_options=parse_engine_options(args.engine_option))
    r["machine"]["loadavg_1m_end"] = machine_info().get("loadavg_1m")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
