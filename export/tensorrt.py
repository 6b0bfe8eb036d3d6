"""``ldm build-engines``: TensorRT plans from a bundle's ONNX files, recorded in its manifest.

For each component: parse the ONNX file (external data works: the parser is given the path),
build a strongly typed network (precision comes from the ONNX types, so an fp16 bundle gives an
fp16 engine; TensorRT 11 has no other kind and no FP16 flag), one optimization profile from the
size and batch options, a timing cache shared by the builds and saved for the next run. Each plan
is checked against onnxruntime CPU on the same random inputs before it is written (atomically) to
``engines/<key>/<component>.plan``, key = ``sm{major}{minor}-trt{version}-{onnx sha256[:12]}``,
and recorded in the manifest's ``engines`` and ``files`` sections.

Exit codes of ``build_engines_main``: 0 built; 1 a build or parity check failed (that plan is not
written); 2 bad input (bundle, sizes, options); 3 TensorRT, cuda-python or a GPU is absent
(nothing is built or written).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from export import parity
from export.specs import ComponentSpec, ProfileError, profile
from ldm_runtime.backends import check_precision
from ldm_runtime.backends.tensorrt import (
    DeviceMemoryPool,
    GpuInfo,
    TensorRTEngine,
    TensorRTUnavailable,
    component_onnx_sha256,
    gpu_info,
    plan_key,
    require_tensorrt,
    take_trt_errors,
    tensorrt_version,
    trt_logger,
)
from ldm_runtime.manifest import (
    COMPONENTS,
    MANIFEST_NAME,
    BundleError,
    ComponentInfo,
    Manifest,
    TensorSpec,
    atomic_write_bytes,
    atomic_write_json,
    record_file,
)
from ldm_runtime.shapes import feed_ranges, random_feeds

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NO_TENSORRT = 0, 1, 2, 3

Profile = dict[str, dict[str, list[int]]]  # input name -> {"min": shape, "opt": shape, "max": shape}


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a component, or the plan failed its parity check."""


# -- options and profiles (pure) --------------------------------------------------------------------
@dataclass(frozen=True)
class BuildOptions:
    min_size: int = 256  # image pixels, both sides
    max_size: int = 1024
    max_batch: int = 4  # images per call; doubled for the U-Net (CFG)
    opt_batch: int = 1
    opt_level: int = 3  # builder_optimization_level, 0..5
    workspace_gb: float | None = None  # None: TensorRT's default (the whole device)
    timing_cache: str | None = None  # loaded if present, saved after the builds
    components: tuple[str, ...] | None = None  # None: every component in the bundle
    seed: int = 0  # parity inputs
    refittable: bool = False  # BuilderFlag.REFIT: LoRAs are applied by refitting the plan at load

    def validate(self) -> None:
        if not 0 <= self.opt_level <= 5:
            raise ValueError(f"--opt-level must be 0..5, got {self.opt_level}")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise ValueError(f"--workspace-gb must be > 0, got {self.workspace_gb}")
        for c in self.components or ():
            if c not in COMPONENTS:
                raise ValueError(f"unknown component {c!r}; expected some of {', '.join(COMPONENTS)}")


def check_size_range(min_size: int, max_size: int, max_batch: int, vae_scale_factor: int) -> None:
    """Refuse a size or batch range the models cannot take, saying what was expected."""
    f = vae_scale_factor
    if max_batch < 1:
        raise ProfileError(f"--max-batch must be >= 1, got {max_batch}")
    for what, v in (("--min-size", min_size), ("--max-size", max_size)):
        if v < f or v % f:
            raise ProfileError(f"{what} {v} must be a positive multiple of the VAE factor {f}")
    if min_size > max_size:
        raise ProfileError(f"--min-size {min_size} is larger than --max-size {max_size}")


def opt_size_for(default_size: tuple[int, int], min_size: int, max_size: int, f: int) -> tuple[int, int]:
    """The profile's opt size: the bundle's default size, clamped into range and down to a multiple of f."""
    h, w = (max(min_size, min(max_size, v)) // f * f for v in default_size)
    return h, w


def profile_shapes(component: ComponentInfo, min_size: int, max_size: int, max_batch: int, vae_scale_factor: int,
                   opt_size: tuple[int, int] | None = None, opt_batch: int = 1) -> Profile:
    """min/opt/max shapes of each input of a manifest component (``export.specs.profile``'s rules).

    "B" ranges over [1, max_batch] (times the component's ``batch_mult``), "h"/"w" are sizes //
    vae_scale_factor, "H"/"W" pixels, fixed dims stay fixed; any other symbolic dim is refused.
    """
    check_size_range(min_size, max_size, max_batch, vae_scale_factor)
    spec = ComponentSpec(component.name, component.inputs, component.outputs, batch_mult=component.batch_mult)
    if opt_size is None:
        opt_size = (min_size, min_size)
    return profile(spec, vae_scale_factor, min_size, max_size, max_batch, opt_size=opt_size, opt_batch=opt_batch)


# -- parity (pure numpy + onnxruntime) ------------------------------------------------------------------
def parity_check(onnx_path: str | os.PathLike, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 shape_sets: Sequence[Mapping[str, Sequence[int]]],
                 run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
                 threshold: float, seed: int = 0, **ranges: int) -> dict[str, Any]:
    """Run ``run`` and onnxruntime CPU on the same random inputs at each shape set; return the figures.

    Inputs are ``random_feeds`` within ``ranges`` (``feed_ranges`` of the bundle; token ids need ``vocab_size``).
    """
    sess = parity.cpu_session(onnx_path)
    names = [s.name for s in outputs]
    rng = np.random.default_rng(seed)
    checks = []
    worst = 0.0
    for shapes in shape_sets:
        feeds = random_feeds(inputs, shapes, rng, **ranges)
        ref = dict(zip(names, sess.run(names, feeds)))
        got = run(feeds)
        errs = {n: parity.rel_l2(got[n], ref[n]) for n in names}
        max_abs = {n: parity.max_abs(got[n], ref[n]) for n in names if np.shape(got[n]) == np.shape(ref[n])}
        checks.append({"shapes": {k: list(v) for k, v in shapes.items()}, "rel_l2": errs, "max_abs": max_abs})
        worst = max(worst, *errs.values())
    return {"metric": "rel_l2", "reference": "onnxruntime CPU", "threshold": threshold, "worst": worst,
            "passed": bool(worst <= threshold), "seed": seed, "checks": checks}


def parity_shape_sets(prof: Profile) -> list[dict[str, list[int]]]:
    """The input shapes a plan is checked at: the profile's min, opt and max."""
    return [{name: r[k] for name, r in prof.items()} for k in ("min", "opt", "max")]


# -- manifest records (pure) -------------------------------------------------------------------------------
def engine_record(component: str, rel_file: str, file_rec: Mapping[str, Any], onnx_file: str, onnx_sha256: str,
                  gpu: GpuInfo, trt_version: str, precision: str, prof: Profile, build: Mapping[str, Any],
                  parity: Mapping[str, Any]) -> dict[str, Any]:
    """The ``manifest["engines"][key]`` entry of one plan."""
    return {
        "component": component,
        "file": rel_file,
        "sha256": file_rec["sha256"],
        "bytes": file_rec["bytes"],
        "onnx_file": onnx_file,
        "onnx_sha256": onnx_sha256,
        "compute_capability": gpu.compute_capability,
        "gpu_name": gpu.name,
        "tensorrt_version": trt_version,
        "precision": precision,
        "strongly_typed": True,
        "profile": prof,
        "build": dict(build),
        "parity": dict(parity),
    }


def add_engine_record(manifest_data: dict[str, Any], root: str | os.PathLike, key: str, record: Mapping[str, Any]) -> None:
    """Record a plan (already on disk) in ``engines`` and ``files`` and rewrite manifest.json atomically."""
    manifest_data.setdefault("engines", {})[key] = dict(record)
    record_file(manifest_data, root, str(record["file"]))
    atomic_write_json(Path(root) / MANIFEST_NAME, manifest_data)


# -- building (TensorRT) ---------------------------------------------------------------------------------------
class PlanBuilder:
    """One ``trt.Builder`` and one timing cache shared by the builds of a run."""

    def __init__(self, opt_level: int = 3, workspace_bytes: int | None = None,
                 timing_cache: str | os.PathLike | None = None, refittable: bool = False) -> None:
        require_tensorrt()
        import tensorrt as trt

        self.opt_level = opt_level
        self.refittable = refittable
        self.workspace_bytes = workspace_bytes
        self.timing_cache_path = Path(timing_cache) if timing_cache is not None else None
        self.builder = trt.Builder(trt_logger())
        self._cache: trt.ITimingCache | None = None
        self._cache_seed = b""
        if self.timing_cache_path is not None and self.timing_cache_path.is_file():
            self._cache_seed = self.timing_cache_path.read_bytes()
            log.info("timing cache: loaded %s (%d bytes)", self.timing_cache_path, len(self._cache_seed))
        if opt_level == 0 and self.timing_cache_path is not None:
            log.warning("builder optimization level 0 does not use the timing cache")

    def _attach_cache(self, config: trt.IBuilderConfig) -> None:
        if self._cache is None:
            cache = config.create_timing_cache(self._cache_seed)
            if cache is None or not config.set_timing_cache(cache, False):
                # what TensorRT logged about the rejected cache belongs here, not to a later build error
                rejected = " | ".join(take_trt_errors()) or "no error logged"
                log.warning("timing cache %s is for another GPU or TensorRT version (or damaged: %s); "
                            "starting a fresh one", self.timing_cache_path, rejected)
                cache = config.create_timing_cache(b"")
                config.set_timing_cache(cache, False)
            self._cache = cache
        else:
            config.set_timing_cache(self._cache, False)

    def build(self, onnx_path: str | os.PathLike, prof: Profile) -> bytes:
        """Serialized plan of the ONNX file at ``onnx_path`` with one optimization profile ``prof``."""
        import tensorrt as trt

        name = Path(onnx_path).name
        take_trt_errors()
        network = self.builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, trt_logger())
        if not parser.parse_from_file(str(onnx_path)):  # a path, so external data files are found
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or take_trt_errors()
            raise EngineBuildError(f"{name}: the TensorRT ONNX parser failed: {' | '.join(errors)}")
        inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
        if inputs != sorted(prof):
            raise EngineBuildError(f"{name}: the network has inputs {inputs}, the profile covers {sorted(prof)}")
        config = self.builder.create_builder_config()
        config.builder_optimization_level = self.opt_level
        if self.refittable:
            config.set_flag(trt.BuilderFlag.REFIT)  # every weight refittable by its ONNX initializer name
        if self.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        self._attach_cache(config)
        p = self.builder.create_optimization_profile()
        for inp, r in prof.items():
            p.set_shape(inp, trt.Dims(list(r["min"])), trt.Dims(list(r["opt"])), trt.Dims(list(r["max"])))
        if config.add_optimization_profile(p) < 0:
            raise EngineBuildError(f"{name}: TensorRT refused the optimization profile {prof}: {' | '.join(take_trt_errors())}")
        plan = self.builder.build_serialized_network(network, config)
        if plan is None or plan.nbytes == 0:
            errors = take_trt_errors()
            raise EngineBuildError(f"{name}: TensorRT could not build the engine"
                                   + (f": {' | '.join(errors)}" if errors else " (no error was logged)"))
        return bytes(memoryview(plan))

    def save_timing_cache(self) -> None:
        """Write the cache (the loaded entries plus this run's) back, atomically."""
        if self.timing_cache_path is None or self._cache is None:
            return
        data = bytes(memoryview(self._cache.serialize()))
        self.timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.timing_cache_path, data)
        log.info("timing cache: saved %s (%d bytes)", self.timing_cache_path, len(data))


def build_engines(bundle: str | os.PathLike, options: BuildOptions = BuildOptions()) -> list[dict[str, Any]]:
    """Build, check and record a plan for each component; returns the new engine records.

    Everything about the input is checked before TensorRT is touched; a component whose build or
    parity check fails raises ``EngineBuildError`` with no plan written for it (plans of earlier
    components stay recorded).
    """
    options.validate()
    m = Manifest.load(bundle)
    check_precision(m, "tensorrt")
    comps = list(options.components) if options.components else [c for c in COMPONENTS if m.has(c)]
    for c in comps:
        m.component(c)  # BundleError if absent
    f = m.vae_scale_factor
    check_size_range(options.min_size, options.max_size, options.max_batch, f)
    opt_hw = opt_size_for(m.default_size, options.min_size, options.max_size, f)
    profiles = {c: profile_shapes(m.component(c), options.min_size, options.max_size, options.max_batch, f,
                                  opt_size=opt_hw, opt_batch=options.opt_batch) for c in comps}

    require_tensorrt()
    if m.precision != "fp16":
        log.warning("bundle precision is %s: the engines will compute in fp32 (TF32 where TensorRT allows); "
                    "export with --precision fp16 for fp16 engines", m.precision)
    if opt_hw != m.default_size:
        log.warning("the bundle's default size %dx%d is outside %d..%d; profile opt size %dx%d",
                    *m.default_size, options.min_size, options.max_size, *opt_hw)
    gpu, version = gpu_info(), tensorrt_version()
    workspace = int(options.workspace_gb * (1 << 30)) if options.workspace_gb else None
    builder = PlanBuilder(options.opt_level, workspace, options.timing_cache, refittable=options.refittable)
    threshold = parity.TENSORRT_REL_L2.get(m.precision, 1e-2)
    ranges = feed_ranges(m)
    records = []
    for c in comps:
        info, prof = m.component(c), profiles[c]
        onnx_sha = component_onnx_sha256(m.data, c)
        key = plan_key(gpu.major, gpu.minor, version, onnx_sha)
        log.info("%s: building %s (compute %s, TensorRT %s)", c, key, gpu.compute_capability, version)
        t0 = time.perf_counter()
        plan = builder.build(m.path(info.file), prof)
        build_s = time.perf_counter() - t0
        builder.save_timing_cache()

        pool = DeviceMemoryPool()
        try:
            engine = TensorRTEngine(plan, c, info.inputs, info.outputs, memory_pool=pool)
        except BundleError as e:  # a plan that does not load or match the manifest is a failed build
            pool.free()
            raise EngineBuildError(str(e)) from None
        try:
            figures = parity_check(m.path(info.file), info.inputs, info.outputs, parity_shape_sets(prof), engine.run,
                                   threshold, seed=options.seed, **ranges)
        finally:
            engine.close()
            pool.free()
        log.info("%s: parity vs onnxruntime CPU: rel L2 %.2e (threshold %.0e)", c, figures["worst"], threshold)
        if not figures["passed"]:
            raise EngineBuildError(f"{c}: the TensorRT plan differs from onnxruntime CPU by rel L2 {figures['worst']:.3e} "
                                   f"> {threshold:.0e} (figures: {figures['checks']}); the plan was not written")

        rel = f"engines/{key}/{c}.plan"
        path = m.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, plan)
        build = {"min_size": options.min_size, "max_size": options.max_size, "max_batch": options.max_batch,
                 "opt_size": list(opt_hw), "opt_batch": options.opt_batch, "opt_level": options.opt_level,
                 "workspace_gb": options.workspace_gb, "timing_cache": options.timing_cache is not None,
                 "refittable": options.refittable,
                 "seconds": round(build_s, 2),
                 "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        file_rec = {"sha256": hashlib.sha256(plan).hexdigest(), "bytes": len(plan)}
        rec = engine_record(c, rel, file_rec, info.file, onnx_sha, gpu, version, m.precision, prof, build, figures)
        add_engine_record(m.data, m.root, key, rec)
        records.append(rec)
    return records


# -- command line ---------------------------------------------------------------------------------------------------
def _components(arg: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in arg.split(",") if c.strip())


def build_engines_main(argv: Sequence[str] | None = None) -> int:
    """``ldm build-engines BUNDLE [options]``; returns the exit code (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="ldm build-engines",
                                 description="Build TensorRT plans for a bundle's ONNX components and record them in its manifest.",
                                 epilog="exit codes: 0 built, 1 build or parity failure, 2 bad input, "
                                        "3 TensorRT, cuda-python or a GPU is absent (nothing built)")
    ap.add_argument("bundle", help="bundle folder (normally exported with --precision fp16)")
    ap.add_argument("--min-size", type=int, default=256, help="smallest image side in pixels (default 256)")
    ap.add_argument("--max-size", type=int, default=1024, help="largest image side in pixels (default 1024)")
    ap.add_argument("--max-batch", type=int, default=4, help="most images per call (default 4; doubled for CFG)")
    ap.add_argument("--timing-cache", metavar="PATH", help="timing cache file, loaded if present and saved after")
    ap.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5 (default 3)")
    ap.add_argument("--workspace-gb", type=float, help="workspace memory limit in GiB (default: TensorRT's)")
    ap.add_argument("--components", type=_components, help=f"comma-separated subset of {','.join(COMPONENTS)}")
    ap.add_argument("--refittable", action="store_true",
                    help="build refittable plans, so Pipeline.load(loras=) / ldm generate --lora refit them at load")
    try:
        args = ap.parse_args(None if argv is None else list(argv))
    except SystemExit as e:  # argparse has printed the usage line (or --help)
        return int(e.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="build-engines: %(message)s", stream=sys.stderr)
    options = BuildOptions(min_size=args.min_size, max_size=args.max_size, max_batch=args.max_batch,
                           opt_level=args.opt_level, workspace_gb=args.workspace_gb,
                           timing_cache=args.timing_cache, components=args.components, refittable=args.refittable)
    try:
        records = build_engines(args.bundle, options)
    except TensorRTUnavailable as e:
        print(f"build-engines: {e}; nothing was built", file=sys.stderr)
        return EXIT_NO_TENSORRT
    except (BundleError, ValueError) as e:  # ProfileError is a ValueError
        print(f"build-engines: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as e:  # EngineBuildError, CUDA errors
        print(f"build-engines: {e}", file=sys.stderr)
        return EXIT_FAILED
    for r in records:
        print(f"{r['component']}: {Path(args.bundle) / r['file']} (parity rel L2 {r['parity']['worst']:.2e})")
    return EXIT_OK
