"""OpenVINO backend: the bundle's portable ONNX graphs compiled by OpenVINO for the CPU, in f32 or bf16."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..manifest import Manifest, TensorSpec
from .base import check_feeds
from .onnxruntime import check_graph, private_copies, read_external_data

PRECISIONS = ("f32", "bf16")
INSTALL_HINT = "pip install 'ldm-runtime[openvino]'"


class OpenVinoUnavailable(RuntimeError):
    """``backend="openvino"`` asked for where the openvino package is not importable."""


def require_openvino():
    """The ``openvino`` module, or ``OpenVinoUnavailable`` naming the extra to install."""
    try:
        import openvino
    except ImportError as e:
        raise OpenVinoUnavailable(f"backend 'openvino' needs the openvino package ({e}); "
                                  f"install it: {INSTALL_HINT}") from None
    return openvino


def default_cache_dir() -> str:
    """Where compiled models are cached unless ``cache_dir`` says otherwise: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ldm-runtime", "openvino")


@dataclass(frozen=True)
class OpenVinoOptions:
    """How OpenVINO compiles a bundle's graphs, from ``Pipeline.load(bundle, backend="openvino", ...)`` down.

    ``threads``: inference threads (None: OpenVINO's default, all cores), as onnxruntime's ``threads``;
    ``precision``: the arithmetic OpenVINO runs in, "f32" or "bf16" (None: bf16 where the CPU reports
    BF16 in ``OPTIMIZATION_CAPABILITIES``, else f32); ``cache_dir``: OpenVINO's compiled-model cache,
    so a second load skips compilation (None: ``default_cache_dir()``). Each precision caches in its own
    subfolder of it: OpenVINO 2026.4's cache key leaves ``INFERENCE_PRECISION_HINT`` out, so a bf16 compile
    of a graph already cached in f32 loaded the f32 blob and, on a CPU with AMX, returned only NaN
    (measured 2026-12-02 on the text encoder of the tests' tiny bundle).
    """

    threads: int | None = None
    precision: str | None = None
    cache_dir: str | None = None

    def __post_init__(self):
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"unknown OpenVINO precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be >= 1, got {self.threads!r}")

    def checked(self) -> "OpenVinoOptions":
        """These options with the precision decided for this CPU; an error if openvino is missing or
        bf16 is asked on a CPU without it."""
        capabilities = cpu_capabilities()
        if self.precision is None:
            return OpenVinoOptions(self.threads, "bf16" if "BF16" in capabilities else "f32", self.cache_dir)
        if self.precision == "bf16" and "BF16" not in capabilities:
            raise ValueError(f"precision 'bf16' needs a CPU with bf16 arithmetic; this CPU "
                             f"({cpu_name()}) reports OPTIMIZATION_CAPABILITIES {capabilities}: use precision='f32'")
        return self

    def compile_config(self) -> dict[str, str]:
        """The properties every graph is compiled with."""
        precision = self.precision or "f32"
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                  "CACHE_DIR": os.path.join(self.cache_dir or default_cache_dir(), precision)}
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = str(self.threads)
        return config


_core_lock = threading.Lock()
_core: Any = None


def core():
    """The process's one ``openvino.Core``."""
    global _core
    ov = require_openvino()
    with _core_lock:
        if _core is None:
            _core = ov.Core()
        return _core


def cpu_capabilities() -> list[str]:
    return list(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def cpu_name() -> str:
    return str(core().get_property("CPU", "FULL_DEVICE_NAME"))


class OpenVinoEngine:
    """One ONNX graph compiled by OpenVINO for the CPU; feeds are checked, not cast (the pipeline casts)."""

    def __init__(self, path: str | os.PathLike, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 name: str | None = None, options: OpenVinoOptions = OpenVinoOptions()):
        self.name = name or Path(path).stem
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.options = options
        model = core().read_model(str(path))
        check_graph(self.name, _PortView(model), self.inputs, self.outputs)
        self.compiled = core().compile_model(model, "CPU", options.compile_config())
        self._output_names = [o.name for o in self.outputs]
        self._requests = threading.local()  # an InferRequest is not thread-safe: one per thread
        self._checked: tuple | None = None  # signature of the last feeds that passed check_feeds

    @classmethod
    def from_manifest(cls, manifest: Manifest, component: str,
                      options: OpenVinoOptions = OpenVinoOptions()) -> "OpenVinoEngine":
        """Compile ``component``'s portable graph (never the onnxruntime CPU variant).

        The graph and its external data are read once and checked against the manifest's ``files`` (the
        graph may name only the data files its entry declares), and OpenVINO reads those verified bytes
        from a private copy (``private_copies``), so a file changed on disk after the check is never
        compiled. Where no private copy can be made (no writable ``/dev/shm``), OpenVINO reads the bundle's
        files by path right after the check.
        """
        info = manifest.component(component)
        where = f"components.{component}"
        graph = manifest.read_verified(info.file, field=f"{where}.file")
        files = {os.path.basename(info.file): graph,
                 **read_external_data(manifest, graph, info.extra.get("external_data") or [], where)}
        with private_copies(files) as folder:
            path = (os.path.join(folder, os.path.basename(info.file)) if folder is not None
                    else manifest.path(info.file, field=f"{where}.file"))
            return cls(path, info.inputs, info.outputs, name=component, options=options)

    @property
    def precision(self) -> str:
        """The arithmetic precision OpenVINO compiled this graph for ("f32" or "bf16")."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    @property
    def loaded_from_cache(self) -> bool:
        """Whether OpenVINO took this compiled graph from ``cache_dir`` instead of compiling it."""
        return bool(self.compiled.get_property("LOADED_FROM_CACHE"))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sig = tuple((k, v.dtype, v.shape) for k, v in feeds.items())
        if sig != self._checked:
            check_feeds(self.name, self.inputs, feeds)
            self._checked = sig
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        # the request's output buffers are reused by its next run: the caller gets copies
        return {name: np.array(request.get_tensor(name).data, copy=True) for name in self._output_names}


_OV_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i64": "tensor(int64)", "i32": "tensor(int32)"}


class _PortView:
    """An OpenVINO model's inputs and outputs as onnxruntime describes them, for ``check_graph``."""

    def __init__(self, model: Any):
        self.model = model

    def get_inputs(self) -> list["_Arg"]:
        return [_Arg(p, p.get_any_name()) for p in self.model.inputs]

    def get_outputs(self) -> list["_Arg"]:  # an output may carry several tensor names: each counts
        return [_Arg(p, name) for p in self.model.outputs for name in sorted(p.get_names())]


class _Arg:
    def __init__(self, port: Any, name: str):
        self.name = name
        self.type = _OV_TYPES.get(port.get_element_type().get_type_name(), str(port.get_element_type()))
        self.shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
