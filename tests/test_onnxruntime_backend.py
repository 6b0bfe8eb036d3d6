"""The onnxruntime backend without a model or a GPU: options, the CUDA provider check (faked sessions), CLI helpers.

onnxruntime's ``InferenceSession`` is replaced by a fake whose ``get_providers()`` we choose: a
CUDA session that onnxruntime quietly put on the CPU (its CUDA or cuDNN libraries did not load)
must be refused with the versions named, one that runs on CUDA must pass.
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import onnxruntime as ort
import pytest

from ldm_runtime.backends import engine_options
from ldm_runtime.backends import onnxruntime as backend
from ldm_runtime.backends.onnxruntime import OnnxRuntimeEngine, OrtOptions, session_options
from ldm_runtime.cliargs import ArgumentParser, UsageError, parse_size, parse_sizes
from ldm_runtime.manifest import TensorSpec

INPUTS = (TensorSpec("latent", "float32", (1, 4, 8, 8)),)
OUTPUTS = (TensorSpec("image", "float32", (1, 3, 64, 64)),)


class FakeSession:
    """Stands in for ``onnxruntime.InferenceSession``: records its arguments, reports ``active`` providers."""

    active: list[str] = []
    opened: list["FakeSession"] = []

    def __init__(self, path, sess_options=None, providers=None):
        self.path, self.sess_options, self.providers = path, sess_options, providers
        FakeSession.opened.append(self)

    def get_providers(self):
        return list(self.active)

    def get_inputs(self):
        return [SimpleNamespace(name=s.name, type="tensor(float)", shape=list(s.shape)) for s in INPUTS]

    def get_outputs(self):
        return [SimpleNamespace(name=s.name, type="tensor(float)", shape=list(s.shape)) for s in OUTPUTS]


@pytest.fixture
def fake_ort(monkeypatch):
    """A GPU build of onnxruntime 1.32 for CUDA 12.8, as far as the backend can tell; records preload calls."""
    preloads = []

    def preload_dlls():
        preloads.append(1)
        print("Failed to load libcudnn.so.9: cannot open shared object file")  # what onnxruntime prints

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "preload_dlls", preload_dlls, raising=False)
    monkeypatch.setattr(ort, "cuda_version", "12.8", raising=False)
    monkeypatch.setattr(backend, "_preload_report", None)  # preload runs once per process: start afresh
    FakeSession.opened = []
    return preloads


def test_cuda_session_on_the_cpu_is_refused(fake_ort, capsys):
    FakeSession.active = ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError) as e:
        OnnxRuntimeEngine("vae_decoder.onnx", INPUTS, OUTPUTS, device="cuda")
    msg = str(e.value)
    assert f"onnxruntime {ort.__version__} (built for CUDA 12.8)" in msg
    assert "fell back to ['CPUExecutionProvider']" in msg and "cuDNN" in msg
    assert "preload_dlls: Failed to load libcudnn.so.9" in msg  # what preloading said travels with the error
    assert fake_ort == [1] and capsys.readouterr().out == ""  # preloaded once; its prints kept off stdout


def test_cuda_session_on_cuda_passes(fake_ort):
    FakeSession.active = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    eng = OnnxRuntimeEngine("vae_decoder.onnx", INPUTS, OUTPUTS, device="cuda", options=OrtOptions(device_id=1))
    OnnxRuntimeEngine("unet.onnx", INPUTS, OUTPUTS, device="cuda")
    assert eng.device_id == 1 and fake_ort == [1]  # the second session does not preload again
    assert FakeSession.opened[0].providers == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]


def test_failed_preload_is_not_fatal(fake_ort, monkeypatch):
    def preload_dlls():
        raise RuntimeError("Invalid parameter of directory=None")

    monkeypatch.setattr(ort, "preload_dlls", preload_dlls)
    FakeSession.active = ["CUDAExecutionProvider"]
    OnnxRuntimeEngine("unet.onnx", INPUTS, OUTPUTS, device="cuda")  # the session's providers decide
    assert len(FakeSession.opened) == 1
    assert backend.preload_cuda_libraries() == "failed: Invalid parameter of directory=None"


def test_cpu_build_asked_for_cuda_names_its_providers(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"needs onnxruntime-gpu .* providers \['CPUExecutionProvider'\]"):
        OnnxRuntimeEngine("unet.onnx", INPUTS, OUTPUTS, device="cuda")


def test_options_travel_as_one_object(monkeypatch):
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    FakeSession.opened = []
    opts = engine_options("onnxruntime", OrtOptions(threads=2), spin_stop=True, arena=False)
    assert opts == OrtOptions(threads=2, spin_stop=True, arena=False)
    OnnxRuntimeEngine("unet.onnx", INPUTS, OUTPUTS, options=opts)
    OnnxRuntimeEngine("vae_decoder.onnx", INPUTS, OUTPUTS, options=opts)
    unet, vae = (s.sess_options for s in FakeSession.opened)
    assert (unet.intra_op_num_threads, unet.inter_op_num_threads) == (2, 1) and not unet.enable_cpu_mem_arena
    assert unet.get_session_config_entry("session.force_spinning_stop") == "1"
    assert unet.enable_mem_pattern and not vae.enable_mem_pattern  # default: the U-Net only
    assert session_options(OrtOptions(mem_pattern=True), "vae_decoder").enable_mem_pattern
    assert engine_options("onnxruntime") == OrtOptions() and engine_options("tensorrt", use_cuda_graph=True) == {
        "use_cuda_graph": True}


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(opt_level="max"), ValueError, "optimization level 'max'"),
    (dict(threads=0), ValueError, "threads must be >= 1, got 0"),
    (dict(thread=2), TypeError, r"unknown onnxruntime engine options \['thread'\]"),
])
def test_bad_options_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        engine_options("onnxruntime", **kwargs)


def test_cli_size_arguments():
    assert parse_size("512") == (512, 512) and parse_size("256X384") == (256, 384)
    assert parse_sizes("192, 256x384,") == ((192, 192), (256, 384))
    with pytest.raises(argparse.ArgumentTypeError, match="expected HEIGHTxWIDTH .* got 'x64'"):
        parse_size("x64")
    p = ArgumentParser(prog="t")
    p.add_argument("--size", type=parse_size)
    assert p.parse_args(["--size", "64x96"]).size == (64, 96)
    with pytest.raises(UsageError, match="argument --size: expected HEIGHTxWIDTH"):
        p.parse_args(["--size", "big"])
