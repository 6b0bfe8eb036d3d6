"""Inference backends behind one ``Engine`` protocol: dict of arrays in, dict of arrays out.

Each backend imports its library lazily, so ``import ldm_runtime`` stays cheap and a missing
optional library (tensorrt, cuda-python) only matters when that backend is asked for.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .base import Engine, EngineInputError, check_feeds

BACKENDS = ("onnxruntime", "tensorrt")


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
    (``use_cuda_graph``). ``overrides`` are the option keywords as callers pass them to
    ``Pipeline.load(bundle, threads=1)``; this is the one place they become the object.
    """
    if backend == "onnxruntime":
        from .onnxruntime import OrtOptions

        base = OrtOptions() if options is None else options
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(OrtOptions)})
        if unknown:
            raise TypeError(f"unknown onnxruntime engine options {unknown}; expected some of "
                            f"{[f.name for f in dataclasses.fields(OrtOptions)]}")
        return dataclasses.replace(base, **overrides) if overrides else base
    if backend == "tensorrt":
        return {**(options or {}), **overrides}
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def load_engine(manifest, component: str, backend: str = "onnxruntime", device: str = "cpu",
                options: Any = None) -> Engine:
    """Open ``component`` of a bundle (``Manifest``) on ``backend``/``device`` with ``options``
    (see ``engine_options``; None: the backend's defaults)."""
    options = engine_options(backend, options)
    if backend == "onnxruntime":
        require_onnxruntime()
        from .onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine.from_manifest(manifest, component, device=device, options=options)
    from .tensorrt import TensorRTEngine

    if device != "cuda":
        raise ValueError(f"backend 'tensorrt' runs on device 'cuda', got device {device!r}")
    return TensorRTEngine.from_manifest(manifest, component, **options)


__all__ = ["BACKENDS", "Engine", "EngineInputError", "check_feeds", "engine_options", "load_engine",
           "OnnxRuntimeUnavailable", "require_onnxruntime"]
