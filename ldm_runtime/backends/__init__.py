"""Inference backends behind one ``Engine`` protocol: dict of arrays in, dict of arrays out.

Each backend imports its library lazily, so ``import ldm_runtime`` stays cheap and a missing
optional library (tensorrt, cuda-python) only matters when that backend is asked for.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .base import Engine, EngineInputError, check_feeds

BACKENDS = ("onnxruntime", "tensorrt", "openvino")
LORA_BACKENDS = ("onnxruntime", "tensorrt")  # the backends that run with LoRA-fused weights


class OnnxRuntimeUnavailable(RuntimeError):
    """Neither onnxruntime build (``onnxruntime``, ``onnxruntime-gpu``) is importable."""


def require_onnxruntime() -> None:
    """Raise ``OnnxRuntimeUnavailable`` unless an onnxruntime build imports whole.

    Both builds write the same ``onnxruntime/`` package, so removing one of two installed builds
    leaves a package without ``InferenceSession``: that counts as missing too.
    """
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    if not hasattr(onnxruntime, "InferenceSession"):
        raise OnnxRuntimeUnavailable(
            "onnxruntime is not installed (or is broken: both builds were installed and one removed); install "
            "exactly one: pip install 'ldm-runtime[cpu]' (CPU) or 'ldm-runtime[gpu]' (CUDA), see the README")


def engine_options(backend: str, options: Any = None, **overrides: Any) -> Any:
    """The one options object ``backend``'s engines open with: ``options`` (or the defaults) with ``overrides``.

    onnxruntime: an ``OrtOptions``; tensorrt: a dict of ``TensorRTEngine.from_manifest`` keywords
    (``use_cuda_graph``); openvino: an ``OpenVinoOptions`` with its precision decided for this CPU
    (openvino missing, or bf16 asked on a CPU without it, is refused here). ``overrides`` are the
    option keywords as callers pass them to ``Pipeline.load(bundle, threads=1)``; this is the one
    place they become the object.
    """
    if backend == "onnxruntime":
        from .onnxruntime import OrtOptions

        return _dataclass_options("onnxruntime", OrtOptions, options, overrides)
    if backend == "tensorrt":
        return {**(options or {}), **overrides}
    if backend == "openvino":
        from .openvino import OpenVinoOptions

        return _dataclass_options("openvino", OpenVinoOptions, options, overrides).checked()
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _dataclass_options(backend: str, cls: type, options: Any, overrides: dict[str, Any]) -> Any:
    """``options`` (default: ``cls()``) with ``overrides``; a TypeError naming any that ``cls`` lacks."""
    base = cls() if options is None else options
    if not isinstance(base, cls):
        raise TypeError(f"{backend} engine options must be a {cls.__name__}, got {type(base).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"unknown {backend} engine options {unknown}; expected some of {fields}")
    return dataclasses.replace(base, **overrides) if overrides else base


def check_precision(manifest, backend: str) -> None:
    """Refuse a bundle ``backend`` cannot run: int8 components (``ldm quantize``) run on onnxruntime and
    OpenVINO; TensorRT plans are not built from their QDQ graphs here."""
    if backend == "tensorrt" and manifest.int8_components:
        from ..manifest import BundleError

        raise BundleError(f"{manifest.root}: int8 bundles are not built for TensorRT here (components "
                          f"{', '.join(manifest.int8_components)} are int8, written by ldm quantize); run it on "
                          "backend 'onnxruntime' (device 'cpu'), or use its fp32 or an fp16 bundle on TensorRT")


def load_engine(manifest, component: str, backend: str = "onnxruntime", device: str = "cpu",
                options: Any = None, loras: Any = None) -> Engine:
    """Open ``component`` of a bundle (``Manifest``) on ``backend``/``device`` with ``options``
    (see ``engine_options``; None: the backend's defaults). ``loras``: a ``lora_apply.BundleLoras``
    whose fused weights the engine runs with (onnxruntime, tensorrt)."""
    options = engine_options(backend, options)
    check_precision(manifest, backend)
    if loras is not None and backend not in LORA_BACKENDS:
        raise ValueError(f"LoRAs are applied on backends {', '.join(LORA_BACKENDS)}, not on {backend!r}")
    if backend == "onnxruntime":
        require_onnxruntime()
        from .onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine.from_manifest(manifest, component, device=device, options=options, loras=loras)
    if backend == "openvino":
        from .openvino import OpenVinoEngine

        if device != "cpu":
            raise ValueError(f"backend 'openvino' runs on device 'cpu', got device {device!r}")
        return OpenVinoEngine.from_manifest(manifest, component, options=options)
    from .tensorrt import TensorRTEngine

    if device != "cuda":
        raise ValueError(f"backend 'tensorrt' runs on device 'cuda', got device {device!r}")
    return TensorRTEngine.from_manifest(manifest, component, **options, loras=loras)


__all__ = ["BACKENDS", "Engine", "EngineInputError", "check_feeds", "check_precision", "engine_options", "load_engine",
           "OnnxRuntimeUnavailable", "require_onnxruntime"]
