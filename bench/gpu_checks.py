"""What decides the GPU run (bench/device.sh runs these first), and the small checks that come before the rest.

    python bench/gpu_checks.py probe [--env FILE]   # GPU, driver, compute capability, which libraries import
    python bench/gpu_checks.py roundtrip            # host -> device -> host through cuda-bindings
    python bench/gpu_checks.py ort-cuda             # onnxruntime CUDA against CPU on one small graph

``probe --env FILE`` also writes ``HAVE_GPU``, ``HAVE_CUDA_BINDINGS``, ``HAVE_TRT`` and
``HAVE_ORT_CUDA`` (0 or 1) as shell assignments, so that device.sh runs only what can run.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_line() -> str:
    """nvidia-smi's name, driver and compute capability of each GPU, or why there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"none (nvidia-smi: {e})"
    return out.stdout.strip() or f"none (nvidia-smi exit {out.returncode}: {out.stderr.strip()[:200]})"


def probe() -> dict[str, Any]:
    """Which GPU libraries import here, with their versions (None: not importable, with why)."""
    res: dict[str, Any] = {"gpu": gpu_line()}
    try:
        from cuda.bindings import runtime as cudart

        from ldm_runtime.backends.tensorrt import cuda_bindings_version, driver_cuda_version

        err, count = cudart.cudaGetDeviceCount()
        driver = driver_cuda_version(cudart)
        res["cuda.bindings"] = (f"{cuda_bindings_version()} (cudaGetDeviceCount: {err!s}, {count or 0} devices; "
                                f"driver supports CUDA {f'{driver // 1000}.{driver % 1000 // 10}' if driver else 'none'})")
        res["cuda_devices"] = int(count or 0) if int(err) == 0 else 0
    except ImportError as e:
        res["cuda.bindings"], res["cuda_devices"] = f"not importable ({e})", 0
    try:
        import tensorrt as trt

        res["tensorrt"] = str(trt.__version__) if hasattr(trt, "Builder") else "not importable (stubs only)"
    except ImportError as e:
        res["tensorrt"] = f"not importable ({e})"
    try:
        import onnxruntime as ort

        builds = [d for d in ("onnxruntime", "onnxruntime-gpu") if _version(d)]
        res["onnxruntime"] = (f"{ort.__version__} from {', '.join(f'{d} {_version(d)}' for d in builds) or '?'}, "
                              f"providers {ort.get_available_providers()}")
        res["ort_cuda"] = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError as e:
        res["onnxruntime"], res["ort_cuda"] = f"not importable ({e})", False
    return res


def shell_flags(res: dict[str, Any]) -> str:
    gpu = res["cuda_devices"] > 0
    flags = {"HAVE_GPU": gpu, "HAVE_CUDA_BINDINGS": gpu,
             "HAVE_TRT": gpu and not res["tensorrt"].startswith("not importable"),
             "HAVE_ORT_CUDA": gpu and res["ort_cuda"]}
    return "".join(f"{k}={int(v)}\n" for k, v in flags.items())


def roundtrip(nbytes: int = 1 << 20) -> str:
    """Copy random bytes to the GPU and back through cuda-bindings; raise unless they come back equal."""
    from cuda.bindings import runtime as cudart

    from ldm_runtime.backends.tensorrt import _cuda

    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    back = np.zeros_like(src)
    ptr = _cuda(cudart.cudaMalloc(nbytes), "cudaMalloc")
    try:
        _cuda(cudart.cudaMemcpy(ptr, src.ctypes.data, nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "to GPU")
        _cuda(cudart.cudaMemcpy(back.ctypes.data, ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost), "back")
    finally:
        cudart.cudaFree(ptr)
    if not np.array_equal(src, back):
        raise RuntimeError(f"CUDA round-trip changed {int((src != back).sum())} of {nbytes} bytes")
    return f"CUDA round-trip of {nbytes} bytes through cuda-bindings: identical"


def conv_graph(path: Path) -> None:
    """A one-Conv fp32 graph with a dynamic batch: enough for the CUDA provider to run a real kernel."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8, 32, 32])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def ort_cuda_vs_cpu(folder: Path, tolerance: float = 1e-3) -> str:
    """The runtime's onnxruntime engine on CUDA against CPU (relative L2; TF32 allowed for)."""
    from ldm_runtime.backends.onnxruntime import OnnxRuntimeEngine
    from ldm_runtime.manifest import TensorSpec

    path = folder / "conv.onnx"
    conv_graph(path)
    specs = ((TensorSpec("x", "float32", ("B", 4, 32, 32)),), (TensorSpec("y", "float32", ("B", 8, 32, 32)),))
    x = {"x": np.random.default_rng(1).standard_normal((2, 4, 32, 32)).astype(np.float32)}
    cpu, cuda = (OnnxRuntimeEngine(path, *specs, name="conv", device=d).run(x)["y"] for d in ("cpu", "cuda"))
    err = float(np.linalg.norm(cuda - cpu) / np.linalg.norm(cpu))
    if not err <= tolerance:
        raise RuntimeError(f"onnxruntime CUDA differs from CPU by rel L2 {err:.2e} > {tolerance:.0e}")
    return f"onnxruntime CUDA vs CPU on a Conv graph: rel L2 {err:.2e} (<= {tolerance:.0e})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GPU probe and pre-checks for bench/device.sh.")
    p.add_argument("check", choices=("probe", "roundtrip", "ort-cuda"))
    p.add_argument("--env", default=None, help="probe: write HAVE_* shell assignments here")
    args = p.parse_args(argv)
    if args.check == "probe":
        res = probe()
        for key in ("gpu", "cuda.bindings", "tensorrt", "onnxruntime"):
            print(f"{key}: {res[key]}")
        if args.env:
            Path(args.env).write_text(shell_flags(res))
        return 0
    if args.check == "roundtrip":
        print(roundtrip())
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ort-cuda-") as tmp:
        print(ort_cuda_vs_cpu(Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
