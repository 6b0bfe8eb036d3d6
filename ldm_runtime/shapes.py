"""Concrete shapes and sample inputs of a component, from its manifest ``TensorSpec``s.

One rule serves export, the fp16 sweep, the CPU variants, TensorRT profiles, ``ldm bench`` and the
runtime's shape checks. Symbolic dims are as the manifest writes them: ``B`` rows per call, ``h`` /
``w`` the latent height and width, ``H`` / ``W`` the image height and width in pixels; fixed dims
are ints. ``bind_shapes`` gives each input its shape at chosen sizes; ``random_feeds`` draws inputs
of those shapes where each kind of input lives in practice (``CONVENTIONS``).
"""
from __future__ import annotations

import json
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .guidance import guidance_scale_embedding
from .manifest import BundleError, Manifest, TensorSpec
from .schedulers import SchedulerConfig


class ShapeError(ValueError):
    """A size the models cannot take, or a spec with a symbolic dim that was given no size."""


def size_dims(height: int, width: int, vae_scale_factor: int) -> dict[str, int]:
    """The size dims of an image of ``height`` x ``width`` pixels: ``H``, ``W`` and latent ``h``, ``w``."""
    f = vae_scale_factor
    if height <= 0 or width <= 0 or height % f or width % f:
        raise ShapeError(f"image size {height}x{width} is not a positive multiple of the VAE factor {f}")
    return {"H": height, "W": width, "h": height // f, "w": width // f}


def bind_shapes(specs: Iterable[TensorSpec], *, B: int, h: int, w: int, **extra_dims: int) -> dict[str, tuple[int, ...]]:
    """Each spec's shape with its symbolic dims bound: ``B`` rows, latent ``h`` x ``w``, and ``extra_dims``
    (``H``/``W`` for pixel inputs, or any other dim a spec names). A dim given no size is refused."""
    sizes = {"B": B, "h": h, "w": w, **extra_dims}
    shapes = {}
    for s in specs:
        unbound = [d for d in s.shape if isinstance(d, str) and d not in sizes]
        if unbound:
            raise ShapeError(f"input {s.name!r} has symbolic dims {unbound} that were given no size; "
                             f"expected only {sorted(sizes)}")
        shapes[s.name] = tuple(int(sizes[d]) if isinstance(d, str) else int(d) for d in s.shape)
    return shapes


# -- sample inputs -------------------------------------------------------------------------------------------
Draw = Callable[[np.random.Generator, tuple[int, ...], Mapping[str, int]], np.ndarray]


def _token_ids(rng: np.random.Generator, shape: tuple[int, ...], ranges: Mapping[str, int]) -> np.ndarray:
    """Ids over the vocabulary, BOS first, EOS (then padding with the same id) from a third of the length on.
    CLIP's layout: BOS and EOS are the two last ids, and the pooled token is read at the largest id."""
    v = ranges.get("vocab_size")
    if v is None:
        raise ShapeError("token id inputs need vocab_size (the tokenizer's vocabulary size)")
    ids = rng.integers(1, max(2, v - 2), size=shape, dtype=np.int64)
    ids[:, 0] = v - 2
    ids[:, max(2, shape[1] // 3):] = v - 1
    return ids


def _timesteps(rng: np.random.Generator, shape: tuple[int, ...], ranges: Mapping[str, int]) -> np.ndarray:
    """Descending, spread over the training range [0, train_timesteps - 1], as a sampler visits them."""
    top = float(ranges.get("train_timesteps", SchedulerConfig.num_train_timesteps) - 1)
    return np.sort(rng.uniform(0.0, top, size=shape)).astype(np.float32)[::-1].copy()


def _image(rng: np.random.Generator, shape: tuple[int, ...], ranges: Mapping[str, int]) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)


def _guidance_embedding(rng: np.random.Generator, shape: tuple[int, ...], ranges: Mapping[str, int]) -> np.ndarray:
    """Embeddings of guidance scales in [1, 15], as LCM users pick them."""
    return guidance_scale_embedding(rng.uniform(1.0, 15.0, size=shape[0]), shape[1])


def _time_ids(rng: np.random.Generator, shape: tuple[int, ...], ranges: Mapping[str, int]) -> np.ndarray:
    """SDXL micro-conditioning rows: original size (64..1024 px), crop top-left (0..64), then target size
    (6 values, a base model) or an aesthetic score in [2.5, 6] (5 values, a refiner)."""
    b, k = shape
    if k not in (5, 6):
        raise ShapeError(f"time_ids rows have 6 values (SDXL base) or 5 (refiner), got {k}")
    original = rng.integers(8, 129, size=(b, 2)) * 8
    crop = rng.integers(0, 65, size=(b, 2))
    last = rng.integers(8, 129, size=(b, 2)) * 8 if k == 6 else rng.uniform(2.5, 6.0, size=(b, 1))
    return np.concatenate([original, crop, last], axis=1).astype(np.float32)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], ranges: Mapping[str, int]) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# input name -> how its values are drawn; any other float input (latents, hidden states) is N(0, 1)
CONVENTIONS: dict[str, Draw] = {
    "input_ids": _token_ids,
    "timestep": _timesteps,
    "image": _image,
    "timestep_cond": _guidance_embedding,
    "time_ids": _time_ids,
}


def random_feeds(specs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]], rng: np.random.Generator, *,
                 vocab_size: int | None = None, train_timesteps: int | None = None) -> dict[str, np.ndarray]:
    """Inputs of each spec's dtype at ``shapes``, drawn in spec order by the ``CONVENTIONS`` table.

    ``vocab_size`` (needed for token ids) and ``train_timesteps`` (default: the scheduler config's
    default) are a bundle's, as ``feed_ranges`` reads them.
    """
    ranges = {k: v for k, v in (("vocab_size", vocab_size), ("train_timesteps", train_timesteps)) if v is not None}
    feeds = {}
    for s in specs:
        draw = CONVENTIONS.get(s.name)
        if draw is None and np.dtype(s.dtype).kind in "iu":
            raise ShapeError(f"integer input {s.name!r} has no sampling convention; known: {sorted(CONVENTIONS)}")
        feeds[s.name] = (draw or _normal)(rng, tuple(int(d) for d in shapes[s.name]), ranges).astype(s.dtype, copy=False)
    return feeds


def feed_ranges(manifest: Manifest) -> dict[str, int]:
    """``random_feeds``' ranges for a bundle: its tokenizer's vocabulary size (an SDXL refiner's ``tokenizer_2``)
    and its training timesteps."""
    vocab = (manifest.data.get("tokenizer") or manifest.data.get("tokenizer_2") or {}).get("vocab")
    try:
        size = len(json.loads(manifest.read_verified(str(vocab), "tokenizer.vocab").decode("utf-8")))
    except (ValueError, TypeError) as e:
        raise BundleError(f"{manifest.root}: cannot read the tokenizer vocabulary {vocab!r}: {e}") from None
    steps = manifest.scheduler_config.get("num_train_timesteps", SchedulerConfig.num_train_timesteps)
    return {"vocab_size": size, "train_timesteps": int(steps)}
