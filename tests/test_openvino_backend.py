"""The OpenVINO backend on the tiny fp32 bundle: each component and the image against onnxruntime fp32,
bf16 where the CPU has it, the compiled-model cache, and the refusals.

The reference is the runtime's own onnxruntime CPU path (the graphs as it opens them), which the
export gates already tie to the torch models.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'ldm-runtime[openvino]'; "
                                       "the Makefile installs it)")

from bench.runtime import component_feeds  # noqa: E402
from export.parity import FP32_GATE, max_abs_rel, psnr_db  # noqa: E402
from ldm_runtime.backends import engine_options, load_engine  # noqa: E402
from ldm_runtime.backends import openvino as ov_backend  # noqa: E402
from ldm_runtime.backends.openvino import OpenVinoEngine, OpenVinoOptions, OpenVinoUnavailable  # noqa: E402
from ldm_runtime.cli import main as ldm_main  # noqa: E402
from ldm_runtime.images import read_parameters  # noqa: E402
from ldm_runtime.manifest import Manifest  # noqa: E402
from ldm_runtime.pipeline import Pipeline  # noqa: E402

PROMPT = "a red circle on a blue square"
# OpenVINO f32 vs onnxruntime fp32 on the same graph: rounding order only, so the 8-bit image may move
# by a level at most (measured on the tiny bundle, 5 DDIM steps, CFG 7.5: max abs 2e-6, PSNR 135 dB)
F32_IMAGE_MAX_ABS = 2 / 255
# bf16 rounds weights and activations to 8 mantissa bits (about 4e-3 relative per op) with f32
# accumulation; the image is judged as a user sees it, by PSNR against the fp32 image, at issue 17's
# reduced-precision quality bound (30 dB). Not measured on the CI VM, whose CPU lacks bf16 (the test
# skips there): the figure it prints where it runs is the one to record.
BF16_IMAGE_MIN_PSNR_DB = 30.0


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


def has_bf16() -> bool:
    return "BF16" in ov_backend.cpu_capabilities()


def image(pipe: Pipeline) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=5, guidance_scale=7.5, seed=3, scheduler="ddim",
                output_type="np").images[0]


def test_each_component_matches_onnxruntime_within_the_fp32_gate(tiny_fp32_bundle, cache_dir):
    man = Manifest.load(tiny_fp32_bundle)
    ref = Pipeline.load(tiny_fp32_bundle, threads=1)
    metric, bound, _ = FP32_GATE
    assert metric == "max_abs_rel"
    opts = engine_options("openvino", threads=1, precision="f32", cache_dir=str(cache_dir))
    for key, feeds in component_feeds(ref, 64, 48, batch=1).items():
        comp = "unet" if key.startswith("unet") else key
        eng = load_engine(man, comp, "openvino", "cpu", opts)
        assert isinstance(eng, OpenVinoEngine) and eng.precision == "f32"
        want, got = ref.engine(comp).run(feeds), eng.run(feeds)
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            value = max_abs_rel(got[name], want[name])
            print(f"{key}.{name}: max_abs_rel {value:.2e} (gate {bound:g})")
            assert value <= bound


def test_image_matches_onnxruntime(tiny_fp32_bundle, cache_dir):
    want = image(Pipeline.load(tiny_fp32_bundle, threads=1))
    pipe = Pipeline.load(tiny_fp32_bundle, backend="openvino", threads=1, precision="f32", cache_dir=str(cache_dir))
    got = image(pipe)
    err = float(np.abs(got - want).max())
    print(f"OpenVINO f32 image: max abs {err:.1e}, PSNR {psnr_db(got, want):.1f} dB")
    assert err <= F32_IMAGE_MAX_ABS


def test_bf16_image_within_its_bound(tiny_fp32_bundle, cache_dir):
    if not has_bf16():
        pytest.skip(f"this CPU ({ov_backend.cpu_name()}) has no bf16 arithmetic "
                    f"(OPTIMIZATION_CAPABILITIES {ov_backend.cpu_capabilities()})")
    want = image(Pipeline.load(tiny_fp32_bundle, threads=1))
    pipe = Pipeline.load(tiny_fp32_bundle, backend="openvino", threads=1, precision="bf16", cache_dir=str(cache_dir))
    got = image(pipe)
    assert all(e.precision == "bf16" for e in pipe.engines.values())
    psnr = psnr_db(got, want)
    print(f"OpenVINO bf16 image: PSNR {psnr:.1f} dB against onnxruntime fp32 (bound {BF16_IMAGE_MIN_PSNR_DB})")
    assert psnr >= BF16_IMAGE_MIN_PSNR_DB


def test_default_precision_follows_the_cpu():
    assert engine_options("openvino").precision == ("bf16" if has_bf16() else "f32")


def test_second_load_comes_from_the_cache(tiny_fp32_bundle, tmp_path):
    man, cache = Manifest.load(tiny_fp32_bundle), tmp_path / "cache"
    opts = engine_options("openvino", threads=1, precision="f32", cache_dir=str(cache))
    first = load_engine(man, "unet", "openvino", "cpu", opts)
    blobs = sorted(p.name for p in cache.iterdir())
    assert blobs and not first.loaded_from_cache
    second = load_engine(man, "unet", "openvino", "cpu", opts)
    assert second.loaded_from_cache
    assert sorted(p.name for p in cache.iterdir()) == blobs
    feeds = component_feeds(Pipeline.load(tiny_fp32_bundle), 64, 64, batch=1)["unet_2B"]
    np.testing.assert_array_equal(second.run(feeds)["out_sample"], first.run(feeds)["out_sample"])


def test_default_cache_dir_is_the_users(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert OpenVinoOptions().compile_config()["CACHE_DIR"] == str(tmp_path / "ldm-runtime" / "openvino" / "f32")
    assert (OpenVinoOptions(precision="bf16", cache_dir=str(tmp_path)).compile_config()["CACHE_DIR"]
            == str(tmp_path / "bf16"))


def test_bf16_after_f32_in_one_cache_is_bf16_and_finite(tiny_fp32_bundle, tmp_path):
    """One cache folder, the same graph compiled in f32 and then in bf16: the bf16 engine must not take
    the f32 blob (OpenVINO's cache key ignores the precision; on an AMX CPU that gave all-NaN outputs)."""
    if not has_bf16():
        pytest.skip(f"this CPU ({ov_backend.cpu_name()}) has no bf16 arithmetic")
    man, cache = Manifest.load(tiny_fp32_bundle), str(tmp_path / "cache")
    feeds = component_feeds(Pipeline.load(tiny_fp32_bundle, threads=1), 64, 64, batch=1)["text_encoder"]
    f32 = load_engine(man, "text_encoder", "openvino", "cpu", engine_options("openvino", threads=1, precision="f32",
                                                                             cache_dir=cache))
    bf16 = load_engine(man, "text_encoder", "openvino", "cpu", engine_options("openvino", threads=1,
                                                                              precision="bf16", cache_dir=cache))
    assert not bf16.loaded_from_cache and bf16.precision == "bf16"
    a, b = (next(iter(e.run(feeds).values())) for e in (f32, bf16))
    assert np.isfinite(b).all()
    assert np.abs(b - a).max() <= 0.1 * np.abs(a).max()  # bf16 (8-bit mantissa) on a 2-layer encoder


def test_threads_reach_openvino():
    assert OpenVinoOptions(threads=2).compile_config()["INFERENCE_NUM_THREADS"] == "2"
    assert "INFERENCE_NUM_THREADS" not in OpenVinoOptions().compile_config()


def test_compiles_the_verified_bytes_not_a_file_changed_after_the_check(tiny_fp32_bundle, tmp_path, monkeypatch):
    """The weights are checked, then compiled: a weights file rewritten on disk between the two (same size,
    other values) does not reach OpenVINO, which reads the checked bytes from a private copy; the engine's
    output equals the bundle's graph on onnxruntime exactly as before (f32 gate)."""
    bundle = shutil.copytree(tiny_fp32_bundle, tmp_path / "b")
    man = Manifest.load(bundle)
    data = man.component("vae_decoder").extra["external_data"]
    assert data, "the tiny bundle's VAE decoder should keep its weights in an external data file"
    ref = Pipeline.load(bundle, threads=1)
    feeds = component_feeds(ref, 64, 48, batch=1)["vae_decoder"]
    want = ref.engine("vae_decoder").run(feeds)
    real = ov_backend.private_copies
    swapped = []

    @contextlib.contextmanager
    def tamper_after_check(files):
        for name in data:  # the check is done (these are verified bytes); now the file on disk changes
            path = bundle / name
            w = np.frombuffer(path.read_bytes(), dtype=np.float32)
            path.write_bytes((w * 1.5 + 0.25).astype(np.float32).tobytes())
            swapped.append(name)
        with real(files) as folder:
            yield folder

    monkeypatch.setattr(ov_backend, "private_copies", tamper_after_check)
    opts = OpenVinoOptions(threads=1, precision="f32", cache_dir=str(tmp_path / "cache"))
    got = OpenVinoEngine.from_manifest(man, "vae_decoder", opts).run(feeds)
    assert swapped == list(data)
    _, bound, _ = FP32_GATE
    for name in want:
        value = max_abs_rel(got[name], want[name])
        print(f"vae_decoder.{name} after the file changed: max_abs_rel {value:.2e} (gate {bound:g})")
        assert value <= bound


def test_refuses_without_openvino(monkeypatch, tiny_fp32_bundle):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    monkeypatch.setattr(ov_backend, "_core", None)
    with pytest.raises(OpenVinoUnavailable, match=r"pip install 'ldm-runtime\[openvino\]'"):
        Pipeline.load(tiny_fp32_bundle, backend="openvino")


def test_refuses_bf16_on_a_cpu_without_it(monkeypatch, tiny_fp32_bundle):
    monkeypatch.setattr(ov_backend, "cpu_capabilities", lambda: ["FP32", "INT8"])
    with pytest.raises(ValueError, match=r"precision 'bf16' needs a CPU with bf16.*\['FP32', 'INT8'\].*'f32'"):
        Pipeline.load(tiny_fp32_bundle, backend="openvino", precision="bf16")
    assert engine_options("openvino").precision == "f32"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"opt_level": "all"}, TypeError, r"unknown openvino engine options \['opt_level'\]; expected some of"),
    ({"precision": "fp16"}, ValueError, r"unknown OpenVINO precision 'fp16'; expected one of f32, bf16"),
    ({"threads": 0}, ValueError, r"threads must be >= 1, got 0"),
])
def test_refuses_bad_options(tiny_fp32_bundle, kwargs, error, match):
    with pytest.raises(error, match=match):
        Pipeline.load(tiny_fp32_bundle, backend="openvino", **kwargs)


def test_refuses_a_device_other_than_cpu(tiny_fp32_bundle):
    with pytest.raises(ValueError, match="backend 'openvino' runs on device 'cpu', got device 'cuda'"):
        Pipeline.load(tiny_fp32_bundle, backend="openvino", device="cuda").open_engines()


@pytest.mark.slow
def test_ldm_generate_and_verify_with_openvino(tiny_fp32_bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "img.png"
    rc = ldm_main(["generate", str(tiny_fp32_bundle), PROMPT, "--backend", "openvino", "--steps", "2",
                   "--seed", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert out.is_file() and (tmp_path / "xdg" / "ldm-runtime" / "openvino").is_dir()
    params = read_parameters(out)
    assert params["backend"] == "openvino" and params["openvino_precision"] == ("bf16" if has_bf16() else "f32")
    f32 = tmp_path / "f32.png"
    rc = ldm_main(["generate", str(tiny_fp32_bundle), PROMPT, "--backend", "openvino", "--steps", "2",
                   "--seed", "1", "--engine-option", "precision=f32", "--engine-option", "threads=1", "--out", str(f32)])
    assert rc == 0, capsys.readouterr().err
    assert read_parameters(f32)["openvino_precision"] == "f32"
    ort = tmp_path / "ort.png"
    assert ldm_main(["generate", str(tiny_fp32_bundle), PROMPT, "--steps", "2", "--seed", "1", "--out", str(ort)]) == 0
    assert "openvino_precision" not in read_parameters(ort)
    from PIL import Image

    diff = np.abs(np.asarray(Image.open(f32), np.int16) - np.asarray(Image.open(ort), np.int16)).max()
    assert diff <= 2  # F32_IMAGE_MAX_ABS in 8-bit levels
    capsys.readouterr()
    assert ldm_main(["generate", str(tiny_fp32_bundle), PROMPT, "--backend", "openvino", "--engine-option",
                     "precision=f16", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown OpenVINO precision 'f16'; expected one of" in err[0]
    assert ldm_main(["generate", str(tiny_fp32_bundle), PROMPT, "--engine-option", "colour=red",
                     "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown onnxruntime engine options ['colour']" in err[0]
    assert not (tmp_path / "x.png").exists()
    assert ldm_main(["verify", str(tiny_fp32_bundle), "--backend", "openvino"]) == 0
    report = tmp_path / "bench"
    assert ldm_main(["bench", str(tiny_fp32_bundle), "--backend", "openvino", "--steps", "1", "--repeats", "1",
                     "--warmup", "0", "--threads", "1", "--no-startup", "--out", str(report)]) == 0
    result = json.loads((report / "bench.json").read_text())
    assert result["config"]["backend"] == "openvino" and result["engine_options"] == {"threads": 1}
