"""A user's folder of captioned images.

Captions come from a `captions.jsonl` at the folder's root when there is one (one
`{"file": "relative/path.png", "caption": "..."}` per line; then it is the only source), else
from sidecar text files (`cat.png` + `cat.txt`). Images anywhere under the folder are found;
they are center-cropped to a square and resized to `size`.

Bad data never crashes an epoch: images that cannot be read and images without a usable
caption are skipped and counted by reason in `dataset.skipped` (logged once). An image that
passes the scan but fails to decode later is replaced by the next readable one and counted
too (in the process that loaded it: DataLoader workers keep their own counts). Only a folder
with no usable pair, or a malformed captions.jsonl line, is an error (`DatasetError`, naming
the file and line).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from training.data.shapes import to_tensor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTIONS_FILE = "captions.jsonl"
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """A data folder that cannot be used; the message says which file and why."""


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Read an image as uint8 (size, size, 3): EXIF-rotated, alpha over white, center-cropped."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            flat = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(flat, im)
        im = ImageOps.fit(im.convert("RGB"), (size, size), method=Image.LANCZOS)
        return np.asarray(im)


def _readable(path: Path) -> bool:
    try:  # verify() checks structure and checksums without decoding pixels: cheap enough
        with Image.open(path) as im:
            im.verify()
        return True
    except _READ_ERRORS:
        return False


def _read_jsonl(path: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg}); expected "
                                   '{"file": "img.png", "caption": "..."}') from None
            if (not isinstance(entry, dict) or not isinstance(entry.get("file"), str)
                    or not isinstance(entry.get("caption"), str)):
                raise DatasetError(f"{path}:{n}: expected an object with string fields 'file' "
                                   f"and 'caption', got {line.strip()[:80]!r}")
            key = Path(entry["file"]).as_posix()
            if key in captions:
                raise DatasetError(f"{path}:{n}: second caption for {entry['file']!r}")
            captions[key] = entry["caption"].strip()
    return captions


class _Unreadable(str):
    """A sidecar caption that exists but cannot be read as UTF-8 text."""


def _sidecar(image: Path) -> str | None:
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        return txt.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return _Unreadable()


class FolderDataset(torch.utils.data.Dataset):
    """Map-style dataset: item i -> (image (3, S, S) float in [-1, 1], caption, None).

    The third element mirrors `ShapesDataset`'s ground truth, which a user's folder lacks,
    so both datasets share `collate` and the training loop.
    """

    def __init__(self, root: str | Path, size: int = 64, verify: bool = True):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a directory; expected a folder of images "
                               f"with captions (sidecar .txt files or {CAPTIONS_FILE})")
        images = sorted(p for p in self.root.rglob("*")
                        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        self.skipped: Counter[str] = Counter()
        self.items: list[tuple[Path, str]] = []
        jsonl = self.root / CAPTIONS_FILE
        if jsonl.is_file():
            captions = _read_jsonl(jsonl)
            names = {p.relative_to(self.root).as_posix() for p in images}
            self.skipped["missing_image"] += sum(1 for k in captions if k not in names)
            pairs = [(p, captions.get(p.relative_to(self.root).as_posix())) for p in images]
        else:
            pairs = [(p, _sidecar(p)) for p in images]
        for path, caption in pairs:
            if caption is None:
                self.skipped["missing_caption"] += 1
            elif isinstance(caption, _Unreadable):
                self.skipped["unreadable_caption"] += 1
            elif not caption:
                self.skipped["empty_caption"] += 1
            elif verify and not _readable(path):
                self.skipped["unreadable_image"] += 1
            else:
                self.items.append((path, caption))
        if not self.items:
            raise DatasetError(
                f"{self.root}: no usable image/caption pairs among {len(images)} images "
                f"(skipped: {dict(self.skipped) or 'none'}); expected images such as cat.png "
                f"with a caption in cat.txt, or a {CAPTIONS_FILE}")
        if self.skipped:
            log.warning("%s: using %d images, skipped %s", self.root, len(self.items),
                        dict(self.skipped))
        self._warned = False

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, None]:
        n = len(self.items)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of length {n}")
        for k in range(n):  # a file that broke after the scan: take the next one, count it
            path, caption = self.items[(i + k) % n]
            try:
                return to_tensor(load_image(path, self.size)), caption, None
            except _READ_ERRORS as e:
                self.skipped["unreadable_image"] += 1
                if not self._warned:
                    log.warning("%s: unreadable (%s); using the next image instead", path, e)
                    self._warned = True
        raise DatasetError(f"{self.root}: none of the {n} images could be decoded")
