"""Parity: the metrics every gate measures, the named thresholds, and the onnxruntime CPU session
the gates compare against (export vs torch, CPU variants vs the portable graph, TensorRT plans vs
onnxruntime). Metrics are computed in float64.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

# (metric, bound, "max" if the metric must stay below the bound else "min")
# fp32 ONNX vs torch: the same arithmetic in another order, so only rounding differs
FP32_GATE = ("max_abs_rel", 1e-4, "max")
# fp16 ONNX vs torch: fp16 rounding of weights and activations (about 1e-3 relative per op) accumulates
# over the layers; the decoder is judged on the image the user sees
FP16_GATES = {
    "text_encoder": ("rel_l2", 1e-2, "max"),
    "text_encoder_2": ("rel_l2", 1e-2, "max"),
    "unet": ("rel_l2", 1e-2, "max"),
    "vae_decoder": ("psnr_db", 35.0, "min"),
    "vae_encoder": ("rel_l2", 1e-2, "max"),
}
# the fused-attention CPU variant vs the portable fp32 graph: only the summation order changes
CPU_VARIANT_MAX_ABS_REL = 1e-4
# TensorRT plans vs onnxruntime CPU, relative L2 per precision (fp32 engines compute in TF32)
TENSORRT_REL_L2 = {"fp16": 1e-2, "fp32": 1e-2}


def gate_for(component: str, precision: str) -> tuple[str, float, str]:
    """The export gate of ``component`` at ``precision``: (metric, bound, sense)."""
    return FP32_GATE if precision == "fp32" else FP16_GATES[component]


def passes(value: float, bound: float, sense: str) -> bool:
    return value <= bound if sense == "max" else value >= bound


def _pair(got: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Both as float64, or None when the shapes differ or ``got`` is not finite (every metric is then worst)."""
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return (g, r) if g.shape == r.shape and np.isfinite(g).all() else None


def max_abs(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| (inf when the shapes differ or ``got`` is not finite; 0 for empty arrays)."""
    p = _pair(got, ref)
    return math.inf if p is None else float(np.max(np.abs(p[0] - p[1]), initial=0.0))


def max_abs_rel(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max(1, max |ref|): relative to the output's scale where that exceeds 1, absolute
    below it (so outputs near zero are not judged by a vanishing scale)."""
    p = _pair(got, ref)
    if p is None:
        return math.inf
    return max_abs(*p) / max(1.0, float(np.max(np.abs(p[1]), initial=0.0)))


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref|| (the plain ||got - ref|| when ref is all zero; inf when the shapes differ
    or ``got`` is not finite)."""
    p = _pair(got, ref)
    if p is None:
        return math.inf
    num, den = float(np.linalg.norm(p[0] - p[1])), float(np.linalg.norm(p[1]))
    return num / den if den > 0 else num


def psnr_db(got: np.ndarray, ref: np.ndarray) -> float:
    """PSNR of the images the runtime would show ([-1, 1] -> [0, 1], clipped); identical images give
    200 dB (a finite figure for the JSON); -inf when the shapes differ or ``got`` is not finite."""
    p = _pair(got, ref)
    if p is None:
        return -math.inf
    a, b = (np.clip((x + 1) / 2, 0, 1) for x in (p[1], p[0]))
    return 10 * math.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20))


def parity_metrics(component: str, ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Every figure of ``got`` against the reference ``ref``: non-finite count, max abs, max abs rel,
    rel L2, and for the VAE decoder the image PSNR."""
    m = {"nonfinite": int((~np.isfinite(np.asarray(got, np.float64))).sum()), "max_abs": max_abs(got, ref),
         "max_abs_rel": max_abs_rel(got, ref), "rel_l2": rel_l2(got, ref)}
    if component == "vae_decoder":
        m["psnr_db"] = psnr_db(got, ref)
    return m


def cpu_session(model: Any, *, threads: int | None = None, low_memory: bool = False):
    """An onnxruntime ``InferenceSession`` on the CPU provider for ``model`` (a path or serialised bytes),
    warnings silenced; ``low_memory``: no arena and no pre-packed weight copies (SD-scale models)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if low_memory:
        so.enable_cpu_mem_arena = False
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])
