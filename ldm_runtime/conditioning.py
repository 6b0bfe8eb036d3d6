"""What a bundle's U-Net is conditioned on besides the latents, as its manifest says: the text encoders
(each with its tokenizer; their hidden states concatenated, one pooled embedding) and SDXL's
micro-conditioning time ids, with diffusers' argument names and defaults.

An SD bundle (no ``conditioning`` field) has one ``text_encoder`` whose ``last_hidden_state`` is the
context, and no time ids. An SDXL bundle lists its encoders in ``conditioning.text_encoders``; its
U-Net takes ``text_embeds`` (the pooled embedding) and ``time_ids``: ``original_size``,
``crops_coords_top_left`` and ``target_size`` (6 values), or for a bundle that
``requires_aesthetics_score`` (the refiner) ``original_size``, ``crops_coords_top_left`` and the
aesthetic score (5 values).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from .manifest import BundleError, Manifest

IMG2IMG_ONLY = frozenset({"StableDiffusionXLImg2ImgPipeline"})  # conditioning.pipeline of a refiner
SIZE_ARGS = ("original_size", "crops_coords_top_left", "target_size")
NEGATIVE_SIZE_ARGS = tuple(f"negative_{name}" for name in SIZE_ARGS)
AESTHETIC_ARGS = ("aesthetic_score", "negative_aesthetic_score")
MICRO_ARGS = SIZE_ARGS + NEGATIVE_SIZE_ARGS + AESTHETIC_ARGS
AESTHETIC_DEFAULTS = {"aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}  # diffusers' img2img defaults
EXACT_FLOAT32_INT = 1 << 24  # time ids are float32: larger ints would not survive the cast


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of the bundle: its component, the manifest field of its tokenizer, the output that is
    its part of the context (``hidden``) and, for the one that gives it, the pooled output (``pooled``)."""

    component: str
    tokenizer: str
    hidden: str
    pooled: str | None = None


SD_ENCODERS = (TextEncoder("text_encoder", "tokenizer", "last_hidden_state"),)


@dataclass(frozen=True)
class Conditioning:
    """A bundle's conditioning (``from_manifest``): the text encoders in context order, the negative-prompt
    rule, and the width of the U-Net's ``time_ids`` input (0: none, an SD model)."""

    encoders: tuple[TextEncoder, ...] = SD_ENCODERS
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    pipeline: str | None = None
    time_ids: int = 0

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "Conditioning":
        entry = manifest.data.get("conditioning")
        unet = {s.name: s for s in manifest.component("unet").inputs} if manifest.has("unet") else {}
        width = unet["time_ids"].shape[1] if "time_ids" in unet else 0
        if entry is None:
            if width:
                raise _bundle_error(manifest, "absent, but the U-Net takes time_ids (an SDXL model)")
            return cls()
        try:
            encoders = tuple(TextEncoder(e["component"], e["tokenizer"], e["hidden"], e.get("pooled"))
                             for e in entry["text_encoders"])
        except (KeyError, TypeError):
            raise _bundle_error(manifest, "text_encoders must list {component, tokenizer, hidden[, pooled]} "
                                          "objects") from None
        return cls(encoders, bool(entry.get("force_zeros_for_empty_prompt", False)),
                   bool(entry.get("requires_aesthetics_score", False)), entry.get("pipeline"), int(width))

    @property
    def img2img_only(self) -> bool:
        """A model trained for image to image only (an SDXL refiner): text to image is refused."""
        return self.pipeline in IMG2IMG_ONLY

    @property
    def pooled(self) -> TextEncoder | None:
        """The encoder whose pooled output feeds the U-Net's ``text_embeds``, if any."""
        return next((e for e in self.encoders if e.pooled), None)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(e.component for e in self.encoders)

    def time_ids_pair(self, height: int, width: int, args: dict[str, Any],
                      img2img: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """(positive, negative) float32 (k,) time ids for an image of ``height`` x ``width`` from ``args``
        (``MICRO_ARGS`` -> value or None), or None for a U-Net without time ids; ``ValueError`` for an
        argument this bundle does not take or a value the time ids cannot express.

        Defaults as diffusers' SDXL pipelines (``img2img``: StableDiffusionXLImg2ImgPipeline's):
        ``original_size`` and ``target_size`` (height, width), ``crops_coords_top_left`` (0, 0),
        ``aesthetic_score`` 6.0, ``negative_aesthetic_score`` 2.5; ``negative_original_size`` and
        ``negative_target_size`` their positive values; ``negative_crops_coords_top_left`` (0, 0) for
        an aesthetic-score bundle and for text to image with a negative size given, else
        ``crops_coords_top_left``. Where diffusers ignores a given negative argument (text to image
        without both negative sizes; base image to image's negative crops), it is used here.
        """
        given = {name for name in MICRO_ARGS if args.get(name) is not None}
        if not self.time_ids:
            if given:
                raise ValueError(f"{', '.join(n for n in MICRO_ARGS if n in given)}: SDXL micro-conditioning, but "
                                 "this bundle's U-Net takes no time_ids (a Stable Diffusion 1.x/2.x model); leave "
                                 "them out")
            return None
        unused = [n for n in MICRO_ARGS if n in given and n not in self.arguments]
        if unused:
            raise ValueError(f"{', '.join(unused)}: not an input of this bundle's U-Net, whose {self.time_ids} "
                             f"time ids are {self._layout()}")
        v = {n: _size(n, args[n]) for n in SIZE_ARGS + NEGATIVE_SIZE_ARGS if n in given}
        v.update({n: _score(n, args[n]) if n in given else d for n, d in AESTHETIC_DEFAULTS.items()})
        for n, default in (("original_size", (height, width)), ("crops_coords_top_left", (0, 0)),
                           ("target_size", (height, width))):
            v.setdefault(n, default)
            if n != "crops_coords_top_left":
                v.setdefault(f"negative_{n}", v[n])
        zero_crops = self.requires_aesthetics_score or (not img2img and bool(given & set(NEGATIVE_SIZE_ARGS)))
        v.setdefault("negative_crops_coords_top_left", (0, 0) if zero_crops else v["crops_coords_top_left"])
        last = ("aesthetic_score",) if self.requires_aesthetics_score else ("target_size",)
        names = ("original_size", "crops_coords_top_left", *last)
        positive = [x for n in names for x in np.atleast_1d(v[n])]
        negative = [x for n in names for x in np.atleast_1d(v[f"negative_{n}"])]
        if len(positive) != self.time_ids:
            raise BundleError(f"the U-Net takes {self.time_ids} time ids, but {self._layout()} make {len(positive)}")
        return np.asarray(positive, dtype=np.float32), np.asarray(negative, dtype=np.float32)

    @property
    def arguments(self) -> tuple[str, ...]:
        """The micro-conditioning arguments this bundle takes (none for an SD model)."""
        if not self.time_ids:
            return ()
        if self.requires_aesthetics_score:
            return tuple(n for n in MICRO_ARGS if "target_size" not in n)
        return SIZE_ARGS + NEGATIVE_SIZE_ARGS

    def _layout(self) -> str:
        last = "aesthetic_score" if self.requires_aesthetics_score else "target_size (height, width)"
        return f"original_size (height, width), crops_coords_top_left (top, left), {last}"


def _bundle_error(manifest: Manifest, problem: str) -> BundleError:
    return BundleError(f"{manifest.root}: manifest field conditioning: {problem}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _size(name: str, value: Any) -> tuple[int, int]:
    """A (height, width) or (top, left) pair of ints: sizes >= 1, crop coordinates >= 0."""
    low = 0 if "crops" in name else 1
    what = "(top, left) of ints >= 0" if low == 0 else "(height, width) of ints >= 1"
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(_is_int(v) and low <= v < EXACT_FLOAT32_INT for v in value)):
        raise ValueError(f"{name} must be a pair {what} (below {EXACT_FLOAT32_INT}), got {value!r}")
    return int(value[0]), int(value[1])


def _score(name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not np.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)
