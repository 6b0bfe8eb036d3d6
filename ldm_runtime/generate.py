"""``ldm generate BUNDLE "PROMPT" ...``: text to PNG files that carry their generation parameters.

Every PNG holds a ``parameters`` text chunk (JSON: prompt, negative prompt, seed, steps,
scheduler, guidance, size, batch position, bundle hash; the SDXL arguments where given), enough
to reproduce it exactly on the same backend. Without ``--seed`` a seed is picked and recorded.
Exit 0 and the paths on stdout; bad input (an argument, the bundle, ``--out``) gives one line on
stderr and exit 2; a failed run (NaN output) or an unexpected internal error one line and exit 1
(``--debug``: the traceback too).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

from . import __version__
from .cliargs import ArgumentParser, UsageError, one_line

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="ldm generate", description="Generate images from a prompt with a bundle (no torch).")
    p.add_argument("bundle", help="bundle folder (with manifest.json)")
    p.add_argument("prompt")
    p.add_argument("--negative-prompt", default=None)
    sdxl = p.add_argument_group("SDXL bundles", "StableDiffusionXLPipeline's arguments (default: diffusers')")
    sdxl.add_argument("--prompt-2", default=None, help="the second text encoder's prompt (default: PROMPT)")
    sdxl.add_argument("--negative-prompt-2", default=None, help="its negative prompt (default: --negative-prompt)")
    for name, what in SDXL_PAIRS.items():
        sdxl.add_argument(f"--{name.replace('_', '-')}", type=int_pair, default=None, metavar=what)
    for name in AESTHETIC_SCORES:
        sdxl.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                          help="refiner bundles (default: 6.0 / 2.5)")
    p.add_argument("--steps", type=int, default=30, help="number of inference steps (default 30)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="<= 1 disables classifier-free guidance")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--scheduler", default=None, help="scheduler name (default: the bundle's)")
    p.add_argument("--eta", type=float, default=0.0, help="tcd's stochasticity (gamma) in [0, 1] (default 0)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: picked and recorded in the PNG)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the bundle's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the bundle's)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--lora", action="append", type=lora_arg, default=[], metavar="FILE[:SCALE]",
                   help="a LoRA safetensors file fused into the weights at load, at SCALE (default 1.0); repeatable")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt", "openvino"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend option, repeatable: threads=2; openvino: precision=f32|bf16, cache_dir=DIR; "
                        "onnxruntime: cpu_variant=false, ...")
    p.add_argument("--out", default=".",
                   help="a .png file name, or a folder (a name ending in / always is; default: the current folder)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    return p


SDXL_PAIRS = {"original_size": "H,W", "crops_coords_top_left": "Y,X", "target_size": "H,W",
              "negative_original_size": "H,W", "negative_crops_coords_top_left": "Y,X", "negative_target_size": "H,W"}
AESTHETIC_SCORES = ("aesthetic_score", "negative_aesthetic_score")
SDXL_ARGS = ("prompt_2", "negative_prompt_2", *SDXL_PAIRS, *AESTHETIC_SCORES)


def int_pair(text: str) -> tuple[int, int]:
    """``"H,W"`` -> (H, W): two integers separated by a comma."""
    parts = text.split(",")
    try:
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected two integers as A,B, got {text!r}")


def sdxl_arguments(a: argparse.Namespace) -> dict[str, Any]:
    """The SDXL arguments given on the command line (``SDXL_ARGS``), by their pipeline names."""
    return {name: getattr(a, name) for name in SDXL_ARGS if getattr(a, name) is not None}


def lora_arg(value: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (file, scale): the text after the last colon is the scale when it is a number."""
    file, sep, tail = value.rpartition(":")
    if sep and file:
        try:
            return file, float(tail)
        except ValueError:
            pass
    return value, 1.0


class ProgressBar:
    """A one-line text progress bar on a terminal (``\\r`` redraws); silent when ``stream`` is not a TTY."""

    def __init__(self, total: int, stream: IO[str] | None = None, width: int = 30, label: str = "sampling"):
        self.total, self.width, self.label = total, width, label
        self.stream = sys.stderr if stream is None else stream
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()

    def __call__(self, step: int, timestep: Any = None, latents: Any = None) -> None:
        if not self.enabled:
            return
        done = min(step + 1, self.total)
        filled = int(self.width * done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                          f"{rate:.2f} it/s")
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()


class OutputPathError(ValueError):
    """An ``--out`` that cannot be written to; found before any model runs."""


def output_target(out: str) -> tuple[Path, bool]:
    """``--out`` -> (path, is_folder), checked and its folder made before anything is generated.

    A name ending in .png is a file, unless it ends in a slash; anything else is a folder.
    """
    path, is_folder = Path(out), out.endswith(("/", os.sep)) or Path(out).suffix.lower() != ".png"
    folder = path if is_folder else path.parent
    for p in (folder, *folder.parents):  # the nearest existing ancestor must be a folder
        if p.exists():
            if not p.is_dir():
                raise OutputPathError(f"--out {out!r}: {str(p)!r} is a file, not a folder")
            break
    if not is_folder and path.is_dir():
        raise OutputPathError(f"--out {out!r} is a folder; end it with '/' to write into it")
    folder.mkdir(parents=True, exist_ok=True)
    return path, is_folder


def output_paths(path: Path, is_folder: bool, seed: int, n: int) -> list[Path]:
    """The PNG names: ``ldm-<seed>-<i>.png`` in a folder; a file name as given (with -<i> before the suffix when n > 1)."""
    if is_folder:
        return [path / f"ldm-{seed}-{i}.png" for i in range(n)]
    return [path] if n == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"ldm generate: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = generate(a)
    except (ValueError, OSError) as e:  # bad input: BundleError, PipelineInputError, an --out path
        print(f"ldm generate: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # RuntimeError: NonFiniteOutputError, an engine's failure; else a bug
        if a.debug:
            traceback.print_exc()
        if isinstance(e, RuntimeError):
            print(f"ldm generate: failed: {one_line(e)}", file=sys.stderr)
        else:
            print(f"ldm generate: internal error: {type(e).__name__}: {one_line(e)}"
                  f"{'' if a.debug else ' (rerun with --debug for the traceback)'}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def generate(a: argparse.Namespace) -> list[Path]:
    """Check ``--out``, load the bundle, generate, save: the saved paths."""
    from .images import save_png
    from .pipeline import Pipeline

    from .cliargs import parse_engine_options

    target, is_folder = output_target(a.out)
    try:
        options = parse_engine_options(a.engine_option)
    except UsageError as e:
        raise ValueError(str(e)) from None
    try:
        pipe = Pipeline.load(a.bundle, backend=a.backend, device=a.device, loras=a.lora, **options)
    except TypeError as e:  # an option the backend does not have
        raise ValueError(str(e)) from None
    out = pipe(a.prompt, negative_prompt=a.negative_prompt, num_inference_steps=a.steps,
               guidance_scale=a.guidance_scale, guidance_rescale=a.guidance_rescale, scheduler=a.scheduler or None,
               height=a.height, width=a.width, num_images_per_prompt=a.num_images, seed=a.seed,
               callback=ProgressBar(a.steps), eta=a.eta, **sdxl_arguments(a))
    params = png_parameters(pipe, prompt=a.prompt, negative_prompt=a.negative_prompt, seed=out.seed, steps=a.steps,
                            scheduler=out.scheduler, eta=a.eta, guidance_scale=a.guidance_scale,
                            guidance_rescale=a.guidance_rescale, height=out.height, width=out.width,
                            num_images=a.num_images, sdxl=sdxl_arguments(a))
    names = output_paths(target, is_folder, out.seed, len(out.images))
    return [save_png(image, path, {**params, "index": i}) for i, (image, path) in enumerate(zip(out.images, names))]


def png_parameters(pipe: Any, *, prompt: str, negative_prompt: str | None, seed: int, steps: int, scheduler: str,
                   eta: float, guidance_scale: float, guidance_rescale: float, height: int, width: int,
                   num_images: int, sdxl: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``parameters`` chunk of a generated PNG (without ``index``, its batch position): what the call
    used, defaults and a picked seed included, and the bundle, backend and device it ran on; ``sdxl``:
    the SDXL arguments that were given (``SDXL_ARGS``; sizes as [a, b]), the others being diffusers' defaults."""
    return {
        "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
        "scheduler": scheduler, "eta": eta, "guidance_scale": guidance_scale,
        "guidance_rescale": guidance_rescale, "height": height, "width": width, "num_images": num_images,
        "bundle": pipe.manifest.sha256, "precision": pipe.manifest.precision, "backend": pipe.backend,
        "device": pipe.device, "ldm_runtime": __version__, **arithmetic(pipe),
        **{k: list(v) if isinstance(v, tuple) else v for k, v in (sdxl or {}).items()},
        **({"loras": lora_parameters(pipe.loras)} if getattr(pipe, "loras", None) is not None else {}),
    }


def arithmetic(pipe: Any) -> dict[str, Any]:
    """What the engines compute in where it is not the manifest's precision: the int8 components of an
    ``ldm quantize`` bundle, and OpenVINO's compiled precision (bf16 on a CPU that has it)."""
    out: dict[str, Any] = {}
    if pipe.manifest.int8_components:
        out["int8_components"] = list(pipe.manifest.int8_components)
    if pipe.backend == "openvino":
        out["openvino_precision"] = pipe.options.precision
    return out


def lora_parameters(loras: Any) -> list[dict[str, Any]]:
    """The LoRAs fused into a pipeline (``lora_apply.BundleLoras``), as PNG parameters and ``ldm bench``
    record them: file name, sha256 and scale, in the order applied."""
    return [{"file": Path(a.path).name, "sha256": a.sha256, "scale": a.scale} for a in loras.applied]


if __name__ == "__main__":
    sys.exit(main())
