"""The image scorer: prompt adherence on the built-in shapes data, scored exactly from the ground truth.

Torch-free (numpy only); `training.evaluate` drives it over the images a checkpoint generates.

An image generated from a sample's caption is segmented and compared with the sample's
`Attrs`:
1. every pixel gets its nearest palette colour; the most common one is the background;
2. connected components (8-connected) of the other pixels are the objects; specks are
   dropped, and a component holding two solid colour regions is split, so touching objects
   still count as two; an object's colour is that of its core (the pixels farthest from the
   background), which blends at blurred edges cannot outvote;
3. each object's mask is re-cut at 50% coverage between its colour and the background
   (anti-aliased edges then fall where the true outline is) and its shape is classified from
   scale-free geometric features (fill of its box, solidity, band profiles, ...) by a
   nearest-centroid classifier fitted on ground-truth renders of single shapes, sharp and
   blurred (fitted once per image size);
4. detections are matched one-to-one to the ground-truth objects (colour first, then shape,
   then cell), and each object is scored for colour, shape, position (centroid in the named
   3x3 cell) and size; the image for count and background.

Made for 64 px images (also fine at 48 and above; at 32 px small shapes are a few pixels
and blurred ones become ambiguous). No scipy: components come from a vectorised
min-label propagation.
"""
from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from training.data.shapes import (COLOURS, KINDS, PALETTE, SIZES, Attrs, ShapesDataset,
                                  make_object, render)

log = logging.getLogger(__name__)

_PAL = np.array([PALETTE[c] for c in COLOURS], np.float32)  # (P, 3)
MIN_AREA = 0.004  # of the image area: smaller components are specks (a small star is ~0.013)
_SIZE_SPLIT = float(np.mean(list(SIZES.values())))  # extent threshold between small and large
_FEATURES = ("fill", "solidity", "aspect", "centroid_y", "top", "bottom", "middle", "sides",
             "corners", "diagonals")


@dataclass(frozen=True)
class Detection:
    colour: str
    kind: str  # one of KINDS, or "unknown" when far from every shape seen in fitting
    size: str
    cell: tuple[int, int]  # (row, col) of the centroid
    centroid: tuple[float, float]  # (x, y) in pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive
    area: int


def _to_rgb255(image, value_range: tuple[float, float]) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"expected uint8 or float pixels, got {a.dtype}")
    lo, hi = value_range
    return ((a.astype(np.float32) - lo) / (hi - lo)).clip(0, 1) * 255


def _shift_reduce(a: np.ndarray, op) -> np.ndarray:
    """op-reduce every element with its 8 neighbours (those inside the array)."""
    out = a.copy()
    for axis in (0, 1):  # separable: rows then columns covers the 3x3 window
        src = out.copy()
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(1, None), slice(None, -1)
        op(out[tuple(lo)], src[tuple(hi)], out=out[tuple(lo)])
        op(out[tuple(hi)], src[tuple(lo)], out=out[tuple(hi)])
    return out


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool (H, W) mask -> (labels 1..K, 0 outside; K)."""
    full = np.zeros(mask.shape, np.int32)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if len(rows) == 0:
        return full, 0
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    mask = mask[box]  # only the part holding foreground needs propagating
    h, w = mask.shape
    none = h * w  # larger than every pixel index
    lab = np.where(mask, np.arange(h * w).reshape(h, w), none)
    while True:
        # each pixel takes the smallest label among its 3x3 neighbours ...
        new = _shift_reduce(lab, np.minimum)
        new[~mask] = none
        flat = new.ravel()
        inside = flat < none
        flat[inside] = flat[flat[inside]]
        if np.array_equal(new, lab):
            break
        lab = new
    roots, dense = np.unique(lab[mask], return_inverse=True)
    full[box][mask] = dense + 1
    return full, len(roots)


def _dilate(mask: np.ndarray) -> np.ndarray:
    return _shift_reduce(mask, np.logical_or)


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def _hull_area(m: np.ndarray) -> float:
    """Area of the convex hull of the pixel squares of a bool mask (monotone chain)."""
    pts = set()
    for r in np.nonzero(m.any(1))[0]:
        xs = np.nonzero(m[r])[0]
        for x in (xs[0], xs[-1] + 1):
            pts.update({(int(x), int(r)), (int(x), int(r) + 1)})
    pts = sorted(pts)

    def half(points):
        chain = []
        for p in points:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(pts) + half(pts[::-1]), float)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def shape_features(mask: np.ndarray) -> np.ndarray:
    """Scale-free features of one object's bool mask, in the order of `_FEATURES`."""
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    m = mask[y0:ys.max() + 1, x0:xs.max() + 1].astype(np.float32)
    h, w = m.shape
    area = float(m.sum())
    kh, kw = max(1, round(0.2 * h)), max(1, round(0.2 * w))  # band thickness
    ch, cw = max(1, round(0.25 * h)), max(1, round(0.25 * w))  # corner block
    mid = (h - kh) // 2
    corners = np.mean([m[:ch, :cw].mean(), m[:ch, -cw:].mean(), m[-ch:, :cw].mean(),
                       m[-ch:, -cw:].mean()])
    # coverage at the four points a quarter in from each corner, bilinear: inside a circle,
    # outside a cross's arms
    p = np.pad(m, 1)
    diag = []
    for fy, fx in ((0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)):
        y, x = fy * h + 0.5, fx * w + 0.5  # pixel-centre coordinates in the padded mask
        iy, ix = int(y), int(x)
        ty, tx = y - iy, x - ix
        diag.append((1 - ty) * ((1 - tx) * p[iy, ix] + tx * p[iy, ix + 1])
                    + ty * ((1 - tx) * p[iy + 1, ix] + tx * p[iy + 1, ix + 1]))
    return np.array([
        area / (h * w),  # square 1, circle .79, cross .64, triangle .5, star ~.45
        area / _hull_area(m),  # concave shapes (star, cross) well below 1
        np.log(h / w),
        (ys.mean() + 0.5 - y0) / h - 0.5,  # triangle's mass sits low
        m[:kh].mean(), m[-kh:].mean(), m[mid:mid + kh].mean(),
        (m[:, :kw].mean() + m[:, -kw:].mean()) / 2,
        corners, np.mean(diag),
    ], np.float32)


def _segment(img: np.ndarray) -> tuple[int, list[tuple[int, np.ndarray]]]:
    """(H, W, 3) float 0..255 -> (background palette index, [(colour index, mask), ...])."""
    h, w, _ = img.shape
    flat = img.reshape(-1, 3)
    d2 = (flat ** 2).sum(1, keepdims=True) - 2 * flat @ _PAL.T + (_PAL ** 2).sum(1)  # (HW, P)
    lab = d2.argmin(1).reshape(h, w)
    bg = int(np.bincount(lab.ravel(), minlength=len(_PAL)).argmax())
    bg_rgb = img[lab == bg].mean(0)  # the measured background, not the nominal one
    min_area = MIN_AREA * h * w
    comps, k = label_components(lab != bg)
    found = []
    for i in range(1, k + 1):
        ys, xs = np.nonzero(comps == i)
        if len(ys) < min_area:
            continue
        # work in the component's box plus a margin for the anti-aliased rim
        y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, h)
        x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, w)
        comp, cl, ci = comps[y0:y1, x0:x1] == i, lab[y0:y1, x0:x1], img[y0:y1, x0:x1]
        cc = np.bincount(cl[comp], minlength=len(_PAL))
        # a component holding two solid colour regions is two touching objects; blended
        # edges (orange between yellow and red) can be a large share of a small blurred
        # object, but they are thin and vanish under erosion
        majors = [int(c) for c in np.argsort(-cc)
                  if cc[c] >= max(0.25 * len(ys), min_area)
                  and _erode(comp & (cl == c)).sum() >= min_area / 2]
        if len(majors) < 2:
            # one object: its colour is that of its core, the pixels farthest from the
            # background; blur can make blends (orange around a small yellow star on red)
            # the majority
            dist = np.linalg.norm(ci - bg_rgb, axis=-1)
            core = comp & (dist >= 0.8 * np.percentile(dist[comp], 95))
            majors = [int(np.bincount(cl[core], minlength=len(_PAL)).argmax())]
        for c in majors:
            region = _dilate(comp)  # anti-aliased rim pixels may be labelled background
            if len(majors) > 1:
                others = np.isin(cl, [o for o in majors if o != c])
                region &= _dilate(comp & (cl == c)) & ~others
            axis = ci[comp & (cl == c)].mean(0) - bg_rgb
            alpha = (ci - bg_rgb) @ axis / max(float(axis @ axis), 1e-6)  # coverage estimate
            if (region & (alpha >= 0.5)).sum() >= min_area:
                mask = np.zeros((h, w), bool)
                mask[y0:y1, x0:x1] = region & (alpha >= 0.5)
                found.append((c, mask))
    return bg, found


@functools.lru_cache(maxsize=8)
def _shape_classifier(image_size: int, reps: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Nearest-centroid on ground-truth renders of single shapes, clean and blurred.

    One centroid per (kind, size, blurred or not): pixelation makes a small circle's
    features differ from a large one's, and blur a small star's from a sharp one's.
    Returns (centroids (K, F), their kind indices (K,), feature scale (F,), rejection distance).
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(1234)
    feats, groups = [], []
    groups_def = list(itertools.product(KINDS, SIZES, (False, True)))
    for kind, size in itertools.product(KINDS, SIZES):
        for _ in range(reps):
            fg, bg = rng.choice(len(COLOURS), 2, replace=False)
            cell = (int(rng.integers(3)), int(rng.integers(3)))
            jit = tuple(float(v) for v in rng.uniform(-0.02, 0.02, 2))
            obj = make_object(kind, COLOURS[fg], size, cell, image_size, jit)
            image = render(Attrs(COLOURS[bg], (obj,), image_size))
            for blur in (False, True):
                _, found = _segment(corrupt(image, blur=blur).astype(np.float32))
                feats.append(shape_features(max(found, key=lambda f: f[1].sum())[1]))
                groups.append(groups_def.index((kind, size, blur)))
    x, y = np.stack(feats), np.array(groups)
    centroids = np.stack([x[y == g].mean(0) for g in range(len(groups_def))])
    kinds = np.array([KINDS.index(k) for k, _, _ in groups_def])
    scale = np.sqrt(((x - centroids[y]) ** 2).mean(0)) + 0.02  # pooled spread, floored
    dist = np.sqrt((((x[:, None] - centroids) / scale) ** 2).sum(-1))  # (N, K)
    fit_acc = float((kinds[dist.argmin(1)] == kinds[y]).mean())
    reject = 3.0 * float(dist[np.arange(len(y)), y].max())  # generous: only reject non-shapes
    log.info("shape classifier for %d px: %d renders, fit accuracy %.3f, %.2fs", image_size,
             len(y), fit_acc, time.perf_counter() - t0)
    return centroids, kinds, scale, reject


def detect_objects(image, value_range: tuple[float, float] = (0.0, 1.0)) -> tuple[str, list[Detection]]:
    """Segment an image: (background colour, objects largest first).

    `image`: (H, W, 3) uint8, or float in `value_range` ((0, 1) by default; (-1, 1) for
    tensors as the datasets give them), or a PIL image.
    """
    return _detect(_to_rgb255(image, value_range))


def _detect(img: np.ndarray) -> tuple[str, list[Detection]]:
    h, w, _ = img.shape
    centroids, kinds, scale, reject = _shape_classifier(w)
    bg, found = _segment(img)
    dets = []
    for c, mask in found:
        ys, xs = np.nonzero(mask)
        d = np.sqrt((((shape_features(mask) - centroids) / scale) ** 2).sum(-1))
        kind = KINDS[kinds[int(d.argmin())]] if d.min() <= reject else "unknown"
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
        extent = max(x1 - x0, y1 - y0) / w
        dets.append(Detection(
            colour=COLOURS[c], kind=kind, size="large" if extent > _SIZE_SPLIT else "small",
            cell=(min(int(cy / h * 3), 2), min(int(cx / w * 3), 2)), centroid=(cx, cy),
            bbox=(x0, y0, x1, y1), area=len(xs)))
    dets.sort(key=lambda d: -d.area)
    return COLOURS[bg], dets


def _match(attrs: Attrs, dets: list[Detection], width: int) -> list[Detection | None]:
    """One-to-one assignment of detections to objects maximising agreement (brute force)."""
    cands = dets[:6]
    k = width / attrs.image_size  # ground truth pixels -> image pixels
    best, best_score = [None] * len(attrs.objects), -1e9
    for pick in itertools.product(range(-1, len(cands)), repeat=len(attrs.objects)):
        used = [p for p in pick if p >= 0]
        if len(used) != len(set(used)):
            continue
        score = 0.0
        for o, p in zip(attrs.objects, pick):
            if p >= 0:
                d = cands[p]
                dist = np.hypot(d.centroid[0] - o.center[0] * k, d.centroid[1] - o.center[1] * k)
                # any match beats none; colour outranks shape outranks cell; distance breaks ties
                score += (10 + 4 * (d.colour == o.colour) + 2 * (d.kind == o.kind)
                          + (d.cell == o.cell) + 0.5 * (d.size == o.size) - 1e-3 * dist / width)
        if score > best_score:
            best, best_score = [cands[p] if p >= 0 else None for p in pick], score
    return best


def evaluate_images(images: list, attrs: list[Attrs],
                    value_range: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Score images against the ground truth of the captions they were generated from.

    Returns accuracies over objects (`colour`, `shape`, `position`, `size`) and over images
    (`count`: as many objects as the caption names; `background`; `all`: count right and every
    object right in colour, shape and position), `n_images`, `n_objects`, and `per_image`: one
    dict per image with per-object booleans and the detections.
    """
    if len(images) != len(attrs):
        raise ValueError(f"got {len(images)} images but {len(attrs)} attrs; expected one each")
    per_image = []
    for image, a in zip(images, attrs):
        img = _to_rgb255(image, value_range)
        bg, dets = _detect(img)
        matched = _match(a, dets, img.shape[1])
        r = {
            "background": bg == a.background,
            "count": len(dets) == len(a.objects),
            "colour": [d is not None and d.colour == o.colour for o, d in zip(a.objects, matched)],
            "shape": [d is not None and d.kind == o.kind for o, d in zip(a.objects, matched)],
            "position": [d is not None and d.cell == o.cell for o, d in zip(a.objects, matched)],
            "size": [d is not None and d.size == o.size for o, d in zip(a.objects, matched)],
            "detected": [asdict(d) for d in dets],
        }
        r["all"] = r["count"] and all(r["colour"]) and all(r["shape"]) and all(r["position"])
        per_image.append(r)
    out: dict = {"n_images": len(per_image), "n_objects": sum(len(a.objects) for a in attrs)}
    for key in ("colour", "shape", "position", "size"):
        out[key] = float(np.mean([v for r in per_image for v in r[key]])) if per_image else 0.0
    for key in ("count", "background", "all"):
        out[key] = float(np.mean([r[key] for r in per_image])) if per_image else 0.0
    out["per_image"] = per_image
    return out


def corrupt(image: np.ndarray, noise: float = 0.0, blur: bool = False,
            rng: np.random.Generator | None = None) -> np.ndarray:
    """Simulate a generator's imperfection on a uint8 image: [1 2 1]/4 blur, Gaussian noise
    (std `noise` in units of the full range)."""
    x = image.astype(np.float32)
    if blur:
        for axis in (0, 1):  # separable binomial blur, edges repeated
            p = np.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
            lo, mid, hi = (np.take(p, range(i, i + x.shape[axis]), axis=axis) for i in range(3))
            x = 0.25 * lo + 0.5 * mid + 0.25 * hi
    if noise > 0:
        rng = rng or np.random.default_rng(0)
        x = x + rng.normal(0.0, noise * 255, x.shape)
    return x.clip(0, 255).round().astype(np.uint8)


CONDITIONS = {"clean": (0.0, False), "noise": (0.04, False), "blur": (0.0, True),
              "noise+blur": (0.04, True)}


def evaluate_dataset_self(n: int = 500, size: int = 64, seed: int = 0,
                          splits: tuple[str, ...] = ("val", "heldout")) -> dict:
    """The evaluator's own accuracy on ground-truth renders, clean and corrupted.

    Returns {split: {condition: summary}} for the conditions in `CONDITIONS` (noise std 0.04
    of the range, i.e. ~10/255; blur [1 2 1]/4 in both axes), summaries without `per_image`.
    """
    out: dict = {}
    for split in splits:
        ds = ShapesDataset(split, size=size, length=n, seed=seed)
        samples = [ds.sample(i) for i in range(n)]
        attrs = [s[2] for s in samples]
        out[split] = {}
        for name, (noise, blur) in CONDITIONS.items():
            rng = np.random.default_rng([seed, n])
            images = [corrupt(s[0], noise, blur, rng) for s in samples]
            res = evaluate_images(images, attrs)
            res.pop("per_image")
            out[split][name] = res
            log.info("evaluator self-check %s/%s: %s", split, name,
                     {k: round(v, 4) for k, v in res.items() if isinstance(v, float)})
    return out
