"""The limit: U-Net FLOPs per step counted from the ONNX graph, this machine's peak fp32 matmul rate,
and the fraction of that peak a U-Net step achieves.

FLOPs count multiply-adds as 2 and cover the ops that hold nearly all the work: ``Conv``,
``MatMul`` (split into weight matmuls and the activation-by-activation ones of attention),
``Gemm``, and the fused ``com.microsoft`` attention ops (QK^T and PV). Normalisations,
activations and other element-wise ops are left out (well under 1% of a U-Net's FLOPs), as in
the usual FLOP counts of these models. Shapes come from ONNX shape inference with the input
dimensions fixed.

The peak is the best of a large square fp32 matmul in numpy's BLAS, in torch (when importable)
and in onnxruntime's own MatMul kernel (MLAS, what the runtime uses), each best-of-N.

``--precisions`` measures the peak of each precision the runtime can run in, through the libraries
it uses: fp32 (numpy, torch, onnxruntime, OpenVINO f32), bf16 (OpenVINO with
``INFERENCE_PRECISION_HINT=bf16``, only where the CPU reports BF16: elsewhere OpenVINO quietly
computes in f32), int8 (onnxruntime ``MatMulInteger``, OpenVINO's int8 MatMul from FakeQuantize),
and then each component's fraction of the peak of the precision it runs in, per backend.

    python bench/flops.py engines/bench-mid/bundle --threads 2            # count, measure, fraction
    python bench/flops.py engines/bench-mid/bundle --step-seconds 0.61    # with a step time measured elsewhere
    python bench/flops.py engines/bench-mid/bundle --threads 2 --precisions   # peaks per precision, fractions
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("flops")

ATTENTION_OPS = ("MultiHeadAttention", "Attention")


class ShapeError(ValueError):
    """A node whose input shapes shape inference could not make concrete."""


def _load(model: Any):
    import onnx

    if isinstance(model, (str, os.PathLike)):
        # shapes only: external weight files are not needed
        return onnx.load(str(model), load_external_data=False)
    return model


def _fix_inputs(model, input_shapes: dict[str, tuple[int, ...]]):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        if inp.name not in input_shapes:
            continue
        dims = inp.type.tensor_type.shape.dim
        want = input_shapes[inp.name]
        if len(dims) != len(want):
            raise ShapeError(f"input {inp.name!r} has rank {len(dims)}, got shape {tuple(want)}")
        for d, v in zip(dims, want):
            d.ClearField("dim_param")
            d.dim_value = int(v)
    return m


COUNTED_OPS = ("Conv", "MatMul", "Gemm", *ATTENTION_OPS)


def graph_shapes(model: Any, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every tensor (initializers included) with the graph inputs fixed to ``input_shapes``.

    ONNX shape inference first; where it leaves a counted node's operand unknown (raw TorchScript
    exports compute reshape targets at run time) and ``model`` is a path, the graph is run once
    in onnxruntime with a ``Shape`` output added for each unknown tensor.
    """
    from onnx import shape_inference

    m = shape_inference.infer_shapes(_fix_inputs(_load(model), input_shapes), data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {i.name: tuple(i.dims) for i in m.graph.initializer}
    for v in (*m.graph.input, *m.graph.value_info, *m.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[v.name] = tuple(d.dim_value for d in t.shape.dim)
    for n in m.graph.node:  # Constant nodes carry their shapes in the attribute
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(a.t.dims)
    missing = sorted({x for n in m.graph.node if n.op_type in COUNTED_OPS
                      for x in (*n.input, *n.output) if x and x not in shapes})
    if missing and isinstance(model, (str, os.PathLike)):
        shapes.update(_shapes_by_running(Path(model), input_shapes, missing))
    return shapes


def _shapes_by_running(path: Path, input_shapes: dict[str, tuple[int, ...]], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Run the model once on zeros with ``Shape(x)`` outputs for ``names``; the shapes they return."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = onnx.load(str(path), load_external_data=False)
    for i, x in enumerate(names):
        m.graph.node.append(helper.make_node("Shape", [x], [f"__shape_{i}"]))
        m.graph.output.append(helper.make_tensor_value_info(f"__shape_{i}", TensorProto.INT64, None))
    tmp = path.with_name(f".{path.stem}.shapes-{os.getpid()}.onnx")  # beside it: external data paths stay valid
    try:
        onnx.save(m, str(tmp))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    finally:
        tmp.unlink(missing_ok=True)
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
    feeds = {i.name: np.zeros(input_shapes[i.name], types[i.type]) for i in s.get_inputs()}
    outs = s.run([f"__shape_{i}" for i in range(len(names))], feeds)
    return {x: tuple(int(d) for d in o) for x, o in zip(names, outs)}


def _shape(shapes: dict, name: str, node) -> tuple[int, ...]:
    if name not in shapes:
        raise ShapeError(f"{node.op_type} node {node.name!r}: no concrete shape for input {name!r}")
    return shapes[name]


def _attr(node, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == a.INT else list(a.ints) if a.ints else a.f
    return default


def node_flops(node, shapes: dict[str, tuple[int, ...]]) -> int:
    """FLOPs (2 per multiply-add) of one Conv / MatMul / Gemm / fused attention node; 0 for other ops."""
    op = node.op_type
    if op == "Conv":
        w = _shape(shapes, node.input[1], node)  # (Cout, Cin/group, kh, kw)
        y = _shape(shapes, node.output[0], node)  # (N, Cout, *spatial)
        return 2 * math.prod(y) * math.prod(w[1:])
    if op == "MatMul":
        a, b = _shape(shapes, node.input[0], node), _shape(shapes, node.input[1], node)
        if len(a) == 1 or len(b) == 1:
            raise ShapeError(f"MatMul node {node.name!r}: vector operands {a} @ {b} are not counted")
        batch = np.broadcast_shapes(a[:-2], b[:-2])
        return 2 * math.prod(batch) * a[-2] * a[-1] * b[-1]
    if op == "Gemm":
        a, b = _shape(shapes, node.input[0], node), _shape(shapes, node.input[1], node)
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else a
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return 2 * m * k * n
    if op in ATTENTION_OPS and node.domain == "com.microsoft":
        # query (B, Lq, Dqk); key (B, Lk, Dqk) and value (B, Lk, Dv) when given separately
        q = _shape(shapes, node.input[0], node)
        if op == "MultiHeadAttention" and len(node.input) > 2 and node.input[1] and node.input[2]:
            k, v = _shape(shapes, node.input[1], node), _shape(shapes, node.input[2], node)
            if len(q) != 3 or len(k) != 3 or len(v) != 3:
                raise ShapeError(f"{op} node {node.name!r}: only 3-D query/key/value are counted, got {q}, {k}, {v}")
            return 2 * q[0] * q[1] * k[1] * q[2] + 2 * q[0] * q[1] * k[1] * v[2]  # QK^T + PV
        raise ShapeError(f"{op} node {node.name!r}: packed QKV inputs are not counted")
    return 0


def count_flops(model: Any, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """FLOPs of one run of ``model`` (an ONNX path or ``ModelProto``) at ``input_shapes``.

    Returns {"total": int, "by_op": {"Conv", "MatMul (weights)", "MatMul (attention)", "Gemm", ...}: int}.
    A MatMul with a weight (initializer) operand is a projection; one of two activations is attention.
    """
    m = _load(model)
    shapes = graph_shapes(model, input_shapes)
    weights = {i.name for i in m.graph.initializer}
    by_op: dict[str, int] = {}
    for node in m.graph.node:
        f = node_flops(node, shapes)
        if not f:
            continue
        key = node.op_type
        if key == "MatMul":
            key = "MatMul (weights)" if any(x in weights for x in node.input) else "MatMul (attention)"
        by_op[key] = by_op.get(key, 0) + f
    return {"total": int(sum(by_op.values())), "by_op": by_op, "inputs": {k: list(v) for k, v in input_shapes.items()}}


def unet_input_shapes(manifest: dict, height: int, width: int, batch: int) -> dict[str, tuple[int, ...]]:
    """The U-Net's manifest inputs bound at ``batch`` rows and an image of ``height`` x ``width`` pixels."""
    from ldm_runtime.manifest import ComponentInfo
    from ldm_runtime.shapes import bind_shapes, size_dims

    inputs = ComponentInfo.from_dict("unet", manifest["components"]["unet"]).inputs
    return bind_shapes(inputs, B=batch, **size_dims(height, width, manifest["latent"]["vae_scale_factor"]))


# ---------------------------------------------------------------------------------------------
# the peak


def _best_rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up: page in, spin up the thread pool
    best = min(_timed(fn) for _ in range(repeats))
    return 2.0 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_matmul_gflops(n: int = 2048, repeats: int = 5, threads: int | None = None,
                       backends: tuple[str, ...] = ("numpy", "torch", "onnxruntime")) -> dict[str, float]:
    """GFLOP/s of an (n x n) @ (n x n) fp32 matmul, best of ``repeats``, per backend that is importable.

    ``threads`` sets torch's and onnxruntime's thread counts (numpy's BLAS uses its own default).
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out: dict[str, float] = {}
    if "numpy" in backends:
        out["numpy"] = _best_rate(lambda: a @ b, n, repeats)
    if "torch" in backends:
        try:
            import torch
        except ImportError:
            pass
        else:
            old = torch.get_num_threads()
            if threads:
                torch.set_num_threads(threads)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            out["torch"] = _best_rate(lambda: torch.mm(ta, tb), n, repeats)
            torch.set_num_threads(old)
    if "onnxruntime" in backends:
        out["onnxruntime"] = _best_rate(_ort_matmul(n, threads, b), n, repeats)
    return out


def _ort_matmul(n: int, threads: int | None, b: np.ndarray):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "mm",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
                          [numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    return lambda: s.run(None, {"a": a})


def _ov_compiled(model, threads: int | None, precision: str = "f32"):
    from ldm_runtime.backends.openvino import core

    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return core().compile_model(model, "CPU", config)


def _ov_matmul(n: int, threads: int | None, b: np.ndarray, precision: str):
    """An OpenVINO (n x n) @ b matmul compiled for ``precision`` ("f32", "bf16")."""
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([n, n], np.float32, name="a")
    model = ov.Model([ops.matmul(a, ops.constant(b), False, False)], [a], "mm")
    request = _ov_compiled(model, threads, precision).create_infer_request()
    x = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    return lambda: request.infer({"a": x})


def _ov_int8_matmul(n: int, threads: int | None, b: np.ndarray):
    """An OpenVINO matmul of int8-quantized operands (FakeQuantize on both: OpenVINO's low-precision
    transformations run it as u8 x i8 with int32 accumulation)."""
    import openvino as ov
    import openvino.opset13 as ops

    def fq(x, lo, hi, levels):
        return ops.fake_quantize(x, ops.constant(np.float32(lo)), ops.constant(np.float32(hi)),
                                 ops.constant(np.float32(lo)), ops.constant(np.float32(hi)), levels)

    a = ops.parameter([n, n], np.float32, name="a")
    y = ops.matmul(fq(a, 0.0, 4.0, 256), fq(ops.constant(b), -4.0, 4.0, 255), False, False)
    request = _ov_compiled(ov.Model([y], [a], "mm8"), threads).create_infer_request()
    x = np.abs(np.random.default_rng(1).standard_normal((n, n), dtype=np.float32))
    return lambda: request.infer({"a": x})


def _ort_matmul_integer(n: int, threads: int | None, b: np.ndarray):
    """onnxruntime's ``MatMulInteger``: uint8 activations @ int8 weights, int32 out (what dynamic
    and static int8 quantization of a MatMul run)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.clip(np.round(b * 32), -127, 127).astype(np.int8)
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mm8",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
                          [numpy_helper.from_array(w, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).integers(0, 256, (n, n), dtype=np.uint8)
    return lambda: s.run(None, {"a": a})


def has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def peaks_by_precision(n: int = 2048, repeats: int = 5, threads: int | None = None) -> dict[str, dict[str, float]]:
    """GFLOP/s (2 per multiply-add) of an (n x n) @ (n x n) matmul per precision and library, best of
    ``repeats``: {"fp32": {...}, "bf16": {...}, "int8": {...}}; a library or precision this machine
    lacks is left out, and ``"bf16"`` is empty where the CPU has no bf16 arithmetic."""
    b = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    out = {"fp32": peak_matmul_gflops(n, repeats, threads), "bf16": {}, "int8": {}}
    out["int8"]["onnxruntime MatMulInteger"] = _best_rate(_ort_matmul_integer(n, threads, b), n, repeats)
    if has_openvino():
        from ldm_runtime.backends.openvino import cpu_capabilities

        out["fp32"]["openvino"] = _best_rate(_ov_matmul(n, threads, b, "f32"), n, repeats)
        out["int8"]["openvino"] = _best_rate(_ov_int8_matmul(n, threads, b), n, repeats)
        if "BF16" in cpu_capabilities():
            out["bf16"]["openvino"] = _best_rate(_ov_matmul(n, threads, b, "bf16"), n, repeats)
    return out


# the precision each backend setting computes a float component in
_PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "fp32": "fp32", "fp16": "fp16"}


def component_precision(pipe: Any, component: str) -> str:
    """The arithmetic ``component`` runs in on ``pipe``'s backend: int8 for a quantized component, the
    OpenVINO engine's compiled precision, else the bundle's."""
    entry = pipe.manifest.data["components"][component]
    if entry.get("precision") == "int8":
        return "int8"
    eng_precision = getattr(pipe.engine(component), "precision", None)
    return _PRECISION_NAMES[eng_precision or pipe.manifest.precision]


def component_fractions(bundle: str, backend: str, options: dict[str, Any], peaks: dict[str, dict[str, float]],
                        height: int | None = None, width: int | None = None, repeats: int = 5) -> list[dict[str, Any]]:
    """Per component (the text encoder on one prompt, the U-Net at batch 2, the decoder at batch 1): its
    FLOPs per call, median seconds on ``backend`` with ``options``, and the fraction of the best peak of
    the precision it runs in (None where that precision has no measured peak)."""
    from bench.runtime import component_feeds
    from ldm_runtime.pipeline import Pipeline

    pipe = Pipeline.load(bundle, backend=backend, **options)
    h, w = height or pipe.manifest.default_size[0], width or pipe.manifest.default_size[1]
    rows = []
    for key, feeds in component_feeds(pipe, h, w, batch=1).items():
        if key == "unet_B":
            continue
        comp = "unet" if key.startswith("unet") else key
        eng = pipe.engine(comp)
        graph = pipe.manifest.path(pipe.manifest.data["components"][comp]["file"])
        flops = count_flops(graph, {k: tuple(v.shape) for k, v in feeds.items()})["total"]
        eng.run(feeds)
        seconds = float(np.median([_timed(lambda: eng.run(feeds)) for _ in range(repeats)]))
        precision = component_precision(pipe, comp)
        peak = max(peaks.get(precision, {}).values(), default=None)
        achieved = flops / seconds / 1e9
        rows.append({"backend": backend, "options": options, "component": key, "precision": precision,
                     "gflops": flops / 1e9, "seconds": seconds, "achieved_gflops_s": achieved,
                     "peak_gflops_s": peak, "fraction_of_peak": achieved / peak if peak else None})
    return rows


def precisions_markdown(peaks: dict[str, dict[str, float]], rows: list[dict[str, Any]], n: int) -> str:
    lines = [f"| precision | matmul peak GFLOP/s (n={n}), per library | best |", "|---|---|---|"]
    for prec, libs in peaks.items():
        shown = ", ".join(f"{k} {v:.1f}" for k, v in libs.items()) or "not available on this CPU"
        lines.append(f"| {prec} | {shown} | **{max(libs.values()):.1f}** |" if libs else f"| {prec} | {shown} | - |")
    lines += ["", "| backend (options) | component | precision | GFLOP/call | median | achieved GFLOP/s | "
              "**fraction of its precision's peak** |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        frac = f"**{100 * r['fraction_of_peak']:.1f}%**" if r["fraction_of_peak"] is not None else "no peak measured"
        lines.append(f"| {r['backend']} ({opts}) | {r['component']} | {r['precision']} | {r['gflops']:.2f} | "
                     f"{1e3 * r['seconds']:.1f} ms | {r['achieved_gflops_s']:.1f} | {frac} |")
    return "\n".join(lines) + "\n"


def _backend_settings(threads: int | None) -> list[tuple[str, dict[str, Any]]]:
    """onnxruntime, and OpenVINO in each precision this CPU has, at ``threads``."""
    base = {"threads": threads} if threads else {}
    settings = [("onnxruntime", dict(base))]
    if has_openvino():
        from ldm_runtime.backends.openvino import cpu_capabilities

        settings.append(("openvino", {**base, "precision": "f32"}))
        if "BF16" in cpu_capabilities():
            settings.append(("openvino", {**base, "precision": "bf16"}))
    return settings


def unet_step_seconds(bundle: str, height: int, width: int, batch: int, threads: int | None, repeats: int,
                      opt_level: str = "all") -> float:
    """Median seconds of one U-Net call through the runtime's own engine (onnxruntime CPU)."""
    from ldm_runtime.backends import engine_options, load_engine
    from ldm_runtime.manifest import Manifest
    from ldm_runtime.shapes import random_feeds

    man = Manifest.load(bundle, verify=False)
    opts = {"opt_level": opt_level, **({"threads": threads} if threads else {})}
    eng = load_engine(man, "unet", "onnxruntime", "cpu", engine_options("onnxruntime", **opts))
    feeds = random_feeds(eng.inputs, unet_input_shapes(man.data, height, width, batch), np.random.default_rng(0))
    eng.run(feeds)
    times = [_timed(lambda: eng.run(feeds)) for _ in range(repeats)]
    return float(np.median(times))


def diffusers_unet_step_seconds(folder: str, height: int, width: int, batch: int, threads: int | None,
                                repeats: int, vae_scale_factor: int) -> float:
    """Median seconds of one call of diffusers' UNet2DConditionModel (torch fp32, CPU) from ``folder``."""
    import torch
    from diffusers import UNet2DConditionModel

    if threads:
        torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(str(Path(folder) / "unet")).eval()
    c, d = unet.config.in_channels, unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, height // vae_scale_factor, width // vae_scale_factor, generator=g)
    t, e = torch.full((batch,), 500.0), torch.randn(batch, 77, d, generator=g)
    extra: dict[str, Any] = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embeddings and time ids
        te2 = Path(folder) / "text_encoder_2" / "config.json"
        pooled = json.loads(te2.read_text())["projection_dim"] if te2.is_file() else None
        if pooled is None:
            raise ValueError(f"{folder}: an SDXL U-Net without text_encoder_2/config.json; expected its projection_dim")
        n_ids = (unet.config.projection_class_embeddings_input_dim - pooled) // unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                      "time_ids": torch.randn(batch, n_ids, generator=g)}
    with torch.inference_mode():
        unet(x, t, e, **extra)
        times = [_timed(lambda: unet(x, t, e, **extra)) for _ in range(repeats)]
    return float(np.median(times))


def limit_report(bundle: str, height: int | None = None, width: int | None = None, batch: int = 2,
                 threads: int | None = None, repeats: int = 5, step_seconds: float | None = None,
                 matmul_n: int = 2048, diffusers: str | None = None) -> dict[str, Any]:
    """FLOPs per U-Net step, the step time, the peak and the fraction achieved, as one dict."""
    man = json.loads((Path(bundle) / "manifest.json").read_text())
    h = height or man["default_size"]["height"]
    w = width or man["default_size"]["width"]
    shapes = unet_input_shapes(man, h, w, batch)
    flops = count_flops(Path(bundle) / man["components"]["unet"]["file"], shapes)
    if step_seconds is None:
        step_seconds = unet_step_seconds(bundle, h, w, batch, threads, repeats)
    peak = peak_matmul_gflops(matmul_n, repeats, threads)
    best = max(peak.values())
    achieved = flops["total"] / step_seconds / 1e9
    peer: dict[str, Any] = {}
    if diffusers:
        sec = diffusers_unet_step_seconds(diffusers, h, w, batch, threads, repeats, man["latent"]["vae_scale_factor"])
        peer = {"diffusers_unet_step_s": sec, "diffusers_fraction_of_peak": flops["total"] / sec / 1e9 / best}
    return {**peer,"bundle": str(bundle), "size": f"{h}x{w}", "batch": batch, "threads": threads,
            "unet_gflops_per_step": flops["total"] / 1e9,
            "by_op_gflops": {k: v / 1e9 for k, v in flops["by_op"].items()},
            "unet_step_s": step_seconds, "achieved_gflops_s": achieved,
            "peak_gflops_s": peak, "peak_best_gflops_s": best, "fraction_of_peak": achieved / best,
            "matmul_n": matmul_n}


def to_markdown(r: dict[str, Any]) -> str:
    peak = ", ".join(f"{k} {v:.1f}" for k, v in r["peak_gflops_s"].items())
    ops = ", ".join(f"{k} {v:.2f}" for k, v in r["by_op_gflops"].items())
    peer = ""
    if "diffusers_unet_step_s" in r:
        peer = (f"\ndiffusers' U-Net on the same weights (torch fp32): {1e3 * r['diffusers_unet_step_s']:.1f} ms/step, "
                f"{100 * r['diffusers_fraction_of_peak']:.1f}% of the peak\n")
    return peer + ("| U-Net GFLOP/step | step | achieved GFLOP/s | peak fp32 matmul GFLOP/s | fraction |\n"
            "|---|---|---|---|---|\n"
            f"| {r['unet_gflops_per_step']:.2f} (batch {r['batch']}, {r['size']}; {ops}) | {1e3 * r['unet_step_s']:.1f} ms | "
            f"{r['achieved_gflops_s']:.1f} | {r['peak_best_gflops_s']:.1f} ({peak}; n={r['matmul_n']}) | "
            f"{100 * r['fraction_of_peak']:.1f}% |\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="U-Net FLOPs per step, peak fp32 matmul rate, fraction achieved.")
    p.add_argument("bundle")
    p.add_argument("--size", default=None, help="HxW in pixels (default: the bundle's)")
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (2 = one guided image)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--step-seconds", type=float, default=None, help="use this U-Net step time instead of measuring")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--diffusers", default=None, help="a diffusers folder with the same weights: time its U-Net too")
    p.add_argument("--precisions", action="store_true",
                   help="the peak of each precision (fp32, bf16, int8) and each component's fraction of its own, "
                        "on onnxruntime and OpenVINO")
    args = p.parse_args(argv)
    h = w = None
    if args.size:
        hs, _, ws = args.size.lower().partition("x")
        h, w = int(hs), int(ws or hs)
    if args.precisions:
        peaks = peaks_by_precision(args.matmul_n, args.repeats, args.threads)
        rows = [row for backend, opts in _backend_settings(args.threads)
                for row in component_fractions(args.bundle, backend, opts, peaks, h, w, args.repeats)]
        if args.json:
            Path(args.json).write_text(json.dumps({"peaks": peaks, "components": rows, "matmul_n": args.matmul_n},
                                                  indent=2) + "\n")
        print(precisions_markdown(peaks, rows, args.matmul_n))
        return 0
    r = limit_report(args.bundle, h, w, args.batch, args.threads, args.repeats, args.step_seconds, args.matmul_n,
                     args.diffusers)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
