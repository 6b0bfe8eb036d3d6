"""Memory bounds of a pipeline call: the budget, an estimate made before any model runs, the engine batch.

At its peak a call holds two kinds of memory:

- buffers that grow with the whole call (``call_buffers``): the latents and their copies in the
  sampling loop, the prompt embeddings, the decoded images and their conversion to the output
  type, and an img2img input image with its conversion;
- the working memory (activations) of engine runs (``working_memory``), which grows with the
  engine batch only: the pipeline feeds each engine at most ``engine_batch`` images at a time
  (twice as many U-Net rows with guidance) and loops. onnxruntime's CPU arenas keep each
  engine's peak, so the four engines' working memories add up.

Activations are not in the manifest: ``Activations`` is a per-pixel model. Its figures are 1.5x
the larger of two measurements of peak RSS (``VmHWM``) over single onnxruntime CPU fp32 runs, on
the tiny test bundle (tests/conftest.py) and the shipped default bundle, 64 to 1024 px:

=========================  ==================  ===========  ============  ===========
per row                    scales with         tiny         default       model
=========================  ==================  ===========  ============  ===========
text encoder               text length x dim   61 B         73 B          110 B
U-Net, fused attention     latent pixel        1.96 KB      1.2 KB        3 KB
U-Net, unfused attention   latent pixel^2      16.1 B       1.04 B        24 B
VAE decoder                output pixel        257 B        1.06 KB       1.6 KB
VAE encoder                input pixel         222 B        401 B         600 B
VAE, unfused attention     latent pixel^2      7.5 B        (none)        11 B
=========================  ==================  ===========  ============  ===========

Attention without a fused kernel holds (tokens x tokens) scores per head, quadratic in pixels:
the estimate adds that term for each graph the manifest does not record as fused (a CPU
variant with ``fused_attention`` > 0 is; TensorRT builds fuse attention themselves). Models
much wider than these two (Stable Diffusion's 320-1280 channel U-Net) need more per pixel than
this model says; the budget still bounds the inputs that grow without limit (images per call,
size), which is what it is for. The budget is host memory: on CUDA (onnxruntime's CUDA provider,
TensorRT) the activations live on the device, so there only the call's host buffers count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .manifest import Manifest

BUDGET_FRACTION = 0.75  # of the memory available when the pipeline is made
FALLBACK_BUDGET = 4 << 30  # where the available memory cannot be read
DEFAULT_MAX_ENGINE_BATCH = 8  # images per engine run when the manifest records no maximum
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: memory.max and memory.current

LATENT_COPIES = 10  # B-row latent buffers alive in the loop: z, scaled input, [z; z], 2B predictions, history, noise
EMBEDDING_COPIES = 6  # B-row embedding buffers: prompt and negative embeddings, repeated, and the 2B [neg; pos]
OUTPUT_BYTES_PER_PIXEL = 72  # decoded float32 RGB, the engine batches joined, postprocess copies, uint8, PIL
INPUT_BYTES_PER_PIXEL = 72  # img2img: the RGB conversion, float32 copies in preprocess, the [-1, 1] array
FLOAT = 4  # bytes of a float32


@dataclass(frozen=True)
class Activations:
    """Peak working bytes of one engine run, per row, by what they scale with (see the module docstring)."""

    text_per_token_dim: float = 110.0
    unet_per_latent_pixel: float = 3000.0
    unet_attention_per_latent_pixel2: float = 24.0
    decoder_per_pixel: float = 1600.0
    encoder_per_pixel: float = 600.0
    vae_attention_per_latent_pixel2: float = 11.0


ACTIVATIONS = Activations()


@dataclass(frozen=True)
class ModelDims:
    """What the estimate reads from the manifest, and which graphs in use have fused attention."""

    latent_channels: int
    vae_scale_factor: int
    text_length: int
    text_hidden: int  # the U-Net's context width: with two text encoders (SDXL), theirs summed
    fused: frozenset[str]  # components whose graph in use runs attention fused
    on_device: bool = False  # the engines' working memory is GPU memory, outside the host budget
    added_cond: int = 0  # floats per row of the U-Net's other constant inputs (SDXL: text_embeds, time_ids)

    @classmethod
    def from_manifest(cls, manifest: Manifest, backend: str, device: str, cpu_variant: bool) -> "ModelDims":
        comps = manifest.data["components"]
        if backend == "tensorrt":
            fused = frozenset(comps)
        elif backend == "onnxruntime" and device == "cpu" and cpu_variant:
            fused = frozenset(c for c, entry in comps.items()
                              if isinstance(entry, dict) and _fused_attention(entry.get("cpu_variant")) > 0)
        else:
            fused = frozenset()
        return cls(manifest.latent_channels, manifest.vae_scale_factor, manifest.text_max_length,
                   manifest.text_hidden_size, fused, on_device=backend == "tensorrt" or device == "cuda",
                   added_cond=_added_cond(manifest))


def _added_cond(manifest: Manifest) -> int:
    """Floats per row of the U-Net's ``text_embeds`` and ``time_ids`` inputs (0 where it has none)."""
    unet = manifest.data["components"].get("unet") or {}
    widths = [s["shape"][1] for s in unet.get("inputs") or ()
              if isinstance(s, dict) and s.get("name") in ("text_embeds", "time_ids")
              and len(s.get("shape") or ()) == 2]
    return sum(w for w in widths if isinstance(w, int))


def _fused_attention(variant: object) -> int:
    n = variant.get("fused_attention", 0) if isinstance(variant, dict) and variant.get("file") else 0
    return n if isinstance(n, int) else 0


@dataclass(frozen=True)
class CallShape:
    """What a call asks for: prompts, images (prompts x num_images_per_prompt), size, guidance, img2img inputs."""

    prompts: int
    images: int
    height: int
    width: int
    guided: bool
    init_images: int = 0  # img2img input images; 0 for text to image


def call_buffers(dims: ModelDims, call: CallShape) -> dict[str, int]:
    """Bytes of the buffers that grow with the whole call, by what they hold."""
    latent_pixels = (call.height // dims.vae_scale_factor) * (call.width // dims.vae_scale_factor)
    pixels = call.height * call.width
    return {
        "latents": LATENT_COPIES * call.images * dims.latent_channels * latent_pixels * FLOAT,
        "embeddings": EMBEDDING_COPIES * call.images * (dims.text_length * dims.text_hidden + dims.added_cond)
        * FLOAT,
        "images": OUTPUT_BYTES_PER_PIXEL * call.images * pixels + INPUT_BYTES_PER_PIXEL * call.init_images * pixels,
    }


def working_memory(dims: ModelDims, call: CallShape, engine_batch: int, act: Activations = ACTIVATIONS) -> int:
    """Host bytes of the four engines' working memory with at most ``engine_batch`` images per engine run
    (none when the engines run on a GPU: their working memory is on the device)."""
    if dims.on_device:
        return 0
    latent_pixels = (call.height // dims.vae_scale_factor) * (call.width // dims.vae_scale_factor)
    pixels = call.height * call.width
    images = min(engine_batch, call.images)

    def attention(component: str, per_pixel2: float) -> float:
        return 0.0 if component in dims.fused else per_pixel2 * latent_pixels**2

    text = min(engine_batch, call.prompts) * act.text_per_token_dim * dims.text_length * dims.text_hidden
    unet = (2 if call.guided else 1) * images * (
        act.unet_per_latent_pixel * latent_pixels + attention("unet", act.unet_attention_per_latent_pixel2))
    decoder = images * (act.decoder_per_pixel * pixels + attention("vae_decoder", act.vae_attention_per_latent_pixel2))
    encoder = min(engine_batch, call.init_images) * (
        act.encoder_per_pixel * pixels + attention("vae_encoder", act.vae_attention_per_latent_pixel2))
    return int(text + unet + decoder + encoder)


@dataclass(frozen=True)
class MemoryPlan:
    """``engine_batch``: images per engine run (0: even one does not fit); ``need``: the estimate at that batch
    (at batch 1 when refused); ``buffers`` and ``working``: its two parts."""

    engine_batch: int
    need: int
    buffers: int
    working: int


def plan(dims: ModelDims, call: CallShape, budget: int, max_engine_batch: int,
         act: Activations = ACTIVATIONS) -> MemoryPlan:
    """The largest engine batch (at most ``max_engine_batch`` and the call's images) whose estimate fits ``budget``."""
    buffers = sum(call_buffers(dims, call).values())

    def fits(batch: int) -> bool:
        return buffers + working_memory(dims, call, batch, act) <= budget

    if not fits(1):
        one = working_memory(dims, call, 1, act)
        return MemoryPlan(0, buffers + one, buffers, one)
    lo, hi = 1, max(1, min(max_engine_batch, call.images))
    while lo < hi:  # working memory grows with the batch: bisect for the largest that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    working = working_memory(dims, call, lo, act)
    return MemoryPlan(lo, buffers + working, buffers, working)


def refusal(plan: MemoryPlan, call: CallShape, budget: int) -> str:
    """The one-line error for a call whose estimate is above ``budget``."""
    return (f"this call needs an estimated {human_bytes(plan.need)} of memory ({call.images} image(s) of "
            f"{call.height}x{call.width}: {human_bytes(plan.buffers)} for latents, embeddings and images, "
            f"{human_bytes(plan.working)} engine working memory at one image per engine run), more than the "
            f"memory budget of {human_bytes(budget)}; lower the number of prompts, num_images_per_prompt or the "
            "size, or raise the budget: Pipeline.load(..., memory_budget_bytes=N) or pipe.memory_budget_bytes = N")


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} EiB"


# -- the budget ------------------------------------------------------------------------------------

def default_budget() -> int:
    """``BUDGET_FRACTION`` of the memory available now (``available_memory``), or ``FALLBACK_BUDGET``."""
    avail = available_memory()
    return FALLBACK_BUDGET if avail is None else int(BUDGET_FRACTION * avail)


def available_memory() -> int | None:
    """Bytes this process can still get: MemAvailable (else ``os.sysconf``), capped by a cgroup v2 limit."""
    found = [v for v in (_meminfo_available() or _sysconf_available(), _cgroup_room()) if v is not None]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sysconf_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_room() -> int | None:
    """memory.max - memory.current of this cgroup (v2), or None without a limit."""
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def max_engine_batch(manifest: Manifest, backend: str) -> int:
    """Images per engine run at most: on TensorRT the smallest ``max_batch`` the bundle's plans were built
    for, else ``DEFAULT_MAX_ENGINE_BATCH``."""
    if backend == "tensorrt":
        engines = manifest.data.get("engines") or {}
        built = [rec["build"]["max_batch"] for rec in engines.values()
                 if isinstance(rec, dict) and isinstance(rec.get("build"), dict)
                 and isinstance(rec["build"].get("max_batch"), int) and rec["build"]["max_batch"] >= 1]
        if built:
            return min(built)
    return DEFAULT_MAX_ENGINE_BATCH
