"""The LoRA weight map of a bundle: which ONNX initializer holds each weight a LoRA can change.

A LoRA changes the weight of a Linear or Conv2d module. After ``torch.onnx.export`` those
weights are initializers of ``MatMul`` (the weight transposed, under a name the exporter made up,
e.g. ``onnx::MatMul_1702``), ``Gemm`` (as is, or transposed without ``transB``) and ``Conv`` (as
is) nodes. The node names carry the scope the module was *called* from, which is not always its
parameter path (the text encoder calls ``text_model.encoder.layers.0`` from ``text_model``, so its
nodes read ``/text_encoder/text_model/layers.0/...``). So an initializer is matched to the
parameter whose bytes it holds (as is or transposed) and, where several parameters hold the same
bytes, to the one whose path ends with the longest part of the node's scope.

The map is written per component to ``<component>.lora.json`` (named by the manifest entry's
``lora_map`` and hashed in ``files``), keyed by the diffusers parameter name with the component
as prefix (``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight``), the keys
``ldm_runtime.lora`` gives its deltas under. Each target records the torch shape and, per graph
file (the portable graph and its CPU variant), the initializer, its layout and dtype and where
its bytes lie in the weights file. Every mapped initializer is kept as external data
(``save_with_weights(..., external=)``), which ``SessionOptions.add_external_initializers`` can
replace at every optimisation level, and no two targets share one initializer.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

from .weights import external_ref

LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")  # what LoRA files target (the VAE never)
LORA_MAP_SUFFIX = ".lora.json"
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")

Target = dict[str, Any]  # {"shape": [...], "initializer": name, "layout": "as_is" | "transposed", "dtype": str}


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _weights_by_digest(module: nn.Module, dtype: np.dtype) -> dict[str, list[tuple[str, str]]]:
    """sha256 of each Linear/Conv2d weight of ``module`` in ``dtype``, as is and (2-D) transposed ->
    [(parameter name, layout)]."""
    out: dict[str, list[tuple[str, str]]] = {}
    for path, mod in module.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        w = mod.weight.detach().to(torch.float32).numpy().astype(dtype)
        out.setdefault(_digest(w), []).append((f"{path}.weight", "as_is"))
        if w.ndim == 2:
            out.setdefault(_digest(w.T), []).append((f"{path}.weight", "transposed"))
    return out


def _scope_match(node_name: str, candidates: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The candidate whose module path ends with the longest part of the node's scope, if one alone does."""
    scope = node_name.strip("/").split("/")[:-1]
    for k in range(len(scope), 0, -1):
        tail = ".".join(scope[-k:])
        hits = [c for c in candidates if ("." + c[0][: -len(".weight")]).endswith("." + tail)]
        if hits:  # the most specific part of the scope that names any: it must name exactly one
            return hits[0] if len(hits) == 1 else None
    return None


def find_targets(model: onnx.ModelProto, module: nn.Module, component: str) -> dict[str, Target]:
    """Map each Linear/Conv2d weight of ``module`` (the exported wrapper of ``component``'s model) to
    the initializer of ``model`` that holds it, keyed ``<component>.<parameter name in the model>``.
    Initializers are read in memory (export time, before the weights are saved); an initializer that
    two parameters claim is split into one copy each (``_split_shared``), so a LoRA on one never
    changes the other."""
    inits = {t.name: t for t in model.graph.initializer}
    by_dtype: dict[int, dict[str, list[tuple[str, str]]]] = {}
    digests: dict[str, str] = {}
    found: dict[str, Target] = {}
    for node in model.graph.node:
        if node.op_type not in _WEIGHT_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        t = inits[node.input[1]]
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        table = by_dtype.get(t.data_type)
        if table is None:
            table = by_dtype[t.data_type] = _weights_by_digest(module, helper.tensor_dtype_to_np_dtype(t.data_type))
        if t.name not in digests:
            digests[t.name] = _digest(numpy_helper.to_array(t))
        hit = _scope_match(node.name, table.get(digests[t.name], []))
        if hit is None:
            continue
        param, layout = hit
        key = f"{component}.{param.split('.', 1)[1]}"  # the wrapper's attribute -> the component
        if key in found:
            continue
        found[key] = {"shape": list(module.get_parameter(param).shape), "initializer": t.name, "layout": layout,
                      "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name, "node": node.name}
    _split_shared(model, found)
    for target in found.values():
        del target["node"]
    return found


def _split_shared(model: onnx.ModelProto, found: dict[str, Target]) -> None:
    """Give every target but the first of a shared initializer its own copy, read by its own node."""
    owner: dict[str, str] = {}
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    for key, target in found.items():
        name = target["initializer"]
        if name not in owner:
            owner[name] = key
            continue
        copy = numpy_helper.from_array(numpy_helper.to_array(inits[name]), f"{key}__lora")
        model.graph.initializer.append(copy)
        nodes[target["node"]].input[1] = copy.name
        target["initializer"] = copy.name


def graph_entries(graph: str | Path, targets: dict[str, Target]) -> dict[str, dict[str, Any]]:
    """Each target's entry for the saved graph file ``graph``: initializer, layout, dtype and the
    (location, offset, length) of its bytes. Raises ``ValueError`` for a target the graph does not
    hold as external data of the target's dtype and shape."""
    model = onnx.load(str(graph), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, dict[str, Any]] = {}
    for key, target in targets.items():
        t = inits.get(target["initializer"])
        ref = external_ref(t) if t is not None else None
        shape = target["shape"] if target["layout"] == "as_is" else target["shape"][::-1]
        if t is None or ref is None or list(t.dims) != list(shape) or \
                np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name != target["dtype"]:
            raise ValueError(f"{Path(graph).name}: LoRA target {key} ({target['initializer']!r}) is not an external "
                             f"{target['dtype']} initializer of shape {shape} in this graph")
        out[key] = {"initializer": t.name, "layout": target["layout"], "dtype": target["dtype"],
                    "location": ref[0], "offset": ref[1], "length": ref[2]}
    return out


def write_lora_map(root: str | Path, component: str, targets: dict[str, Target], graphs: list[str]) -> str:
    """Write ``<component>.lora.json`` in the bundle folder ``root`` for the graph files ``graphs``
    (names in ``root``); returns its file name."""
    root = Path(root)
    per_graph = {g: graph_entries(root / g, targets) for g in graphs}
    doc = {"component": component,
           "targets": {key: {"shape": t["shape"], "graphs": {g: per_graph[g][key] for g in graphs}}
                       for key, t in sorted(targets.items())}}
    name = component + LORA_MAP_SUFFIX
    (root / name).write_text(json.dumps(doc, indent=1) + "\n")
    return name


def add_lora_maps(root: str | Path, manifest: dict, targets: dict[str, dict[str, Target]]) -> None:
    """Write the map of each component of ``targets`` over its portable graph and CPU variant (where
    the bundle has one), name it in the component entry (``lora_map``) and hash it in ``files``."""
    from ldm_runtime.manifest import record_file

    for component, found in targets.items():
        entry = manifest["components"][component]
        variant = (entry.get("cpu_variant") or {}).get("file")
        graphs = [entry["file"], *([variant] if variant else [])]
        entry["lora_map"] = write_lora_map(root, component, found, graphs)
        record_file(manifest, Path(root), entry["lora_map"])


def read_targets(root: str | Path, entry: dict) -> dict[str, Target]:
    """The targets of a component's written map, as ``find_targets`` gave them (for rewriting the map
    after its CPU variant changed: ``export.optimize``)."""
    doc = json.loads((Path(root) / entry["lora_map"]).read_text())
    portable = entry["file"]
    return {k: {"shape": t["shape"], **{f: t["graphs"][portable][f] for f in ("initializer", "layout", "dtype")}}
            for k, t in doc["targets"].items()}
