"""Inference backends behind one ``Engine`` protocol: dict of arrays in, dict of arrays out.

Each backend imports its library lazily, so ``import ldm_runtime`` stays cheap and a missing
optional library (tensorrt, cuda-python) only matters when that backend is asked for.
"""
from __future__ import annotations

from .base import Engine, EngineInputError, check_feeds

BACKENDS = ("onnxruntime", "tensorrt")


def load_engine(manifest, component: str, backend: str = "onnxruntime", device: str = "cpu", **options) -> Engine:
    """Open ``component`` of a bundle (``Manifest``) on ``backend``/``device``."""
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine.from_manifest(manifest, component, device=device, **options)
    if backend == "tensorrt":
        from .tensorrt import TensorRTEngine

        if device != "cuda":
            raise ValueError(f"backend 'tensorrt' runs on device 'cuda', got device {device!r}")
        return TensorRTEngine.from_manifest(manifest, component, **options)
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Engine", "EngineInputError", "check_feeds", "load_engine"]
