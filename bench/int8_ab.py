"""An int8 bundle against its fp32 source: U-Net seconds per call (alternating), image PSNR, peak RSS.

One process opens both bundles' U-Nets (onnxruntime CPU, as ``Pipeline.load`` opens them) and times
calls alternately (A B B A ...) on the same random feeds, so a shared machine's drift hits both.
The end-to-end figures run in fresh processes, one per bundle: a generate call of ``--steps`` steps
at the bundle's size, its peak RSS (VmHWM) and its images, whose PSNR against fp32's is reported.

    python bench/int8_ab.py engines/bench-mid/bundle engines/bench-mid/bundle-int8 --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.backend_ab import alternate  # noqa: E402
from bench.proc import PEAK_RSS_SNIPPET, machine_info, run_child  # noqa: E402
from bench.runtime import component_feeds  # noqa: E402
from export.quantize import image_psnr_db  # noqa: E402
from ldm_runtime.pipeline import Pipeline  # noqa: E402

GENERATE_CHILD = PEAK_RSS_SNIPPET + r"""
import json, sys, time
import numpy as np
from ldm_runtime.pipeline import Pipeline
a = json.loads(sys.argv[1])
pipe = Pipeline.load(a["bundle"], threads=a["threads"])
t0 = time.perf_counter()
images = pipe(a["prompt"], seed=a["seeds"], num_images_per_prompt=len(a["seeds"]), num_inference_steps=a["steps"],
              output_type="np").images
seconds = time.perf_counter() - t0
np.save(a["out"], images)
print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))
"""


def unet_seconds(bundles: list[str], batch: int, threads: int, rounds: int) -> list[list[float]]:
    """Per bundle, the seconds of each timed U-Net call at ``batch`` rows (the bundle's default size)."""
    pipes = [Pipeline.load(b, threads=threads) for b in bundles]
    h, w = pipes[0].manifest.default_size
    feeds = component_feeds(pipes[0], h, w, batch // 2)["unet_2B"]
    return alternate([p.engine("unet") for p in pipes], feeds, rounds)


def generate(bundle: str, args: argparse.Namespace, folder: Path) -> tuple[dict, np.ndarray]:
    out = folder / f"{len(list(folder.iterdir()))}.npy"
    child = {"bundle": bundle, "threads": args.threads, "prompt": args.prompt, "seeds": list(range(args.seeds)),
             "steps": args.steps, "out": str(out)}
    result = run_child(GENERATE_CHILD, child, timeout=3600)
    return result, np.load(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fp32")
    p.add_argument("int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="U-Net rows per timed call")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the end-to-end runs")
    p.add_argument("--seeds", type=int, default=8, help="images (seeds 0..N-1) of the end-to-end runs")
    p.add_argument("--prompt", default="a blue circle next to an orange square")
    args = p.parse_args(argv)
    times = unet_seconds([args.fp32, args.int8], args.batch, args.threads, args.rounds)
    med = [statistics.median(t) for t in times]
    with tempfile.TemporaryDirectory() as folder:
        (r32, im32), (r8, im8) = (generate(b, args, Path(folder)) for b in (args.fp32, args.int8))
    report = {"machine": machine_info(), "threads": args.threads, "batch": args.batch, "rounds": args.rounds,
              "unet_s": {"fp32": med[0], "int8": med[1], "speedup": med[0] / med[1],
                         "min_fp32": min(times[0]), "min_int8": min(times[1])},
              "end_to_end": {"steps": args.steps, "images": args.seeds, "fp32": r32, "int8": r8,
                             "psnr_db": image_psnr_db(im8, im32),
                             "min_seed_psnr_db": min(image_psnr_db(a, b) for a, b in zip(im8, im32))}}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
