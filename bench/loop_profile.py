"""Where the runtime's per-step overhead goes, and what slicing in ``guidance.combine`` saved.

1. A replica of ``Pipeline.denoise`` as it runs on onnxruntime CPU (guided, the bundle's
   scheduler; dtypes looked up once, feeds checked once per signature) with a timer around each
   piece: scale, concatenate, feeds, casts, feed check, onnxruntime itself, the output check, the
   guidance combine, the scheduler step. Microseconds per step,
   averaged over ``--images`` images of ``--steps`` steps after one warm-up image.
2. Whole generations, alternating in one process: ``guidance.combine`` as it is (slices, one new
   array) against the earlier version that used ``np.split`` and three temporaries.

    python bench/loop_profile.py engines/bench-default/bundle --steps 30 --images 20 --rounds 10
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from bench.runtime import PROMPT
from ldm_runtime import guidance
from ldm_runtime.backends.base import check_feeds
from ldm_runtime.pipeline import Pipeline
from ldm_runtime.schedulers import make_scheduler
from ldm_runtime.timing import instrument


def combine_split(noise_pred: np.ndarray, guidance_scale: float, guidance_rescale: float = 0.0) -> np.ndarray:
    """The earlier ``guidance.combine``: ``np.split`` and three temporaries (same values)."""
    uncond, cond = np.split(noise_pred, 2)
    guided = uncond + np.float32(guidance_scale) * (cond - uncond)
    if guidance_rescale > 0.0:
        guided = guidance.rescale_noise_cfg(guided, cond, guidance_rescale)
    return guided


def loop_breakdown(pipe: Pipeline, steps: int, images: int, scale: float = 7.5) -> dict[str, float]:
    eng = pipe.engines["unet"]
    session = getattr(eng, "session", None)
    if session is None:
        raise SystemExit("the U-Net engine has no onnxruntime session")
    session = getattr(session, "_target", session)  # under ldm_runtime.timing.instrument
    names = [o.name for o in eng.outputs]
    # guided, the empty negative prompt: the [negative; prompt] rows the U-Net sees
    cond = pipe.encode_prompt([PROMPT], 1, [""]).unet_rows()["encoder_hidden_states"]
    h, w = pipe.manifest.default_size
    acc: dict[str, float] = {}
    n = 0
    dtypes = {s.name: np.dtype(s.dtype) for s in eng.inputs}  # as Pipeline.cast_feeds: once per engine
    checked = None
    for image in range(images + 1):
        sched = make_scheduler(pipe.scheduler_name, pipe.scheduler_config)
        sched.set_timesteps(steps)
        z = np.random.default_rng(0).standard_normal(pipe.latent_shape(1, h, w), dtype=np.float32)
        rng = np.random.default_rng(0)
        if image == 1:  # image 0 warms up
            acc.clear()
            n = 0
        for t in sched.timesteps:
            marks = [time.perf_counter()]
            x = sched.scale_model_input(z, t)
            marks.append(time.perf_counter())
            x2 = np.concatenate([x, x])
            marks.append(time.perf_counter())
            feeds = {"sample": x2, "timestep": np.full((2,), t, dtype=np.float32), "encoder_hidden_states": cond}
            marks.append(time.perf_counter())
            feeds = {k: v.astype(dtypes[k], copy=False) for k, v in feeds.items()}
            marks.append(time.perf_counter())
            sig = tuple((k, v.dtype, v.shape) for k, v in feeds.items())  # as OnnxRuntimeEngine.run
            if sig != checked:
                check_feeds("unet", eng.inputs, feeds)
                checked = sig
            feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
            marks.append(time.perf_counter())
            out = session.run(names, feeds)[0]
            marks.append(time.perf_counter())
            if not np.isfinite(out).all():
                raise SystemExit("non-finite U-Net output")
            out = out.astype(np.float32, copy=False)
            marks.append(time.perf_counter())
            noise = guidance.combine(out, scale)
            marks.append(time.perf_counter())
            z = np.asarray(sched.step(noise, t, z, generator=rng), dtype=np.float32)
            marks.append(time.perf_counter())
            for key, a, b in zip(("scale", "concatenate", "feeds", "casts", "feed check", "onnxruntime",
                                  "output check", "combine", "scheduler step"), marks, marks[1:]):
                acc[key] = acc.get(key, 0.0) + b - a
            n += 1
    return {k: 1e6 * v / n for k, v in acc.items()}


def combine_ab(pipe: Pipeline, steps: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    clock = instrument(pipe)
    original = guidance.combine
    res: dict[str, list[tuple[float, float]]] = {"np.split (before)": [], "slices (as is)": []}

    def call(name: str) -> tuple[float, float]:
        guidance.combine = combine_split if name == "np.split (before)" else original
        try:
            clock.reset()
            t0 = time.perf_counter()
            pipe(PROMPT, num_inference_steps=steps, seed=0, output_type="np")
            wall = time.perf_counter() - t0
        finally:
            guidance.combine = original
        return wall, wall - clock.total

    for name in res:
        call(name)
    for r in range(rounds):
        for name in (list(res) if r % 2 == 0 else list(res)[::-1]):
            res[name].append(call(name))
    return {k: (statistics.median(w for w, _ in v), statistics.median(o for _, o in v),
                statistics.median(100 * o / w for w, o in v)) for k, v in res.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    pipe = Pipeline.load(args.bundle, threads=args.threads)
    pipe.open_engines()
    parts = loop_breakdown(pipe, args.steps, args.images)
    outside = sum(v for k, v in parts.items() if k != "onnxruntime")
    print(f"{args.bundle}: per step, {args.images} images x {args.steps} steps (microseconds)\n")
    print("| " + " | ".join(parts) + " | outside onnxruntime |\n|" + "---|" * (len(parts) + 1))
    print("| " + " | ".join(f"{v:.0f}" for v in parts.values()) + f" | **{outside:.0f}** |\n")
    print(f"whole images, {args.steps} steps, {args.rounds} alternating rounds, medians\n")
    print("| guidance.combine | s/image | overhead |\n|---|---|---|")
    for k, (w, o, pct) in combine_ab(pipe, args.steps, args.rounds).items():
        print(f"| {k} | {w:.3f} | {1e3 * o:.1f} ms ({pct:.2f}%) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
