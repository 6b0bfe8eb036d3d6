"""The built-in captioned dataset: procedural shapes, deterministic by (seed, split, index).

Each sample is one or two objects (circle, square, triangle, star, cross) in a palette colour,
small or large, in a cell of a 3x3 grid, on a solid palette background, with a caption a
person would write ("a small red circle in the top left on a blue background") and the exact
ground truth (`Attrs`) that `training.scorer` scores generated images against.

Splits (the held-out combinations are the same for every seed):
- "train": objects never have a (colour, kind) pair from `HELDOUT_COMBOS`;
- "val": the training distribution, an independent random stream (for validation metrics);
- "heldout": every sample holds at least one object whose (colour, kind) is in
  `HELDOUT_COMBOS`, so it measures compositional generalisation to unseen pairs.

The generator is numpy + PIL (objects are drawn at 4x and box-downsampled, so edges are
anti-aliased); only `to_tensor` and `ShapesDataset.__getitem__` touch torch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

# Colours far apart in RGB (closest pair, yellow/orange, is ~98 apart) so nearest-palette
# segmentation of a generated image is unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 40),
    "green": (40, 170, 60),
    "blue": (30, 90, 230),
    "yellow": (250, 230, 40),
    "purple": (150, 50, 200),
    "orange": (250, 135, 15),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Object extent (the longer side of its box) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.175, "large": 0.27}
# Cell centres sit inside the thirds (not at 1/6, 1/2, 5/6) so a large object in a corner
# cell stays inside the image; cells for scoring are still the exact thirds.
CELL_CENTRES: tuple[float, float, float] = (0.19, 0.5, 0.81)
JITTER = 0.02  # of the image side, uniform, per axis
MIN_GAP = 1 / 32  # of the image side: two objects' boxes never come closer than this
P_TWO = 0.5  # probability of a second object
# (colour, kind) pairs that only the "heldout" split produces: one per kind, five colours.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset({
    ("orange", "circle"), ("white", "square"), ("green", "triangle"),
    ("purple", "star"), ("yellow", "cross"),
})
SPLITS: dict[str, int] = {"train": 0, "val": 1, "heldout": 2}

CELL_NAMES: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
# Phrasings per cell (row, col); each names the cell unambiguously.
_POSITION_WORDS: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the top left", "in the top left corner", "at the top left"),
    (0, 1): ("at the top", "in the top middle", "at the top center"),
    (0, 2): ("in the top right", "in the top right corner", "at the top right"),
    (1, 0): ("on the left", "on the left side", "at the left"),
    (1, 1): ("in the center", "in the middle", "in the centre"),
    (1, 2): ("on the right", "on the right side", "at the right"),
    (2, 0): ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "in the bottom middle", "at the bottom center"),
    (2, 2): ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}
_SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
_ONE_TEMPLATES: tuple[str, ...] = (
    "a {o1} {p1} on {a_bg} background",
    "a {o1} {p1}, {bg} background",
    "{bg} background with a {o1} {p1}",
    "one {o1} {p1} on {bg}",
    "a picture of a {o1} {p1} against {a_bg} background",
    "a {o1} on {a_bg} background, {p1}",
)
_TWO_TEMPLATES: tuple[str, ...] = (
    "a {o1} {p1} and a {o2} {p2} on {a_bg} background",
    "two objects on {a_bg} background: a {o1} {p1} and a {o2} {p2}",
    "{bg} background, a {o1} {p1}, a {o2} {p2}",
    "two shapes, a {o1} {p1} and a {o2} {p2}, on {bg}",
    "a {o1} {p1} with a {o2} {p2} on {a_bg} background",
)
_TRAIN_COMBOS = tuple((c, k) for c in COLOURS for k in KINDS if (c, k) not in HELDOUT_COMBOS)
_HELDOUT_LIST = tuple(sorted(HELDOUT_COMBOS))
_ALL_COMBOS = tuple((c, k) for c in COLOURS for k in KINDS)
_SIZE_NAMES = tuple(SIZES)


@dataclass(frozen=True)
class ShapeObject:
    kind: str
    colour: str
    size: str  # "small" | "large"
    cell: tuple[int, int]  # (row, col) in the 3x3 grid
    center: tuple[float, float]  # (x, y) in pixels of a size-S image; pixel i spans [i, i+1)
    extent: float  # the longer side of the object's box, in pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive, rounded from the geometry


@dataclass(frozen=True)
class Attrs:
    """Ground truth of one sample: what the caption says, in numbers."""
    background: str
    objects: tuple[ShapeObject, ...]
    image_size: int


def _unit_outline(kind: str) -> np.ndarray | None:
    """Polygon (N, 2) of a shape whose box is centred at 0 with longer side 2; None: ellipse."""
    if kind == "circle":
        return None
    if kind == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    if kind == "triangle":  # apex up, base at the bottom
        return np.array([[0, -1], [1, 1], [-1, 1]], float)
    if kind == "cross":  # a plus sign; arms 0.4 of the extent so it survives at small sizes
        a = 0.4
        return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                         [-a, a], [-1, a], [-1, -a], [-a, -a]], float)
    if kind == "star":  # five points, fat inner radius so it reads as a star at ~11 px
        ang = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.47)
        pts = np.stack([r * np.cos(ang), r * np.sin(ang)], 1)
        pts -= (pts.max(0) + pts.min(0)) / 2  # centre the box, not the circumcircle
        return pts / (pts.max(0) - pts.min(0)).max() * 2
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


_OUTLINES = {k: _unit_outline(k) for k in KINDS}
# half width and half height of each unit shape (1 on the longer side)
_HALF = {k: (1.0, 1.0) if p is None else (float(p[:, 0].max()), float(p[:, 1].max()))
         for k, p in _OUTLINES.items()}


def make_object(kind: str, colour: str, size: str, cell: tuple[int, int], image_size: int,
                jitter: tuple[float, float] = (0.0, 0.0)) -> ShapeObject:
    """A `ShapeObject` at a grid cell (jitter in fractions of the image side)."""
    s = image_size
    cx = (CELL_CENTRES[cell[1]] + jitter[0]) * s
    cy = (CELL_CENTRES[cell[0]] + jitter[1]) * s
    extent = SIZES[size] * s
    hx, hy = _HALF[kind]
    hx, hy = hx * extent / 2, hy * extent / 2
    bbox = (int(round(cx - hx)), int(round(cy - hy)), int(round(cx + hx)), int(round(cy + hy)))
    return ShapeObject(kind, colour, size, cell, (cx, cy), extent, bbox)


def _boxes_apart(a: ShapeObject, b: ShapeObject, gap: float) -> bool:
    # exact float boxes, not the rounded ints, so the gap holds at any image size
    ahx, ahy = _HALF[a.kind]
    bhx, bhy = _HALF[b.kind]
    dx = abs(a.center[0] - b.center[0]) - (ahx * a.extent + bhx * b.extent) / 2
    dy = abs(a.center[1] - b.center[1]) - (ahy * a.extent + bhy * b.extent) / 2
    return max(dx, dy) >= gap


def sample_attrs(split: str, index: int, seed: int = 0, image_size: int = 64
                 ) -> tuple[Attrs, str]:
    """The ground truth and caption of sample `index`: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    n = 2 if rng.random() < P_TWO else 1
    first_pool = _HELDOUT_LIST if split == "heldout" else _TRAIN_COMBOS
    other_pool = _ALL_COMBOS if split == "heldout" else _TRAIN_COMBOS
    for _ in range(100):  # rejection: two objects must not touch (almost always 1-2 tries)
        pools = (first_pool, other_pool)[:n]
        combos = [pool[rng.integers(len(pool))] for pool in pools]
        cells = rng.permutation(9)[:n]  # distinct cells
        sizes = [_SIZE_NAMES[s] for s in rng.integers(len(SIZES), size=n)]
        jit = rng.uniform(-JITTER, JITTER, size=(n, 2))
        objs = [make_object(k, c, sz, (int(cell) // 3, int(cell) % 3), image_size,
                            (float(j[0]), float(j[1])))
                for (c, k), cell, sz, j in zip(combos, cells, sizes, jit)]
        if n == 1 or _boxes_apart(objs[0], objs[1], MIN_GAP * image_size):
            break
    else:  # unreachable in practice: keep one object rather than emit overlapping ones
        objs = objs[:1]
    if len(objs) == 2 and rng.random() < 0.5:  # the held-out object is not always named first
        objs.reverse()
    used = {o.colour for o in objs}
    free = [c for c in COLOURS if c not in used]
    background = free[rng.integers(len(free))]
    attrs = Attrs(background, tuple(objs), image_size)
    return attrs, _caption(attrs, rng)


def _caption(attrs: Attrs, rng: np.random.Generator) -> str:
    def pick(options):
        return options[rng.integers(len(options))]

    bg = attrs.background
    # objects always start with a size word ("a small ..."), so only the background needs "an"
    words = {"bg": bg, "a_bg": ("an " if bg[0] in "aeiou" else "a ") + bg}
    for j, o in enumerate(attrs.objects, 1):
        words[f"o{j}"] = f"{pick(_SIZE_WORDS[o.size])} {o.colour} {o.kind}"
        words[f"p{j}"] = pick(_POSITION_WORDS[o.cell])
    templates = _ONE_TEMPLATES if len(attrs.objects) == 1 else _TWO_TEMPLATES
    return pick(templates).format(**words)


def render(attrs: Attrs, image_size: int | None = None, supersample: int = 4) -> np.ndarray:
    """Draw `attrs` as uint8 (S, S, 3): drawn at `supersample`x, box-filtered down."""
    s = image_size or attrs.image_size
    scale = s / attrs.image_size * supersample  # attrs' pixels -> canvas pixels
    big = s * supersample
    img = Image.new("RGB", (big, big), PALETTE[attrs.background])
    draw = ImageDraw.Draw(img)
    for o in attrs.objects:
        cx, cy, r = o.center[0] * scale, o.center[1] * scale, o.extent / 2 * scale
        pts = _OUTLINES[o.kind]
        if pts is None:
            draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=PALETTE[o.colour])
        else:
            # PIL fills pixel centres inside the polygon; shift by half a pixel to match
            xy = [(cx + px * r - 0.5, cy + py * r - 0.5) for px, py in pts]
            draw.polygon(xy, fill=PALETTE[o.colour])
    return np.asarray(img.resize((s, s), Image.BOX))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (3, H, W) in [-1, 1] -> uint8 (H, W, 3), rounding and clamping."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def collate(batch: list[tuple]) -> tuple[torch.Tensor, list[str], list]:
    """DataLoader collate: (images (B, 3, S, S), captions, attrs) with attrs kept as a list."""
    images, captions, attrs = zip(*batch)
    return torch.stack(images), list(captions), list(attrs)


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style dataset: item i -> (image (3, S, S) float in [-1, 1], caption, Attrs).

    Every item is a pure function of (seed, split, i), so any order, sharding or resume
    position gives the same samples.
    """

    def __init__(self, split: str = "train", size: int = 64, length: int = 10_000, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
        if size < 16:
            raise ValueError(f"image size must be at least 16 pixels, got {size}")
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        self.split, self.size, self.length, self.seed = split, size, length, seed

    def __len__(self) -> int:
        return self.length

    def _index(self, i: int) -> int:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        return i % self.length

    def attrs(self, i: int) -> tuple[Attrs, str]:
        """Ground truth and caption of item i, without drawing it."""
        return sample_attrs(self.split, self._index(i), self.seed, self.size)

    def sample(self, i: int) -> tuple[np.ndarray, str, Attrs]:
        """Item i as a uint8 (S, S, 3) image, its caption and its ground truth."""
        attrs, caption = self.attrs(i)
        return render(attrs), caption, attrs

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, Attrs]:
        image, caption, attrs = self.sample(i)
        return to_tensor(image), caption, attrs

    def caption_corpus(self, n: int | None = None) -> list[str]:
        """The captions of the first n items (all by default), e.g. to learn a vocabulary."""
        return [self.attrs(i)[1] for i in range(self.length if n is None else n)]


def caption_corpus(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """Captions of the first n items of a split (no images drawn)."""
    return [sample_attrs(split, i, seed)[1] for i in range(n)]
