"""Few-step speed: a 4-step LCM student against its 30-step teacher and diffusers' LatentConsistencyModelPipeline.

In one process on the CPU, fp32, after a warm-up of each, three runs alternate (their order rotates
every round): the student bundle at 4 steps (its ``lcm`` scheduler and guidance embedding, no
unconditional pass), the teacher bundle at 30 steps with classifier-free guidance (its own
scheduler), and diffusers' ``LatentConsistencyModelPipeline`` on the student's weights. All three
get the same prompt and initial latents (``latents=``), ``output_type="np"``; diffusers' LCM
scheduler draws its between-step noise from the same numpy stream as the runtime (its
``randn_tensor`` is replaced for its runs), so student and diffusers give the same picture.

Then the runtime's own overhead at 4 steps, as ``ldm generate`` makes an image (PIL output and
a PNG with its parameters written): wall time minus the time inside onnxruntime's ``session.run``,
as a share of end to end, and a cProfile of the same calls split by the step of ``__call__`` it
falls in, with the functions that take the most time of their own.

Two models:
- (a) default: the mid-size benchmark model (bench/make_models.py's ``mid``, random weights) as a
  student with a guidance embedding (``time_cond_proj_dim``) and an LCM scheduler, and the same
  U-Net without the embedding as the teacher (PNDM, as SD 1.x), built once under
  ``engines/bench-mid-lcm/``.
- (b) ``--student CKPT --teacher CKPT``: trained checkpoint folders (the distilled default model and
  its teacher), exported under ``engines/fewstep-<parent>-<student folder>/`` and re-exported when a
  checkpoint's ``ldm_checkpoint.json`` changes.

    python bench/fewstep.py --repeats 3 --threads 2
    python bench/fewstep.py --student runs/lcm-default/checkpoint --teacher checkpoints/default --repeats 10
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import hashlib
import json
import logging
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.proc import machine_info  # noqa: E402
from bench.runtime import PROMPT  # noqa: E402
from ldm_runtime.timing import instrument  # noqa: E402

log = logging.getLogger("fewstep")

# an LCM scheduler as the released SD 1.x LCM folders carry it
LCM_SCHEDULER = {"_class_name": "LCMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": True, "steps_offset": 1,
                 "timestep_spacing": "leading", "original_inference_steps": 50, "timestep_scaling": 10.0,
                 "clip_sample": False, "prediction_type": "epsilon"}
RUN_COMPONENTS = ("text_encoder", "unet", "vae_decoder")  # what text to image runs: no VAE encoder
GUIDANCE_EMBEDDING_DIM = 256  # as LCM-distilled SD 1.x U-Nets (and `ldm train lcm`) have it


# -- the models ------------------------------------------------------------------------------------
def mid_lcm_models(seed: int = 0) -> tuple[Any, Any]:
    """(student, teacher) ``LatentDiffusion``s: the mid benchmark model, its U-Net with a random guidance
    embedding and an LCM scheduler as the student; the same weights without the embedding as the teacher."""
    import torch

    from bench.make_models import random_models
    from training.models.unet import UNet

    teacher = random_models("mid", seed)
    torch.manual_seed(seed + 1)
    unet = UNet(dataclasses.replace(teacher.unet.config, time_cond_proj_dim=GUIDANCE_EMBEDDING_DIM))
    missing, unexpected = unet.load_state_dict(teacher.unet.state_dict(), strict=False)
    if unexpected or not missing or not all(".cond_proj." in k for k in missing):
        raise RuntimeError(f"student U-Net should differ from the teacher's by cond_proj only: "
                           f"missing {missing}, unexpected {unexpected}")
    unet.eval().requires_grad_(False)
    student = dataclasses.replace(teacher, unet=unet, scheduler_config=dict(LCM_SCHEDULER),
                                  extra={"note": "random weights, bench config 'mid' with an LCM guidance embedding"})
    return student, teacher


def export_model(ld: Any, out: Path, diffusers: bool) -> Path:
    """``out/ckpt`` (our checkpoint), ``out/bundle`` (fp32 with CPU variants) and, if asked, ``out/diffusers``."""
    from export.bundle import export_bundle
    from training.checkpoint import export_diffusers, save_checkpoint

    save_checkpoint(ld, out / "ckpt")
    if diffusers:
        export_diffusers(ld, out / "diffusers")
    export_bundle(out / "ckpt", out / "bundle", precision="fp32", components=RUN_COMPONENTS, models=ld)
    return out


def _source_stamp(student: Path | None, teacher: Path | None) -> str:
    """What the built models came from: the mid config, or the two checkpoints' ``ldm_checkpoint.json`` hashes."""
    if student is None:
        return "random stand-in: bench config 'mid' + LCM guidance embedding\n"
    return "".join(f"{role}: {p} {hashlib.sha256((p / 'ldm_checkpoint.json').read_bytes()).hexdigest()}\n"
                   for role, p in (("student", student), ("teacher", teacher)))


def build_models(root: Path, student: Path | None = None, teacher: Path | None = None, force: bool = False) -> Path:
    """The folder holding ``student/{ckpt,diffusers,bundle}`` and ``teacher/{ckpt,bundle}``, built when missing,
    asked (``force``) or when the checkpoints they came from changed."""
    out = root / ("bench-mid-lcm" if student is None else f"fewstep-{student.resolve().parent.name}-{student.name}")
    stamp = _source_stamp(student, teacher)
    marker = out / "SOURCE"
    if not force and marker.is_file() and marker.read_text() == stamp:
        return out
    import shutil

    from training.checkpoint import load_models

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    s, t = mid_lcm_models() if student is None else (load_models(student), load_models(teacher))
    if s.unet.config.time_cond_proj_dim is None:
        raise SystemExit(f"{student}: its U-Net has no guidance embedding (time_cond_proj_dim); is it an LCM student?")
    export_model(s, out / "student", diffusers=True)
    export_model(t, out / "teacher", diffusers=False)
    marker.write_text(stamp)
    log.info("built %s in %.0f s", out, time.perf_counter() - t0)
    return out


# -- the timed runs --------------------------------------------------------------------------------
@contextlib.contextmanager
def numpy_lcm_noise(seed: int) -> Iterator[None]:
    """diffusers' LCMScheduler draws its between-step noise from ``np.random.default_rng(seed)`` (float32),
    as the runtime does for an int seed when ``latents`` are given."""
    import torch
    import diffusers.schedulers.scheduling_lcm as lcm

    rng = np.random.default_rng(seed)

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype or torch.float32)

    original = lcm.randn_tensor
    lcm.randn_tensor = randn
    try:
        yield
    finally:
        lcm.randn_tensor = original


@dataclasses.dataclass
class Setup:
    """What one benchmark run compares: its pipelines and the call arguments they share."""

    student: Any  # ldm_runtime Pipeline
    teacher: Any
    diffusers: Any  # LatentConsistencyModelPipeline
    latents: np.ndarray
    prompt: str = PROMPT
    seed: int = 0
    steps: int = 4
    teacher_steps: int = 30
    guidance_scale: float = 8.0  # the student's (embedded)
    teacher_guidance_scale: float = 7.5
    clocks: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> EngineClock of that pipeline

    def __post_init__(self) -> None:
        self.clocks = {"student": instrument(self.student), "teacher": instrument(self.teacher)}


def load_setup(folder: Path, threads: int, **call: Any) -> Setup:
    """The student and teacher bundles on onnxruntime CPU and diffusers' LCM pipeline on the student's weights."""
    import torch
    from diffusers import LatentConsistencyModelPipeline

    from ldm_runtime.pipeline import Pipeline

    torch.set_num_threads(threads)
    student = Pipeline.load(folder / "student" / "bundle", threads=threads)
    teacher = Pipeline.load(folder / "teacher" / "bundle", threads=threads)
    theirs = LatentConsistencyModelPipeline.from_pretrained(str(folder / "student" / "diffusers"),
                                                            torch_dtype=torch.float32, safety_checker=None,
                                                            requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    h, w = student.manifest.default_size
    seed = call.get("seed", 0)
    latents = np.random.default_rng(seed).standard_normal(student.latent_shape(1, h, w), dtype=np.float32)
    return Setup(student, teacher, theirs, latents, **call)


def runners(s: Setup) -> dict[str, Callable[[], tuple[float, float | None, np.ndarray]]]:
    """name -> a function that makes one image and returns (seconds, seconds inside onnxruntime or None, image)."""
    import torch

    def ours(name: str, steps: int, scale: float) -> Callable[[], tuple[float, float | None, np.ndarray]]:
        pipe, clock = getattr(s, name), s.clocks[name]

        def run():
            clock.reset()
            t0 = time.perf_counter()
            img = pipe(s.prompt, num_inference_steps=steps, guidance_scale=scale, latents=s.latents, seed=s.seed,
                       output_type="np").images
            return time.perf_counter() - t0, clock.total, img
        return run

    def theirs():
        t0 = time.perf_counter()
        with numpy_lcm_noise(s.seed), torch.inference_mode():
            img = s.diffusers(s.prompt, num_inference_steps=s.steps, guidance_scale=s.guidance_scale,
                              latents=torch.from_numpy(s.latents.copy()), output_type="np").images
        return time.perf_counter() - t0, None, img

    return {"student": ours("student", s.steps, s.guidance_scale),
            "teacher": ours("teacher", s.teacher_steps, s.teacher_guidance_scale), "diffusers": theirs}


def alternate(run: dict[str, Callable], repeats: int, warmup: int) -> dict[str, list[tuple[float, float | None]]]:
    """Each runner ``warmup`` times, then ``repeats`` rounds in an order rotated by one every round;
    per runner its (seconds, inside) of each round, and its last image under the key ``"<name>:image"``."""
    names = list(run)
    for _ in range(warmup):
        for name in names:
            run[name]()
    out: dict[str, Any] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sec, inside, img = run[name]()
            out[name].append((sec, inside))
            out[f"{name}:image"] = img
        log.info("round %d: %s", r, ", ".join(f"{n} {out[n][-1][0]:.3f} s" for n in names))
    return out


# -- the runtime's own overhead at few steps -------------------------------------------------------
def generate_like_cli(s: Setup, out_dir: Path, index: int) -> None:
    """One student image as ``ldm generate`` makes it: PIL output, then a PNG with its parameters."""
    from ldm_runtime.generate import png_parameters
    from ldm_runtime.images import save_png

    out = s.student(s.prompt, num_inference_steps=s.steps, guidance_scale=s.guidance_scale, seed=s.seed + index)
    params = png_parameters(s.student, prompt=s.prompt, negative_prompt=None, seed=out.seed, steps=s.steps,
                            scheduler=out.scheduler, eta=0.0, guidance_scale=s.guidance_scale, guidance_rescale=0.0,
                            height=out.height, width=out.width, num_images=1)
    save_png(out.images[0], out_dir / f"fewstep-{index}.png", {**params, "index": 0})


def overhead(s: Setup, images: int) -> dict[str, Any]:
    """Median wall time, time inside onnxruntime and their difference over ``images`` CLI-like images."""
    clock = s.clocks["student"]
    walls, inside = [], []
    with tempfile.TemporaryDirectory() as tmp:
        generate_like_cli(s, Path(tmp), 0)  # warm-up
        for i in range(images):
            clock.reset()
            t0 = time.perf_counter()
            generate_like_cli(s, Path(tmp), 1 + i)
            walls.append(time.perf_counter() - t0)
            inside.append(clock.total)
    over = [w - e for w, e in zip(walls, inside)]
    return {"images": images, "seconds": statistics.median(walls), "engine_seconds": statistics.median(inside),
            "overhead_seconds": statistics.median(over),
            "overhead_pct": 100.0 * statistics.median(o / w for o, w in zip(over, walls)),
            "engine_by_component_s": dict(clock.seconds)}


# the steps of Pipeline.__call__ (and of saving the PNG), each a function of ours: (label, file, function);
# the engine time that falls inside a step (the clock's, by component) is subtracted from it; the
# tokenizer's row is also part of "encode prompt"'s
CALL_STEPS = (("input checks", "ldm_runtime/pipeline.py", "check_inputs", None),
              ("scheduler setup", "ldm_runtime/pipeline.py", "prepare_scheduler", None),
              ("memory plan", "ldm_runtime/pipeline.py", "plan_memory", None),
              ("engine shapes", "ldm_runtime/pipeline.py", "engine_shapes", None),
              ("tokenizer", "ldm_runtime/tokenizer.py", "__call__", None),
              ("encode prompt, outside onnxruntime", "ldm_runtime/pipeline.py", "encode_prompt", "text_encoder"),
              ("denoise loop, outside onnxruntime", "ldm_runtime/pipeline.py", "denoise", "unet"),
              ("decode, outside onnxruntime", "ldm_runtime/pipeline.py", "decode_latents", "vae_decoder"),
              ("postprocess (to PIL)", "ldm_runtime/images.py", "postprocess", None),
              ("PNG parameters + write", "ldm_runtime/images.py", "save_png", None))


def _cumulative(stats: pstats.Stats, path: str, func: str) -> float:
    return sum(v[3] for (file, _, name), v in stats.stats.items()  # type: ignore[attr-defined]
               if name == func and file.replace("\\", "/").endswith(path))


def profile(s: Setup, images: int, top: int = 12) -> dict[str, Any]:
    """cProfile of ``images`` CLI-like images: ms per image of each step of ``CALL_STEPS`` outside the engines
    (profiled, so inflated against unprofiled runs), and the ``top`` functions by their own time, onnxruntime's
    ``run`` left out."""
    clock = s.clocks["student"]
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        generate_like_cli(s, Path(tmp), 0)  # warm-up
        clock.reset()
        t0 = time.perf_counter()
        prof.enable()
        for i in range(images):
            generate_like_cli(s, Path(tmp), 1 + i)
        prof.disable()
        wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    engine = {k: v / images for k, v in clock.seconds.items()}
    steps = {label: 1e3 * (_cumulative(stats, path, func) / images - engine.get(comp, 0.0) if comp else
                           _cumulative(stats, path, func) / images)
             for label, path, func, comp in CALL_STEPS}
    own = sorted(((v[2], f"{Path(k[0]).name}:{k[1]}({k[2]})") for k, v in stats.stats.items()  # type: ignore
                  if "onnxruntime" not in k[2]), reverse=True)
    return {"images": images, "wall_ms": 1e3 * wall / images, "engine_ms": 1e3 * sum(engine.values()),
            "steps_ms": steps, "top_own_ms": [(name, 1e3 * t / images) for t, name in own[:top]]}


# -- report ----------------------------------------------------------------------------------------
def summarise(s: Setup, runs: dict[str, Any]) -> dict[str, Any]:
    med = {n: statistics.median(sec for sec, _ in runs[n]) for n in ("student", "teacher", "diffusers")}
    over = {n: statistics.median(100.0 * (sec - inside) / sec for sec, inside in runs[n])
            for n in ("student", "teacher")}
    h, w = s.student.manifest.default_size
    return {
        "size": f"{h}x{w}", "steps": s.steps, "teacher_steps": s.teacher_steps, "guidance_scale": s.guidance_scale,
        "teacher_guidance_scale": s.teacher_guidance_scale,
        "schedulers": {"student": s.student.scheduler_name, "teacher": s.teacher.scheduler_name,
                       "diffusers": type(s.diffusers.scheduler).__name__},
        "seconds": med, "teacher_over_student": med["teacher"] / med["student"],
        "diffusers_over_student": med["diffusers"] / med["student"], "overhead_pct_np": over,
        "student_vs_diffusers_max_abs": float(np.abs(runs["student:image"] - runs["diffusers:image"]).max()),
        "runs_s": {n: [sec for sec, _ in runs[n]] for n in ("student", "teacher", "diffusers")},
    }


def to_markdown(r: dict[str, Any]) -> str:
    t, sec = r["timing"], r["timing"]["seconds"]
    lines = ["| model | size | student, 4 steps (s/image) | teacher, 30 steps | diffusers LCM, 4 steps | "
             "teacher / student | diffusers / student | student vs diffusers max abs |", "|---|---|---|---|---|---|---|---|",
             f"| `{r['folder']}` | {t['size']} | {sec['student']:.3f} | {sec['teacher']:.3f} | {sec['diffusers']:.3f} | "
             f"**{t['teacher_over_student']:.2f}x** | **{t['diffusers_over_student']:.2f}x** | "
             f"{t['student_vs_diffusers_max_abs']:.1e} |"]
    o = r["overhead"]
    lines += ["", f"Runtime overhead at {t['steps']} steps as `ldm generate` makes an image (PIL + PNG), "
              f"{o['images']} images: {1e3 * o['overhead_seconds']:.1f} ms of {o['seconds']:.3f} s "
              f"(**{o['overhead_pct']:.2f}%**); with `output_type=\"np\"` in the alternating runs "
              f"{t['overhead_pct_np']['student']:.2f}% (teacher at {t['teacher_steps']} steps "
              f"{t['overhead_pct_np']['teacher']:.2f}%)."]
    p = r["profile"]
    lines += ["", f"cProfile, {p['images']} images (ms per image, profiled: {p['wall_ms']:.1f} ms wall, "
              f"{p['engine_ms']:.1f} ms in onnxruntime):", "", "| step of the call | ms |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in p["steps_ms"].items()]
    lines += ["", "| function (own time) | ms |", "|---|---|"]
    lines += [f"| `{k}` | {v:.2f} |" for k, v in p["top_own_ms"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", type=Path, default=None, help="a distilled checkpoint folder (default: the mid stand-in)")
    p.add_argument("--teacher", type=Path, default=None, help="its teacher's checkpoint folder (with --student)")
    p.add_argument("--root", type=Path, default=REPO / "engines", help="where the exported models are kept")
    p.add_argument("--force", action="store_true", help="export again even when nothing changed")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--teacher-steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=8.0, help="the student's (its guidance embedding)")
    p.add_argument("--teacher-guidance-scale", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--overhead-images", type=int, default=5)
    p.add_argument("--profile-images", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the result here too")
    args = p.parse_args(argv)
    if (args.student is None) != (args.teacher is None):
        p.error("give both --student and --teacher, or neither (the mid-size stand-in)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    machine = machine_info()
    folder = build_models(args.root, args.student, args.teacher, args.force)
    s = load_setup(folder, args.threads, steps=args.steps, teacher_steps=args.teacher_steps,
                   guidance_scale=args.guidance_scale, teacher_guidance_scale=args.teacher_guidance_scale)
    timing = summarise(s, alternate(runners(s), args.repeats, args.warmup))
    r = {"folder": str(folder), "source": (folder / "SOURCE").read_text(), "repeats": args.repeats,
         "threads": args.threads, "timing": timing, "overhead": overhead(s, args.overhead_images),
         "profile": profile(s, args.profile_images), "machine": {**machine, "loadavg_1m_end": machine_info().get(
             "loadavg_1m")}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
