"""Image conversions at the pipeline's edges, and PNGs that carry their generation parameters."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import atomic_write_bytes

PARAMETERS_KEY = "parameters"  # PNG tEXt/iTXt key holding the generation parameters as JSON


def postprocess(image: np.ndarray, output_type: str = "pil") -> Any:
    """VAE output (B, 3, H, W) in about [-1, 1] -> "np": float32 (B, H, W, 3) in [0, 1], or "pil": list of images."""
    if output_type not in ("pil", "np"):
        raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
    x = np.clip(image.astype(np.float32, copy=False) / 2 + 0.5, 0.0, 1.0)
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # (B, 3, H, W) -> (B, H, W, 3)
    return x if output_type == "np" else numpy_to_pil(x)


def numpy_to_pil(images: np.ndarray) -> list:
    """float (B, H, W, 3) in [0, 1] -> list of RGB PIL images (round to nearest, as diffusers)."""
    from PIL import Image

    if images.ndim == 3:
        images = images[None]
    u8 = (images * 255).round().astype(np.uint8)
    return [Image.fromarray(im) for im in u8]


def preprocess(image: Any, multiple_of: int = 1) -> np.ndarray:
    """A PIL image, a list of them, or a uint8 / float array (H, W, 3) or (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1].

    uint8 arrays are in [0, 255], float arrays in [0, 1]. Sizes must be multiples of
    ``multiple_of`` (the VAE's factor): the image is refused rather than silently resized.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image or not all(isinstance(im, Image.Image) for im in image):
            raise TypeError("image list must hold PIL images and not be empty")
        sizes = {im.size for im in image}
        if len(sizes) != 1:
            raise ValueError(f"images in a batch must share one size, got {sorted(sizes)}")
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in image])
    elif isinstance(image, np.ndarray):
        arr = image[None] if image.ndim == 3 else image
    else:
        raise TypeError(f"image must be a PIL image, a list of them or a numpy array, got {type(image).__name__}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"image array must be (H, W, 3) or (B, H, W, 3), got shape {list(image.shape)}")
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32)
        if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(f"float image must be finite and in [0, 1], got range [{x.min()}, {x.max()}]")
    else:
        raise ValueError(f"image array must be uint8 or float, got dtype {arr.dtype}")
    h, w = x.shape[1:3]
    if h % multiple_of or w % multiple_of or h == 0 or w == 0:
        raise ValueError(f"image height and width must be positive multiples of {multiple_of} "
                         f"(the VAE's spatial factor), got {h}x{w}")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) * 2.0 - 1.0  # (B, H, W, 3) -> (B, 3, H, W), [-1, 1]


def png_bytes(image: Any, parameters: dict | None = None) -> bytes:
    """A PIL image (or float (H, W, 3) in [0, 1]) as PNG bytes, with ``parameters`` as JSON in a text chunk."""
    from PIL import Image, PngImagePlugin

    if isinstance(image, np.ndarray):
        image = numpy_to_pil(image)[0]
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_itxt(PARAMETERS_KEY, json.dumps(parameters, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Any, path: str | os.PathLike, parameters: dict | None = None) -> Path:
    """Write ``png_bytes(image, parameters)`` to ``path``."""
    path = Path(path)
    # a unique name beside, then rename: a crash never leaves a truncated PNG under the final name,
    # and two processes saving to one path never share a temporary file (the last rename wins)
    atomic_write_bytes(path, png_bytes(image, parameters))
    return path


def read_parameters(path: str | os.PathLike) -> dict:
    """The generation parameters that ``save_png`` stored in a PNG."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.text.get(PARAMETERS_KEY) if hasattr(im, "text") else None
    if text is None:
        raise ValueError(f"{path}: no {PARAMETERS_KEY!r} text chunk")
    return json.loads(text)
