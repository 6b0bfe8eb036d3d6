"""TensorRT backend: plans from the bundle, device buffers through cuda-python, shared activations.

A bundle records each plan it holds in ``manifest["engines"]`` (written by ``ldm build-engines``)::

    "engines": {"sm90-trt10.13.0.35-1a2b3c4d5e6f": {
        "component": "unet", "file": "engines/sm90-trt10.13.0.35-1a2b3c4d5e6f/unet.plan",
        "sha256": "...", "onnx_sha256": "...", "compute_capability": "9.0", "gpu_name": "NVIDIA H100",
        "tensorrt_version": "10.13.0.35", "profile": {...}, "build": {...}, "parity": {...}}}

A plan runs only on the compute capability and the exact TensorRT version it was built with, and
only while its ONNX source is unchanged, so ``select_plan`` refuses any other (a pure function,
testable without TensorRT). ``tensorrt`` and ``cuda.bindings`` are imported inside functions:
this module imports without them, and ``TensorRTEngine.from_manifest`` raises
``TensorRTUnavailable`` with one clear line where they, or a GPU, are missing. No torch here.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..manifest import BundleError, Manifest, TensorSpec
from .base import EngineInputError, check_feeds

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ldm-runtime[trt]'"
CUDA_ERROR_INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: the runtime needs a newer driver

# TensorRT DataType names -> numpy dtype names (the types a bundle's ONNX can carry)
TRT_TO_NUMPY = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64",
                "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


class TensorRTUnavailable(RuntimeError):
    """TensorRT, cuda-python or a CUDA GPU is missing."""


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error."""


# -- availability ------------------------------------------------------------------------------
def require_tensorrt() -> None:
    """Raise ``TensorRTUnavailable`` unless TensorRT, cuda-python and a CUDA GPU are all present."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(f"TensorRT is not installed ({INSTALL_HINT})") from None
    # A folder holding only type stubs (tensorrt-stubs) imports as an empty namespace package.
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable(f"TensorRT is not installed ({INSTALL_HINT})")
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:  # cuda-python before 12.6.1 has no cuda.bindings
        raise TensorRTUnavailable(f"cuda-python>=12.6.1 (cuda.bindings) is not installed ({INSTALL_HINT})") from None
    err, count = cudart.cudaGetDeviceCount()
    driver = driver_cuda_version(cudart)
    if int(err) == CUDA_ERROR_INSUFFICIENT_DRIVER and driver:  # with no driver at all, 35 too: no GPU
        raise TensorRTUnavailable(_driver_too_old_message(driver, cuda_bindings_version()))
    if int(err) != 0 or not count:
        raise TensorRTUnavailable(f"no CUDA GPU is available ({_error_name(err) if int(err) else 'device count 0'})")


def driver_cuda_version(cudart: Any) -> int:
    """The CUDA version the installed driver supports, as 1000 * major + 10 * minor (0: no driver)."""
    err, version = cudart.cudaDriverGetVersion()
    return int(version or 0) if int(err) == 0 else 0


def cuda_bindings_version() -> str:
    from cuda import bindings

    return str(getattr(bindings, "__version__", "?"))


def _driver_too_old_message(driver_cuda: int, bindings_version: str) -> str:
    """What cudaErrorInsufficientDriver means: the bindings' CUDA major is newer than the driver's."""
    driver = f"{driver_cuda // 1000}.{driver_cuda % 1000 // 10}"
    return (f"the NVIDIA driver (CUDA {driver}) is too old for cuda-bindings {bindings_version}: "
            "install the cuda-python of the driver's CUDA major (pip install 'ldm-runtime[trt]' for CUDA 12, "
            "'ldm-runtime[trt-cu13]' for CUDA 13) or update the driver")


def _error_name(err: Any) -> str:
    from cuda.bindings import runtime as cudart

    res = cudart.cudaGetErrorName(err)
    name = res[1] if len(res) > 1 else None
    return name.decode() if isinstance(name, bytes) else str(err)


def _cuda(result: tuple[Any, ...], what: str) -> Any:
    """Unpack a cuda-python result tuple ``(err, *values)``; raise ``CudaError`` on failure."""
    err = result[0]
    if int(err) != 0:
        raise CudaError(f"{what} failed: {_error_name(err)}")
    values = result[1:]
    return values[0] if len(values) == 1 else (values or None)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    major: int
    minor: int

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"


def gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device``."""
    from cuda.bindings import runtime as cudart

    prop = _cuda(cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    name = prop.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode(errors="replace")
    return GpuInfo(name=str(name), major=int(prop.major), minor=int(prop.minor))


def tensorrt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


# -- plan bookkeeping (pure) ---------------------------------------------------------------------
def plan_key(major: int, minor: int, trt_version: str, onnx_sha256: str) -> str:
    """Folder name of a plan under ``engines/``: ``sm{major}{minor}-trt{version}-{onnx sha256[:12]}``."""
    if len(onnx_sha256) < 12 or any(c not in "0123456789abcdef" for c in onnx_sha256):
        raise ValueError(f"onnx_sha256 must be a lowercase hex digest (>= 12 chars), got {onnx_sha256!r}")
    if not trt_version or any(c.isspace() or c in "/\\" for c in trt_version):
        raise ValueError(f"bad TensorRT version string {trt_version!r}")
    return f"sm{int(major)}{int(minor)}-trt{trt_version}-{onnx_sha256[:12]}"


def component_onnx_sha256(manifest_data: Mapping[str, Any], component: str) -> str:
    """Identity of a component's ONNX source as recorded in the manifest.

    The ``.onnx`` file's sha256; when the weights live in external data files, a digest over the
    graph's and every data file's sha256, since retrained weights can leave the graph file unchanged.
    """
    comps = manifest_data.get("components", {})
    if component not in comps:
        raise BundleError(f"bundle has no {component!r} component (it has {sorted(comps)})")
    comp = comps[component]
    files = manifest_data.get("files", {})
    names = [comp["file"], *comp.get("external_data", [])]
    for rel in names:
        if rel not in files or "sha256" not in files[rel]:
            raise BundleError(f"manifest lists no sha256 for {rel!r} (component {component!r})")
    if len(names) == 1:
        return str(files[names[0]]["sha256"])
    blob = "".join(f"{rel}:{files[rel]['sha256']}\n" for rel in names)
    return hashlib.sha256(blob.encode()).hexdigest()


def select_plan(engines: Mapping[str, Mapping[str, Any]], component: str, onnx_sha256: str,
                compute_capability: str, trt_version: str) -> tuple[str, Mapping[str, Any]]:
    """Pick the plan built for this component, ONNX source, GPU and TensorRT version.

    Returns ``(key, record)``. Raises ``BundleError`` listing, for each plan of the component,
    what it was built for and what this machine and bundle need.
    """
    candidates = [(k, r) for k, r in engines.items() if r.get("component") == component]
    if not candidates:
        raise BundleError(f"bundle has no TensorRT plan for {component!r}; build one with "
                          f"`ldm build-engines BUNDLE` on this machine (compute {compute_capability}, TensorRT {trt_version})")
    reasons = []
    for key, rec in candidates:
        why = []
        if rec.get("onnx_sha256") != onnx_sha256:
            why.append(f"built from ONNX sha256 {str(rec.get('onnx_sha256'))[:12]}..., the bundle's {component} "
                       f"ONNX is {onnx_sha256[:12]}... (stale plan)")
        if str(rec.get("compute_capability")) != compute_capability:
            why.append(f"built for GPU compute capability {rec.get('compute_capability')} "
                       f"({rec.get('gpu_name', '?')}), this GPU is compute {compute_capability}")
        if rec.get("tensorrt_version") != trt_version:
            why.append(f"built with TensorRT {rec.get('tensorrt_version')}, this is TensorRT {trt_version}")
        if not why:
            return key, rec
        reasons.append(f"{rec.get('file', key)}: " + "; ".join(why))
    raise BundleError(f"no usable TensorRT plan for {component!r}, refusing: " + " | ".join(reasons)
                      + "; rebuild with `ldm build-engines BUNDLE`")


def check_profile(engine_name: str, input_name: str, shape: Sequence[int],
                  lo: Sequence[int], hi: Sequence[int]) -> None:
    """Raise ``EngineInputError`` when ``shape`` lies outside the profile range [lo, hi]."""
    if len(shape) != len(lo) or any(not (a <= s <= b) for s, a, b in zip(shape, lo, hi)):
        raise EngineInputError(
            f"{engine_name}: input {input_name!r} has shape {list(shape)}, outside the TensorRT profile "
            f"(min {list(lo)}, max {list(hi)}); rebuild the engines with a wider range "
            "(ldm build-engines --min-size/--max-size/--max-batch)")


def _dims(d: trt.Dims) -> tuple[int, ...]:
    return tuple(int(d[i]) for i in range(len(d)))


# -- TensorRT logging ------------------------------------------------------------------------------
_trt_logger: trt.ILogger | None = None
_trt_errors: list[str] = []


def trt_logger() -> trt.ILogger:
    """The process-wide TensorRT logger (TensorRT keeps the first logger it is given)."""
    global _trt_logger
    import tensorrt as trt

    if _trt_logger is None:
        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
                level = int(severity)
                if level <= 1:  # INTERNAL_ERROR, ERROR: kept for the error message that follows
                    _trt_errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif level == 2:
                    log.warning("TensorRT: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

        _trt_logger = _Logger()
    return _trt_logger


def take_trt_errors() -> list[str]:
    """Errors TensorRT logged since the last call (then forgotten)."""
    errors = list(_trt_errors)
    _trt_errors.clear()
    return errors


# -- device memory -----------------------------------------------------------------------------------
class DeviceMemoryPool:
    """One activation allocation shared by the execution contexts of a pipeline's engines.

    Sized to the largest engine's need. Engines that share a pool take its lock for a whole run,
    so they never use the memory at the same time.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.ptr = 0
        self.size = 0

    def reserve(self, nbytes: int) -> None:
        """Grow to at least ``nbytes``; engines notice the new address before their next run."""
        from cuda.bindings import runtime as cudart

        with self.lock:
            if nbytes <= self.size:
                return
            if self.ptr:
                _cuda(cudart.cudaFree(self.ptr), "cudaFree")
                self.ptr, self.size = 0, 0
            self.ptr = int(_cuda(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for TensorRT activations"))
            self.size = nbytes

    def free(self) -> None:
        from cuda.bindings import runtime as cudart

        with self.lock:
            if self.ptr:
                cudart.cudaFree(self.ptr)
            self.ptr, self.size = 0, 0


_default_pool: DeviceMemoryPool | None = None


def default_memory_pool() -> DeviceMemoryPool:
    """The pool engines share unless given their own."""
    global _default_pool
    if _default_pool is None:
        _default_pool = DeviceMemoryPool()
    return _default_pool


# -- the engine ---------------------------------------------------------------------------------------
class TensorRTEngine:
    """A deserialized plan with one execution context; ``run`` is dict of arrays in, dict out.

    Inputs are copied to device buffers kept between calls (grown when a call needs more); output
    shapes come from the context after the input shapes are set; outputs are copied into fresh
    numpy arrays that belong to the caller. With ``use_cuda_graph`` the ``execute_async_v3`` call
    is captured once per set of shapes (after a warm-up run) and replayed.
    """

    def __init__(self, plan: bytes, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 memory_pool: DeviceMemoryPool | None = None, use_cuda_graph: bool = False,
                 refit: tuple[bytes, str, Mapping[str, np.ndarray]] | None = None):
        """``refit``: (ONNX graph bytes, its path, fused weights by initializer name): refit the plan
        (built with ``ldm build-engines --refittable``) with the graph's weights, those replaced."""
        require_tensorrt()
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.use_cuda_graph = use_cuda_graph
        self._pool = memory_pool if memory_pool is not None else default_memory_pool()
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device ptr, capacity in bytes)
        self._stream: Any = None
        self._graph_exec: Any = None
        self._graph_key: tuple[Any, ...] | None = None
        self._graph_failed = False
        self._bound_ptr: int | None = None

        take_trt_errors()
        self._runtime = trt.Runtime(trt_logger())
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            errors = take_trt_errors()
            raise BundleError(f"{name}: TensorRT {trt.__version__} could not deserialize the plan ({len(plan)} bytes)"
                              + (f": {' | '.join(errors)}" if errors else ""))
        self._engine = engine
        if refit is not None:
            refit_engine(engine, name, *refit)
        self._check_io(engine)
        self._profile = {s.name: _profile_range(engine, s.name) for s in self.inputs}
        size = getattr(engine, "device_memory_size_v2", None)
        self._memory_size = int(size if size is not None else engine.device_memory_size)
        self._pool.reserve(self._memory_size)
        self._context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self._context is None:
            raise RuntimeError(f"{name}: TensorRT could not create an execution context: {' | '.join(take_trt_errors())}")
        self._stream = _cuda(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @classmethod
    def from_manifest(cls, manifest: Manifest, component: str, use_cuda_graph: bool = False,
                      memory_pool: DeviceMemoryPool | None = None, loras: Any = None) -> TensorRTEngine:
        """Load the plan the bundle holds for ``component`` on this GPU and TensorRT version; with
        ``loras`` (a ``lora_apply.BundleLoras`` changing this component) refit it with their fused weights."""
        require_tensorrt()
        info = manifest.component(component)
        gpu = gpu_info()
        key, rec = select_plan(manifest.data.get("engines") or {}, component,
                               component_onnx_sha256(manifest.data, component),
                               gpu.compute_capability, tensorrt_version())
        if rec.get("gpu_name") and rec["gpu_name"] != gpu.name:
            log.warning("%s: plan %s was built on %s, running on %s (same compute capability; "
                        "tactics may be slower)", component, key, rec["gpu_name"], gpu.name)
        plan = manifest.read_verified(rec.get("file", ""), field=f"engines.{key}.file")  # checked against files
        if rec.get("sha256") != manifest.file_record(rec["file"])["sha256"]:
            raise BundleError(f"{manifest.root}: manifest field engines.{key}.sha256 disagrees with the plan's "
                              f"files entry {rec['file']!r}")
        fused = loras.for_graph(component, info.file) if loras is not None else {}
        refit = (manifest.read_verified(info.file, field=f"components.{component}.file"),
                 str(manifest.path(info.file, field=f"components.{component}.file")), fused) if fused else None
        return cls(plan, component, info.inputs, info.outputs, memory_pool=memory_pool, use_cuda_graph=use_cuda_graph,
                   refit=refit)

    # -- setup helpers -------------------------------------------------------------------------------
    def _check_io(self, engine: trt.ICudaEngine) -> None:
        import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        got_in = sorted(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        got_out = sorted(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        want_in, want_out = sorted(s.name for s in self.inputs), sorted(s.name for s in self.outputs)
        if (got_in, got_out) != (want_in, want_out):
            raise BundleError(f"{self.name}: plan has inputs {got_in} and outputs {got_out}; "
                              f"the manifest expects inputs {want_in} and outputs {want_out}")
        for spec in (*self.inputs, *self.outputs):
            dt = engine.get_tensor_dtype(spec.name).name
            if TRT_TO_NUMPY.get(dt) != spec.dtype:
                raise BundleError(f"{self.name}: tensor {spec.name!r} is {dt} in the plan "
                                  f"({TRT_TO_NUMPY.get(dt, 'unsupported')}), the manifest says {spec.dtype}")

    def check_shapes(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Refuse input shapes outside the plan's profile before anything runs (the pipeline asks)."""
        for name, shape in shapes.items():
            if name in self._profile:
                check_profile(self.name, name, shape, *self._profile[name])

    def _buffer(self, name: str, nbytes: int) -> int:
        from cuda.bindings import runtime as cudart

        ptr, cap = self._buffers.get(name, (0, 0))
        if nbytes > cap:
            if ptr:
                _cuda(cudart.cudaFree(ptr), "cudaFree")
            ptr = int(_cuda(cudart.cudaMalloc(max(nbytes, 256)), f"cudaMalloc({nbytes}) for {self.name}.{name}"))
            self._buffers[name] = (ptr, max(nbytes, 256))
        return ptr

    def _bind_memory(self) -> None:
        if self._bound_ptr != self._pool.ptr:
            set_device_memory(self._context, self._pool.ptr, self._pool.size)
            self._bound_ptr = self._pool.ptr

    @property
    def cuda_graph_active(self) -> bool:
        """True while a captured CUDA graph replays the calls (False: plain enqueues)."""
        return self._graph_exec is not None

    # -- running ---------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cuda.bindings import runtime as cudart

        check_feeds(self.name, self.inputs, feeds)
        arrays = {s.name: np.ascontiguousarray(feeds[s.name]) for s in self.inputs}
        self.check_shapes({name: arr.shape for name, arr in arrays.items()})
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        ctx, stream = self._context, self._stream
        with self._pool.lock:
            self._bind_memory()
            addresses = []
            for name, arr in arrays.items():
                if not ctx.set_input_shape(name, tuple(arr.shape)):
                    raise EngineInputError(f"{self.name}: TensorRT rejected shape {list(arr.shape)} for input {name!r}: "
                                           f"{' | '.join(take_trt_errors())}")
                ptr = self._buffer(name, arr.nbytes)
                ctx.set_tensor_address(name, ptr)
                addresses.append(ptr)
            missing = ctx.infer_shapes()
            if missing:
                raise RuntimeError(f"{self.name}: TensorRT cannot infer shapes of {missing} from the inputs")
            out_shapes: dict[str, tuple[int, ...]] = {}
            for spec in self.outputs:
                shape = _dims(ctx.get_tensor_shape(spec.name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"{self.name}: output {spec.name!r} has unresolved shape {list(shape)}")
                out_shapes[spec.name] = shape
                ptr = self._buffer(spec.name, math.prod(shape) * np.dtype(spec.dtype).itemsize)
                ctx.set_tensor_address(spec.name, ptr)
                addresses.append(ptr)
            for name, arr in arrays.items():
                if arr.nbytes:
                    _cuda(cudart.cudaMemcpyAsync(self._buffers[name][0], arr.ctypes.data, arr.nbytes, h2d, stream),
                          f"copy of {self.name}.{name} to the GPU")
            key = (tuple(a.shape for a in arrays.values()), tuple(addresses), self._pool.ptr)
            self._execute(key)
            results = {}
            for spec in self.outputs:
                out = np.empty(out_shapes[spec.name], dtype=spec.dtype)
                if out.nbytes:
                    _cuda(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[spec.name][0], out.nbytes, d2h, stream),
                          f"copy of {self.name}.{spec.name} from the GPU")
                results[spec.name] = out
            _cuda(cudart.cudaStreamSynchronize(stream), f"{self.name}: cudaStreamSynchronize")
        return results

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed: {' | '.join(take_trt_errors())}")

    def _execute(self, key: tuple[Any, ...]) -> None:
        from cuda.bindings import runtime as cudart

        if not self.use_cuda_graph or self._graph_failed:
            self._enqueue()
            return
        if self._graph_exec is not None and key == self._graph_key:
            _cuda(cudart.cudaGraphLaunch(self._graph_exec, self._stream), f"{self.name}: cudaGraphLaunch")
            return
        # New shapes or addresses: the warm-up run computes this call's outputs (and lets TensorRT do
        # its one-time work outside the capture), then the graph is captured for the next calls.
        self._drop_graph()
        self._enqueue()
        _cuda(cudart.cudaStreamSynchronize(self._stream), f"{self.name}: cudaStreamSynchronize")
        self._capture(key)

    def _capture(self, key: tuple[Any, ...]) -> None:
        from cuda.bindings import runtime as cudart

        stream = self._stream
        try:
            # thread-local (as trtexec): a global capture would fail other threads' CUDA calls meanwhile
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _cuda(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
            ok = self._context.execute_async_v3(int(stream))
            err, graph = cudart.cudaStreamEndCapture(stream)
            if not ok or int(err) != 0 or graph is None:
                if graph is not None and int(err) == 0:
                    cudart.cudaGraphDestroy(graph)
                raise CudaError(f"capture ended with {_error_name(err)}, execute_async_v3 returned {ok}")
            try:
                self._graph_exec = _cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            finally:
                cudart.cudaGraphDestroy(graph)
            self._graph_key = key
        except CudaError as e:
            cudart.cudaGetLastError()  # clear the error the failed capture left behind
            take_trt_errors()
            self._graph_failed = True
            log.warning("%s: CUDA graph capture failed (%s); running without a CUDA graph", self.name, e)

    def _drop_graph(self) -> None:
        if self._graph_exec is not None:
            from cuda.bindings import runtime as cudart

            cudart.cudaGraphExecDestroy(self._graph_exec)
        self._graph_exec, self._graph_key = None, None

    def close(self) -> None:
        """Free this engine's device buffers, stream and graph (the shared pool stays)."""
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            return
        self._drop_graph()
        for ptr, _ in self._buffers.values():
            cudart.cudaFree(ptr)
        self._buffers.clear()
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        try:
            if getattr(self, "_stream", None) is not None:
                self.close()
        except Exception:  # interpreter shutdown: modules may be gone already
            pass


def refit_engine(engine: trt.ICudaEngine, name: str, graph: bytes, graph_path: str,
                 weights: Mapping[str, np.ndarray]) -> None:
    """Refit ``engine`` from its ONNX graph (``graph`` bytes; external data beside ``graph_path``) with the
    initializers named in ``weights`` replaced: every weight of the plan is set, so none is missing."""
    import tensorrt as trt

    if not engine.refittable:
        raise BundleError(f"{name}: the TensorRT plan was not built refittable; rebuild it with "
                          "'ldm build-engines --refittable' to apply LoRAs")
    take_trt_errors()
    refitter = trt.Refitter(engine, trt_logger())
    parser = trt.OnnxParserRefitter(refitter, trt_logger())
    if not parser.load_model_proto(graph, graph_path):
        raise BundleError(f"{name}: TensorRT could not read the ONNX graph to refit from: {' | '.join(take_trt_errors())}")
    arrays = {n: np.ascontiguousarray(a) for n, a in weights.items()}  # alive until the refit is done
    for n, a in arrays.items():
        if not parser.load_initializer(n, a.ctypes.data, a.nbytes):
            raise BundleError(f"{name}: TensorRT refused the fused weight {n!r} ({a.dtype} {list(a.shape)}): "
                              f"{' | '.join(take_trt_errors())}")
    if not parser.refit_model_proto() or not refitter.refit_cuda_engine():
        missing = list(refitter.get_missing_weights())
        raise BundleError(f"{name}: TensorRT could not refit the plan" + (f" (missing {missing[:5]})" if missing else "")
                          + f": {' | '.join(take_trt_errors())}")


def set_device_memory(context: trt.IExecutionContext, ptr: int, size: int) -> None:
    """Give ``context`` its activation memory: ``set_device_memory`` (TensorRT 10.1+), else the
    ``device_memory`` attribute of TensorRT 10.0."""
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(ptr, size)
    else:
        setattr(context, "device_memory", ptr)


def _profile_range(engine: trt.ICudaEngine, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lo, _opt, hi = engine.get_tensor_profile_shape(name, 0)
    return _dims(lo), _dims(hi)
