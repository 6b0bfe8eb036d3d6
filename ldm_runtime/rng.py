"""Random streams of a pipeline call: one for the whole batch (an int seed), or one per image (a list).

``call_generator`` turns a call's ``seed`` into the generator its draws come from. An int seeds
one ``np.random.default_rng(seed)`` for the batch, as diffusers' generator does. A list of seeds
gives ``ImageGenerators``: row i of every draw comes from ``np.random.default_rng(seeds[i])``, in
the order the call draws, so image i is the image a one-image call with ``seed=seeds[i]`` makes.
"""
from __future__ import annotations

import secrets
from typing import Any, Sequence

import numpy as np


class ImageGenerators:
    """One ``np.random.Generator`` per image; ``standard_normal((B, ...))`` draws row i from generator i."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self._generators = [np.random.default_rng(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self._generators)

    def standard_normal(self, size: tuple[int, ...], dtype: Any = np.float64) -> np.ndarray:
        """Standard normals of shape ``size`` (its first dim: one row per image), each row its image's next draw."""
        size = tuple(size)
        if not size or size[0] != len(self._generators):
            raise ValueError(f"per-image generators draw one row per image: shape {list(size)} should have "
                             f"{len(self._generators)} rows")
        return np.stack([g.standard_normal(size[1:], dtype=dtype) for g in self._generators])


def call_generator(seed: int | Sequence[int] | None, batch: int) -> tuple[list[int], np.random.Generator | ImageGenerators]:
    """(one seed per image, the generator of the call) for a checked ``seed``: None (one picked at random
    and reported), an int (one stream for the batch) or a list of ``batch`` ints (one stream per image)."""
    if isinstance(seed, Sequence):
        gens = ImageGenerators(seed)
        return gens.seeds, gens
    picked = secrets.randbelow(2**32) if seed is None else int(seed)
    return [picked] * batch, np.random.default_rng(picked)
