"""onnxruntime backend: CPU, and CUDA with IO binding."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..manifest import BundleError, Manifest, TensorSpec
from .base import check_feeds
from .onnx_wire import WireError, external_data_locations

log = logging.getLogger(__name__)

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
CUDA_PROVIDER = "CUDAExecutionProvider"


@dataclass(frozen=True)
class OrtOptions:
    """How onnxruntime sessions are opened: one object from ``Pipeline.load`` down to ``SessionOptions``.

    ``threads``: intra-op threads (None: onnxruntime's default); ``opt_level``: graph optimization
    (disable, basic, extended, all); ``arena``: the CPU memory arena; ``mem_pattern``: plan one block
    for all activations per input shape (None: for the U-Net only, the one component whose shapes
    repeat every step); ``spinning``: let idle intra-op threads busy-wait for the next parallel
    section; ``spin_stop``: end that busy-wait when a run returns, so the caller's code between runs
    gets the cores; ``cpu_variant``: on the CPU, open a component's CPU variant (fused attention,
    written by ``export.optimize``) where the bundle has one; ``device_id``: the CUDA device.
    """

    threads: int | None = None
    opt_level: str = "all"
    arena: bool = True
    mem_pattern: bool | None = None
    spinning: bool = True
    spin_stop: bool = False
    cpu_variant: bool = True
    device_id: int = 0

    def __post_init__(self):
        if self.opt_level not in _OPT_LEVELS:
            raise ValueError(f"unknown onnxruntime optimization level {self.opt_level!r}; "
                             f"expected one of {', '.join(_OPT_LEVELS)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def uses_mem_pattern(self, component: str) -> bool:
        return component == "unet" if self.mem_pattern is None else self.mem_pattern


def session_options(options: OrtOptions = OrtOptions(), component: str = ""):
    """``onnxruntime.SessionOptions`` for ``component``'s session, from ``options``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[options.opt_level])
    if options.threads is not None:
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = options.arena
    so.enable_mem_pattern = options.uses_mem_pattern(component)
    if not options.spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if options.spin_stop:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3
    return so


class OnnxRuntimeEngine:
    """One ONNX model in an ``onnxruntime.InferenceSession``.

    On ``device="cuda"`` inputs are bound with IO binding: numpy feeds are copied to the GPU
    once per call, and ``OrtValue`` feeds that already live on the GPU (see ``to_device``)
    are bound without a copy, so that embeddings stay on the device for a whole sampling loop.
    Feeds must already have the declared dtypes (the pipeline casts them); they are checked, not cast.
    """

    def __init__(self, path: str | os.PathLike | bytes, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], name: str | None = None, device: str = "cpu",
                 options: OrtOptions = OrtOptions(), external_data: Mapping[str, bytes] | None = None,
                 initializers: Mapping[str, np.ndarray] | None = None):
        """``path``: the model file, or its bytes (then ``external_data``: its data files' bytes by location).
        ``initializers``: arrays that replace the graph's external initializers of those names (LoRA-fused weights)."""
        self.name = name or ("model" if isinstance(path, bytes) else Path(path).stem)
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.device = device
        self.device_id = options.device_id
        self._initializers = initializers  # onnxruntime reads these buffers without owning them
        self.session = open_session(path, session_options(options, self.name), device, options.device_id,
                                    external_data, initializers)
        check_graph(self.name, self.session, self.inputs, self.outputs)
        self._output_names = [o.name for o in self.outputs]
        self._checked: tuple | None = None  # signature of the last feeds that passed check_feeds

    @classmethod
    def from_manifest(cls, manifest: Manifest, component: str, device: str = "cpu",
                      options: OrtOptions = OrtOptions(), loras: Any = None) -> "OnnxRuntimeEngine":
        """Open ``component``; on the CPU its ``cpu_variant`` graph when the bundle has one and
        ``options.cpu_variant`` is true. ``loras`` (a ``lora_apply.BundleLoras``): run with its fused
        weights for that graph, handed to onnxruntime with ``add_external_initializers``.

        The session opens from verified bytes: the graph and each external data file are read once,
        checked against the manifest's ``files`` and handed to onnxruntime from those bytes (through a
        private copy, ``private_copies``), so a file changed on disk after ``Pipeline.load`` is refused,
        never run. The graph may name only the
        external data files its manifest entry declares.
        """
        info = manifest.component(component)
        variant = info.extra.get("cpu_variant") or {}
        use = device == "cpu" and options.cpu_variant and variant.get("file")
        entry, where = (variant, f"components.{component}.cpu_variant") if use else (info.extra, f"components.{component}")
        model = manifest.read_verified(variant["file"] if use else info.file, field=f"{where}.file")
        data = read_external_data(manifest, model, entry.get("external_data") or [], where)
        fused = loras.for_graph(component, variant["file"] if use else info.file) if loras is not None else None
        return cls(model, info.inputs, info.outputs, name=component, device=device, options=options,
                   external_data=data, initializers=fused)

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


# -- sessions ----------------------------------------------------------------------------------------

def read_external_data(manifest: Manifest, model: bytes, declared: list[str], where: str) -> dict[str, bytes]:
    """The verified bytes of every external data file ``model`` names, by location.

    Each location the graph names must be one of ``declared`` (the manifest's ``where.external_data``);
    each declared file is read through ``Manifest.read_verified``.
    """
    if not isinstance(declared, list):
        raise BundleError(f"{manifest.root}: manifest field {where}.external_data: expected a list of file names, "
                          f"got {type(declared).__name__}")
    try:
        named = external_data_locations(model)
    except WireError as e:
        raise BundleError(f"{manifest.root}: {where}.file is not a valid ONNX model ({e})") from None
    undeclared = [loc for loc in named if loc not in declared]
    if undeclared:
        shown = ", ".join(repr(loc[:100]) for loc in undeclared[:3])
        raise BundleError(f"{manifest.root}: the graph of {where} reads external data {shown}, which its "
                          f"manifest field {where}.external_data {declared!r} does not declare")
    return {rel: manifest.read_verified(rel, field=f"{where}.external_data[{i}]") for i, rel in enumerate(declared)
            if rel in named}


def open_session(path: str | os.PathLike | bytes, so: Any, device: str, device_id: int = 0,
                 external_data: Mapping[str, bytes] | None = None,
                 initializers: Mapping[str, np.ndarray] | None = None):
    """An ``InferenceSession`` on ``device``; on "cuda" one that really runs on the CUDA provider, or an error.

    ``external_data``: for a model given as bytes, its external data files' bytes by location (a dict is
    emptied once they are copied for onnxruntime: see ``private_copies``).
    ``initializers``: arrays replacing the external initializers of those names (the caller keeps them alive).
    """
    import onnxruntime as ort

    with private_copies(external_data or {}) as folder:
        if folder is not None:  # onnxruntime reads the verified copies by name from a folder only we can write
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        elif external_data:
            names = list(external_data)
            so.add_external_initializers_from_files_in_memory(
                names, [external_data[n] for n in names], [len(external_data[n]) for n in names])
        return _open(ort, path, so, device, device_id, initializers)


SHM = "/dev/shm"


@contextlib.contextmanager
def private_copies(files: Mapping[str, bytes]):
    """A folder in memory (``/dev/shm``) holding ``files`` (location -> verified bytes), readable and writable
    by this user only, removed on exit; None when there is nothing to write, no ``/dev/shm``, or a location is
    not a plain file name (then the caller hands the bytes over in memory). Once written, the bytes are
    dropped from ``files`` (a dict is cleared).

    Why not in memory: onnxruntime copies files given with ``add_external_initializers_from_files_in_memory``
    and keeps that copy for the session's life, beside the initializers it made from it. Measured on the fp32
    mid pipeline (VmHWM, load + one 10-step image): 916-998 MiB in memory, 561-562 MiB from this folder,
    562-569 MiB when onnxruntime reads the bundle itself (which would run files changed after the check).
    """
    plain = all(name and name == os.path.basename(name) and name not in (".", "..") for name in files)
    if not files or not plain or not os.path.isdir(SHM) or not os.access(SHM, os.W_OK | os.X_OK):
        yield None
        return
    import shutil
    import tempfile

    sweep_stale(SHM)
    try:
        folder = tempfile.mkdtemp(prefix=f"{SHM_PREFIX}{os.getpid()}-", dir=SHM)  # mode 0700
    except OSError:
        yield None
        return
    try:
        write_private(folder, files)
    except OSError as e:  # e.g. a container's 64 MB /dev/shm: hand the bytes over in memory instead
        log.info("weights handed to onnxruntime in memory: cannot write them to %s (%s)", SHM, e)
        shutil.rmtree(folder, ignore_errors=True)
        yield None
        return
    try:
        if isinstance(files, dict):
            files.clear()  # the caller's reference to the bytes too: the process holds the weights once
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


SHM_PREFIX = "ldm-weights-"
# a folder lives only while its session opens (seconds to a few minutes); one older than this whose process
# is gone is stale. The age guards a /dev/shm shared across PID namespaces (containers run with
# --ipc=host), where another container's live process looks gone from here
STALE_AFTER_S = 3600.0


def sweep_stale(root: str) -> list[str]:
    """Remove the weights folders (``ldm-weights-<pid>-*`` in ``root``, ours by uid) whose process is gone
    and that are older than ``STALE_AFTER_S``: a process killed while a session opened (SIGKILL, OOM)
    cannot remove its own, and each holds a model's weights in RAM until reboot. Folders of live
    processes, of other users, recent ones, or ones not named so are left. Returns the folders removed."""
    import shutil
    import time

    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        rest = entry.name[len(SHM_PREFIX):] if entry.name.startswith(SHM_PREFIX) else ""
        pid = rest.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or st.st_uid != os.getuid() or \
                    time.time() - st.st_mtime < STALE_AFTER_S:
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:  # no such process: the folder is stale
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        except OSError:  # PermissionError: the pid is alive (someone else's); or the entry vanished meanwhile
            continue
    if removed:
        log.info("removed %d stale weights folder(s) in %s: %s", len(removed), root, removed)
    return removed


def write_private(folder: str, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (name -> bytes) into ``folder`` as new files readable by this user only."""
    for name, data in files.items():
        fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def _open(ort: Any, path: str | os.PathLike | bytes, so: Any, device: str, device_id: int,
          initializers: Mapping[str, np.ndarray] | None):
    if initializers:
        names = list(initializers)
        so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(initializers[n]) for n in names])
    model = path if isinstance(path, bytes) else str(path)
    if device == "cpu":
        return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])
    if device != "cuda":
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")
    if CUDA_PROVIDER not in ort.get_available_providers():
        raise RuntimeError("device 'cuda' needs onnxruntime-gpu (pip install 'ldm-runtime[gpu]'); "
                           f"this onnxruntime has providers {ort.get_available_providers()}")
    preload_report = preload_cuda_libraries()
    session = ort.InferenceSession(model, sess_options=so,
                                   providers=[(CUDA_PROVIDER, {"device_id": device_id}), "CPUExecutionProvider"])
    require_cuda_provider(session, preload_report)
    return session


def require_cuda_provider(session: Any, preload_report: str = "") -> None:
    """Refuse a CUDA session that onnxruntime quietly put on the CPU (its CUDA or cuDNN libraries did not load)."""
    import onnxruntime as ort

    active = list(session.get_providers())
    if active and active[0] == CUDA_PROVIDER:
        return
    raise RuntimeError(
        f"device 'cuda': onnxruntime {ort.__version__} (built for CUDA {built_cuda_version() or 'unknown'}) "
        f"could not start {CUDA_PROVIDER} and fell back to {active}: the CUDA runtime or cuDNN libraries "
        "that build needs did not load; install the versions it was built for"
        + (f" (onnxruntime.preload_dlls: {preload_report})" if preload_report else ""))


def built_cuda_version() -> str:
    """The CUDA version this onnxruntime was built for ("" for a CPU build)."""
    import onnxruntime as ort

    version = getattr(ort, "cuda_version", None)
    if version is None:  # older releases keep it only in the build info module
        from onnxruntime.capi import build_and_package_info as info

        version = getattr(info, "cuda_version", "")
    return str(version or "")


_preload_lock = threading.Lock()
_preload_report: str | None = None


def preload_cuda_libraries() -> str:
    """Load the CUDA and cuDNN libraries the CUDA provider needs (``onnxruntime.preload_dlls``, 1.21+), once.

    It finds them in the nvidia pip packages where those are installed. A failure here is not
    fatal: the system loader may still find them when the session starts, and
    ``require_cuda_provider`` then has the last word. Returns what preloading reported, for that error.
    """
    global _preload_report
    import onnxruntime as ort

    with _preload_lock:  # sessions open on several threads; preload and redirect stdout on one
        if _preload_report is None:
            _preload_report = _preload(getattr(ort, "preload_dlls", None))
        return _preload_report


def _preload(preload: Any) -> str:
    if preload is None:
        return ""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # it prints what it could not load: stdout is for results
            preload()
    except (OSError, RuntimeError) as e:
        printed.write(f"failed: {e}")
    report = " ".join(printed.getvalue().split())
    if report:
        log.info("onnxruntime.preload_dlls: %s", report)
    return report


def check_graph(component: str, session: Any, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    """The manifest's tensors against the opened graph's: the same input names (outputs: a subset),
    dtypes, ranks, and fixed dimensions where the graph's are fixed (symbolic ones may be named
    differently); a ``BundleError`` naming the manifest field otherwise."""
    for kind, specs, args in (("inputs", inputs, session.get_inputs()), ("outputs", outputs, session.get_outputs())):
        graph = {a.name: a for a in args}
        declared = {s.name for s in specs}
        if declared - set(graph) or (kind == "inputs" and set(graph) - declared):
            raise BundleError(f"{component}: manifest field components.{component}.{kind} names {sorted(declared)}; "
                              f"the graph's {kind} are {sorted(graph)}")
        for i, spec in enumerate(specs):
            _check_tensor(f"components.{component}.{kind}[{i}]", spec, graph[spec.name])


def _check_tensor(field: str, spec: TensorSpec, arg: Any) -> None:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None or np.dtype(dtype).name != spec.dtype:
        raise BundleError(f"manifest field {field}.dtype: {spec.name!r} is {spec.dtype!r} in the manifest, "
                          f"{arg.type} in the graph")
    shape = list(arg.shape)  # symbolic dimensions: str or None
    differ = any(g != m if isinstance(g, int) else isinstance(m, int) for g, m in zip(shape, spec.shape))
    if len(shape) != len(spec.shape) or differ:
        raise BundleError(f"manifest field {field}.shape: {spec.name!r} is {list(spec.shape)} in the manifest, "
                          f"{shape} in the graph")


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
