"""``ldm quantize``: int8 bundles from the tiny fp32 bundle, judged against it.

The tiny models have random weights, so their int8 error is larger than a trained model's; the gate
stated for them is the mid-size model's, 30 dB of image PSNR against the fp32 bundle (measured:
about 36 dB over 3 seeds at 4 PNDM steps).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime.quantization")
onnx = pytest.importorskip("onnx")

from export.quantize import Calibration, Int8Policy, QualityGate, QualityGateError, QuantizeError, image_psnr_db, quantize_bundle
from ldm_runtime.manifest import BundleError, Manifest
from ldm_runtime.pipeline import Pipeline

TINY_GATE_DB = 30.0
CALIBRATION = Calibration(prompts=("a red circle", "a blue square"), steps=4)
GATE = QualityGate(min_psnr_db=TINY_GATE_DB, seeds=(1, 2, 3), steps=4)


@pytest.fixture(scope="module")
def int8_bundle(tiny_fp32_bundle, tmp_path_factory):
    return quantize_bundle(tiny_fp32_bundle, tmp_path_factory.mktemp("int8") / "bundle", calibration=CALIBRATION,
                           gate=GATE, threads=1)


def _images(bundle, seed, **kw):
    pipe = Pipeline.load(bundle, threads=1, **kw)
    return pipe("a green triangle", seed=seed, num_inference_steps=4, output_type="np").images


def test_int8_images_match_fp32_within_the_gate(tiny_fp32_bundle, int8_bundle):
    ref, got = _images(tiny_fp32_bundle, 7), _images(int8_bundle, 7)
    psnr = image_psnr_db(got, ref)
    assert TINY_GATE_DB <= psnr < 100  # close to fp32, yet not the fp32 graph run again


def test_manifest_records_precision_calibration_and_gate(tiny_fp32_bundle, int8_bundle):
    fp32, int8 = Manifest.load(tiny_fp32_bundle), Manifest.load(int8_bundle)  # schema, meaning and files checked
    assert int8.int8_components == ("unet",) and fp32.int8_components == ()
    unet = int8.data["components"]["unet"]
    assert unet["precision"] == "int8" and "cpu_variant" not in unet
    assert unet["quantization"]["from"] == "cpu_variant" and unet["quantization"]["quantized_nodes"] > 0
    for c in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert int8.data["components"][c] == fp32.data["components"][c]
    q = int8.data["quantization"]
    assert q["source"] == {"name": fp32.root.name, "sha256": fp32.sha256}
    assert q["calibration"]["prompts"] == list(CALIBRATION.prompts) and q["calibration"]["steps"] == 4
    assert q["calibration"]["samples"]["unet"] == len(CALIBRATION.prompts) * _unet_runs(tiny_fp32_bundle, steps=4)
    gate = q["quality_gate"]
    assert gate["name"] == "image_psnr_db" and gate["min_psnr_db"] == TINY_GATE_DB and gate["passed"] is True
    assert gate["psnr_db"] >= TINY_GATE_DB and len(gate["per_seed_psnr_db"]) == len(GATE.seeds)


def test_unet_graph_is_int8(tiny_fp32_bundle, int8_bundle):
    model = onnx.load(str(int8_bundle / "unet.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul"} <= ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims]
    assert int8_weights
    assert (int8_bundle / "unet.weights").stat().st_size < (tiny_fp32_bundle / "unet.weights").stat().st_size / 2


def _unet_runs(bundle, steps: int) -> int:
    pipe = Pipeline.load(bundle, threads=1)
    calls = []
    unet = pipe.engine("unet")

    class Counting:
        inputs, outputs = unet.inputs, unet.outputs

        def run(self, feeds):
            calls.append(1)
            return unet.run(feeds)

    pipe.engines["unet"] = Counting()
    pipe("x", seed=0, num_inference_steps=steps, output_type="np")
    return len(calls)


def test_percentile_calibration_and_kept_scopes(tiny_fp32_bundle, tmp_path):
    policy = Int8Policy(keep_scopes=("conv_in", "conv_out"), calibration_method="percentile", percentile=99.9)
    out = quantize_bundle(tiny_fp32_bundle, tmp_path / "int8", calibration=CALIBRATION, gate=GATE, policy=policy,
                          threads=1)
    m = Manifest.load(out)
    q = m.data["components"]["unet"]["quantization"]
    assert q["kept_in_float"] and all(("conv_in" in n or "conv_out" in n) for n in q["kept_in_float"])
    assert {n for n in q["kept_in_float"]} == {n.name for n in onnx.load(str(out / "unet.onnx")).graph.node
                                               if n.op_type == "Conv" and ("conv_in" in n.name or "conv_out" in n.name)}
    assert m.data["quantization"]["policy"]["calibration_method"] == "Percentile"
    assert m.data["quantization"]["policy"]["percentile"] == 99.9
    assert m.data["quantization"]["quality_gate"]["psnr_db"] >= TINY_GATE_DB
    with pytest.raises(QuantizeError, match=r"calibration method 'kl': expected one of minmax, percentile, entropy"):
        Int8Policy(calibration_method="kl")
    with pytest.raises(QuantizeError, match=r"keep scope '\(': not a regular expression"):
        Int8Policy(keep_scopes=("(",))
    with pytest.raises(QuantizeError, match=r"percentile 50.0: expected a value in \[90, 100\]"):
        Int8Policy(percentile=50.0)


def test_failed_gate_writes_nothing(tiny_fp32_bundle, tmp_path, capsys):
    from ldm_runtime.cli import main

    out = tmp_path / "int8"
    rc = main(["quantize", str(tiny_fp32_bundle), "--out", str(out), "--min-psnr", "200", "--gate-steps", "2",
               "--calibration-steps", "1", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1
    assert "failed its quality gate, nothing written: image_psnr_db" in err and "< min_psnr_db 200 dB" in err
    assert list(tmp_path.iterdir()) == []


def test_generated_png_names_the_int8_components(tiny_fp32_bundle, int8_bundle, tmp_path):
    from ldm_runtime.cli import main
    from ldm_runtime.images import read_parameters

    for bundle, name in ((int8_bundle, "int8.png"), (tiny_fp32_bundle, "fp32.png")):
        assert main(["generate", str(bundle), "a red circle", "--steps", "2", "--seed", "1",
                     "--engine-option", "threads=1", "--out", str(tmp_path / name)]) == 0
    int8, fp32 = read_parameters(tmp_path / "int8.png"), read_parameters(tmp_path / "fp32.png")
    assert int8["int8_components"] == ["unet"] and int8["precision"] == "fp32"
    assert "int8_components" not in fp32 and int8["bundle"] != fp32["bundle"]


def test_tensorrt_refuses_int8(int8_bundle):
    with pytest.raises(BundleError, match="int8 bundles are not built for TensorRT here"):
        Pipeline.load(int8_bundle, backend="tensorrt", device="cuda")
    from export.tensorrt import build_engines

    with pytest.raises(BundleError, match="int8 bundles are not built for TensorRT here"):
        build_engines(int8_bundle)


def test_bad_input(tiny_fp32_bundle, int8_bundle, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="is not a bundle: it has no manifest.json"):
        quantize_bundle(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(QuantizeError, match=r"already an int8 bundle \(unet quantized\); quantize its fp32 source"):
        quantize_bundle(int8_bundle, tmp_path / "out")
    with pytest.raises(QuantizeError, match=r"expected one or more of unet, vae_decoder"):
        quantize_bundle(tiny_fp32_bundle, tmp_path / "out", components=("text_encoder",))
    with pytest.raises(QuantizeError, match="must go to another folder than its fp32 source"):
        quantize_bundle(tiny_fp32_bundle, tiny_fp32_bundle)
    fp16 = tmp_path / "fp16"
    shutil.copytree(tiny_fp32_bundle, fp16)
    data = json.loads((fp16 / "manifest.json").read_text())
    (fp16 / "manifest.json").write_text(json.dumps({**data, "precision": "fp16"}))
    with pytest.raises(QuantizeError, match="expected an fp32 bundle, got precision 'fp16'"):
        quantize_bundle(fp16, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "fp16"]


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from ldm_runtime.cli import main

    assert main(["quantize", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ldm quantize: error: ") and "is not a bundle" in err[0]


def test_image_psnr_closed_form():
    ref = np.zeros((2, 4, 4, 3), np.float32)
    assert image_psnr_db(ref + 0.1, ref) == pytest.approx(20.0)
    assert image_psnr_db(ref, ref) == 200.0


def test_precision_gate_script(tiny_fp32_bundle, int8_bundle, capsys):
    """bench/precision_gate.py applies ldm quantize's gate to a bundle on any backend: the fp32 bundle
    against itself is exact (200 dB); the int8 bundle is near fp32 yet not equal, and fails a 200 dB gate (exit 1)."""
    from bench import precision_gate

    assert precision_gate.main([str(tiny_fp32_bundle), "--threads", "1", "--steps", "4"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["psnr_db"] == 200.0 and same["passed"] is True
    rc = precision_gate.main([str(tiny_fp32_bundle), "--candidate", str(int8_bundle), "--threads", "1",
                              "--steps", "4", "--min-psnr", "200"])
    got = json.loads(capsys.readouterr().out)
    assert rc == 1 and got["passed"] is False and TINY_GATE_DB <= got["psnr_db"] < 100
