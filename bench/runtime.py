"""``ldm bench BUNDLE``: where the runtime's time goes, end to end, and what start-up and memory cost.

Measured (medians over ``--repeats`` runs after ``--warmup`` runs):

- per component: the text encoder on one prompt, one U-Net step at batch 2B (guided) and at B,
  the VAE decode; at the bundle's default size and at each ``--sizes`` entry;
- end to end: seconds per image at each of ``--steps`` (guided, ``output_type="np"``), and at the
  fewest steps for each extra size;
- the runtime's own overhead: end to end minus the time spent inside the inference library
  (every engine's session is wrapped with a clock), in seconds and as a percentage;
- start-up, in fresh subprocesses: ``import ldm_runtime``, importing the pipeline with its
  inference library, loading the bundle and opening its engines; and the peak RSS of a
  subprocess that loads the bundle and generates one image.

Writes ``bench.json``, ``bench.md`` and ``bench.png`` (when matplotlib is importable) into
``--out``, and prints the markdown. torch-free: it measures the runtime only; the diffusers peer
is ``bench/compare_diffusers.py``. The tables and plot are ``bench.report``'s, the child processes
``bench.proc``'s, and the clock inside the engines is ``ldm_runtime.timing``'s.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.proc import PEAK_RSS_SNIPPET, machine_info, startup_runs
from bench.report import plot, to_markdown
from ldm_runtime.cliargs import ArgumentParser, UsageError, parse_engine_options, parse_sizes
from ldm_runtime.generate import lora_arg, lora_parameters
from ldm_runtime.manifest import BundleError
from ldm_runtime.shapes import bind_shapes, feed_ranges, random_feeds, size_dims
from ldm_runtime.timing import EngineClock, instrument

logger = logging.getLogger(__name__)

PROMPT = "a red circle on a blue background"


# ---------------------------------------------------------------------------------------------
# measurements


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def component_feeds(pipe: Any, height: int, width: int, batch: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Random inputs (``ldm_runtime.shapes``) for one call of each timed component: the text encoder on one
    prompt, the U-Net at 2B and B rows, the VAE decoder at B."""
    rng = np.random.default_rng(seed)
    m = pipe.manifest
    size, ranges = size_dims(height, width, pipe.vae_scale_factor), feed_ranges(m)
    calls = {"text_encoder": ("text_encoder", 1), "unet_2B": ("unet", 2 * batch), "unet_B": ("unet", batch),
             "vae_decoder": ("vae_decoder", batch)}
    feeds = {}
    for key, (comp, rows) in calls.items():
        specs = m.component(comp).inputs
        feeds[key] = random_feeds(specs, bind_shapes(specs, B=rows, **size), rng, **ranges)
    return feeds


def time_components(pipe: Any, clock: EngineClock, height: int, width: int, repeats: int, warmup: int,
                    batch: int = 1) -> dict[str, dict[str, Any]]:
    """Median seconds inside the library for one call of each component at ``height`` x ``width``."""
    rows: dict[str, dict[str, Any]] = {}
    for key, feeds in component_feeds(pipe, height, width, batch).items():
        comp = "unet" if key.startswith("unet") else key
        eng = pipe.engine(comp)
        dtypes = {s.name: s.dtype for s in eng.inputs}
        feeds = {k: v.astype(dtypes[k]) for k, v in feeds.items()}
        for _ in range(warmup):
            eng.run(feeds)
        runs = []
        for _ in range(repeats):
            clock.reset()
            eng.run(feeds)
            runs.append(clock.seconds[comp])
        rows[key] = {"batch": int(next(iter(feeds.values())).shape[0]), "median_s": _median(runs), "runs_s": runs}
    return rows


def time_end_to_end(pipe: Any, clock: EngineClock, steps: int, height: int, width: int, repeats: int, warmup: int,
                    guidance_scale: float = 7.5, prompt: str = PROMPT, seed: int = 0,
                    scheduler: str | None = None) -> dict[str, Any]:
    """One image at ``steps``: medians of wall time, time inside the engines and the difference."""
    def call():
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                    seed=seed, scheduler=scheduler, output_type="np")

    for _ in range(warmup):
        call()
    wall, inside, per_comp = [], [], []
    for _ in range(repeats):
        clock.reset()
        t0 = time.perf_counter()
        call()
        wall.append(time.perf_counter() - t0)
        inside.append(clock.total)
        per_comp.append(dict(clock.seconds))
    overhead = [w - e for w, e in zip(wall, inside)]
    med_wall = _median(wall)
    return {"steps": steps, "height": height, "width": width, "guidance_scale": guidance_scale,
            "seconds": med_wall, "engine_seconds": _median(inside), "overhead_seconds": _median(overhead),
            "overhead_pct": 100.0 * _median([o / w for o, w in zip(overhead, wall)]),
            "overhead_per_step_ms": 1e3 * _median(overhead) / steps,
            "engine_calls": dict(clock.calls), "engine_seconds_by_component": {
                k: _median([p.get(k, 0.0) for p in per_comp]) for k in per_comp[0]} if per_comp else {},
            "runs_s": wall}


# What a fresh process pays before its first image: imports, manifest, engines; then one image for
# the peak RSS. Runs as ``python -c`` so that nothing is imported before the clock starts.
_STARTUP_CHILD = r"""
import json, sys, time
""" + PEAK_RSS_SNIPPET + r"""
t0 = time.perf_counter()
import ldm_runtime
t1 = time.perf_counter()
import onnxruntime
from ldm_runtime.pipeline import Pipeline
t2 = time.perf_counter()
args = json.loads(sys.argv[1])
pipe = Pipeline.load(args["bundle"], **args["engine_options"])
pipe.open_engines(("text_encoder", "unet", "vae_decoder"))
t3 = time.perf_counter()
out = {"import_ldm_runtime_s": t1 - t0, "import_pipeline_s": t2 - t1, "load_s": t3 - t2, "import_plus_load_s": t3 - t0,
       "rss_after_load_mb": peak_rss_mb()}
if args["steps"]:
    pipe(args["prompt"], num_inference_steps=args["steps"], guidance_scale=args["guidance_scale"], seed=0,
         output_type="np")
    out["first_image_s"] = time.perf_counter() - t3
out["peak_rss_mb"] = peak_rss_mb()
print("RESULT " + json.dumps(out))
"""


def time_startup(bundle: str | os.PathLike, engine_options: dict, repeats: int, steps: int = 1,
                 guidance_scale: float = 7.5) -> dict[str, Any]:
    """Start-up times (medians over ``repeats`` fresh processes) and peak RSS."""
    args = {"bundle": str(bundle), "engine_options": engine_options, "steps": steps, "prompt": PROMPT,
            "guidance_scale": guidance_scale}
    return {**startup_runs(_STARTUP_CHILD, args, repeats), "generate_steps": steps}


# ---------------------------------------------------------------------------------------------
# the whole benchmark


@dataclass
class BenchConfig:
    bundle: str
    steps: tuple[int, ...] = (10, 30, 50)
    sizes: tuple[tuple[int, int], ...] = ()  # extra sizes besides the bundle's default
    repeats: int = 3
    warmup: int = 1
    threads: int | None = None
    opt_level: str = "all"
    guidance_scale: float = 7.5
    scheduler: str | None = None
    startup: bool = True  # the fresh-process measurements (import, load, peak RSS)
    negative_cache: bool = True  # False: encode the negative prompt on every call (the cache's "before")
    engine_options: dict = field(default_factory=dict)  # extra engine options (arena, precision, ...)
    backend: str = "onnxruntime"  # or "openvino" (the CPU backends)
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA file, scale) fused at load (Pipeline.load(loras=))

    def options(self) -> dict:
        """The engine options (``opt_level`` is onnxruntime's only)."""
        opts = {**({"opt_level": self.opt_level} if self.backend == "onnxruntime" else {}), **self.engine_options}
        if self.threads is not None:
            opts["threads"] = self.threads
        return opts

    def load_kwargs(self) -> dict:
        """``Pipeline.load`` keywords: the backend, its options and the LoRAs."""
        loras = {"loras": [list(x) for x in self.loras]} if self.loras else {}
        return {"backend": self.backend, **self.options(), **loras}


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Every measurement of ``ldm bench`` for ``cfg``; returns the JSON-able result."""
    from ldm_runtime.pipeline import Pipeline, files_in_use

    result: dict[str, Any] = {"bundle": str(cfg.bundle), "config": asdict(cfg), "machine": machine_info()}
    t0 = time.perf_counter()
    pipe = Pipeline.load(cfg.bundle, **cfg.load_kwargs())
    if not cfg.negative_cache:
        from ldm_runtime.guidance import EmbeddingCache

        pipe.negative_cache = EmbeddingCache(0)
    clock = instrument(pipe)
    result["load_in_process_s"] = time.perf_counter() - t0
    man = pipe.manifest
    used = files_in_use(man, pipe.required_components, pipe.backend, pipe.device, cfg.options().get("cpu_variant", True))
    result["engine_options"] = cfg.options()
    result["bundle_info"] = {"sha256": man.sha256[:16], "precision": man.precision, "scheduler": pipe.scheduler_name,
                             "default_size": list(man.default_size), "graphs": [f for f in used if f.endswith(".onnx")],
                             "bytes_read": sum(int(man.data["files"][f].get("bytes", 0)) for f in used),
                             **({"loras": lora_parameters(pipe.loras)} if pipe.loras is not None else {})}
    default = man.default_size
    sizes = [default] + [s for s in cfg.sizes if tuple(s) != tuple(default)]
    result["components"] = {}
    for h, w in sizes:
        log(f"components at {h}x{w}")
        result["components"][f"{h}x{w}"] = time_components(pipe, clock, h, w, cfg.repeats, cfg.warmup)
    result["end_to_end"] = []
    for s in cfg.steps:
        log(f"end to end, {s} steps at {default[0]}x{default[1]}")
        result["end_to_end"].append(time_end_to_end(pipe, clock, s, *default, cfg.repeats, cfg.warmup,
                                                    cfg.guidance_scale, scheduler=cfg.scheduler))
    for h, w in sizes[1:]:
        s = min(cfg.steps)
        log(f"end to end, {s} steps at {h}x{w}")
        result["end_to_end"].append(time_end_to_end(pipe, clock, s, h, w, cfg.repeats, cfg.warmup,
                                                    cfg.guidance_scale, scheduler=cfg.scheduler))
    if cfg.startup:
        log("start-up and peak RSS in fresh processes")
        result["startup"] = time_startup(cfg.bundle, cfg.load_kwargs(), cfg.repeats, steps=min(cfg.steps),
                                         guidance_scale=cfg.guidance_scale)
    result["machine"]["loadavg_1m_end"] = machine_info().get("loadavg_1m")
    return result


def write_report(result: dict[str, Any], out: Path) -> str:
    """Write bench.json, bench.md and bench.png into ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(result)
    why = plot(result, out / "bench.png")
    result["plot"] = why or str(out / "bench.png")
    if why:
        md += f"\n({why})\n"
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(md)
    return md


# ---------------------------------------------------------------------------------------------
# command line


def _ints(s: str) -> tuple[int, ...]:
    try:
        v = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="ldm bench", description="Latency, overhead, start-up and memory of a bundle on the runtime.")
    p.add_argument("bundle")
    p.add_argument("--steps", type=_ints, default=(10, 30, 50), help="end-to-end step counts (default 10,30,50)")
    p.add_argument("--sizes", type=parse_sizes, default=(), help="extra image sizes, e.g. 192,256x384 (default: the bundle's only)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (medians reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each figure")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino"),
                   help="the CPU backend (default onnxruntime)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the backend's)")
    p.add_argument("--opt-level", default="all", choices=("disable", "basic", "extended", "all"))
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra engine option, repeatable (e.g. cpu_variant=false, mem_pattern=false, arena=false, "
                        "spinning=false)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--scheduler", default=None, help="scheduler name (default: the bundle's)")
    p.add_argument("--lora", action="append", type=lora_arg, default=[], metavar="FILE[:SCALE]",
                   help="a LoRA fused at load, as ldm generate --lora (repeatable)")
    p.add_argument("--no-startup", action="store_true", help="skip the fresh-process start-up and RSS runs")
    p.add_argument("--no-negative-cache", action="store_true", help="encode the negative prompt on every call")
    p.add_argument("--out", default="bench-out", help="folder for bench.json, bench.md, bench.png")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        if args.repeats < 1 or args.warmup < 0:
            raise UsageError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
        parse_engine_options(args.engine_option)
    except UsageError as e:
        print(f"ldm bench: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    cfg = BenchConfig(bundle=args.bundle, steps=args.steps, sizes=args.sizes, repeats=args.repeats,
                      warmup=args.warmup, threads=args.threads, opt_level=args.opt_level, backend=args.backend,
                      guidance_scale=args.guidance_scale, scheduler=args.scheduler, startup=not args.no_startup,
                      negative_cache=not args.no_negative_cache, loras=tuple(args.lora),
                      engine_options=parse_engine_options(args.engine_option))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        result = run_bench(cfg)
    except (BundleError, ValueError) as e:
        print(f"ldm bench: error: {e}", file=sys.stderr)
        return 2
    print(write_report(result, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
