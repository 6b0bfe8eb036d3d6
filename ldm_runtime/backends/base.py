"""The ``Engine`` protocol and the input checks every backend shares."""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..manifest import TensorSpec


class EngineInputError(ValueError):
    """Feeds that do not match an engine's declared inputs (name, dtype or shape)."""


@runtime_checkable
class Engine(Protocol):
    """A loaded model: ``run`` takes and returns name-keyed arrays.

    The returned arrays belong to the caller: a later ``run`` never overwrites them.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_feeds(engine_name: str, specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Check ``feeds`` against ``specs``; return the values bound to symbolic dimensions.

    A symbolic dimension (a string such as ``"B"``) must take the same value in every input
    that names it; a fixed dimension (an int) must match exactly.
    """
    expected = {s.name for s in specs}
    got = set(feeds)
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise EngineInputError(f"{engine_name}: expected inputs {sorted(expected)}, got {sorted(got)} ({'; '.join(parts)})")
    dims: dict[str, int] = {}
    for spec in specs:
        arr = feeds[spec.name]
        dtype = getattr(arr, "dtype", None)
        if dtype is None or np.dtype(dtype) != np.dtype(spec.dtype):
            raise EngineInputError(f"{engine_name}: input {spec.name!r} expected dtype {spec.dtype}, got {dtype}")
        shape = tuple(arr.shape)
        if len(shape) != len(spec.shape):
            raise EngineInputError(
                f"{engine_name}: input {spec.name!r} expected shape {list(spec.shape)} (rank {len(spec.shape)}), got {list(shape)}"
            )
        for want, have in zip(spec.shape, shape):
            if isinstance(want, int):
                if want != have:
                    raise EngineInputError(f"{engine_name}: input {spec.name!r} expected shape {list(spec.shape)}, got {list(shape)}")
            else:
                bound = dims.setdefault(want, have)
                if bound != have:
                    raise EngineInputError(
                        f"{engine_name}: dimension {want!r} is {bound} in one input but {have} in {spec.name!r} (shape {list(shape)})"
                    )
    return dims
