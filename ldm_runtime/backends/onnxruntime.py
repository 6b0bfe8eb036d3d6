"""onnxruntime backend: CPU, and CUDA with IO binding."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..manifest import BundleError, Manifest, TensorSpec
from .base import check_feeds

log = logging.getLogger(__name__)

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session_options(threads: int | None = None, opt_level: str = "all", arena: bool = True, optimized_model_path: str | None = None,
                    mem_pattern: bool = True, spinning: bool = True, spin_stop: bool = False):
    """Build ``onnxruntime.SessionOptions`` from plain values.

    ``mem_pattern``: plan one block for all activations per input shape (after the first run at that
    shape); ``spinning``: let idle intra-op threads busy-wait for the next parallel section;
    ``spin_stop``: end that busy-wait when a run returns, so the caller's code between runs gets the cores.
    """
    import onnxruntime as ort

    if opt_level not in _OPT_LEVELS:
        raise ValueError(f"unknown onnxruntime optimization level {opt_level!r}; expected one of {', '.join(_OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[opt_level])
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = arena
    so.enable_mem_pattern = mem_pattern
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if spin_stop:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    return so


class OnnxRuntimeEngine:
    """One ONNX model in an ``onnxruntime.InferenceSession``.

    ``mem_pattern=None`` (default) turns onnxruntime's memory pattern on for the U-Net only.
    On ``device="cuda"`` inputs are bound with IO binding: numpy feeds are copied to the GPU
    once per call, and ``OrtValue`` feeds that already live on the GPU (see ``to_device``)
    are bound without a copy, so that embeddings stay on the device for a whole sampling loop.
    """

    def __init__(self, path: str | os.PathLike, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 name: str | None = None, device: str = "cpu", threads: int | None = None,
                 opt_level: str = "all", arena: bool = True, device_id: int = 0, mem_pattern: bool | None = None,
                 spinning: bool = True, spin_stop: bool = False):
        import onnxruntime as ort

        self.name = name or Path(path).stem
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.device = device
        self.device_id = device_id
        if device == "cpu":
            providers: list[Any] = ["CPUExecutionProvider"]
        elif device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "device 'cuda' needs onnxruntime-gpu (pip install 'ldm-runtime[gpu]'); "
                    f"this onnxruntime has providers {ort.get_available_providers()}"
                )
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        else:
            raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")
        if mem_pattern is None:
            # the planned activation block pays off for the U-Net (same shapes every step: measured 10%
            # faster on a small one); for a component run once per image it is a second copy of
            # the activations (VAE decoder at 256x256: +120 MB, no faster)
            mem_pattern = self.name == "unet"
        so = session_options(threads=threads, opt_level=opt_level, arena=arena, mem_pattern=mem_pattern, spinning=spinning,
                             spin_stop=spin_stop)
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        declared = {i.name for i in self.session.get_inputs()}
        wanted = {s.name for s in self.inputs}
        if declared != wanted:
            raise BundleError(f"{path}: ONNX inputs {sorted(declared)} do not match the manifest's {sorted(wanted)}")
        self._output_names = [o.name for o in self.outputs]
        self._checked: tuple | None = None  # signature of the last feeds that passed check_feeds

    @classmethod
    def from_manifest(cls, manifest: Manifest, component: str, device: str = "cpu", cpu_variant: bool = True,
                      **options) -> "OnnxRuntimeEngine":
        """Open ``component``; on the CPU its ``cpu_variant`` graph (fused attention, written by
        ``export.optimize``) when the bundle has one and ``cpu_variant`` is true."""
        info = manifest.component(component)
        variant = info.extra.get("cpu_variant") or {}
        use = device == "cpu" and cpu_variant and variant.get("file")
        path = manifest.path(variant["file"] if use else info.file)
        return cls(path, info.inputs, info.outputs, name=component, device=device, **options)

    def to_device(self, arr: np.ndarray):
        """Copy ``arr`` to this engine's device once; the result can be fed to ``run`` repeatedly."""
        import onnxruntime as ort

        if self.device == "cpu":
            return arr
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), "cuda", self.device_id)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        # the U-Net gets the same names, dtypes and shapes every step: check them once per signature
        sig = tuple((k, v.dtype, v.shape) if isinstance(v, np.ndarray) else (k, id(v)) for k, v in feeds.items())
        if sig != self._checked:
            check_feeds(self.name, self.inputs, {k: _as_checkable(v) for k, v in feeds.items()})
            self._checked = sig
        if self.device == "cpu":
            outs = self.session.run(self._output_names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
            return dict(zip(self._output_names, outs))
        binding = self.session.io_binding()
        for k, v in feeds.items():
            if isinstance(v, np.ndarray):
                binding.bind_cpu_input(k, np.ascontiguousarray(v))
            else:
                binding.bind_ortvalue_input(k, v)
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu()))


class _ShapeDtype:
    """Shape and dtype of an OrtValue, for the shared input checks."""

    def __init__(self, shape, dtype):
        self.shape = tuple(shape)
        self.dtype = dtype


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _as_checkable(v: Any):
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "data_type") and hasattr(v, "shape"):  # OrtValue
        return _ShapeDtype(v.shape(), _ORT_TYPES.get(v.data_type()))
    return v
