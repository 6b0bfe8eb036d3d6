"""Text-to-image and image-to-image pipelines over a bundle: diffusers' argument names, no torch.

Everything model-related comes from the manifest (latent channels, scaling factor, VAE factor,
text length, feed dtypes); engines open lazily, one per component, on first use. Randomness
comes from one ``np.random.default_rng(seed)`` per call, drawn in a fixed order (initial noise
or the img2img posterior and noise first, then the stochastic samplers' noise), so the same
seed on the same backend gives bit-identical images; a list of seeds gives each image its own
stream drawn in that order (``ldm_runtime.rng``).
"""
from __future__ import annotations

import logging
import numbers
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from . import guidance, memory
from .backends import BACKENDS, Engine, check_precision, engine_options, load_engine
from .cancel import is_token, raise_if_cancelled
from .conditioning import Conditioning
from .images import postprocess, preprocess
from .manifest import BundleError, Manifest
from .rng import ImageGenerators, call_generator
from .shapes import ShapeError, bind_shapes, size_dims
from .tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np")
FLOAT32_MAX = float(np.finfo(np.float32).max)
Callback = Callable[[int, Any, np.ndarray], None]


class PipelineInputError(ValueError):
    """An argument to a pipeline call that cannot work; raised before any model runs."""


class NonFiniteOutputError(RuntimeError):
    """A model produced NaN or Inf (typically fp16 overflow); raised instead of returning a black image."""


@dataclass
class PipelineOutput:
    """``images``: a list of PIL images, or float32 (B, H, W, 3) in [0, 1] for ``output_type="np"``.

    What the call used where it chose: ``seed`` (picked at random when none was given; with a list
    of seeds, the first image's), ``seeds`` (one per image: the int seed repeated, or the list), the
    ``scheduler`` name and the image ``height`` and ``width`` (the bundle's defaults when not given).
    """

    images: Any
    seed: int | None = None
    seeds: list[int] | None = None
    scheduler: str | None = None
    height: int | None = None
    width: int | None = None


@dataclass
class PromptEmbeddings:
    """What the text encoders give one call, one row per image: the U-Net's context ``embeds`` (N, L, D)
    and, for a bundle with a pooled text embedding (SDXL), ``pooled`` (N, P); ``negative`` and
    ``negative_pooled`` the same for the negative prompts (None without guidance)."""

    embeds: np.ndarray
    pooled: np.ndarray | None = None
    negative: np.ndarray | None = None
    negative_pooled: np.ndarray | None = None

    def unet_rows(self, time_ids: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The U-Net inputs that no step changes, one row per U-Net row ([negative; positive] with guidance):
        ``encoder_hidden_states``, and ``text_embeds`` / ``time_ids`` (from the (positive, negative) pair)
        where the bundle has them."""
        rows = {"encoder_hidden_states": guidance.cfg_embeddings(self.negative, self.embeds)}
        if self.pooled is not None:
            rows["text_embeds"] = guidance.cfg_embeddings(self.negative_pooled, self.pooled)
        if time_ids is not None:
            positive, negative = (np.tile(ids, (len(self.embeds), 1)) for ids in time_ids)
            rows["time_ids"] = guidance.cfg_embeddings(None if self.negative is None else negative, positive)
        return rows


@dataclass(frozen=True)
class CallConditioning:
    """A call's text and micro-conditioning beyond the prompts (``BasePipeline.check_conditioning``)."""

    prompts_2: list[str] | None = None
    negatives_2: list[str] | None = None
    zero_negative: bool = False
    time_ids: tuple[np.ndarray, np.ndarray] | None = None


def _scheduler_module():
    from . import schedulers  # late: a scheduler bug must not break `import ldm_runtime.pipeline`

    return schedulers


class BasePipeline:
    """What the text-to-image and image-to-image pipelines share: bundle, engines, helpers, checks."""

    required_components: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder")

    def __init__(self, manifest: Manifest, backend: str = "onnxruntime", device: str = "cpu",
                 options: Any = None, negative_cache_size: int = 32, memory_budget_bytes: int | None = None,
                 loras: Any = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        check_precision(manifest, backend)
        self.conditioning = conditioning = Conditioning.from_manifest(manifest)
        check_pipeline_kind(type(self), manifest, conditioning)
        # the text encoders are the bundle's (SDXL: two; its refiner: text_encoder_2 only)
        self.required_components = pipeline_components(conditioning, type(self).required_components)
        missing = [c for c in self.required_components if not manifest.has(c)]
        if missing:
            raise BundleError(f"{manifest.root}: {type(self).__name__} needs components {list(self.required_components)}; "
                              f"the bundle lacks {missing}")
        self.manifest = manifest
        self.backend, self.device = backend, device
        self.options = engine_options(backend, options)  # OrtOptions on onnxruntime; see backends.engine_options
        self.engines: dict[str, Engine] = {}  # opened lazily; tests and tools may swap in wrappers
        self.loras = loras  # lora_apply.BundleLoras: the LoRAs fused into the engines' weights, or None
        self._engine_lock = threading.Lock()  # held while engines open (see open_engines)
        self._input_dtypes: dict[str, tuple[Engine, dict[str, np.dtype]]] = {}  # component -> (engine, input dtypes)
        # one tokenizer per text encoder, by manifest field; ``tokenizer`` is the first encoder's
        self.tokenizers = {e.tokenizer: load_tokenizer(manifest, e.tokenizer) for e in conditioning.encoders}
        self.tokenizer = self.tokenizers[conditioning.encoders[0].tokenizer]
        # the scheduler the bundle was exported with; callers may replace name or config, as
        # diffusers users assign pipe.scheduler
        self.scheduler_name: str = manifest.scheduler_name
        self.scheduler_config: dict = manifest.scheduler_config
        self.latent_channels = manifest.latent_channels
        self.vae_scale_factor = manifest.vae_scale_factor
        self.scaling_factor = manifest.scaling_factor
        self.shift_factor = manifest.shift_factor
        self.negative_cache = guidance.EmbeddingCache(negative_cache_size)
        self.guidance_embedding_dim = guidance_embedding_dim(manifest)  # None: a U-Net guided by CFG
        # bounds (ldm_runtime/memory.py): a call whose estimate exceeds the budget is refused before any
        # model runs; engines see at most max_engine_batch images per run (fewer when the budget says so)
        if memory_budget_bytes is not None and (not _is_int(memory_budget_bytes) or memory_budget_bytes < 1):
            raise ValueError(f"memory_budget_bytes must be None or an int >= 1, got {memory_budget_bytes!r}")
        self.memory_budget_bytes: int = memory.default_budget() if memory_budget_bytes is None else memory_budget_bytes
        self.max_engine_batch: int = memory.max_engine_batch(manifest, backend)
        self.model_dims = memory.ModelDims.from_manifest(manifest, backend, device,
                                                         bool(getattr(self.options, "cpu_variant", False)))
        for field, tok in self.tokenizers.items():
            if tok.model_max_length != manifest.text_max_length:
                raise BundleError(f"{manifest.root}: {field} model_max_length {tok.model_max_length} "
                                  f"differs from text.max_length {manifest.text_max_length}")

    @classmethod
    def load(cls, bundle: str | os.PathLike, backend: str = "onnxruntime", device: str = "cpu",
             options: Any = None, memory_budget_bytes: int | None = None,
             loras: Sequence[tuple[str | os.PathLike, float]] | None = None, **option_overrides: Any):
        """Read ``bundle``'s manifest and verify (size, sha256) every file this pipeline can read.

        Engines open on first use with ``options`` (onnxruntime: an ``OrtOptions``; openvino: an
        ``OpenVinoOptions``); keywords such as ``threads=1``, ``cpu_variant=False`` or (openvino)
        ``precision="bf16"`` override single fields of it. An engine checks the
        bytes it opens again then, so a file changed after the load is refused, never run.
        ``memory_budget_bytes`` bounds what one call may need (see ``memory``; default: 75% of
        the memory available now), also settable later as ``pipe.memory_budget_bytes``.
        ``loras``: (LoRA file, scale) pairs fused into the weights now (``lora_apply``; onnxruntime and
        tensorrt); every bad file, key or scale is refused here, before any engine opens.
        """
        options = engine_options(backend, options, **option_overrides)
        manifest = Manifest.load(bundle, verify=False)
        conditioning = Conditioning.from_manifest(manifest)
        check_pipeline_kind(cls, manifest, conditioning)  # before hashing gigabytes
        check_precision(manifest, backend)
        cpu_variant = backend == "onnxruntime" and options.cpu_variant
        components = pipeline_components(conditioning, cls.required_components)
        in_use = files_in_use(manifest, components, backend, device, cpu_variant)
        verify_files(manifest, in_use)
        fused = None
        if loras:
            from .lora_apply import load_loras, lora_graphs, lora_map_files

            graphs = lora_graphs(manifest, components, backend, device, cpu_variant)
            verify_files(manifest, [f for f in lora_map_files(manifest, graphs, backend) if f not in in_use])
            fused = load_loras(manifest, loras, graphs)
        return cls(manifest, backend=backend, device=device, options=options, memory_budget_bytes=memory_budget_bytes,
                   loras=fused)

    # -- engines -------------------------------------------------------------------------------
    def engine(self, component: str) -> Engine:
        """The engine of ``component``, opened on first use."""
        eng = self.engines.get(component)
        if eng is None:
            self.open_engines((component,))
            eng = self.engines[component]
        return eng

    def open_engines(self, components: tuple[str, ...] | None = None) -> None:
        """Open ``components`` (default: ``required_components``) that are not open yet, now.

        Under a lock, so threads sharing a fresh pipeline open each engine once; on onnxruntime
        the sessions are created concurrently (session creation releases the GIL).
        """
        with self._engine_lock:
            todo = [c for c in (components or self.required_components) if c not in self.engines]
            if not todo:
                return
            logger.info("opening %s on %s/%s", ", ".join(todo), self.backend, self.device)
            if len(todo) < 2 or self.backend != "onnxruntime":
                opened = [self._load_engine(c) for c in todo]
            else:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=len(todo)) as pool:
                    opened = list(pool.map(self._load_engine, todo))
            self.engines.update(zip(todo, opened))

    def _load_engine(self, component: str) -> Engine:
        return load_engine(self.manifest, component, self.backend, self.device, self.options, loras=self.loras)

    def cast_feeds(self, component: str, feeds: dict[str, Any]) -> dict[str, Any]:
        """Feeds as contiguous arrays of ``component``'s declared input dtypes: the one place they are cast
        (engines check dtypes, never cast). Values already placed by ``to_engine`` pass as they are."""
        eng = self.engine(component)
        cached = self._input_dtypes.get(component)
        if cached is None or cached[0] is not eng:  # once per engine: this runs every step
            cached = self._input_dtypes[component] = (eng, {s.name: np.dtype(s.dtype) for s in eng.inputs})
        dtypes = cached[1]
        return {k: np.ascontiguousarray(v, dtype=dtypes.get(k, v.dtype)) if isinstance(v, np.ndarray) else v
                for k, v in feeds.items()}

    def run_engine(self, component: str, feeds: dict[str, Any], where: str = "") -> dict[str, np.ndarray]:
        """Cast feeds to the engine's dtypes, run, check outputs are finite, return float32."""
        outs = self.engine(component).run(self.cast_feeds(component, feeds))
        result = {}
        for name, v in outs.items():
            v = np.asarray(v)
            if v.dtype.kind == "f":
                if not np.isfinite(v).all():
                    n_nan, n_inf = int(np.isnan(v).sum()), int(np.isinf(v).sum())
                    raise NonFiniteOutputError(
                        f"{component} output {name!r} has {n_nan} NaN and {n_inf} Inf values of {v.size}"
                        f"{' at ' + where if where else ''} (bundle precision {self.manifest.precision}, "
                        f"backend {self.backend}); {self._nonfinite_cause()}")
                v = v.astype(np.float32, copy=False)
            result[name] = v
        return result

    def _nonfinite_cause(self) -> str:
        """The likely cause of a NaN or Inf model output, for ``NonFiniteOutputError``."""
        if self.manifest.precision == "fp16":
            return "fp16 overflow is the usual cause: try an fp32 bundle"
        settings = {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                    **{f"scheduler config {k}": v for k, v in self.scheduler_config.items() if isinstance(v, float)}}
        bad = [f"{k}={v!r}" for k, v in settings.items() if not np.isfinite(v)]
        if bad:
            return f"the likely cause is a non-finite config value: {', '.join(bad)}"
        return ("on an fp32 bundle the likely cause is an extreme input (latents, an image) or non-finite "
                "weights in the exported model, not fp16 overflow")

    def engine_shapes(self, num_prompts: int, batch_size: int, height: int, width: int, guided: bool,
                      num_images: int = 1) -> dict[str, dict[str, tuple[int, ...]]]:
        """The input shapes each component of the bundle will be fed in one call, bound from its manifest
        inputs (text encoders: the prompts, and negatives; U-Net: times its ``batch_mult`` when guided)."""
        rows = {**{c: num_prompts for c in self.conditioning.components},
                "unet": batch_size * (self.manifest.component("unet").batch_mult if guided else 1),
                "vae_decoder": batch_size, "vae_encoder": num_images}
        size = size_dims(height, width, self.vae_scale_factor)
        shapes = {}
        for comp, b in rows.items():
            if self.manifest.has(comp):
                try:
                    shapes[comp] = bind_shapes(self.manifest.component(comp).inputs, B=b, **size)
                except ShapeError as e:
                    raise BundleError(f"{self.manifest.root}: manifest components.{comp}: {e}") from None
        return shapes

    def check_engine_shapes(self, shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
        """Hook for backends with fixed shape ranges (TensorRT profiles): refuse sizes before anything runs.

        An engine that has ``check_shapes(shapes: dict[input name, tuple]) -> None`` is asked about the
        shapes this call will feed it (it raises ValueError to refuse); onnxruntime and OpenVINO take
        any shape, so their engines are not opened early.
        """
        if self.backend in ("onnxruntime", "openvino"):
            return
        for comp, feeds in shapes.items():
            check = getattr(self.engine(comp), "check_shapes", None)
            if check is not None:
                check(feeds)

    def to_engine(self, component: str, name: str, arr: np.ndarray) -> Any:
        """Cast ``arr`` to input ``name``'s dtype and, where the engine can, place it on its device once
        (onnxruntime CUDA: an OrtValue), for inputs that stay the same over the whole loop."""
        arr = self.cast_feeds(component, {name: arr})[name]
        to_device = getattr(self.engine(component), "to_device", None)
        return to_device(arr) if to_device is not None else arr

    # -- helpers (diffusers' names) ------------------------------------------------------------
    def _token_ids(self, texts: list[list[str]]) -> np.ndarray:
        """Each text encoder's token ids of its texts (``texts[i]`` for encoder i), side by side: (N, k * L) int64."""
        ids = [self.tokenizers[e.tokenizer](t) for e, t in zip(self.conditioning.encoders, texts)]
        return ids[0] if len(ids) == 1 else np.concatenate(ids, axis=1)

    def _packed_embeddings(self, ids: np.ndarray, engine_batch: int | None = None) -> np.ndarray:
        """(N, k * L) ids from ``_token_ids`` -> (N, L * D [+ P]) float32 through the text encoders, ``engine_batch``
        rows per run (None: all): their hidden states joined along the width (D in all), flat, then the pooled
        embedding where the bundle has one (``_unpack`` splits them again; one row per prompt for the cache)."""
        hidden, pooled = [], []
        for entry, part in zip(self.conditioning.encoders, np.split(ids, len(self.conditioning.encoders), axis=1)):
            outs = [self.run_engine(entry.component, {"input_ids": part[rows]}, where="encode_prompt")
                    for rows in _row_slices(len(part), engine_batch)]
            hidden.append(_cat([o[entry.hidden] for o in outs]))
            if entry.pooled:
                pooled.append(_cat([o[entry.pooled] for o in outs]))
        h = hidden[0] if len(hidden) == 1 else np.concatenate(hidden, axis=-1)
        flat = h.reshape(len(h), -1)
        return np.concatenate([flat, *pooled], axis=1) if pooled else flat

    def _unpack(self, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``_packed_embeddings`` rows -> (hidden states (N, L, D), pooled (N, P) or None)."""
        n, size = len(packed), self.manifest.text_max_length * self.manifest.text_hidden_size
        hidden = packed[:, :size].reshape(n, self.manifest.text_max_length, self.manifest.text_hidden_size)
        return hidden, (packed[:, size:] if self.conditioning.pooled else None)

    def encode_prompt(self, prompts: list[str], num_images_per_prompt: int = 1,
                      negative_prompts: list[str] | None = None, engine_batch: int | None = None, *,
                      prompts_2: list[str] | None = None, negative_prompts_2: list[str] | None = None,
                      zero_negative: bool = False) -> "PromptEmbeddings":
        """Prompts -> their ``PromptEmbeddings``, each (B * n, ...) (diffusers' ``encode_prompt``).

        ``negative_prompts``: one per prompt (``guidance.negative_prompts``), or None without
        guidance. Rows are repeated per image: prompt 0 n times, then prompt 1, ... (as diffusers).
        A second text encoder (SDXL) reads ``prompts_2`` / ``negative_prompts_2`` (None: the same
        texts as the first). ``zero_negative``: all-zero negative embeddings and pooled embedding
        instead of encoding the negatives (SDXL's ``force_zeros_for_empty_prompt`` when no negative
        prompt was given). Negative embeddings come through ``negative_cache``. The text encoders
        see at most ``engine_batch`` prompts per run (None: all at once).
        """
        n = num_images_per_prompt
        embeds, pooled = self._unpack(self._packed_embeddings(self._token_ids([prompts, prompts_2 or prompts]),
                                                              engine_batch))
        out = PromptEmbeddings(_repeat(embeds, n), _repeat(pooled, n))
        if negative_prompts is None:
            return out
        if zero_negative:
            out.negative = np.zeros_like(out.embeds)
            out.negative_pooled = None if out.pooled is None else np.zeros_like(out.pooled)
            return out
        ids = self._token_ids([negative_prompts, negative_prompts_2 or negative_prompts])
        negative, negative_pooled = self._unpack(
            self.negative_cache.encode(ids, lambda rows: self._packed_embeddings(rows, engine_batch)))
        out.negative, out.negative_pooled = _repeat(negative, n), _repeat(negative_pooled, n)
        return out

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        return (batch_size, self.latent_channels, height // f, width // f)

    def prepare_latents(self, batch_size: int, height: int, width: int, rng: np.random.Generator | ImageGenerators,
                        latents: np.ndarray | None = None, init_noise_sigma: float = 1.0) -> np.ndarray:
        """z_T: ``latents`` or float32 standard normals from ``rng`` (one generator for the batch, or one per
        image: ``ldm_runtime.rng``), times the scheduler's initial sigma."""
        if latents is None:
            latents = rng.standard_normal(self.latent_shape(batch_size, height, width), dtype=np.float32)
        return latents * np.float32(init_noise_sigma)

    def decode_latents(self, latents: np.ndarray, engine_batch: int | None = None) -> np.ndarray:
        """Scaled latents (B, C, h, w) -> image (B, 3, H, W) in about [-1, 1], ``engine_batch`` rows per run."""
        z = latents / np.float32(self.scaling_factor)
        if self.shift_factor:
            z = z + np.float32(self.shift_factor)
        image = _cat([self.run_engine("vae_decoder", {"latent": z[rows]}, where="decode")["image"]
                      for rows in _row_slices(len(z), engine_batch)])
        self.check_vae_factor("vae_decoder", image.shape[2:], latents.shape[2:])
        return image

    def check_vae_factor(self, component: str, pixels: tuple[int, ...], latent: tuple[int, ...]) -> None:
        """The VAE's real spatial factor (image size / latent size) must be the manifest's: a wrong
        ``latent.vae_scale_factor`` would otherwise give images of the wrong size without a word."""
        f = self.vae_scale_factor
        if tuple(pixels) != tuple(n * f for n in latent):
            raise BundleError(f"{self.manifest.root}: manifest field latent.vae_scale_factor is {f}, but {component} "
                              f"maps latents {list(latent)} to pixels {list(pixels)}")

    def _unet(self, x: np.ndarray, t: Any, conds: list[tuple[slice, dict[str, Any]]], step: int) -> np.ndarray:
        """One U-Net pass over the rows of ``x``, one run per (rows, their constant feeds) in ``conds``."""
        outs = []
        for rows, cond in conds:
            xs = x[rows]
            feeds = {"sample": xs, "timestep": np.full((len(xs),), t, dtype=np.float32), **cond}
            outs.append(self.run_engine("unet", feeds, where=f"step {step} (timestep {t})")["out_sample"])
        return _cat(outs)

    def _constant_unet_feeds(self, rows: dict[str, np.ndarray], scales: np.ndarray | None) -> dict[str, Any]:
        """The U-Net feeds of these rows that no step changes, on the engine: ``rows`` (the text embeddings;
        SDXL: also ``text_embeds`` and ``time_ids``) and, for a U-Net that embeds the guidance scale, its
        ``timestep_cond`` from ``scales`` (one per row)."""
        feeds = {name: self.to_engine("unet", name, arr) for name, arr in rows.items()}
        if scales is not None:
            w = guidance.guidance_scale_embedding(scales, self.guidance_embedding_dim)
            feeds["timestep_cond"] = self.to_engine("unet", "timestep_cond", w)
        return feeds

    def denoise(self, latents: np.ndarray, timesteps: np.ndarray, sched: Any, cond: dict[str, np.ndarray],
                cfg: guidance.Guidance, rng: np.random.Generator | ImageGenerators,
                callback: Callback | None = None, engine_batch: int | None = None,
                step_kwargs: dict[str, Any] | None = None, cancel: Any = None) -> np.ndarray:
        """The sampling loop: scale input, one (guided) U-Net pass, scheduler step; returns z_0.

        ``cond``: the U-Net's inputs that stay the same over the loop, one row per U-Net row
        (``PromptEmbeddings.unet_rows``). A pass runs the U-Net on at most ``engine_batch`` images (2x
        rows with guidance) at a time (None: all); the scheduler steps the whole batch, so its noise
        draws do not depend on the split.
        ``step_kwargs`` go to every scheduler step (``scheduler_step_kwargs``: tcd's eta). ``cancel``
        (see ``ldm_runtime.cancel``) is looked at before every step: once set, ``Cancelled`` is raised.
        """
        user_steps = sched.user_steps  # the callback ticks once per inference step, not per warm-up call
        total = int(sum(user_steps))
        rows = None if engine_batch is None else engine_batch * (2 if cfg.enabled else 1)
        # the embeddings are the same for every step: cast (and placed on the device) once per engine batch
        n = len(cond["encoder_hidden_states"])
        scales = cfg.row_scales(n) if cfg.embedded else None  # embedded: never guided, one row per image
        conds = [(r, self._constant_unet_feeds({k: v[r] for k, v in cond.items()},
                                               None if scales is None else scales[r]))
                 for r in _row_slices(n, rows)]
        step = [0]  # the model function reads the step index for its error messages
        # cfg_denoiser hands its cond on to the model function; _unet takes the per-batch conds instead
        denoise = guidance.cfg_denoiser(lambda x, t, c: self._unet(x, t, conds, step[0]), cond, cfg)
        tick = 0
        for i, t in enumerate(timesteps):
            raise_if_cancelled(cancel, f"step {tick + 1} of {total}")
            step[0] = i
            noise_pred = denoise(sched.scale_model_input(latents, t), t)
            latents = np.asarray(sched.step(noise_pred, t, latents, generator=rng, **(step_kwargs or {})),
                                 dtype=np.float32)
            if callback is not None and user_steps[i]:
                callback(tick, t, latents)
                tick += 1
        return latents

    # -- input checks and the scheduler (all before any model runs) ----------------------------
    def call_guidance(self, guidance_scale: float | list[float], guidance_rescale: float = 0.0,
                      num_images_per_prompt: int = 1) -> guidance.Guidance:
        """The call's guidance: classifier-free, or (a U-Net with ``timestep_cond``) embedded, never unconditional.
        A list of scales (one per prompt) becomes one scale per image."""
        scale = (tuple(float(s) for s in guidance_scale for _ in range(num_images_per_prompt))
                 if isinstance(guidance_scale, (list, tuple)) else guidance_scale)
        return guidance.Guidance(scale, guidance_rescale, embedded=self.guidance_embedding_dim is not None)

    def check_conditioning(self, num_prompts: int, *, negative_prompt: Any, prompt_2: Any, negative_prompt_2: Any,
                           height: int, width: int, micro: dict[str, Any]) -> "CallConditioning":
        """Check the second prompts and the micro-conditioning against the bundle (``PipelineInputError``)."""
        second = [(name, v) for name, v in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2))
                  if v is not None]
        if second and len(self.conditioning.encoders) < 2:
            raise PipelineInputError(f"{second[0][0]} is the text for a second text encoder, but this bundle has one "
                                     f"({self.conditioning.encoders[0].component}); leave it out")
        prompts_2, negatives_2 = (None if v is None else _per_prompt(v, num_prompts, name)
                                  for name, v in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)))
        try:
            time_ids = self.conditioning.time_ids_pair(height, width, micro,
                                                       img2img=isinstance(self, Img2ImgPipeline))
        except BundleError:
            raise
        except ValueError as e:
            raise PipelineInputError(str(e)) from None
        zero = negative_prompt is None and self.conditioning.force_zeros_for_empty_prompt
        return CallConditioning(prompts_2, negatives_2, zero, time_ids)

    def prompt_conditioning(self, prompts: list[str], negatives: list[str], num_images_per_prompt: int,
                            cfg: guidance.Guidance, engine_batch: int,
                            extra: "CallConditioning") -> dict[str, np.ndarray]:
        """2. encode the prompts: the U-Net's constant inputs of the call (``PromptEmbeddings.unet_rows``)."""
        text = self.encode_prompt(prompts, num_images_per_prompt, negatives if cfg.enabled else None, engine_batch,
                                  prompts_2=extra.prompts_2, negative_prompts_2=extra.negatives_2,
                                  zero_negative=extra.zero_negative)
        return text.unet_rows(extra.time_ids)

    def _check_common(self, *, prompt: Any, negative_prompt: Any, num_inference_steps: Any, guidance_scale: Any,
                      guidance_rescale: Any, num_images_per_prompt: Any, seed: Any, output_type: Any,
                      callback: Any, cancel: Any = None) -> tuple[list[str], list[str]]:
        """The checks both pipelines share; returns (prompts, one negative prompt per prompt)."""
        prompts = _prompt_list(prompt)
        try:
            negatives = guidance.negative_prompts(negative_prompt, len(prompts))
        except (TypeError, ValueError) as e:
            raise PipelineInputError(str(e)) from None
        _check_encodable(prompts, "prompt")
        _check_encodable(negatives, "negative_prompt")
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise PipelineInputError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise PipelineInputError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        self._check_guidance_scale(guidance_scale, len(prompts))
        if not isinstance(guidance_rescale, numbers.Real) or not 0.0 <= float(guidance_rescale) <= 1.0:
            raise PipelineInputError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        if self.guidance_embedding_dim is not None:
            self._check_embedded_guidance(negative_prompt, guidance_rescale)
        _check_seed(seed, len(prompts) * num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise PipelineInputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if callback is not None and not callable(callback):
            raise PipelineInputError(f"callback must be callable(step, timestep, latents), got {type(callback).__name__}")
        if not is_token(cancel):
            raise PipelineInputError(f"cancel must be None or an object with a bool attribute 'cancelled' (such as "
                                     f"ldm_runtime.cancel.CancelToken), got {type(cancel).__name__}")
        return prompts, negatives

    def _check_guidance_scale(self, guidance_scale: Any, num_prompts: int) -> None:
        """A finite float32 number, or a list of one per prompt; a list for classifier-free guidance must be
        all guided (> 1) or all unguided (<= 1): the two run different U-Net batches."""
        scales = guidance_scale if isinstance(guidance_scale, (list, tuple)) else [guidance_scale]
        if isinstance(guidance_scale, (list, tuple)) and len(guidance_scale) != num_prompts:
            raise PipelineInputError(f"guidance_scale has {len(guidance_scale)} entries but there are {num_prompts} "
                                     "prompts; pass one scale per prompt, or a single number for all")
        for s in scales:
            if not isinstance(s, numbers.Real) or not abs(float(s)) <= FLOAT32_MAX:
                raise PipelineInputError(f"guidance_scale must be a finite number within float32's range "
                                         f"(|s| <= {FLOAT32_MAX:.3g}; the U-Net's outputs are scaled by it), or a list "
                                         f"of one per prompt, got {guidance_scale!r}")
        guided = {float(s) > 1.0 for s in scales}
        if len(guided) > 1 and self.guidance_embedding_dim is None:
            raise PipelineInputError(f"guidance_scale {list(guidance_scale)} mixes guided (> 1) and unguided (<= 1) "
                                     "scales; one call runs all its prompts with classifier-free guidance or none: "
                                     "split the call")

    def _check_embedded_guidance(self, negative_prompt: Any, guidance_rescale: float) -> None:
        """A U-Net that embeds the guidance scale runs no unconditional pass (as diffusers' LCM pipelines):
        a negative prompt has nothing to act on (a warning), and there is no CFG result to rescale (an error)."""
        if guidance_rescale:
            raise PipelineInputError(f"guidance_rescale must be 0 for this bundle, got {guidance_rescale!r}: its U-Net "
                                     "takes the guidance scale as an input (timestep_cond) and runs no "
                                     "classifier-free guidance to rescale")
        if negative_prompt is not None:
            logger.warning("negative prompt ignored: this bundle's U-Net takes the guidance scale as an input "
                           "(timestep_cond, an LCM-distilled model) and runs no unconditional pass")

    def _check_size(self, height: Any, width: Any) -> None:
        f = self.vae_scale_factor
        for what, v in (("height", height), ("width", width)):
            if not _is_int(v) or v < f or v % f:
                raise PipelineInputError(f"{what} must be a positive multiple of {f} (the VAE's spatial factor), got {v!r}")

    def prepare_scheduler(self, scheduler: str | None, num_inference_steps: int, strength: float | None = None) -> Any:
        """The call's one scheduler: ``scheduler`` (None: the bundle's) built and set to ``num_inference_steps``
        (img2img: its ``img2img_timesteps`` for ``strength``; ``run_timesteps`` are the ones to run).

        Building the schedule is pure numpy, so config and step-count problems surface here, as
        ``PipelineInputError``, before any model runs.
        """
        name = self.scheduler_name if scheduler is None else scheduler
        valid = _scheduler_module().SCHEDULERS
        if not isinstance(name, str) or name not in valid:
            raise PipelineInputError(f"unknown scheduler {name!r}; expected one of {', '.join(valid)}")
        try:
            sched = _scheduler_module().make_scheduler(name, self.scheduler_config)
            if strength is None:
                sched.set_timesteps(num_inference_steps)
            else:
                sched.img2img_timesteps(num_inference_steps, strength)
        except ValueError as e:
            raise PipelineInputError(f"scheduler {name!r}: {e}") from None
        return sched

    def scheduler_step_kwargs(self, sched: Any, eta: Any) -> dict[str, Any]:
        """What the call's ``eta`` gives each step of ``sched`` (tcd: eta in [0, 1]; the others take only 0)."""
        try:
            return sched.step_kwargs(eta)
        except ValueError as e:
            raise PipelineInputError(str(e)) from None

    def plan_memory(self, call: memory.CallShape) -> int:
        """The engine batch (images per engine run) for ``call``; ``PipelineInputError`` when the memory
        estimate is above ``memory_budget_bytes`` even at one image per run (see ``memory``)."""
        budget = self.memory_budget_bytes
        plan = memory.plan(self.model_dims, call, budget, self.max_engine_batch)
        if plan.engine_batch == 0:
            raise PipelineInputError(memory.refusal(plan, call, budget))
        return plan.engine_batch

    def _output(self, latents: np.ndarray, output_type: str, seeds: list[int], sched: Any, height: int, width: int,
                engine_batch: int | None = None) -> PipelineOutput:
        """6. decode, 7. postprocess, and what the call used."""
        images = postprocess(self.decode_latents(latents, engine_batch), output_type)
        return PipelineOutput(images=images, seed=seeds[0], seeds=seeds, scheduler=sched.name, height=height,
                              width=width)


class Pipeline(BasePipeline):
    """Text to image: ``Pipeline.load(bundle)(prompt, ...)``; see ``__call__``."""

    def check_inputs(self, *, prompt: Any, negative_prompt: Any, height: Any, width: Any, num_inference_steps: Any,
                     guidance_scale: Any, guidance_rescale: Any, num_images_per_prompt: Any, seed: Any,
                     latents: Any, output_type: Any, callback: Any, cancel: Any = None) -> tuple[list[str], list[str]]:
        """Raise ``PipelineInputError`` for any argument that cannot work; return (prompts, negative prompts)."""
        prompts, negatives = self._check_common(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, seed=seed, output_type=output_type, callback=callback,
            cancel=cancel)
        self._check_size(height, width)
        if latents is not None:
            self._check_latents(latents, self.latent_shape(len(prompts) * num_images_per_prompt, height, width))
        return prompts, negatives

    def _check_latents(self, latents: Any, want: tuple[int, ...]) -> None:
        if not isinstance(latents, np.ndarray) or latents.dtype != np.float32 or latents.shape != want:
            got = f"{latents.dtype} {list(latents.shape)}" if isinstance(latents, np.ndarray) else type(latents).__name__
            raise PipelineInputError(f"latents must be float32 {list(want)} (batch = prompts x num_images_per_prompt, "
                                     f"channels, height/{self.vae_scale_factor}, width/{self.vae_scale_factor}), got {got}")
        if not np.isfinite(latents).all():
            raise PipelineInputError("latents contain NaN or Inf")

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float | list[float] = 7.5,
        guidance_rescale: float = 0.0,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        callback: Callback | None = None,
        eta: float = 0.0,
        cancel: Any = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
    ) -> PipelineOutput:
        """Generate images from text; argument names and meanings follow diffusers' StableDiffusionPipeline.

        guidance_scale <= 1 disables classifier-free guidance (one B-row U-Net call per step);
        above 1 each step is one U-Net call on [negative; prompt] (2B rows). A bundle whose U-Net takes
        ``timestep_cond`` (LCM-distilled) gets the scale as that embedding instead: B rows, no negative
        prompt (as diffusers' LCM pipelines). ``latents`` is z_T
        before scheduler scaling, float32 (B * num_images_per_prompt, C, height/f, width/f).
        ``callback(step, timestep, latents)`` runs once per inference step. Without ``seed``,
        ``height`` or ``width`` the call picks them and reports them in the output. ``eta`` is
        tcd's gamma in [0, 1] (0: deterministic, diffusers' pipeline default); other schedulers take 0.
        ``cancel``: None, or an object with a ``cancelled`` bool (``ldm_runtime.cancel.CancelToken``)
        that another thread may set; it is looked at before the text encoder, before every denoise step
        and before the VAE decoder, and once set the call raises ``ldm_runtime.cancel.Cancelled``
        (saying where, e.g. "cancelled before step 3 of 20") and runs nothing further.

        Batches of unlike requests: ``seed`` may be a list of one int per image (prompts x
        num_images_per_prompt, prompt-major), and image i is then the image of the one-prompt,
        one-image call with ``seed=seed[i]`` (its own random stream, see ``ldm_runtime.rng``);
        ``guidance_scale`` may be a list of one float per prompt, all above 1 or all at most 1
        (a U-Net that embeds the scale takes any mix). An int seed draws one stream for the batch.

        SDXL bundles take diffusers' StableDiffusionXLPipeline arguments too: ``prompt_2`` /
        ``negative_prompt_2`` for the second text encoder (None: ``prompt`` / ``negative_prompt``),
        and the micro-conditioning ``original_size``, ``crops_coords_top_left``, ``target_size``
        and their ``negative_*`` counterparts (see ``ldm_runtime.conditioning``). With
        ``negative_prompt=None`` a bundle that says ``force_zeros_for_empty_prompt`` guides with
        all-zero negative embeddings, as diffusers; ``negative_prompt=""`` encodes the empty prompt.
        """
        # 1. check inputs, build the scheduler (nothing runs before both pass)
        dh, dw = self.manifest.default_size
        height, width = (dh if height is None else height), (dw if width is None else width)
        prompts, negatives = self.check_inputs(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, seed=seed, latents=latents, output_type=output_type,
            callback=callback, cancel=cancel)
        extra = self.check_conditioning(
            len(prompts), negative_prompt=negative_prompt, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            height=height, width=width,
            micro=dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                       target_size=target_size, negative_original_size=negative_original_size,
                       negative_crops_coords_top_left=negative_crops_coords_top_left,
                       negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                       negative_aesthetic_score=negative_aesthetic_score))
        sched = self.prepare_scheduler(scheduler, num_inference_steps)
        step_kwargs = self.scheduler_step_kwargs(sched, eta)
        cfg = self.call_guidance(guidance_scale, guidance_rescale, num_images_per_prompt)
        batch = len(prompts) * num_images_per_prompt
        engine_batch = self.plan_memory(memory.CallShape(len(prompts), batch, height, width, cfg.enabled))
        shapes = self.engine_shapes(min(len(prompts), engine_batch), min(batch, engine_batch), height, width, cfg.enabled)
        self.check_engine_shapes({k: v for k, v in shapes.items() if k != "vae_encoder"})
        seeds, rng = call_generator(seed, batch)
        raise_if_cancelled(cancel, "the text encoder")
        # together, on the first call
        self.open_engines(tuple(c for c in self.required_components if c != "vae_encoder"))

        # 2. encode prompt: (B*n, L, D), and the [negative; prompt] batch when guided (SDXL: with pooled, time ids)
        cond = self.prompt_conditioning(prompts, negatives, num_images_per_prompt, cfg, engine_batch, extra)

        # 3. timesteps (of the scheduler built in step 1)
        timesteps = sched.timesteps

        # 4. prepare latents
        z = self.prepare_latents(batch, height, width, rng, latents, sched.init_noise_sigma)

        # 5. denoise loop
        z = self.denoise(z, timesteps, sched, cond, cfg, rng, callback, engine_batch, step_kwargs, cancel)

        # 6. decode, 7. postprocess
        raise_if_cancelled(cancel, "the VAE decoder")
        return self._output(z, output_type, seeds, sched, height, width, engine_batch)


class Img2ImgPipeline(BasePipeline):
    """Image to image (SDEdit, Meng et al. 2022): encode the image, noise it to an intermediate step, denoise."""

    required_components = ("text_encoder", "unet", "vae_decoder", "vae_encoder")

    def encode_image(self, image: np.ndarray, rng: np.random.Generator | ImageGenerators,
                     engine_batch: int | None = None) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] -> scaled latents: a posterior draw mean + exp(logvar/2) * eps, eps from ``rng``
        (drawn for the whole batch, whatever ``engine_batch``: the images per encoder run). With per-image
        generators (``ldm_runtime.rng``) each output image draws its own eps: the B images' latents are
        repeated to one row per generator first (images in prompt order, as ``np.repeat``)."""
        outs = [self.run_engine("vae_encoder", {"image": image[rows]}, where="encode_image")
                for rows in _row_slices(len(image), engine_batch)]
        mean, logvar = _cat([o["mean"] for o in outs]), _cat([o["logvar"] for o in outs])
        self.check_vae_factor("vae_encoder", image.shape[2:], mean.shape[2:])
        if isinstance(rng, ImageGenerators):
            rows = np.repeat(np.arange(len(mean)), len(rng) // len(mean))
            mean, logvar = mean[rows], logvar[rows]
        logvar = np.clip(logvar, -30.0, 20.0)
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        z = mean + np.exp(np.float32(0.5) * logvar) * eps
        if self.shift_factor:
            z = z - np.float32(self.shift_factor)
        return z * np.float32(self.scaling_factor)

    def check_inputs(self, *, prompt: Any, image: Any, strength: Any, negative_prompt: Any, num_inference_steps: Any,
                     guidance_scale: Any, guidance_rescale: Any, num_images_per_prompt: Any, seed: Any,
                     output_type: Any, callback: Any, cancel: Any = None) -> tuple[list[str], list[str], np.ndarray]:
        """Raise ``PipelineInputError`` for any argument that cannot work; return (prompts, negative prompts,
        the image(s) as float32 (Bi, 3, H, W) in [-1, 1])."""
        prompts, negatives = self._check_common(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, seed=seed, output_type=output_type, callback=callback,
            cancel=cancel)
        dims = _image_dims(image)
        if dims is not None:  # refuse an image too large before converting it (preprocess copies it several times)
            count, h, w = dims
            self.plan_memory(memory.CallShape(len(prompts), len(prompts) * num_images_per_prompt, h, w,
                                              self.call_guidance(guidance_scale, 0.0, num_images_per_prompt).enabled,
                                              count))
        try:
            pixels = preprocess(image, self.vae_scale_factor)
        except (TypeError, ValueError) as e:
            raise PipelineInputError(str(e)) from None
        if pixels.shape[0] not in (1, len(prompts)):
            raise PipelineInputError(f"got {pixels.shape[0]} images for {len(prompts)} prompts; "
                                     "pass one image for all prompts or one per prompt")
        if not isinstance(strength, numbers.Real) or not 0.0 < float(strength) <= 1.0:
            raise PipelineInputError(f"strength must be in (0, 1], got {strength!r}")
        return prompts, negatives, pixels

    def __call__(
        self,
        prompt: str | list[str],
        image: Any,
        strength: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float | list[float] = 7.5,
        guidance_rescale: float = 0.0,
        scheduler: str | None = None,
        num_images_per_prompt: int = 1,
        seed: int | list[int] | None = None,
        output_type: str = "pil",
        callback: Callback | None = None,
        eta: float = 0.0,
        cancel: Any = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
    ) -> PipelineOutput:
        """Transform ``image`` (PIL, list of PIL, uint8 or float [0, 1] array, (H, W, 3) or (B, H, W, 3)) along ``prompt``.

        ``strength`` in (0, 1] (default: diffusers' for the bundle's pipeline, 0.3 for SDXL, else 0.8)
        is the fraction of the schedule that is re-run: the image is noised
        to the first kept timestep, and int(num_inference_steps * strength) steps denoise it, as
        in diffusers' StableDiffusionImg2ImgPipeline (lcm: strength cuts its distillation grid and
        all the steps run, as in LatentConsistencyModelImg2ImgPipeline). The output size is the
        image's size. ``eta``, ``cancel``, a list of seeds (each image's posterior draw and noise
        from its own stream) and a list of guidance scales as in ``Pipeline.__call__``, and so are the
        SDXL arguments, with ``aesthetic_score`` (6.0) / ``negative_aesthetic_score`` (2.5) in place of
        the target sizes for a bundle that requires them (the SDXL refiner).
        """
        # 1. check inputs, build the scheduler
        if strength is None:  # StableDiffusionXLImg2ImgPipeline's default, else StableDiffusionImg2ImgPipeline's
            strength = 0.3 if self.conditioning.pooled is not None else 0.8
        prompts, negatives, pixels = self.check_inputs(
            prompt=prompt, image=image, strength=strength, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, seed=seed, output_type=output_type, callback=callback,
            cancel=cancel)
        extra = self.check_conditioning(
            len(prompts), negative_prompt=negative_prompt, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            height=pixels.shape[2], width=pixels.shape[3],
            micro=dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                       target_size=target_size, negative_original_size=negative_original_size,
                       negative_crops_coords_top_left=negative_crops_coords_top_left,
                       negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                       negative_aesthetic_score=negative_aesthetic_score))
        sched = self.prepare_scheduler(scheduler, num_inference_steps, strength)
        step_kwargs = self.scheduler_step_kwargs(sched, eta)
        cfg = self.call_guidance(guidance_scale, guidance_rescale, num_images_per_prompt)
        height, width = pixels.shape[2:]
        batch = len(prompts) * num_images_per_prompt
        engine_batch = self.plan_memory(memory.CallShape(len(prompts), batch, height, width, cfg.enabled, len(pixels)))
        self.check_engine_shapes(self.engine_shapes(min(len(prompts), engine_batch), min(batch, engine_batch), height,
                                                    width, cfg.enabled, min(len(pixels), engine_batch)))
        seeds, rng = call_generator(seed, batch)
        raise_if_cancelled(cancel, "the text encoder")
        self.open_engines()  # together, on the first call

        # 2. encode prompt
        cond = self.prompt_conditioning(prompts, negatives, num_images_per_prompt, cfg, engine_batch, extra)

        # 3. timesteps: the part of the schedule that strength keeps (set in step 1)
        timesteps = sched.run_timesteps

        # 4. prepare latents: posterior draw of the image(s), repeated per image, noised to the first kept step
        z0 = self.encode_image(pixels, rng, engine_batch)
        z0 = np.repeat(z0, batch // z0.shape[0], axis=0)
        noise = rng.standard_normal(z0.shape, dtype=np.float32)
        z = np.asarray(sched.add_noise(z0, noise, timesteps[:1]), dtype=np.float32)

        # 5. denoise loop
        z = self.denoise(z, timesteps, sched, cond, cfg, rng, callback, engine_batch, step_kwargs, cancel)

        # 6. decode, 7. postprocess
        raise_if_cancelled(cancel, "the VAE decoder")
        return self._output(z, output_type, seeds, sched, height, width, engine_batch)


def load_tokenizer(manifest: Manifest, field: str = "tokenizer") -> CLIPTokenizer:
    """The bundle's tokenizer in manifest field ``field`` (SDXL's second: ``tokenizer_2``) from its verified
    files; an absent field or a file that does not parse is a ``BundleError``."""
    entry = manifest.data.get(field)
    if not isinstance(entry, dict):
        raise BundleError(f"{manifest.root}: manifest field {field}: missing (a text encoder reads it)")
    try:
        return CLIPTokenizer.from_manifest_entry(manifest.root, entry, manifest.read_verified)
    except BundleError:
        raise
    except ValueError as e:
        raise BundleError(f"{manifest.root}: manifest field {field}: {e}") from None


def pipeline_components(conditioning: Conditioning, components: tuple[str, ...]) -> tuple[str, ...]:
    """A pipeline class's ``components`` with its ``text_encoder`` replaced by the bundle's text encoders."""
    out: list[str] = []
    for c in components:
        out += conditioning.components if c == "text_encoder" else (c,)
    return tuple(out)


def check_pipeline_kind(cls: type, manifest: Manifest, conditioning: Conditioning) -> None:
    """Refuse text to image on a bundle made for image to image only (an SDXL refiner)."""
    if conditioning.img2img_only and not issubclass(cls, Img2ImgPipeline):
        raise PipelineInputError(f"{manifest.root}: this bundle is an image-to-image model (conditioning.pipeline "
                                 f"{conditioning.pipeline}, such as an SDXL refiner) and cannot make images from "
                                 "text; use Img2ImgPipeline with an image")


def guidance_embedding_dim(manifest: Manifest) -> int | None:
    """The width of the U-Net's ``timestep_cond`` input (an LCM-distilled model's guidance embedding), or
    None when its manifest inputs have none."""
    spec = {s.name: s for s in manifest.component("unet").inputs}.get("timestep_cond")
    if spec is None:
        return None
    if len(spec.shape) != 2 or not _is_int(spec.shape[1]) or spec.shape[1] < 4:
        raise BundleError(f"{manifest.root}: manifest field components.unet.inputs: timestep_cond must have shape "
                          f"[batch, width >= 4], got {list(spec.shape)}")
    return int(spec.shape[1])


def files_in_use(manifest: Manifest, components: tuple[str, ...], backend: str, device: str,
                 cpu_variant: bool = True) -> list[str]:
    """The bundle files a pipeline of ``components`` on ``backend``/``device`` reads, and no others.

    The tokenizer's files, then each component's as its backend opens it (``component_files``).
    Every name is checked to lie inside the bundle (``Manifest.path``, naming its manifest field);
    the names come from the fields that point at them, so ``files`` must list each (see ``verify_files``).
    """
    fields = dict.fromkeys(e.tokenizer for e in Conditioning.from_manifest(manifest).encoders)
    named = [(rel, f"{field}.{key}") for field in fields for key in ("vocab", "merges")
             if isinstance(manifest.data.get(field), dict) and (rel := manifest.data[field].get(key)) is not None]
    for comp in (c for c in components if c in manifest.data["components"]):
        named += component_files(manifest, comp, backend, device, cpu_variant)
    for rel, field in named:
        manifest.path(rel, field=field)
    return list(dict.fromkeys(rel for rel, _ in named))


def component_files(manifest: Manifest, component: str, backend: str, device: str,
                    cpu_variant: bool = True) -> list[tuple[Any, str]]:
    """(file, manifest field) of what ``backend`` reads to open ``component`` on ``device``: on onnxruntime
    a graph and its external data (``graph_files``; on the CPU the ``cpu_variant`` where the bundle has
    one and ``cpu_variant`` is true), on OpenVINO the portable graph and its external data, on TensorRT
    its plans (``plan_files``)."""
    if backend == "onnxruntime":
        return graph_files(manifest, component, device == "cpu" and cpu_variant)
    if backend == "openvino":
        return graph_files(manifest, component, cpu_variant=False)
    if backend == "tensorrt":
        return plan_files(manifest, component)
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def graph_files(manifest: Manifest, component: str, cpu_variant: bool) -> list[tuple[Any, str]]:
    """(file, manifest field) of the ONNX graph onnxruntime opens for ``component`` and its external data
    (the ``cpu_variant`` one when asked and the bundle has one, else the portable graph)."""
    entry, where = manifest.data["components"][component], f"components.{component}"
    if cpu_variant and (entry.get("cpu_variant") or {}).get("file"):
        entry, where = entry["cpu_variant"], f"{where}.cpu_variant"
    data = entry.get("external_data") or []
    return [(entry.get("file"), f"{where}.file"), *((f, f"{where}.external_data[{i}]") for i, f in enumerate(data))]


def plan_files(manifest: Manifest, component: str) -> list[tuple[Any, str]]:
    """(file, manifest field) of the TensorRT plans of ``component`` built from the bundle's ONNX graph as
    it is now (one per GPU and TensorRT version built for; the engine opens the one for this machine).
    TensorRT reads neither the ONNX graphs nor their weights."""
    from .backends.tensorrt import component_onnx_sha256

    current = component_onnx_sha256(manifest.data, component)
    engines = manifest.data.get("engines") or {}
    return [(rec.get("file"), f"engines.{key}.file") for key, rec in engines.items()
            if isinstance(rec, dict) and rec.get("component") == component and rec.get("onnx_sha256") == current]


def verify_files(manifest: Manifest, names: list[str]) -> None:
    """``manifest.verify_files`` for ``names``, hashed in parallel (hashlib releases the GIL), in order of errors."""
    from concurrent.futures import ThreadPoolExecutor

    if len(names) <= 1:
        manifest.verify_files(names)
        return
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1, 4)) as pool:
        for _ in pool.map(lambda n: manifest.verify_files([n]), names):
            pass


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _prompt_list(prompt: Any, what: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)):
        raise PipelineInputError(f"{what} must be a str or a list of str, got {type(prompt).__name__}")
    if not prompt:
        raise PipelineInputError(f"{what} is an empty list; pass at least one prompt")
    if not all(isinstance(p, str) for p in prompt):
        raise PipelineInputError(f"{what} must be a str or a list of str, got items of type "
                                 f"{sorted({type(p).__name__ for p in prompt})}")
    return list(prompt)


def _per_prompt(texts: Any, num_prompts: int, what: str) -> list[str]:
    """A text argument for every prompt: a str (the same for all) or a list of one str per prompt."""
    listed = _prompt_list(texts, what)
    if isinstance(texts, str):
        listed *= num_prompts
    elif len(listed) != num_prompts:
        raise PipelineInputError(f"{what} has {len(listed)} entries but there are {num_prompts} prompts; "
                                 "pass one per prompt, or a single str for all")
    _check_encodable(listed, what)
    return listed


def _check_encodable(texts: list[str], what: str) -> None:
    """Refuse text the tokenizer cannot turn into UTF-8 bytes: a lone surrogate, such as a
    command line's undecodable byte (``"\\udc80"``)."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f"{what}[{i}]" if len(texts) > 1 else what
            raise PipelineInputError(f"{where} is not valid Unicode text: {text[e.start:e.end]!r} at position {e.start} "
                                     "is a lone surrogate (an undecodable byte?)") from None


def _row_slices(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``n`` rows (None: one slice of all)."""
    step = max(1, n if size is None else size)
    return [slice(i, i + step) for i in range(0, n, step)] or [slice(0, 0)]


def _repeat(rows: np.ndarray | None, n: int) -> np.ndarray | None:
    """Each row ``n`` times in a row (prompt 0 n times, then prompt 1, ...); None stays None."""
    return None if rows is None else np.repeat(rows, n, axis=0)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    """Engine batch outputs joined along rows; a single one as it is (no copy)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _image_dims(image: Any) -> tuple[int, int, int] | None:
    """(images, height, width) of an img2img ``image`` from its size alone, before any conversion; None for
    what ``preprocess`` does not take (it says why)."""
    from PIL import Image

    first = image[0] if isinstance(image, (list, tuple)) and image else image
    count = len(image) if isinstance(image, (list, tuple)) else 1
    if isinstance(first, Image.Image):
        return count, first.height, first.width
    if isinstance(image, np.ndarray) and image.ndim in (3, 4):
        return (1 if image.ndim == 3 else image.shape[0]), image.shape[-3], image.shape[-2]
    return None


def _check_seed(seed: Any, batch: int) -> None:
    """None, an int >= 0, or a list of one int >= 0 per image (``batch``: prompts x num_images_per_prompt)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise PipelineInputError(f"seed has {len(seed)} entries but the call makes {batch} images "
                                     "(prompts x num_images_per_prompt); pass one seed per image, or a single int")
        bad = [(i, s) for i, s in enumerate(seed) if not _is_int(s) or s < 0]
        if bad:
            raise PipelineInputError(f"seed must be a list of ints >= 0, got {bad[0][1]!r} at index {bad[0][0]}")
    elif seed is not None and (not _is_int(seed) or seed < 0):
        raise PipelineInputError(f"seed must be None or an int >= 0 (or a list of one per image), got {seed!r}")


# diffusers' name for the text-to-image pipeline
StableDiffusionPipeline = Pipeline
