"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"), numpy.

k-diffusion style: the guided denoiser is an adapter around a model function
``model(x, t, cond) -> prediction``; samplers and schedulers never see guidance. With guidance
the model runs ONCE per step on the batch [uncond; cond] of 2B rows (one engine call, as
diffusers does); with ``guidance_scale <= 1`` it runs on the B conditional rows only.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

ModelFn = Callable[[np.ndarray, float, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Guidance:
    """The guidance of one call: ``scale`` and ``rescale`` (``rescale_noise_cfg``); ``enabled`` decides on/off.

    ``scale``: one float for the batch, or a tuple of one float per image (row of the batch), all
    above 1 or all at most 1. ``embedded``: the U-Net takes ``scale`` as an input
    (``guidance_scale_embedding``, LCM-distilled models), so no unconditional pass runs, whatever the scale.
    """

    scale: float | tuple[float, ...]
    rescale: float = 0.0
    embedded: bool = False

    @property
    def enabled(self) -> bool:
        """Classifier-free guidance on: only above 1 (at 1 the unconditional term cancels, below it is disabled,
        as diffusers), and never for a U-Net that embeds the scale."""
        return bool(np.all(np.asarray(self.scale) > 1.0)) and not self.embedded

    def row_scales(self, rows: int) -> np.ndarray:
        """The scale of each of ``rows`` images as float64 (rows,): a float repeated, or the per-image tuple."""
        scales = np.asarray(self.scale, dtype=np.float64)
        if scales.ndim and len(scales) != rows:
            raise ValueError(f"guidance has {len(scales)} per-image scales for {rows} images")
        return np.broadcast_to(scales, (rows,))


def rescale_noise_cfg(noise_cfg: np.ndarray, noise_pred_text: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4.

    Scale the guided prediction to the per-sample std of the conditional one, then mix the two
    by ``guidance_rescale``. The std is unbiased over all dims but the batch, as in diffusers.
    """
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = noise_pred_text.std(axis=axes, keepdims=True, ddof=1)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True, ddof=1)
    rescaled = noise_cfg * (std_text / std_cfg)
    return (guidance_rescale * rescaled + (1.0 - guidance_rescale) * noise_cfg).astype(noise_cfg.dtype, copy=False)


def combine(noise_pred: np.ndarray, guidance_scale: float | Sequence[float], guidance_rescale: float = 0.0) -> np.ndarray:
    """(2B, ...) predictions on [uncond; cond] -> (B, ...) guided prediction.

    ``guidance_scale``: one float for all rows, or B floats, row i guided by the i-th (in float32,
    so a row gets the same bytes as when it is combined alone with its float).
    """
    n = noise_pred.shape[0] // 2
    uncond, cond = noise_pred[:n], noise_pred[n:]  # views; np.split costs more than the arithmetic here
    scale = np.asarray(guidance_scale, dtype=np.float32)
    if scale.ndim:
        if scale.shape != (n,):
            raise ValueError(f"guidance_scale has {scale.size} per-row scales for {n} rows")
        scale = scale.reshape((n,) + (1,) * (noise_pred.ndim - 1))  # broadcast over C, H, W
    guided = np.subtract(cond, uncond)
    guided *= scale
    guided += uncond
    if guidance_rescale > 0.0:
        guided = rescale_noise_cfg(guided, cond, guidance_rescale)
    return guided


def cfg_embeddings(negative: np.ndarray | None, positive: np.ndarray) -> np.ndarray:
    """The encoder_hidden_states the U-Net sees: [negative; positive] (2B) with guidance, positive (B) without
    (``negative`` None: the caller decided on no guidance and encoded no negative prompt)."""
    if negative is None:
        return positive
    if negative.shape != positive.shape:
        raise ValueError(f"guidance needs negative embeddings of shape {positive.shape}, got {negative.shape}")
    return np.concatenate([negative, positive])


def cfg_denoiser(model: ModelFn, cond: np.ndarray, cfg: Guidance) -> Callable[[np.ndarray, float], np.ndarray]:
    """Wrap ``model(x, t, cond)`` into ``denoise(x, t)``: one model call per step, guided when ``cfg.enabled``.

    ``cond`` comes from ``cfg_embeddings`` (2B rows with guidance, B without); ``x`` has B rows.
    """
    if not cfg.enabled:
        return lambda x, t: model(x, t, cond)

    def denoise(x: np.ndarray, t: float) -> np.ndarray:
        out = model(np.concatenate([x, x]), t, cond)  # (2B, C, h, w): [uncond; cond]
        return combine(out, cfg.scale, cfg.rescale)

    return denoise


def guidance_scale_embedding(guidance_scale: float | np.ndarray, dim: int) -> np.ndarray:
    """The guidance embedding an LCM-distilled U-Net takes as ``timestep_cond`` (Luo et al. 2023,
    "Latent Consistency Models", Sec. 4.2; diffusers' ``get_guidance_scale_embedding``).

    Per row w = guidance_scale - 1 (LCM's guidance excludes the plain conditional term), scaled by
    1000, embedded sin-then-cos with frequencies 10000^(-i / (dim/2 - 1)); zero-padded to an odd
    ``dim``. ``guidance_scale``: a float or (B,) array -> (B, dim) float32 (B = 1 for a float).
    """
    if dim < 4:  # the frequencies divide by dim/2 - 1
        raise ValueError(f"a guidance embedding needs dim >= 4, got {dim}")
    # w in float64 before the cast: torch.tensor(guidance_scale - 1) rounds the difference, not the scale
    w = (np.asarray(guidance_scale, dtype=np.float64).reshape(-1) - 1.0).astype(np.float32) * np.float32(1000.0)
    half = dim // 2
    step = np.log(np.float32(10000.0)) / np.float32(half - 1)
    # exp in float64, rounded once: float32 np.exp is off by an ulp where torch's is not, and an ulp
    # of a frequency times w * 1000 (thousands) shows in the sine
    freqs = np.exp((np.arange(half, dtype=np.float32) * -step).astype(np.float64)).astype(np.float32)  # (half,)
    args = w[:, None] * freqs[None, :]  # (B, half)
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2))) if dim % 2 else emb


def negative_prompts(negative_prompt: str | list[str] | None, batch_size: int) -> list[str]:
    """One negative prompt per prompt: None -> empty prompts, a str -> repeated, a list -> checked."""
    if negative_prompt is None:
        return [""] * batch_size
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch_size
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(p, str) for p in negative_prompt):
        raise TypeError(f"negative_prompt must be None, a str or a list of str, got {type(negative_prompt).__name__}")
    if len(negative_prompt) != batch_size:
        raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but there are {batch_size} prompts; "
                         "pass one negative prompt per prompt, or a single str for all")
    return list(negative_prompt)


class EmbeddingCache:
    """LRU map: token ids of one prompt (bytes of its int64 row) -> its (L, D) embedding.

    Negative prompts (usually the empty one) repeat across calls; caching them saves one text
    encoder run per call. Rows are stored as computed, so a cached call gives the same bytes.
    Safe to share between threads: the map is touched under a lock, the encoder runs outside it
    (two threads missing the same prompt at once both encode it, and store equal rows).
    """

    def __init__(self, maxsize: int = 32):
        self.maxsize = maxsize
        self._data: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def get(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._data.move_to_end(key)
            return value

    def put(self, key: bytes, value: np.ndarray) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def encode(self, ids: np.ndarray, encode_fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """(N, L) ids -> (N, L, D): cached rows reused, the others encoded in ONE ``encode_fn`` call."""
        keys = [row.tobytes() for row in ids]
        found = {k: v for k in dict.fromkeys(keys) if (v := self.get(k)) is not None}
        todo = [k for k in dict.fromkeys(keys) if k not in found]
        if todo:
            rows = np.stack([np.frombuffer(k, dtype=ids.dtype) for k in todo])
            emb = encode_fn(rows)
            for k, e in zip(todo, emb):
                e = e.copy()  # own the row, not a view into the whole batch output
                self.put(k, e)
                found[k] = e
        return np.stack([found[k] for k in keys])
