"""Where a bundle's weights live: one page-aligned weights file per component, read by all its graphs.

The portable graph ``<component>.onnx`` keeps every initializer of ``MIN_EXTERNAL_BYTES`` or more in
``<component>.weights`` at 4096-byte offsets (onnxruntime and the TensorRT parser can map such a
file; initializers below that size stay in the graph, where a page each would waste more than they
hold). A graph derived from it (the onnxruntime-CPU variant, ``export/optimize.py``) points each
initializer whose bytes equal one of the portable graph's at the same file, offset and length;
only initializers the derivation created go to a small file of its own (``<variant>.weights``).
Every location is a plain file name beside the graph, so the graph opens from its path and, in the
runtime, from verified bytes with the files handed over by name.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

ALIGN = 4096  # the page size: offsets that allow memory-mapping each tensor
MIN_EXTERNAL_BYTES = 1024  # smaller initializers stay inside the graph's protobuf
WEIGHTS_SUFFIX = ".weights"

Ref = tuple[str, int, int]  # (location, offset, length)


def weights_name(graph: str | Path) -> str:
    """The weights file of graph file ``graph``: ``unet.onnx`` -> ``unet.weights``."""
    name = Path(graph).name
    return (name[: -len(".onnx")] if name.endswith(".onnx") else name) + WEIGHTS_SUFFIX


def external_ref(t: TensorProto) -> Ref | None:
    """(location, offset, length) of an initializer kept in an external file; None for one held inline."""
    if t.data_location != TensorProto.EXTERNAL:
        return None
    e = {x.key: x.value for x in t.external_data}
    return e["location"], int(e.get("offset", 0)), int(e["length"])


def _point_to(t: TensorProto, ref: Ref) -> None:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in zip(("location", "offset", "length"), (ref[0], str(ref[1]), str(ref[2]))):
        t.external_data.add(key=k, value=v)


def _inline_bytes(t: TensorProto, min_bytes: int = MIN_EXTERNAL_BYTES) -> bytes | None:
    """The little-endian bytes of an inline numeric initializer of ``min_bytes`` or more, now held
    as ``raw_data``; None for one that stays in the graph (small, external already, or strings)."""
    if t.data_location == TensorProto.EXTERNAL or t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    if not t.HasField("raw_data"):
        n = int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if n < min_bytes:
            return None
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))  # typed fields -> raw_data
    return t.raw_data if len(t.raw_data) >= min_bytes else None


class _WeightsWriter:
    """Appends tensors to one file at page-aligned offsets; the file is created on the first tensor."""

    def __init__(self, path: Path):
        self.path, self.f = path, None

    def add(self, data: bytes) -> Ref:
        if self.f is None:
            self.f = open(self.path, "wb")
        self.f.write(b"\0" * (-self.f.tell() % ALIGN))
        offset = self.f.tell()
        self.f.write(data)
        return self.path.name, offset, len(data)

    def close(self) -> list[str]:
        """The file names written (none when no tensor was added)."""
        if self.f is None:
            return []
        self.f.close()
        return [self.path.name]


def save_with_weights(model: onnx.ModelProto, path: str | Path, shared: dict[str, Ref] | None = None,
                      external: frozenset[str] = frozenset()) -> list[str]:
    """Save ``model`` to ``path`` with its large inline initializers moved out: each whose sha256 is a
    key of ``shared`` points at that (location, offset, length), the others go to ``weights_name(path)``.
    Initializers named in ``external`` move out whatever their size (LoRA targets, which onnxruntime
    replaces only when external). Initializers already external keep their location. ``model`` is
    changed in place (its inline data is dropped). Returns every external file the saved graph names,
    in order of first use."""
    path = Path(path)
    writer = _WeightsWriter(path.with_name(weights_name(path)))
    try:
        for t in model.graph.initializer:
            data = _inline_bytes(t, 1 if t.name in external else MIN_EXTERNAL_BYTES)
            if data is None:
                continue
            ref = (shared or {}).get(hashlib.sha256(data).hexdigest()) or writer.add(data)
            _point_to(t, ref)
    finally:
        writer.close()
    onnx.save(model, str(path))
    return locations(model)


def locations(model: onnx.ModelProto) -> list[str]:
    """The external files ``model``'s initializers name, in order of first use."""
    return list(dict.fromkeys(r[0] for t in model.graph.initializer if (r := external_ref(t)) is not None))


def weights_by_digest(graph: str | Path) -> dict[str, Ref]:
    """sha256 of each external initializer's bytes -> its (location, offset, length), for the graph file
    ``graph`` (its external files are memory-mapped, not read whole)."""
    graph = Path(graph)
    model = onnx.load(str(graph), load_external_data=False)
    maps: dict[str, np.memmap] = {}
    out: dict[str, Ref] = {}
    for t in model.graph.initializer:
        ref = external_ref(t)
        if ref is None:
            continue
        loc, offset, length = ref
        if loc not in maps:
            maps[loc] = np.memmap(graph.with_name(loc), dtype=np.uint8, mode="r")
        out.setdefault(hashlib.sha256(maps[loc][offset:offset + length]).hexdigest(), ref)
    return out
