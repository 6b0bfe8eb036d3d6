"""One export spec per component: the single description that drives the ONNX export, the
parity gate's sample inputs, the manifest's inputs/outputs (with ``batch_mult``) and the TensorRT
shape profile. Shapes and sample values come from ``ldm_runtime.shapes``.

Symbolic dimensions: "B" batch, "h"/"w" latent height/width, "H"/"W" image height/width.
The text length is fixed (77 for CLIP). Sizes given to ``profile`` are in pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ldm_runtime.manifest import COMPONENTS, TensorSpec
from ldm_runtime.shapes import ShapeError, bind_shapes, random_feeds, size_dims

ProfileError = ShapeError  # a size or batch range that the models cannot take


@dataclass(frozen=True)
class ModelDims:
    """The few numbers the specs need, read from the model configs (see ``dims_from_models``)."""

    latent_channels: int = 4
    unet_in_channels: int = 4
    unet_out_channels: int = 4
    vae_scale_factor: int = 8
    hidden_size: int = 768
    max_length: int = 77
    vocab_size: int = 49408
    image_channels: int = 3
    time_cond_proj_dim: int | None = None  # an LCM-distilled U-Net's guidance embedding width
    num_train_timesteps: int = 1000  # the scheduler's training range (sample timesteps lie in it)
    # SDXL: each text encoder's hidden width, in concatenation order (their sum is hidden_size, the
    # U-Net's context width); empty for SD (one text encoder of width hidden_size)
    encoder_widths: tuple[tuple[str, int], ...] = ()
    text_embeds_dim: int | None = None  # SDXL: the pooled width (text_encoder_2's projection, the U-Net's text_embeds)
    num_time_ids: int | None = None  # SDXL: values per row of the U-Net's time_ids (base 6, refiner 5)

    @property
    def is_sdxl(self) -> bool:
        return self.text_embeds_dim is not None

    def encoder_width(self, component: str) -> int:
        """The hidden width of text encoder ``component`` (SD: hidden_size)."""
        widths = dict(self.encoder_widths) or {"text_encoder": self.hidden_size}
        if component not in widths:
            raise ValueError(f"these models have no {component!r} (text encoders: {', '.join(widths)})")
        return widths[component]


@dataclass(frozen=True)
class ComponentSpec:
    """Names, dtypes and shapes of one component's inputs and outputs (fp32 export types)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_mult: int = 1  # the runtime calls the U-Net on [uncond, cond] batches (the text encoder per prompt batch)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes``: every symbolic dim of every input and output."""
        return {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in (*self.inputs, *self.outputs)}


def component_spec(name: str, dims: ModelDims) -> ComponentSpec:
    """The spec of ``name`` (one of ``COMPONENTS``) for models of the given ``dims``."""
    f32 = "float32"
    L, D, C = dims.max_length, dims.hidden_size, dims.latent_channels
    if name in ("text_encoder", "text_encoder_2"):
        return _text_encoder_spec(name, dims)
    if name == "unet":
        # a U-Net with a guidance embedding is never called on [uncond, cond] batches
        cond = () if dims.time_cond_proj_dim is None else (TensorSpec("timestep_cond", f32, ("B", dims.time_cond_proj_dim)),)
        added = () if not dims.is_sdxl else (TensorSpec("text_embeds", f32, ("B", dims.text_embeds_dim)),
                                             TensorSpec("time_ids", f32, ("B", dims.num_time_ids)))
        return ComponentSpec(
            name,
            (TensorSpec("sample", f32, ("B", dims.unet_in_channels, "h", "w")),
             TensorSpec("timestep", f32, ("B",)),
             TensorSpec("encoder_hidden_states", f32, ("B", L, D)), *cond, *added),
            (TensorSpec("out_sample", f32, ("B", dims.unet_out_channels, "h", "w")),),
            batch_mult=1 if cond else 2,
        )
    if name == "vae_decoder":
        return ComponentSpec(name, (TensorSpec("latent", f32, ("B", C, "h", "w")),),
                             (TensorSpec("image", f32, ("B", dims.image_channels, "H", "W")),))
    if name == "vae_encoder":
        return ComponentSpec(name, (TensorSpec("image", f32, ("B", dims.image_channels, "H", "W")),),
                             (TensorSpec("mean", f32, ("B", C, "h", "w")), TensorSpec("logvar", f32, ("B", C, "h", "w"))))
    raise ValueError(f"unknown component {name!r}; expected one of {', '.join(COMPONENTS)}")


def _text_encoder_spec(name: str, dims: ModelDims) -> ComponentSpec:
    """SD: ``last_hidden_state``. SDXL: ``hidden_states`` (the penultimate layer, no final norm), and for
    ``text_encoder_2`` also ``text_embeds`` (the pooled token through the projection)."""
    f32, L = "float32", dims.max_length
    ids = (TensorSpec("input_ids", "int64", ("B", L)),)
    if not dims.is_sdxl:
        if name != "text_encoder":
            raise ValueError(f"{name!r} is a component of SDXL models only")
        return ComponentSpec(name, ids, (TensorSpec("last_hidden_state", f32, ("B", L, dims.hidden_size)),))
    hidden = TensorSpec("hidden_states", f32, ("B", L, dims.encoder_width(name)))
    pooled = (TensorSpec("text_embeds", f32, ("B", dims.text_embeds_dim)),) if name == "text_encoder_2" else ()
    return ComponentSpec(name, ids, (hidden, *pooled))


def dims_from_models(ld) -> ModelDims:
    """``ModelDims`` from a ``training.checkpoint.LatentDiffusion`` (its configs; SDXL: both text encoders)."""
    u, v = ld.unet_config, ld.vae_config
    encoders = ld.text_encoders()
    first = next(iter(encoders.values())).config
    tok_config = ld.tokenizer_config if ld.text_encoder is not None else ld.tokenizer_2_config
    L = int(tok_config.get("model_max_length", first.max_position_embeddings))
    for name, te in encoders.items():
        if L > te.config.max_position_embeddings:
            raise ProfileError(f"tokenizer model_max_length {L} exceeds {name}'s "
                               f"max_position_embeddings {te.config.max_position_embeddings}")
    widths = tuple((name, int(te.config.hidden_size)) for name, te in encoders.items())
    sdxl = ld.sdxl
    return ModelDims(
        latent_channels=int(v.latent_channels),
        unet_in_channels=int(getattr(u, "in_channels", v.latent_channels)),
        unet_out_channels=int(getattr(u, "out_channels", v.latent_channels)),
        vae_scale_factor=int(v.spatial_factor),
        hidden_size=sum(w for _, w in widths) if sdxl is not None else int(first.hidden_size),
        max_length=L,
        vocab_size=int(getattr(first, "vocab_size", 49408)),
        image_channels=int(getattr(v, "in_channels", 3)),
        time_cond_proj_dim=getattr(u, "time_cond_proj_dim", None),
        num_train_timesteps=int(ld.scheduler_config.get("num_train_timesteps", 1000)),
        encoder_widths=widths if sdxl is not None else (),
        text_embeds_dim=None if sdxl is None else _pooled_width(ld),
        num_time_ids=None if sdxl is None else sdxl.num_time_ids,
    )


def _pooled_width(ld) -> int:
    """The width of text_encoder_2's pooled output (its projection; without one, its hidden width)."""
    cfg = ld.text_encoder_2.config
    return int(cfg.projection_dim if cfg.projection_dim is not None else cfg.hidden_size)


def sample_inputs(spec: ComponentSpec, dims: ModelDims, batch: int, height: int, width: int,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic sample inputs (numpy, the spec's dtypes) for export tracing and parity checks:
    ``random_feeds`` at ``batch`` rows and an image of ``height`` x ``width`` pixels."""
    shapes = bind_shapes(spec.inputs, B=batch, **size_dims(height, width, dims.vae_scale_factor))
    return random_feeds(spec.inputs, shapes, np.random.default_rng(seed), vocab_size=dims.vocab_size,
                        train_timesteps=dims.num_train_timesteps)


def profile(spec: ComponentSpec, f: int, min_size: int = 256, max_size: int = 1024, max_batch: int = 4,
            opt_size: tuple[int, int] | None = None, opt_batch: int = 1) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes of every input of ``spec`` for an engine build.

    Sizes are image pixels (both sides range over [min_size, max_size]) and must be multiples
    of the VAE factor ``f``; batches are per prompt and are doubled for components that the
    runtime calls on [uncond, cond] batches (``spec.batch_mult``). The minimum batch stays 1 so
    that guidance_scale <= 1 (no unconditional pass) still fits.
    Returns ``{input_name: {"min": shape, "opt": shape, "max": shape}}``.
    """
    oh, ow = opt_size if opt_size is not None else (min(max(512, min_size), max_size),) * 2
    for what, v in (("min_size", min_size), ("max_size", max_size), ("opt height", oh), ("opt width", ow)):
        if v <= 0 or v % f:
            raise ProfileError(f"{spec.name}: {what} {v} must be a positive multiple of the VAE factor {f}")
    if not min_size <= oh <= max_size or not min_size <= ow <= max_size:
        raise ProfileError(f"{spec.name}: expected min_size <= opt size <= max_size, got {min_size} <= {oh}x{ow} <= {max_size}")
    if max_batch < 1 or not 1 <= opt_batch <= max_batch:
        raise ProfileError(f"{spec.name}: expected 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}")
    def bound(batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        try:
            return bind_shapes(spec.inputs, B=batch, **size_dims(height, width, f))
        except ShapeError as e:
            raise ProfileError(f"{spec.name}: {e}") from None

    m = spec.batch_mult
    mins, opts, maxs = bound(1, min_size, min_size), bound(opt_batch * m, oh, ow), bound(max_batch * m, max_size, max_size)
    return {n: {"min": list(mins[n]), "opt": list(opts[n]), "max": list(maxs[n])} for n in spec.input_names}


def with_dtypes(specs: tuple[TensorSpec, ...], dtypes: Mapping[str, str]) -> tuple[TensorSpec, ...]:
    """The same specs with dtypes replaced (e.g. by the types an fp16 graph really declares)."""
    return tuple(TensorSpec(s.name, dtypes.get(s.name, s.dtype), s.shape) for s in specs)
