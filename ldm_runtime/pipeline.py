"""Text-to-image and image-to-image pipelines over a bundle: diffusers' argument names, no torch.

Everything model-related comes from the manifest (latent channels, scaling factor, VAE factor,
text length, feed dtypes); engines open lazily, one per component, on first use. Randomness
comes from one ``np.random.default_rng(seed)`` per call, drawn in a fixed order (initial noise
or the img2img posterior and noise first, then the stochastic samplers' noise), so the same
seed on the same backend gives bit-identical images.
"""
from __future__ import annotations

import logging
import numbers
import os
import secrets
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import guidance
from .backends import BACKENDS, Engine, engine_options, load_engine
from .images import postprocess, preprocess
from .manifest import BundleError, Manifest
from .tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np")
Callback = Callable[[int, Any, np.ndarray], None]


class PipelineInputError(ValueError):
    """An argument to a pipeline call that cannot work; raised before any model runs."""


class NonFiniteOutputError(RuntimeError):
    """A model produced NaN or Inf (typically fp16 overflow); raised instead of returning a black image."""


@dataclass
class PipelineOutput:
    """``images``: a list of PIL images, or float32 (B, H, W, 3) in [0, 1] for ``output_type="np"``.

    What the call used where it chose: ``seed`` (picked at random when none was given), the
    ``scheduler`` name and the image ``height`` and ``width`` (the bundle's defaults when not given).
    """

    images: Any
    seed: int | None = None
    scheduler: str | None = None
    height: int | None = None
    width: int | None = None


def _scheduler_module():
    from . import schedulers  # late: a scheduler bug must not break `import ldm_runtime.pipeline`

    return schedulers


class BasePipeline:
    """What the text-to-image and image-to-image pipelines share: bundle, engines, helpers, checks."""

    required_components: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder")

    def __init__(self, manifest: Manifest, backend: str = "onnxruntime", device: str = "cpu",
                 options: Any = None, negative_cache_size: int = 32):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        missing = [c for c in self.required_components if not manifest.has(c)]
        if missing:
            raise BundleError(f"{manifest.root}: {type(self).__name__} needs components {list(self.required_components)}; "
                              f"the bundle lacks {missing}")
        self.manifest = manifest
        self.backend, self.device = backend, device
        self.options = engine_options(backend, options)  # OrtOptions on onnxruntime; see backends.engine_options
        self.engines: dict[str, Engine] = {}  # opened lazily; tests and tools may swap in wrappers
        self._input_dtypes: dict[str, tuple[Engine, dict[str, np.dtype]]] = {}  # component -> (engine, input dtypes)
        self.tokenizer = CLIPTokenizer.from_manifest_entry(manifest.root, manifest.tokenizer)
        # the scheduler the bundle was exported with; callers may replace name or config, as
        # diffusers users assign pipe.scheduler
        self.scheduler_name: str = manifest.scheduler_name
        self.scheduler_config: dict = manifest.scheduler_config
        self.latent_channels = manifest.latent_channels
        self.vae_scale_factor = manifest.vae_scale_factor
        self.scaling_factor = manifest.scaling_factor
        self.shift_factor = manifest.shift_factor
        self.negative_cache = guidance.EmbeddingCache(negative_cache_size)
        if self.tokenizer.model_max_length != manifest.text_max_length:
            raise BundleError(f"{manifest.root}: tokenizer model_max_length {self.tokenizer.model_max_length} "
                              f"differs from text.max_length {manifest.text_max_length}")

    @classmethod
    def load(cls, bundle: str | os.PathLike, backend: str = "onnxruntime", device: str = "cpu",
             options: Any = None, **option_overrides: Any):
        """Read ``bundle``'s manifest and verify (size, sha256) every file this pipeline can read.

        Engines open on first use with ``options`` (onnxruntime: an ``OrtOptions``); keywords such
        as ``threads=1`` or ``cpu_variant=False`` override single fields of it.
        """
        options = engine_options(backend, options, **option_overrides)
        manifest = Manifest.load(bundle, verify=False)
        cpu_variant = backend == "onnxruntime" and options.cpu_variant
        verify_files(manifest, files_in_use(manifest, cls.required_components, backend, device, cpu_variant))
        return cls(manifest, backend=backend, device=device, options=options)

    # -- engines -------------------------------------------------------------------------------
    def engine(self, component: str) -> Engine:
        """The engine of ``component``, opened on first use."""
        eng = self.engines.get(component)
        if eng is None:
            logger.info("opening %s on %s/%s", component, self.backend, self.device)
            eng = load_engine(self.manifest, component, self.backend, self.device, self.options)
            self.engines[component] = eng
        return eng

    def open_engines(self, components: tuple[str, ...] | None = None) -> None:
        """Open ``components`` (default: ``required_components``) that are not open yet, now.

        On onnxruntime the sessions are created concurrently: session creation releases the GIL.
        """
        todo = [c for c in (components or self.required_components) if c not in self.engines]
        if len(todo) < 2 or self.backend != "onnxruntime":
            for c in todo:
                self.engine(c)
            return
        from concurrent.futures import ThreadPoolExecutor

        logger.info("opening %s on %s/%s", ", ".join(todo), self.backend, self.device)
        with ThreadPoolExecutor(max_workers=len(todo)) as pool:
            opened = list(pool.map(lambda c: load_engine(self.manifest, c, self.backend, self.device, self.options),
                                   todo))
        for c, eng in zip(todo, opened):
            self.engines.setdefault(c, eng)

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
                        f"backend {self.backend}); fp16 overflow is the usual cause: try an fp32 bundle")
                v = v.astype(np.float32, copy=False)
            result[name] = v
        return result

    def engine_shapes(self, num_prompts: int, batch_size: int, height: int, width: int, guided: bool,
                      num_images: int = 1) -> dict[str, dict[str, tuple[int, ...]]]:
        """The input shapes each component will be fed in one call (text encoder: prompts, and negatives)."""
        f, L = self.vae_scale_factor, self.manifest.text_max_length
        h, w, c = height // f, width // f, self.latent_channels
        bu = 2 * batch_size if guided else batch_size
        hidden = self.manifest.text_hidden_size
        return {
            "text_encoder": {"input_ids": (num_prompts, L)},
            "unet": {"sample": (bu, c, h, w), "timestep": (bu,), "encoder_hidden_states": (bu, L, hidden)},
            "vae_decoder": {"latent": (batch_size, c, h, w)},
            "vae_encoder": {"image": (num_images, 3, height, width)},
        }

    def check_engine_shapes(self, shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
        """Hook for backends with fixed shape ranges (TensorRT profiles): refuse sizes before anything runs.

        An engine that has ``check_shapes(shapes: dict[input name, tuple]) -> None`` is asked about the
        shapes this call will feed it (it raises ValueError to refuse); onnxruntime takes any shape,
        so its engines are not opened early.
        """
        if self.backend == "onnxruntime":
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
    def _text_embeddings(self, ids: np.ndarray) -> np.ndarray:
        """(N, L) int64 -> (N, L, D) float32 through the text encoder."""
        return self.run_engine("text_encoder", {"input_ids": ids}, where="encode_prompt")["last_hidden_state"]

    def encode_prompt(self, prompts: list[str], num_images_per_prompt: int = 1,
                      negative_prompts: list[str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompts -> (prompt_embeds, negative_prompt_embeds or None), each (B * n, L, D).

        ``negative_prompts``: one per prompt (``guidance.negative_prompts``), or None without
        guidance. Rows are repeated per image: prompt 0 n times, then prompt 1, ... (as diffusers).
        Negative embeddings come through ``negative_cache``.
        """
        embeds = np.repeat(self._text_embeddings(self.tokenizer(prompts)), num_images_per_prompt, axis=0)
        if negative_prompts is None:
            return embeds, None
        negative = self.negative_cache.encode(self.tokenizer(negative_prompts), self._text_embeddings)
        return embeds, np.repeat(negative, num_images_per_prompt, axis=0)

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        return (batch_size, self.latent_channels, height // f, width // f)

    def prepare_latents(self, batch_size: int, height: int, width: int, rng: np.random.Generator,
                        latents: np.ndarray | None = None, init_noise_sigma: float = 1.0) -> np.ndarray:
        """z_T: ``latents`` or float32 standard normals from ``rng``, times the scheduler's initial sigma."""
        if latents is None:
            latents = rng.standard_normal(self.latent_shape(batch_size, height, width), dtype=np.float32)
        return latents * np.float32(init_noise_sigma)

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents (B, C, h, w) -> image (B, 3, H, W) in about [-1, 1]."""
        z = latents / np.float32(self.scaling_factor)
        if self.shift_factor:
            z = z + np.float32(self.shift_factor)
        return self.run_engine("vae_decoder", {"latent": z}, where="decode")["image"]

    def _unet(self, x: np.ndarray, t: Any, cond: np.ndarray, step: int) -> np.ndarray:
        timestep = np.full((x.shape[0],), t, dtype=np.float32)
        feeds = {"sample": x, "timestep": timestep, "encoder_hidden_states": cond}
        return self.run_engine("unet", feeds, where=f"step {step} (timestep {t})")["out_sample"]

    def denoise(self, latents: np.ndarray, timesteps: np.ndarray, sched: Any, embeds: np.ndarray,
                cfg: guidance.Guidance, rng: np.random.Generator,
                callback: Callback | None = None) -> np.ndarray:
        """The sampling loop: scale input, one (guided) U-Net call, scheduler step; returns z_0."""
        user_steps = sched.user_steps  # the callback ticks once per inference step, not per warm-up call
        embeds = self.to_engine("unet", "encoder_hidden_states", embeds)  # the same for every step
        step = [0]  # the model function reads the step index for its error messages
        denoise = guidance.cfg_denoiser(lambda x, t, c: self._unet(x, t, c, step[0]), embeds, cfg)
        tick = 0
        for i, t in enumerate(timesteps):
            step[0] = i
            noise_pred = denoise(sched.scale_model_input(latents, t), t)
            latents = np.asarray(sched.step(noise_pred, t, latents, generator=rng), dtype=np.float32)
            if callback is not None and user_steps[i]:
                callback(tick, t, latents)
                tick += 1
        return latents

    # -- input checks and the scheduler (all before any model runs) ----------------------------
    def _check_common(self, *, prompt: Any, negative_prompt: Any, num_inference_steps: Any, guidance_scale: Any,
                      guidance_rescale: Any, num_images_per_prompt: Any, seed: Any, output_type: Any,
                      callback: Any) -> tuple[list[str], list[str]]:
        """The checks both pipelines share; returns (prompts, one negative prompt per prompt)."""
        prompts = _prompt_list(prompt)
        try:
            negatives = guidance.negative_prompts(negative_prompt, len(prompts))
        except (TypeError, ValueError) as e:
            raise PipelineInputError(str(e)) from None
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise PipelineInputError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise PipelineInputError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        if not isinstance(guidance_scale, numbers.Real) or not np.isfinite(float(guidance_scale)):
            raise PipelineInputError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if not isinstance(guidance_rescale, numbers.Real) or not 0.0 <= float(guidance_rescale) <= 1.0:
            raise PipelineInputError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise PipelineInputError(f"seed must be None or an int >= 0, got {seed!r}")
        if output_type not in OUTPUT_TYPES:
            raise PipelineInputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if callback is not None and not callable(callback):
            raise PipelineInputError(f"callback must be callable(step, timestep, latents), got {type(callback).__name__}")
        return prompts, negatives

    def _check_size(self, height: Any, width: Any) -> None:
        f = self.vae_scale_factor
        for what, v in (("height", height), ("width", width)):
            if not _is_int(v) or v < f or v % f:
                raise PipelineInputError(f"{what} must be a positive multiple of {f} (the VAE's spatial factor), got {v!r}")

    def prepare_scheduler(self, scheduler: str | None, num_inference_steps: int) -> Any:
        """The call's one scheduler: ``scheduler`` (None: the bundle's) built and set to ``num_inference_steps``.

        Building the schedule is pure numpy, so config and step-count problems surface here, as
        ``PipelineInputError``, before any model runs.
        """
        name = self.scheduler_name if scheduler is None else scheduler
        valid = _scheduler_module().SCHEDULERS
        if not isinstance(name, str) or name not in valid:
            raise PipelineInputError(f"unknown scheduler {name!r}; expected one of {', '.join(valid)}")
        try:
            sched = _scheduler_module().make_scheduler(name, self.scheduler_config)
            sched.set_timesteps(num_inference_steps)
        except ValueError as e:
            raise PipelineInputError(f"scheduler {name!r}: {e}") from None
        return sched

    def _output(self, latents: np.ndarray, output_type: str, seed: int, sched: Any, height: int, width: int
                ) -> PipelineOutput:
        """6. decode, 7. postprocess, and what the call used."""
        images = postprocess(self.decode_latents(latents), output_type)
        return PipelineOutput(images=images, seed=seed, scheduler=sched.name, height=height, width=width)


class Pipeline(BasePipeline):
    """Text to image: ``Pipeline.load(bundle)(prompt, ...)``; see ``__call__``."""

    def check_inputs(self, *, prompt: Any, negative_prompt: Any, height: Any, width: Any, num_inference_steps: Any,
                     guidance_scale: Any, guidance_rescale: Any, num_images_per_prompt: Any, seed: Any,
                     latents: Any, output_type: Any, callback: Any) -> tuple[list[str], list[str]]:
        """Raise ``PipelineInputError`` for any argument that cannot work; return (prompts, negative prompts)."""
        prompts, negatives = self._check_common(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, seed=seed, output_type=output_type, callback=callback)
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
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        scheduler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        callback: Callback | None = None,
    ) -> PipelineOutput:
        """Generate images from text; argument names and meanings follow diffusers' StableDiffusionPipeline.

        guidance_scale <= 1 disables classifier-free guidance (one B-row U-Net call per step);
        above 1 each step is one U-Net call on [negative; prompt] (2B rows). ``latents`` is z_T
        before scheduler scaling, float32 (B * num_images_per_prompt, C, height/f, width/f).
        ``callback(step, timestep, latents)`` runs once per inference step. Without ``seed``,
        ``height`` or ``width`` the call picks them and reports them in the output.
        """
        # 1. check inputs, build the scheduler (nothing runs before both pass)
        dh, dw = self.manifest.default_size
        height, width = (dh if height is None else height), (dw if width is None else width)
        prompts, negatives = self.check_inputs(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, seed=seed, latents=latents, output_type=output_type,
            callback=callback)
        sched = self.prepare_scheduler(scheduler, num_inference_steps)
        cfg = guidance.Guidance(guidance_scale, guidance_rescale)
        batch = len(prompts) * num_images_per_prompt
        shapes = self.engine_shapes(len(prompts), batch, height, width, cfg.enabled)
        self.check_engine_shapes({k: v for k, v in shapes.items() if k != "vae_encoder"})
        seed = _pick_seed(seed)
        rng = np.random.default_rng(seed)
        self.open_engines(("text_encoder", "unet", "vae_decoder"))  # together, on the first call

        # 2. encode prompt: (B*n, L, D), and the [negative; prompt] batch when guided
        embeds, negative = self.encode_prompt(prompts, num_images_per_prompt, negatives if cfg.enabled else None)
        cond = guidance.cfg_embeddings(negative, embeds)

        # 3. timesteps (of the scheduler built in step 1)
        timesteps = sched.timesteps

        # 4. prepare latents
        z = self.prepare_latents(batch, height, width, rng, latents, sched.init_noise_sigma)

        # 5. denoise loop
        z = self.denoise(z, timesteps, sched, cond, cfg, rng, callback)

        # 6. decode, 7. postprocess
        return self._output(z, output_type, seed, sched, height, width)


class Img2ImgPipeline(BasePipeline):
    """Image to image (SDEdit, Meng et al. 2022): encode the image, noise it to an intermediate step, denoise."""

    required_components = ("text_encoder", "unet", "vae_decoder", "vae_encoder")

    def encode_image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] -> scaled latents: a posterior draw mean + exp(logvar/2) * eps, eps from ``rng``."""
        out = self.run_engine("vae_encoder", {"image": image}, where="encode_image")
        mean, logvar = out["mean"], np.clip(out["logvar"], -30.0, 20.0)
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        z = mean + np.exp(np.float32(0.5) * logvar) * eps
        if self.shift_factor:
            z = z - np.float32(self.shift_factor)
        return z * np.float32(self.scaling_factor)

    def check_inputs(self, *, prompt: Any, image: Any, strength: Any, negative_prompt: Any, num_inference_steps: Any,
                     guidance_scale: Any, guidance_rescale: Any, num_images_per_prompt: Any, seed: Any,
                     output_type: Any, callback: Any) -> tuple[list[str], list[str], np.ndarray]:
        """Raise ``PipelineInputError`` for any argument that cannot work; return (prompts, negative prompts,
        the image(s) as float32 (Bi, 3, H, W) in [-1, 1])."""
        prompts, negatives = self._check_common(
            prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, seed=seed, output_type=output_type, callback=callback)
        try:
            pixels = preprocess(image, self.vae_scale_factor)
        except (TypeError, ValueError) as e:
            raise PipelineInputError(str(e)) from None
        if pixels.shape[0] not in (1, len(prompts)):
            raise PipelineInputError(f"got {pixels.shape[0]} images for {len(prompts)} prompts; "
                                     "pass one image for all prompts or one per prompt")
        if not isinstance(strength, numbers.Real) or not 0.0 < float(strength) <= 1.0:
            raise PipelineInputError(f"strength must be in (0, 1], got {strength!r}")
        if int(num_inference_steps * strength) < 1:
            raise PipelineInputError(f"num_inference_steps * strength = {num_inference_steps} * {strength} < 1: "
                                     "no denoising step would run; raise either")
        return prompts, negatives, pixels

    def __call__(
        self,
        prompt: str | list[str],
        image: Any,
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        scheduler: str | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        output_type: str = "pil",
        callback: Callback | None = None,
    ) -> PipelineOutput:
        """Transform ``image`` (PIL, list of PIL, uint8 or float [0, 1] array, (H, W, 3) or (B, H, W, 3)) along ``prompt``.

        ``strength`` in (0, 1] is the fraction of the schedule that is re-run: the image is noised
        to the first kept timestep, and int(num_inference_steps * strength) steps denoise it, as
        in diffusers' StableDiffusionImg2ImgPipeline. The output size is the image's size.
        """
        # 1. check inputs, build the scheduler
        prompts, negatives, pixels = self.check_inputs(
            prompt=prompt, image=image, strength=strength, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
            num_images_per_prompt=num_images_per_prompt, seed=seed, output_type=output_type, callback=callback)
        sched = self.prepare_scheduler(scheduler, num_inference_steps)
        cfg = guidance.Guidance(guidance_scale, guidance_rescale)
        height, width = pixels.shape[2:]
        batch = len(prompts) * num_images_per_prompt
        self.check_engine_shapes(self.engine_shapes(len(prompts), batch, height, width, cfg.enabled, pixels.shape[0]))
        seed = _pick_seed(seed)
        rng = np.random.default_rng(seed)
        self.open_engines()  # together, on the first call

        # 2. encode prompt
        embeds, negative = self.encode_prompt(prompts, num_images_per_prompt, negatives if cfg.enabled else None)
        cond = guidance.cfg_embeddings(negative, embeds)

        # 3. timesteps: the tail of the schedule that strength keeps
        timesteps = sched.img2img_timesteps(num_inference_steps, strength)

        # 4. prepare latents: posterior draw of the image(s), repeated per image, noised to the first kept step
        z0 = self.encode_image(pixels, rng)
        z0 = np.repeat(z0, batch // z0.shape[0], axis=0)
        noise = rng.standard_normal(z0.shape, dtype=np.float32)
        z = np.asarray(sched.add_noise(z0, noise, timesteps[:1]), dtype=np.float32)

        # 5. denoise loop
        z = self.denoise(z, timesteps, sched, cond, cfg, rng, callback)

        # 6. decode, 7. postprocess
        return self._output(z, output_type, seed, sched, height, width)


def files_in_use(manifest: Manifest, components: tuple[str, ...], backend: str, device: str,
                 cpu_variant: bool = True) -> list[str]:
    """The manifest's files a pipeline of ``components`` on ``backend``/``device`` can read.

    Every file but those of other components and, per component, the graph it will not open:
    on onnxruntime CPU the ``cpu_variant`` (fused attention, see export/optimize.py) when the
    bundle has one, else the portable graph. Files no component owns (tokenizer, engine plans)
    are always in.
    """
    comps = manifest.data["components"]
    use_variant = backend == "onnxruntime" and device == "cpu" and cpu_variant
    roles: dict[str, list[tuple[str, bool]]] = {}  # file -> [(component, as part of its CPU variant)]
    for name, entry in comps.items():
        for f in (entry.get("file"), *entry.get("external_data", ())):
            roles.setdefault(f, []).append((name, False))
        variant = entry.get("cpu_variant") or {}
        for f in (variant.get("file"), *variant.get("external_data", ())):
            roles.setdefault(f, []).append((name, True))  # a variant may share the portable graph's weights
    roles.pop(None, None)

    def read(comp: str, is_variant: bool) -> bool:
        has_variant = bool((comps[comp].get("cpu_variant") or {}).get("file"))
        return comp in components and is_variant == (use_variant and has_variant)

    return [f for f in manifest.data["files"] if f not in roles or any(read(c, v) for c, v in roles[f])]


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


def _prompt_list(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)):
        raise PipelineInputError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    if not prompt:
        raise PipelineInputError("prompt is an empty list; pass at least one prompt")
    if not all(isinstance(p, str) for p in prompt):
        raise PipelineInputError(f"prompt must be a str or a list of str, got items of type "
                                 f"{sorted({type(p).__name__ for p in prompt})}")
    return list(prompt)


def _pick_seed(seed: int | None) -> int:
    """``seed``, or a random one when None (the call reports it, so the image can be made again)."""
    return secrets.randbelow(2**32) if seed is None else int(seed)


# diffusers' name for the text-to-image pipeline
StableDiffusionPipeline = Pipeline
