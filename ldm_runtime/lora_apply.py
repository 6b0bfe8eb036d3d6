"""LoRA files fused into a bundle's weights at load time; the bundle on disk is never changed.

The bundle names, per component, the ONNX initializer holding each weight a LoRA can change
(its ``lora_map``, written at export by ``export/lora_map.py``): layout, dtype and where its bytes
lie in the weights file, per graph file. ``load_loras`` reads the LoRA files (``ldm_runtime.lora``),
sums their deltas against the map's shapes and adds them to the base weights, in the layout and
dtype of the graph each backend opens; every refusal (a file, key, shape or scale that does not
fit, a fused fp16 weight out of range) comes here, before any session exists. The engines then
substitute the fused weights: onnxruntime through ``SessionOptions.add_external_initializers``,
TensorRT by refitting a refittable plan.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .lora import LoraError, LoraFile, layers_per_block, lora_deltas, read_lora
from .manifest import BundleError, Manifest

FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class GraphWeight:
    """Where one graph holds a LoRA target: initializer name, layout ("as_is" or "transposed": the
    torch weight's transpose, MatMul), dtype and its bytes in the weights file."""

    initializer: str
    layout: str
    dtype: str
    location: str
    offset: int
    length: int


@dataclass(frozen=True)
class AppliedLora:
    """One LoRA as applied: its file, sha256 and scale (what PNG parameters and ``ldm bench`` name)."""

    path: str
    sha256: str
    scale: float

    def describe(self) -> str:
        return f"{Path(self.path).name} (sha256 {self.sha256[:12]}, scale {self.scale:g})"


def read_lora_map(manifest: Manifest, component: str) -> dict[str, tuple[tuple[int, ...], dict[str, GraphWeight]]]:
    """``component``'s LoRA map: parameter key -> (torch shape, {graph file: GraphWeight}); {} when the
    component has none. The map file is read verified against ``files``."""
    entry = manifest.data["components"].get(component) or {}
    rel = entry.get("lora_map")
    if rel is None:
        return {}
    where = f"components.{component}.lora_map"
    try:
        doc = json.loads(manifest.read_verified(rel, field=where))
        return {key: (tuple(int(d) for d in t["shape"]),
                      {g: GraphWeight(str(w["initializer"]), _layout(w["layout"]), str(np.dtype(w["dtype"])),
                                      str(w["location"]), int(w["offset"]), int(w["length"]))
                       for g, w in t["graphs"].items()})
                for key, t in doc["targets"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{manifest.root}: {where} {rel!r} is not a LoRA map ({type(e).__name__}: {e})") from None


def _layout(value: Any) -> str:
    if value not in ("as_is", "transposed"):
        raise ValueError(f"layout {value!r}, expected 'as_is' or 'transposed'")
    return str(value)


def check_lora_specs(loras: Any) -> list[tuple[str, float]]:
    """``loras`` as a list of (path, scale): a list or tuple of pairs, each a path and a real number."""
    if not isinstance(loras, (list, tuple)):
        raise TypeError(f"loras must be a list of (path, scale) pairs, got {type(loras).__name__}")
    out = []
    for i, item in enumerate(loras):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (str, Path))
                and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)):
            raise TypeError(f"loras[{i}] must be a (path, scale) pair with a number as scale, got {item!r}")
        out.append((str(item[0]), float(item[1])))
    return out


class BundleLoras:
    """The LoRAs fused into one pipeline's weights: ``applied`` (file, sha256, scale) and, per component
    and graph file, the fused weights by initializer name (``for_graph``)."""

    def __init__(self, applied: tuple[AppliedLora, ...], fused: dict[str, dict[str, dict[str, np.ndarray]]]):
        self.applied = applied
        self._fused = fused  # component -> graph file -> initializer -> array

    def components(self) -> tuple[str, ...]:
        return tuple(self._fused)

    def for_graph(self, component: str, graph: str) -> dict[str, np.ndarray]:
        """The fused weights of ``component`` for its graph file ``graph`` ({} when no LoRA changes it)."""
        per_graph = self._fused.get(component)
        if not per_graph:
            return {}
        if graph not in per_graph:
            raise BundleError(f"{component}: the LoRA weights were fused for {sorted(per_graph)}, not for {graph!r}")
        return per_graph[graph]

    def describe(self) -> str:
        """One line naming every LoRA (file, sha256, scale)."""
        return ", ".join(a.describe() for a in self.applied)


def load_loras(manifest: Manifest, loras: Sequence[tuple[str, float]], graphs: Mapping[str, str]) -> BundleLoras:
    """Read ``loras`` ((path, scale) pairs) and fuse them into ``manifest``'s weights for the graph file
    each component opens (``graphs``: component -> graph file). Raises ``LoraError`` (naming the file
    and the key) or ``BundleError``; creates no session."""
    specs = check_lora_specs(loras)
    maps = {c: m for c in graphs if (m := read_lora_map(manifest, c))}
    shapes = {key: shape for m in maps.values() for key, (shape, _) in m.items()}
    if not shapes:
        raise BundleError(f"{manifest.root}: the bundle has no LoRA weight map (lora_map); "
                          "export it again with this version to apply LoRAs")
    files = [(read_lora(path, unet_layers_per_block=layers_per_block(shapes)), scale) for path, scale in specs]
    deltas = lora_deltas(files, shapes)  # refuses non-finite scales, unknown keys, shapes that differ
    fused: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for component, m in maps.items():
        mine = {k: d for k, d in deltas.items() if k in m}
        if mine:
            graph = graphs[component]
            fused[component] = {graph: _fuse(manifest, component, graph, m, mine, files)}
    applied = tuple(AppliedLora(str(f.path), f.sha256, s) for f, s in files)
    return BundleLoras(applied, fused)


def _fuse(manifest: Manifest, component: str, graph: str, m: dict, deltas: dict[str, np.ndarray],
          files: list[tuple[LoraFile, float]]) -> dict[str, np.ndarray]:
    """base + delta for every target of ``deltas``, in ``graph``'s layout and dtype, by initializer name."""
    out: dict[str, np.ndarray] = {}
    maps: dict[str, np.memmap] = {}
    for key, delta in deltas.items():
        shape, per_graph = m[key]
        w = per_graph.get(graph)
        if w is None:
            raise BundleError(f"{manifest.root}: components.{component}.lora_map names no initializer of {key} "
                              f"in {graph!r}")
        base = _base_weight(manifest, component, w, shape, maps)
        fused = base.astype(np.float32) + (delta.T if w.layout == "transposed" else delta)
        limit = FP16_MAX if w.dtype == "float16" else float(np.finfo(np.float32).max)
        worst = float(np.max(np.abs(fused))) if fused.size else 0.0
        if not worst <= limit:  # also NaN
            names = ", ".join(f"{f.path} at scale {s:g}" for f, s in files if key in f.modules)
            raise LoraError(f"LoRA {names}: the fused weight {key} reaches {worst:.4g}, beyond the {w.dtype} range "
                            f"(max {limit:.6g}) of this bundle; lower the scale or use an fp32 bundle")
        out[w.initializer] = np.ascontiguousarray(fused.astype(w.dtype))
    return out


def _base_weight(manifest: Manifest, component: str, w: GraphWeight, shape: tuple[int, ...],
                 maps: dict[str, np.memmap]) -> np.ndarray:
    """The bundle's weight as the graph holds it, copied out of its weights file."""
    onnx_shape = shape if w.layout == "as_is" else shape[::-1]
    dtype = np.dtype(w.dtype)
    if w.length != int(np.prod(onnx_shape, dtype=np.int64)) * dtype.itemsize:
        raise BundleError(f"{manifest.root}: components.{component}.lora_map: {w.initializer!r} has {w.length} bytes, "
                          f"not those of {dtype.name} {list(onnx_shape)}")
    if w.location not in maps:
        path = manifest.path(w.location, field=f"components.{component}.lora_map location")
        maps[w.location] = np.memmap(path, dtype=np.uint8, mode="r")
    raw = maps[w.location][w.offset:w.offset + w.length]
    if raw.size != w.length:
        raise BundleError(f"{manifest.root}: {w.location} ends before {w.initializer!r} (offset {w.offset})")
    return np.array(raw).view(dtype).reshape(onnx_shape)


def lora_graphs(manifest: Manifest, components: Sequence[str], backend: str, device: str,
                cpu_variant: bool) -> dict[str, str]:
    """The graph file whose weights each of ``components`` runs with on ``backend``/``device``: the
    one onnxruntime opens (the CPU variant where it would), the portable graph for TensorRT (its
    plans are refitted with that graph's initializers)."""
    from .backends import LORA_BACKENDS
    from .pipeline import graph_files

    if backend not in LORA_BACKENDS:
        raise ValueError(f"LoRAs are applied on backends {', '.join(LORA_BACKENDS)}, not on {backend!r}")
    use_variant = backend == "onnxruntime" and device == "cpu" and cpu_variant
    present = [c for c in components if c in manifest.data["components"]]
    return {c: graph_files(manifest, c, use_variant)[0][0] for c in present}


def lora_map_files(manifest: Manifest, graphs: Mapping[str, str], backend: str) -> list[str]:
    """The bundle files fusing reads beyond what ``backend`` opens (each component's map is read
    verified here): the weights files its graph's targets lie in; for TensorRT, which refits from
    the portable graph, that graph and all its external data."""
    from .pipeline import graph_files

    files: list[str] = []
    for component, graph in graphs.items():
        m = read_lora_map(manifest, component)
        files += sorted({w[graph].location for _, w in m.values() if graph in w})
        if backend == "tensorrt" and m:
            files += [f for f, _ in graph_files(manifest, component, cpu_variant=False)]
    return list(dict.fromkeys(files))
