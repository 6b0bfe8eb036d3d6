"""CPU variants of an exported bundle's graphs: fused attention on the portable graph's weights, a parity gate.

torch exports ``F.scaled_dot_product_attention`` as MatMul -> Softmax -> MatMul around head
reshapes and a split scale (q and k each times sqrt(1/sqrt(d))). On onnxruntime's CPU provider
that materialises the (B, heads, Lq, Lk) score matrix twice and spends much of a U-Net step in
Softmax and thin per-head matmuls. ``fuse_attention`` replaces each such subgraph by one
``com.microsoft.MultiHeadAttention`` on the (B, L, C) projections, whose CPU kernel computes
attention in tiles without the score tensor.

The fused graph uses an onnxruntime contrib op that TensorRT's parser does not know, so it is
written beside the portable graph (``unet.cpu.onnx``) and recorded in the manifest entry as
``cpu_variant``; the onnxruntime backend on ``device="cpu"`` opens the variant, every other
engine the portable graph. The variant points into the portable graph's weights file
(``<component>.weights``, see ``export/weights.py``): no weight is stored twice. A graph with
nothing to fuse (the text encoder's causal attention is not fused) gets no variant.

    python -m export.optimize BUNDLE [--components unet,vae_decoder]   # add CPU variants to a bundle
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ldm_runtime.manifest import COMPONENTS, ComponentInfo, Manifest, TensorSpec
from ldm_runtime.shapes import bind_shapes, feed_ranges, random_feeds, size_dims

from . import parity
from .graph_copy import infer_shapes
from .parity import CPU_VARIANT_MAX_ABS_REL
from .weights import locations, save_with_weights, weights_by_digest

log = logging.getLogger(__name__)

CPU_VARIANT_SUFFIX = ".cpu.onnx"
# the components tried; one with no fusable attention (the text encoders' causal one) gets no variant
CPU_COMPONENTS = COMPONENTS


class OptimizeError(RuntimeError):
    """The optimised graph disagrees with the original beyond ``parity.CPU_VARIANT_MAX_ABS_REL``, or cannot be built."""


# ---------------------------------------------------------------------------------------------
# graph helpers


class _Graph:
    """Producer/consumer maps and concrete shapes (inputs fixed to a sample shape) of one graph."""

    def __init__(self, model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]):
        self.model = model
        g = model.graph
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in g.initializer}
        self.shapes = _static_shapes(model, input_shapes)
        self.outputs = {o.name for o in g.output}

    def prod(self, name: str, op: str) -> onnx.NodeProto | None:
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 and name not in self.outputs else None

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None


def _static_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every tensor's concrete shape with the graph inputs pinned to ``input_shapes``."""
    m = infer_shapes(model, input_shapes=input_shapes)
    out = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for v in (*m.graph.input, *m.graph.value_info, *m.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[v.name] = tuple(d.dim_value for d in t.shape.dim)
    return out


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _unsqueeze_axis1(g: _Graph, node: onnx.NodeProto) -> bool:
    axes = g.const(node.input[1]) if len(node.input) > 1 else None
    if axes is None:
        axes = next((np.array(a.ints) for a in node.attribute if a.name == "axes"), None)
    return axes is not None and list(np.asarray(axes).ravel()) == [1]


def _heads_source(g: _Graph, x: str, key: bool = False) -> tuple[str, int] | None:
    """(B, L, C) tensor and head count behind a per-head view ``x``.

    Several heads: ``x`` = Transpose(Reshape(src -> (B, L, nh, C/nh))) with perm [0, 2, 1, 3] for
    queries and values, [0, 2, 3, 1] for keys. One head: ``x`` = Unsqueeze(src, 1), keys then
    Transpose([0, 1, 3, 2]).
    """
    t = g.prod(x, "Transpose")
    if t is not None and _perm(t) == ([0, 2, 3, 1] if key else [0, 2, 1, 3]):
        r = g.prod(t.input[0], "Reshape")
        if r is None:
            return None
        src, s3, s4 = r.input[0], g.shapes.get(r.input[0]), g.shapes.get(r.output[0])
        if s3 and s4 and len(s3) == 3 and len(s4) == 4 and s3[:2] == s4[:2] and s4[2] * s4[3] == s3[2]:
            return src, s4[2]
        return None
    if key:
        if t is None or _perm(t) != [0, 1, 3, 2]:
            return None
        x = t.input[0]
    u = g.prod(x, "Unsqueeze")
    if u is not None and _unsqueeze_axis1(g, u) and len(g.shapes.get(u.input[0], ())) == 3:
        return u.input[0], 1
    return None


def _is_split_scale(g: _Graph, name: str) -> bool:
    """sqrt(1 / sqrt(head_dim)) as torch's SDPA export computes it (Sqrt(Div(1, Sqrt(Cast(...)))))."""
    s = g.prod(name, "Sqrt")
    if s is None:
        return False
    d = g.prod(s.input[0], "Div")
    if d is None:
        return False
    one = g.const(d.input[0])
    return one is not None and one.size == 1 and float(one.ravel()[0]) == 1.0 and g.prod(d.input[1], "Sqrt") is not None


def fuse_attention(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                   min_query_len: int = 0) -> tuple[onnx.ModelProto, int]:
    """Replace exported scaled-dot-product attentions by ``com.microsoft.MultiHeadAttention``.

    ``input_shapes``: concrete shapes for the graph inputs (a sample at the default size), used to
    read head counts, check the reshapes and measure each attention's query length; those with
    fewer than ``min_query_len`` queries at that size are left as they are (the fused CPU kernel
    only pays off on long sequences). Returns (new model, number of attentions fused).
    """
    g = _Graph(model, input_shapes)
    new_nodes: dict[str, onnx.NodeProto] = {}  # output of the node it replaces -> fused node
    fused = 0
    for sm in [n for n in model.graph.node if n.op_type == "Softmax"]:
        axis = next((a.i for a in sm.attribute if a.name == "axis"), -1)
        scores = g.prod(sm.input[0], "MatMul")
        pv = g.only_consumer(sm.output[0])
        if scores is None or pv is None or pv.op_type != "MatMul" or pv.input[0] != sm.output[0]:
            continue
        if axis not in (-1, 3):
            continue
        mq, mk = g.prod(scores.input[0], "Mul"), g.prod(scores.input[1], "Mul")
        if mq is None or mk is None or mq.input[1] != mk.input[1] or not _is_split_scale(g, mq.input[1]):
            continue
        q, k, v = _heads_source(g, mq.input[0]), _heads_source(g, mk.input[0], key=True), _heads_source(g, pv.input[1])
        if q is None or k is None or v is None or not (q[1] == k[1] == v[1]):
            continue
        # the output back to (B, L, C): Transpose([0, 2, 1, 3]) -> Reshape, or Squeeze(1) for one head
        nxt = g.only_consumer(pv.output[0])
        last = None
        if nxt is not None and nxt.op_type == "Transpose" and _perm(nxt) == [0, 2, 1, 3]:
            # the Reshape back to (B, L, C); a Shape of the same tensor may feed its target
            rs = [c for c in g.consumers.get(nxt.output[0], []) if c.op_type == "Reshape"]
            if len(rs) == 1 and len(g.shapes.get(rs[0].output[0], ())) == 3:
                last = rs[0]
        elif nxt is not None and nxt.op_type == "Squeeze" and q[1] == 1:
            last = nxt
        if last is None or g.shapes.get(last.output[0]) != g.shapes.get(q[0]):
            continue
        if g.shapes[q[0]][1] < min_query_len:
            continue
        node = helper.make_node("MultiHeadAttention", [q[0], k[0], v[0]], [last.output[0]],
                                name=f"{sm.name}/MultiHeadAttention", domain="com.microsoft", num_heads=q[1])
        new_nodes[last.output[0]] = node
        fused += 1
    if not fused:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for n in out.graph.node:
        nodes.append(new_nodes.get(n.output[0], n) if n.output else n)
    del out.graph.node[:]
    out.graph.node.extend(_live(nodes, {o.name for o in out.graph.output}))
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {i for n in out.graph.node for i in n.input}
    keep = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    live_names = {o for n in out.graph.node for o in n.output}
    vi = [v for v in out.graph.value_info if v.name in live_names]
    del out.graph.value_info[:]
    out.graph.value_info.extend(vi)
    return out, fused


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing uses (iterated: dead chains go whole)."""
    nodes = list(nodes)
    while True:
        used = outputs | {i for n in nodes for i in n.input}
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


# ---------------------------------------------------------------------------------------------
# file level: write the CPU variant, check it


def _ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return parity.cpu_session(path).run(None, feeds)


def _input_specs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> tuple[TensorSpec, ...]:
    """The graph's inputs as specs (name, numpy dtype) at ``shapes``."""
    return tuple(TensorSpec(i.name, helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name,
                            tuple(shapes[i.name])) for i in model.graph.input)


def write_cpu_variant(src: str | os.PathLike, dst: str | os.PathLike, input_shapes: dict[str, tuple[int, ...]],
                      check_shapes: list[dict[str, tuple[int, ...]]] | None = None,
                      ranges: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Write ``src``'s CPU variant (attention fused) to ``dst`` beside it, if some attention was fused.

    The variant reads ``src``'s weights: each initializer whose bytes equal one of ``src``'s points at
    the same external file, offset and length, and only those the fusion created go to a file of its
    own (``export/weights.py``). It is gated against ``src`` on random inputs at ``check_shapes``
    (default: ``input_shapes``), drawn by ``ldm_runtime.shapes.random_feeds`` within ``ranges``
    (``feed_ranges`` of the bundle; token ids need its ``vocab_size``). Returns what the manifest records ({"fused_attention": 0} and nothing
    written when there is nothing to gain); raises ``OptimizeError``.
    """
    src, dst = Path(src), Path(dst)
    if dst.parent != src.parent:
        raise OptimizeError(f"{dst}: a CPU variant reads {src.name}'s weights and must sit beside it")
    t0 = time.perf_counter()
    model = onnx.load(str(src), load_external_data=False)
    if any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input):
        raise OptimizeError(f"{src}: an fp16 graph; the CPU variant is for fp32 bundles "
                            "(onnxruntime's CPU kernels run fp16 graphs through casts anyway)")
    fused_model, n = fuse_attention(model, input_shapes)
    if n == 0:
        return {"fused_attention": 0}
    nodes = {"before": len(model.graph.node), "after": len(fused_model.graph.node)}
    del model
    data_files = save_with_weights(fused_model, dst, shared=weights_by_digest(src))
    own = [f for f in data_files if f not in locations(onnx.load(str(src), load_external_data=False))]
    worst = 0.0
    for i, shapes in enumerate(check_shapes or [input_shapes]):
        feeds = random_feeds(_input_specs(fused_model, shapes), shapes, np.random.default_rng(i), **(ranges or {}))
        ref, got = _ort_outputs(src, feeds), _ort_outputs(dst, feeds)
        worst = max(worst, *(parity.max_abs_rel(b, a) for a, b in zip(ref, got)))
    if not worst <= CPU_VARIANT_MAX_ABS_REL:
        for f in [dst.name, *own]:
            dst.with_name(f).unlink(missing_ok=True)
        raise OptimizeError(f"{dst.name}: the CPU variant differs from {src.name} by max_abs_rel {worst:.2e} "
                            f"(gate {CPU_VARIANT_MAX_ABS_REL:.0e})")
    info = {"file": dst.name, "external_data": data_files, "shares_weights": not own, "fused_attention": n,
            "nodes": nodes, "parity": {"metric": "max_abs_rel", "value": worst, "threshold": CPU_VARIANT_MAX_ABS_REL},
            "seconds": round(time.perf_counter() - t0, 2)}
    log.info("%s: CPU variant %s, %d attentions fused, weights read from %s (max_abs_rel %.1e)", src.name, dst.name,
             n, ", ".join(data_files) or "the graph", worst)
    return info


def sample_shapes(manifest: dict, component: str, height: int | None = None,
                  width: int | None = None, batch: int | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes of ``component`` at the bundle's default size (or ``height`` x ``width``):
    its manifest inputs bound at the rows of one image (``batch_mult``: 2 for a guided U-Net), or ``batch`` rows."""
    info = ComponentInfo.from_dict(component, manifest["components"][component])
    size = size_dims(height or manifest["default_size"]["height"], width or manifest["default_size"]["width"],
                     manifest["latent"]["vae_scale_factor"])
    return bind_shapes(info.inputs, B=batch or info.batch_mult, **size)


def add_cpu_variants(root: str | os.PathLike, manifest: dict, components: tuple[str, ...] = CPU_COMPONENTS) -> dict[str, Any]:
    """Write the CPU variants of ``components`` beside their graphs in ``root`` and record them in the
    manifest dict (component entry ``cpu_variant``, file hashes). Returns {component: info}.

    For export: call it on the bundle being built, after the manifest dict is made and before it
    is written (fp32 bundles only).
    """
    from ldm_runtime.manifest import record_file

    root = Path(root)
    if manifest.get("precision", "fp32") != "fp32":
        raise OptimizeError(f"{root}: precision {manifest.get('precision')}; CPU variants are for fp32 bundles only")
    done: dict[str, Any] = {}
    f = manifest["latent"]["vae_scale_factor"]
    ranges = feed_ranges(Manifest(root, manifest))
    for c in components:
        entry = manifest["components"].get(c)
        if entry is None:
            continue
        src = root / entry["file"]
        dst = src.with_name(src.name[: -len(".onnx")] + CPU_VARIANT_SUFFIX)
        shapes = sample_shapes(manifest, c)
        checks = [shapes]
        if c in ("unet", "vae_decoder"):  # odd latent sizes too: the reshapes around attention must follow
            h, w = (manifest["default_size"][k] + f for k in ("height", "width"))
            checks.append(sample_shapes(manifest, c, h, w))
        # the fusion reads head counts from static shapes, and onnx shape inference leaves about half of a
        # U-Net's tensors symbolic at one row (an LCM U-Net runs one row per image): match at two rows at
        # least; the variant stays dynamic in the batch and is checked at the rows it will run
        rows = shapes[next(iter(shapes))][0]
        fuse_shapes = sample_shapes(manifest, c, batch=2) if c == "unet" and rows < 2 else shapes
        if fuse_shapes is not shapes:
            checks.append(fuse_shapes)
        info = write_cpu_variant(src, dst, fuse_shapes, check_shapes=checks, ranges=ranges)
        if info.get("file"):
            entry["cpu_variant"] = info
            for rel in [info["file"], *info["external_data"]]:
                if rel not in (entry.get("external_data") or []):  # the portable graph's are recorded
                    record_file(manifest, root, rel)
        done[c] = info
    return done


def optimize_bundle(bundle: str | os.PathLike, components: tuple[str, ...] = CPU_COMPONENTS) -> dict[str, Any]:
    """Add CPU variants to an existing fp32 bundle and rewrite its manifest (atomically, last)."""
    from ldm_runtime.manifest import MANIFEST_NAME, Manifest, atomic_write_json

    from .lora_map import add_lora_maps, read_targets

    man = Manifest.load(bundle, verify=True)
    for entry in man.data["components"].values():  # a rerun replaces earlier variants
        entry.pop("cpu_variant", None)
    done = add_cpu_variants(man.root, man.data, components)
    add_lora_maps(man.root, man.data, {c: read_targets(man.root, e) for c, e in man.data["components"].items()
                                       if e.get("lora_map")})
    atomic_write_json(man.root / MANIFEST_NAME, man.data)
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.optimize", description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--components", default=",".join(CPU_COMPONENTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        done = optimize_bundle(args.bundle, tuple(c for c in args.components.split(",") if c))
    except OptimizeError as e:
        print(f"export.optimize: {e}", file=sys.stderr)
        return 1
    for c, info in done.items():
        print(f"{c}: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
