"""TensorRT build and backend: bookkeeping on CPU with small fakes, the real thing where TensorRT and a GPU exist.

TensorRT cannot be installed in CI, so the TensorRT code gets two checks here: mypy against
tensorrt-stubs (TensorRT 10.13's API), and unit tests of everything that does not need TensorRT
(plan keys, profiles, manifest records, plan selection and refusal, parity arithmetic, the CLI's
exit code 3). The ``gpu`` tests build and run a tiny bundle where TensorRT and a CUDA GPU exist.

``make typecheck`` runs the same mypy check (tools/tensorrt_stubs.py repairs the stubs first).
"""
from __future__ import annotations

import enum
import json
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from export.specs import ProfileError
from export.tensorrt import (
    EXIT_BAD_INPUT,
    EXIT_NO_TENSORRT,
    BuildOptions,
    EngineBuildError,
    PlanBuilder,
    add_engine_record,
    build_engines,
    build_engines_main,
    engine_record,
    opt_size_for,
    parity_check,
    parity_shape_sets,
    profile_shapes,
)
from export.parity import rel_l2
from ldm_runtime.backends import EngineInputError, load_engine
from ldm_runtime.backends.tensorrt import (
    GpuInfo,
    TensorRTEngine,
    TensorRTUnavailable,
    check_profile,
    component_onnx_sha256,
    plan_key,
    require_tensorrt,
    select_plan,
    set_device_memory,
)
from ldm_runtime.manifest import MANIFEST_NAME, BundleError, Manifest, atomic_write_json, new_manifest, record_file
from ldm_runtime.shapes import random_feeds

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tools/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))
SHA_A = "a" * 64
SHA_B = "b" * 64


def trt_reason() -> str | None:
    """Why TensorRT cannot run here (None when it can)."""
    try:
        require_tensorrt()
    except TensorRTUnavailable as e:
        return str(e)
    return None


# -- a tiny fp16 bundle (ONNX written with onnx.helper; no torch) ------------------------------------
def _unet_onnx(path: Path, hidden: int) -> None:
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((4, 4, 1, 1)) * 0.5).astype(np.float16), "w")
    k = numpy_helper.from_array(np.array(1e-3, np.float16), "k")
    shape = numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4")
    axes = numpy_helper.from_array(np.array([1, 2], np.int64), "axes12")
    ax3 = numpy_helper.from_array(np.array([3], np.int64), "ax3")
    nodes = [
        helper.make_node("Conv", ["sample", "w"], ["c"]),
        helper.make_node("Cast", ["timestep"], ["t16"], to=T.FLOAT16),
        helper.make_node("Reshape", ["t16", "shape4"], ["t4"]),
        helper.make_node("Mul", ["t4", "k"], ["tt"]),
        helper.make_node("ReduceMean", ["encoder_hidden_states", "axes12"], ["e3"], keepdims=1),
        helper.make_node("Unsqueeze", ["e3", "ax3"], ["e4"]),
        helper.make_node("Add", ["c", "tt"], ["ct"]),
        helper.make_node("Add", ["ct", "e4"], ["out_sample"]),
    ]
    graph = helper.make_graph(
        nodes, "unet",
        [helper.make_tensor_value_info("sample", T.FLOAT16, ["B", 4, "h", "w"]),
         helper.make_tensor_value_info("timestep", T.FLOAT, ["B"]),
         helper.make_tensor_value_info("encoder_hidden_states", T.FLOAT16, ["B", 77, hidden])],
        [helper.make_tensor_value_info("out_sample", T.FLOAT16, ["B", 4, "h", "w"])],
        initializer=[w, k, shape, axes, ax3])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def _vae_decoder_onnx(path: Path, f: int) -> None:
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    w = numpy_helper.from_array((rng.standard_normal((3, 4, 1, 1)) * 0.5).astype(np.float16), "w")
    scales = numpy_helper.from_array(np.array([1, 1, f, f], np.float32), "scales")
    nodes = [helper.make_node("Resize", ["latent", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Conv", ["up", "w"], ["image"])]
    graph = helper.make_graph(
        nodes, "vae_decoder",
        [helper.make_tensor_value_info("latent", T.FLOAT16, ["B", 4, "h", "w"])],
        [helper.make_tensor_value_info("image", T.FLOAT16, ["B", 3, "H", "W"])],
        initializer=[w, scales])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def make_bundle(root: Path, hidden: int = 8, f: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _unet_onnx(root / "unet.onnx", hidden)
    _vae_decoder_onnx(root / "vae_decoder.onnx", f)
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(100)}))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    m = new_manifest()
    m.update({
        "precision": "fp16", "opset": 18,
        "latent": {"channels": 4, "scaling_factor": 0.18215, "shift_factor": None, "vae_scale_factor": f},
        "default_size": {"height": 64, "width": 64},
        "text": {"max_length": 77, "hidden_size": hidden},
        "tokenizer": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt", "model_max_length": 77,
                      "pad_token": "<|endoftext|>"},
        "scheduler": {"name": "ddim", "config": {}},
    })
    m["components"] = {
        "unet": {"file": "unet.onnx", "external_data": [],
                 "inputs": [{"name": "sample", "dtype": "float16", "shape": ["B", 4, "h", "w"]},
                            {"name": "timestep", "dtype": "float32", "shape": ["B"]},
                            {"name": "encoder_hidden_states", "dtype": "float16", "shape": ["B", 77, hidden]}],
                 "outputs": [{"name": "out_sample", "dtype": "float16", "shape": ["B", 4, "h", "w"]}]},
        "vae_decoder": {"file": "vae_decoder.onnx", "external_data": [],
                        "inputs": [{"name": "latent", "dtype": "float16", "shape": ["B", 4, "h", "w"]}],
                        "outputs": [{"name": "image", "dtype": "float16", "shape": ["B", 3, "H", "W"]}]},
    }
    for rel in ("unet.onnx", "vae_decoder.onnx", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        record_file(m, root, rel)
    atomic_write_json(root / MANIFEST_NAME, m)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


SD_UNET = {"file": "unet.onnx",
           "inputs": [{"name": "sample", "dtype": "float16", "shape": ["B", 4, "h", "w"]},
                      {"name": "timestep", "dtype": "float32", "shape": ["B"]},
                      {"name": "encoder_hidden_states", "dtype": "float16", "shape": ["B", 77, 768]}],
           "outputs": [{"name": "out_sample", "dtype": "float16", "shape": ["B", 4, "h", "w"]}]}


def sd_component(name: str):
    from ldm_runtime.manifest import ComponentInfo

    d = {
        "unet": SD_UNET,
        "text_encoder": {"file": "t.onnx", "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["B", 77]}],
                         "outputs": [{"name": "last_hidden_state", "dtype": "float16", "shape": ["B", 77, 768]}]},
        "vae_decoder": {"file": "d.onnx", "inputs": [{"name": "latent", "dtype": "float16", "shape": ["B", 4, "h", "w"]}],
                        "outputs": [{"name": "image", "dtype": "float16", "shape": ["B", 3, "H", "W"]}]},
        "vae_encoder": {"file": "e.onnx", "inputs": [{"name": "image", "dtype": "float16", "shape": ["B", 3, "H", "W"]}],
                        "outputs": [{"name": "mean", "dtype": "float16", "shape": ["B", 4, "h", "w"]},
                                    {"name": "logvar", "dtype": "float16", "shape": ["B", 4, "h", "w"]}]},
    }[name]
    return ComponentInfo.from_dict(name, d)


# -- plan keys and ONNX identity ------------------------------------------------------------------------
def test_plan_key():
    assert plan_key(9, 0, "10.13.0.35", SHA_A) == "sm90-trt10.13.0.35-aaaaaaaaaaaa"
    assert plan_key(8, 6, "11.1.0.106", "0123456789ab" + "c" * 52) == "sm86-trt11.1.0.106-0123456789ab"
    with pytest.raises(ValueError, match="hex digest"):
        plan_key(9, 0, "10.13", "XYZ")
    with pytest.raises(ValueError, match="TensorRT version"):
        plan_key(9, 0, "10/13", SHA_A)


def test_component_onnx_sha256_covers_external_data():
    data = {"files": {"unet.onnx": {"sha256": SHA_A}, "unet.onnx.data": {"sha256": SHA_B}},
            "components": {"unet": {"file": "unet.onnx", "external_data": []},
                           "big": {"file": "unet.onnx", "external_data": ["unet.onnx.data"]}}}
    assert component_onnx_sha256(data, "unet") == SHA_A
    combined = component_onnx_sha256(data, "big")
    assert combined not in (SHA_A, SHA_B) and len(combined) == 64
    data["files"]["unet.onnx.data"]["sha256"] = "c" * 64  # retrained weights, same graph file
    assert component_onnx_sha256(data, "big") != combined
    with pytest.raises(BundleError, match="no 'vae_decoder' component"):
        component_onnx_sha256(data, "vae_decoder")


# -- profiles ---------------------------------------------------------------------------------------------
def test_profile_unet_batch_doubled_and_latent_sizes():
    p = profile_shapes(sd_component("unet"), 256, 1024, 4, 8, opt_size=(512, 512))
    assert p["sample"] == {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [8, 4, 128, 128]}
    assert p["timestep"] == {"min": [1], "opt": [2], "max": [8]}
    assert p["encoder_hidden_states"] == {"min": [1, 77, 768], "opt": [2, 77, 768], "max": [8, 77, 768]}


def test_profile_vae_not_doubled_pixels_and_latents():
    d = profile_shapes(sd_component("vae_decoder"), 256, 1024, 4, 8, opt_size=(512, 768))
    assert d["latent"] == {"min": [1, 4, 32, 32], "opt": [1, 4, 64, 96], "max": [4, 4, 128, 128]}
    e = profile_shapes(sd_component("vae_encoder"), 256, 1024, 4, 8, opt_size=(512, 768))
    assert e["image"] == {"min": [1, 3, 256, 256], "opt": [1, 3, 512, 768], "max": [4, 3, 1024, 1024]}
    t = profile_shapes(sd_component("text_encoder"), 256, 1024, 4, 8)
    assert t["input_ids"] == {"min": [1, 77], "opt": [1, 77], "max": [4, 77]}  # one call per prompt batch


@pytest.mark.parametrize("name", ["unet", "text_encoder", "vae_decoder", "vae_encoder"])
@pytest.mark.parametrize("rng", [(64, 64, 1, 8), (256, 1024, 4, 8), (48, 200, 3, 4)])
def test_profile_min_opt_max_ordered(name, rng):
    lo, hi, batch, f = rng
    for opt in ((lo, lo), (hi, hi), (lo, hi)):
        p = profile_shapes(sd_component(name), lo, hi, batch, f, opt_size=opt)
        for r in p.values():
            assert len(r["min"]) == len(r["opt"]) == len(r["max"])
            assert all(a <= b <= c for a, b, c in zip(r["min"], r["opt"], r["max"])), r


@pytest.mark.parametrize("args,msg", [
    ((1024, 256, 4, 8), "--min-size 1024 is larger than --max-size 256"),
    ((260, 1024, 4, 8), "--min-size 260 must be a positive multiple of the VAE factor 8"),
    ((256, 1020, 4, 8), "--max-size 1020 must be a positive multiple of the VAE factor 8"),
    ((0, 1024, 4, 8), "--min-size 0 must be a positive multiple"),
    ((256, 1024, 0, 8), "--max-batch must be >= 1, got 0"),
])
def test_profile_bad_ranges_rejected(args, msg):
    with pytest.raises(ProfileError, match=re.escape(msg)):
        profile_shapes(sd_component("unet"), *args)


def test_profile_unknown_symbolic_dim_rejected():
    from ldm_runtime.manifest import ComponentInfo

    comp = ComponentInfo.from_dict("unet", {**SD_UNET, "inputs": [{"name": "sample", "dtype": "float16", "shape": ["N", 4, "h", "w"]}]})
    with pytest.raises(ProfileError, match=r"symbolic dims \['N'\]"):
        profile_shapes(comp, 256, 512, 1, 8)


def test_opt_size_for_clamps_to_range_and_factor():
    assert opt_size_for((512, 512), 256, 1024, 8) == (512, 512)
    assert opt_size_for((64, 64), 256, 1024, 8) == (256, 256)
    assert opt_size_for((2048, 300), 256, 1024, 64) == (1024, 256)


def test_build_options_validated():
    for opts, msg in ((BuildOptions(opt_level=6), "--opt-level must be 0..5"),
                      (BuildOptions(workspace_gb=0), "--workspace-gb must be > 0"),
                      (BuildOptions(components=("unet", "vae")), "unknown component 'vae'")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            opts.validate()


# -- plan selection and refusal --------------------------------------------------------------------------------
def _rec(component="unet", onnx=SHA_A, cc="9.0", trt="10.13.0.35", gpu="NVIDIA H100"):
    return {"component": component, "file": f"engines/sm{cc.replace('.', '')}-trt{trt}-{onnx[:12]}/{component}.plan",
            "onnx_sha256": onnx, "compute_capability": cc, "gpu_name": gpu, "tensorrt_version": trt}


def test_select_plan_picks_the_matching_one():
    engines = {"other-gpu": _rec(cc="8.6", gpu="NVIDIA A10"), "old-trt": _rec(trt="10.12.0.36"),
               "stale": _rec(onnx=SHA_B), "vae": _rec(component="vae_decoder"), "good": _rec()}
    key, rec = select_plan(engines, "unet", SHA_A, "9.0", "10.13.0.35")
    assert key == "good" and rec is engines["good"]


@pytest.mark.parametrize("rec,expected", [
    (_rec(cc="8.6", gpu="NVIDIA A10"), "built for GPU compute capability 8.6 (NVIDIA A10), this GPU is compute 9.0"),
    (_rec(trt="10.12.0.36"), "built with TensorRT 10.12.0.36, this is TensorRT 10.13.0.35"),
    (_rec(onnx=SHA_B), "built from ONNX sha256 bbbbbbbbbbbb..., the bundle's unet ONNX is aaaaaaaaaaaa... (stale plan)"),
])
def test_select_plan_refuses_mismatch(rec, expected):
    with pytest.raises(BundleError) as e:
        select_plan({"k": rec}, "unet", SHA_A, "9.0", "10.13.0.35")
    print(e.value)
    assert expected in str(e.value) and "refusing" in str(e.value) and rec["file"] in str(e.value)


def test_select_plan_lists_every_reason_and_missing_component():
    with pytest.raises(BundleError) as e:
        select_plan({"x": _rec(onnx=SHA_B, cc="8.9", trt="10.0.1")}, "unet", SHA_A, "9.0", "10.13.0.35")
    assert all(s in str(e.value) for s in ("stale plan", "compute capability 8.9", "TensorRT 10.0.1"))
    with pytest.raises(BundleError, match="no TensorRT plan for 'text_encoder'.*ldm build-engines"):
        select_plan({"x": _rec()}, "text_encoder", SHA_A, "9.0", "10.13.0.35")


def test_check_profile():
    check_profile("unet", "sample", (2, 4, 64, 64), (1, 4, 32, 32), (8, 4, 128, 128))
    with pytest.raises(EngineInputError, match=r"unet: input 'sample' has shape \[2, 4, 136, 64\], outside the TensorRT "
                                               r"profile \(min \[1, 4, 32, 32\], max \[8, 4, 128, 128\]\)"):
        check_profile("unet", "sample", (2, 4, 136, 64), (1, 4, 32, 32), (8, 4, 128, 128))
    with pytest.raises(EngineInputError, match="outside"):
        check_profile("unet", "sample", (9, 4, 64, 64), (1, 4, 32, 32), (8, 4, 128, 128))


# -- manifest records -------------------------------------------------------------------------------------------------
def test_engine_record_written_atomically_and_verifiable(tmp_path):
    root = make_bundle(tmp_path / "b")
    m = Manifest.load(root)
    key = plan_key(9, 0, "10.13.0.35", component_onnx_sha256(m.data, "unet"))
    rel = f"engines/{key}/unet.plan"
    (root / rel).parent.mkdir(parents=True)
    (root / rel).write_bytes(b"fake plan bytes")
    prof = profile_shapes(m.component("unet"), 64, 128, 2, 8, opt_size=(64, 64))
    parity = {"metric": "rel_l2", "worst": 1.5e-3, "threshold": 1e-2, "passed": True}
    import hashlib

    file_rec = {"sha256": hashlib.sha256(b"fake plan bytes").hexdigest(), "bytes": 15}
    rec = engine_record("unet", rel, file_rec, "unet.onnx", component_onnx_sha256(m.data, "unet"),
                        GpuInfo("NVIDIA H100 80GB HBM3", 9, 0), "10.13.0.35", "fp16", prof, {"opt_level": 3}, parity)
    add_engine_record(m.data, root, key, rec)
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    m2 = Manifest.load(root)  # verifies every file, the plan included
    got = m2.data["engines"][key]
    assert got["onnx_sha256"] == m2.data["files"]["unet.onnx"]["sha256"]
    assert m2.data["files"][rel] == file_rec
    assert (got["compute_capability"], got["gpu_name"], got["tensorrt_version"]) == ("9.0", "NVIDIA H100 80GB HBM3", "10.13.0.35")
    assert got["profile"]["sample"]["max"] == [4, 4, 16, 16] and got["parity"]["worst"] == 1.5e-3
    assert got["strongly_typed"] is True
    assert select_plan(m2.data["engines"], "unet", component_onnx_sha256(m2.data, "unet"), "9.0", "10.13.0.35")[0] == key


# -- parity arithmetic --------------------------------------------------------------------------------------------------
def test_random_feeds_dtypes_shapes_ranges():
    from ldm_runtime.manifest import TensorSpec

    specs = [TensorSpec("sample", "float16", ("B", 4, "h", "w")), TensorSpec("timestep", "float32", ("B",)),
             TensorSpec("input_ids", "int64", ("B", 77)), TensorSpec("image", "float16", ("B", 3, "H", "W"))]
    shapes = {"sample": (2, 4, 8, 8), "timestep": (2,), "input_ids": (2, 77), "image": (1, 3, 16, 16)}
    f = random_feeds(specs, shapes, np.random.default_rng(0), vocab_size=50)
    assert {k: (v.dtype.name, v.shape) for k, v in f.items()} == {
        "sample": ("float16", (2, 4, 8, 8)), "timestep": ("float32", (2,)),
        "input_ids": ("int64", (2, 77)), "image": ("float16", (1, 3, 16, 16))}
    assert f["input_ids"].min() >= 0 and f["input_ids"].max() < 50
    assert 0 <= f["timestep"].min() and f["timestep"].max() < 1000 and np.abs(f["image"]).max() <= 1


def test_rel_l2_closed_form():
    ref = np.array([3.0, 4.0])  # norm 5
    assert rel_l2(ref + np.array([0.3, -0.4]), ref) == pytest.approx(0.1, abs=1e-15)
    assert rel_l2(np.array([np.nan, 4.0]), ref) == float("inf")
    assert rel_l2(np.zeros(3), np.zeros(2)) == float("inf")


def test_parity_check_against_onnxruntime(tmp_path):
    """A fake plan that returns onnxruntime's output scaled by (1 + eps) must measure rel L2 == eps."""
    import onnxruntime as ort

    root = make_bundle(tmp_path / "b")
    m = Manifest.load(root)
    info = m.component("unet")
    sess = ort.InferenceSession(str(root / "unet.onnx"), providers=["CPUExecutionProvider"])
    prof = profile_shapes(info, 64, 128, 2, 8, opt_size=(64, 128))
    shape_sets = [{n: r[k] for n, r in prof.items()} for k in ("min", "opt")]
    seen = []
    for eps, passed in ((3e-3, True), (2e-2, False)):
        def fake_run(feeds, eps=eps):
            seen.append({k: v.shape for k, v in feeds.items()})
            (out,) = sess.run(["out_sample"], feeds)
            return {"out_sample": out.astype(np.float64) * (1 + eps)}

        res = parity_check(root / "unet.onnx", info.inputs, info.outputs, shape_sets, fake_run, 1e-2, seed=0, vocab_size=100)
        print(f"eps {eps:.0e}: measured rel L2 {res['worst']:.6e}")
        assert res["worst"] == pytest.approx(eps, rel=1e-9)
        assert res["passed"] is passed and len(res["checks"]) == 2
    assert seen[0]["sample"] == (1, 4, 8, 8) and seen[1]["sample"] == (2, 4, 8, 16)  # min, then opt shapes


# -- absent TensorRT: one clear line, exit 3, nothing written ----------------------------------------------------------
def test_cli_without_tensorrt_exits_3_and_writes_nothing(tmp_path, capsys, monkeypatch):
    root = make_bundle(tmp_path / "b")
    if trt_reason() is None:  # on a TensorRT machine, simulate its absence
        def absent() -> None:
            raise TensorRTUnavailable("TensorRT is not installed (pip install 'ldm-runtime[trt]')")
        monkeypatch.setattr("export.tensorrt.require_tensorrt", absent)
    before = snapshot(root)
    code = build_engines_main([str(root), "--min-size", "64", "--max-size", "128", "--max-batch", "2",
                               "--timing-cache", str(tmp_path / "tc.cache")])
    err = capsys.readouterr().err
    print(err)
    assert code == EXIT_NO_TENSORRT == 3
    assert err == "build-engines: TensorRT is not installed (pip install 'ldm-runtime[trt]'); nothing was built\n"
    assert snapshot(root) == before and not (tmp_path / "tc.cache").exists()


@pytest.mark.parametrize("args,msg", [
    (["--min-size", "512", "--max-size", "256"], "--min-size 512 is larger than --max-size 256"),
    (["--max-size", "100"], "--max-size 100 must be a positive multiple of the VAE factor 8"),
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--components", "unet,clip"], "unknown component 'clip'"),
    (["--components", "text_encoder"], "bundle has no 'text_encoder' component"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, args, msg):
    root = make_bundle(tmp_path / "b")
    before = snapshot(root)
    assert build_engines_main([str(root), *args]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("build-engines: ") and msg in err, err
    assert snapshot(root) == before


def test_cli_not_a_bundle(tmp_path, capsys):
    assert build_engines_main([str(tmp_path)]) == EXIT_BAD_INPUT
    assert "is not a bundle" in capsys.readouterr().err


def test_load_engine_without_tensorrt_raises_one_clear_error(tmp_path):
    reason = trt_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present here")
    m = Manifest.load(make_bundle(tmp_path / "b"))
    with pytest.raises(TensorRTUnavailable, match=r"pip install 'ldm-runtime\[trt\]'|no CUDA GPU"):
        load_engine(m, "unet", backend="tensorrt", device="cuda")


def test_modules_import_tensorrt_lazily_and_backend_never_torch():
    code = ("import sys, ldm_runtime.backends.tensorrt; "
            "bad = [m for m in ('torch', 'tensorrt', 'cuda.bindings.runtime') if m in sys.modules]; "
            "import export.tensorrt; "
            "bad += [m for m in ('tensorrt', 'cuda.bindings.runtime') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- mypy against tensorrt-stubs --------------------------------------------------------------------------------------
def run_mypy() -> subprocess.CompletedProcess:
    """What ``make typecheck`` runs: the stub repair, then mypy on the files mypy.ini names."""
    from tools.tensorrt_stubs import DEFAULT_DEST, prepare_trt_stubs

    env = {**os.environ, "MYPYPATH": str(prepare_trt_stubs(DEFAULT_DEST))}
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "mypy.ini")]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_mypy_against_tensorrt_stubs():
    r = run_mypy()
    print(r.stdout + r.stderr)
    assert r.returncode == 0, f"mypy failed (exit {r.returncode}):\n{r.stdout}{r.stderr}"


# -- the GPU path's first run, with faked TensorRT and cuda-bindings (issue 19) ---------------------------------------
class FakeCudart(types.ModuleType):
    """The cuda.bindings.runtime calls the backend makes: results as tuples, calls recorded."""

    cudaStreamCaptureMode = enum.IntEnum("cudaStreamCaptureMode", ["cudaStreamCaptureModeGlobal",
                                                                   "cudaStreamCaptureModeThreadLocal",
                                                                   "cudaStreamCaptureModeRelaxed"], start=0)

    def __init__(self, device_count: tuple = (0, 1), driver_version: int = 12040) -> None:
        super().__init__("cuda.bindings.runtime")
        self.device_count, self.driver_version, self.calls = device_count, driver_version, []

    def cudaGetDeviceCount(self):
        return self.device_count

    def cudaDriverGetVersion(self):
        return (0, self.driver_version)

    def cudaGetErrorName(self, err):
        return (0, b"cudaErrorInsufficientDriver" if int(err) == 35 else b"cudaErrorUnknown")

    def cudaStreamBeginCapture(self, stream, mode):
        self.calls.append(("capture", mode))
        return (0,)

    def cudaStreamEndCapture(self, stream):
        return (0, "graph")

    def cudaGraphInstantiate(self, graph, flags):
        return (0, "graph_exec")

    def cudaGraphLaunch(self, graph_exec, stream):
        self.calls.append(("launch", graph_exec))
        return (0,)

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (0,)

    def cudaGetLastError(self):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)


def install_fake_cuda(monkeypatch, cudart: FakeCudart, bindings_version: str = "13.0.2") -> None:
    """Make ``from cuda.bindings import runtime`` and ``import tensorrt`` find fakes."""
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime, bindings.__version__ = cudart, bindings_version
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, mod in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart),
                      ("tensorrt", types.SimpleNamespace(Builder=object, __version__="10.13.0.35"))):
        monkeypatch.setitem(sys.modules, name, mod)


def test_error_35_with_a_driver_says_the_driver_is_too_old(monkeypatch):
    install_fake_cuda(monkeypatch, FakeCudart(device_count=(35, 0), driver_version=12040), "13.0.2")
    with pytest.raises(TensorRTUnavailable) as e:
        require_tensorrt()
    print(e.value)
    assert str(e.value).startswith("the NVIDIA driver (CUDA 12.4) is too old for cuda-bindings 13.0.2")
    assert "ldm-runtime[trt]" in str(e.value)
    # no driver at all also gives 35: then there is no GPU to speak of
    install_fake_cuda(monkeypatch, FakeCudart(device_count=(35, 0), driver_version=0))
    with pytest.raises(TensorRTUnavailable, match=r"^no CUDA GPU is available \(cudaErrorInsufficientDriver\)$"):
        require_tensorrt()
    install_fake_cuda(monkeypatch, FakeCudart(device_count=(0, 1)))
    require_tensorrt()  # a GPU and a driver that fits


def test_cuda_python_without_cuda_bindings_names_the_floor(monkeypatch):
    install_fake_cuda(monkeypatch, FakeCudart())
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # cuda-python 12.0-12.6.0: no cuda.bindings
    with pytest.raises(TensorRTUnavailable, match=re.escape("cuda-python>=12.6.1 (cuda.bindings) is not installed")):
        require_tensorrt()


def test_device_memory_set_with_the_method_or_on_tensorrt_10_0_the_attribute():
    class Context10_1:
        def set_device_memory(self, ptr, size):
            self.bound = (ptr, size)

    class Context10_0:  # no set_device_memory: only the device_memory attribute
        pass

    new, old = Context10_1(), Context10_0()
    set_device_memory(new, 4096, 512)
    set_device_memory(old, 4096, 512)
    assert new.bound == (4096, 512) and old.device_memory == 4096


class FakeContext:
    def __init__(self, capturable: bool = True) -> None:
        self.capturable, self.enqueues = capturable, 0

    def execute_async_v3(self, stream: int) -> bool:
        self.enqueues += 1
        return self.capturable or self.enqueues != 2  # call 2 is the one inside the capture


def graph_engine(context: FakeContext) -> TensorRTEngine:
    """A ``TensorRTEngine`` with only what ``_execute`` reads (no plan, no GPU)."""
    eng = TensorRTEngine.__new__(TensorRTEngine)
    eng.name, eng.use_cuda_graph, eng._context, eng._stream = "unet", True, context, 7
    eng._graph_exec, eng._graph_key, eng._graph_failed = None, None, False
    return eng


@pytest.mark.parametrize("capturable", [True, False])
def test_cuda_graph_captured_thread_local_and_reported_active(monkeypatch, capturable):
    cudart = FakeCudart()
    install_fake_cuda(monkeypatch, cudart)
    eng = graph_engine(FakeContext(capturable))
    key = (((1, 4, 8, 8),), (1, 2), 3)
    assert not eng.cuda_graph_active
    eng._execute(key)  # warm-up enqueue, then the capture
    eng._execute(key)  # the replay (or, after a failed capture, a plain enqueue)
    mode = FakeCudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    if capturable:
        assert cudart.calls == [("capture", mode), ("launch", "graph_exec")] and eng.cuda_graph_active
    else:
        assert cudart.calls == [("capture", mode)] and not eng.cuda_graph_active and eng._context.enqueues == 3
    eng._drop_graph()
    eng._stream = None  # nothing for __del__ to free


class FakeTensorRT(types.ModuleType):
    """The TensorRT calls ``PlanBuilder`` makes; the builder config rejects a non-empty timing cache
    (logging an error, as TensorRT does for another GPU's cache) and the build logs ``build_error``."""

    class ILogger:
        def __init__(self) -> None:
            pass

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1  # TensorRT 10.x; 11.x has 0: the code must compute the bit

    class MemoryPoolType:
        WORKSPACE = 0

    def __init__(self, build_error: str | None) -> None:
        super().__init__("tensorrt")
        self.build_error, self.network_flags, self.config_flags = build_error, [], []
        self.Dims = list

    def Builder(self, logger):
        fake = self

        class Config:
            builder_optimization_level = 3

            def create_timing_cache(self, seed):
                return types.SimpleNamespace(seed=seed, serialize=lambda: memoryview(b"cache"))

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache.seed:
                    logger.log(1, "timing cache header mismatch: built on another device")
                return not cache.seed

            def set_flag(self, flag):
                fake.config_flags.append(flag)

            def add_optimization_profile(self, profile):
                return 0

        class Builder:
            def create_network(self, flags):
                fake.network_flags.append(flags)
                return types.SimpleNamespace(num_inputs=1, get_input=lambda i: types.SimpleNamespace(name="latent"))

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return types.SimpleNamespace(set_shape=lambda *a: None)

            def build_serialized_network(self, network, config):
                if fake.build_error:
                    logger.log(1, fake.build_error)
                    return None
                return memoryview(b"plan")

        return Builder()

    def OnnxParser(self, network, logger):
        return types.SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)


def fake_plan_builder(monkeypatch, tmp_path, build_error: str | None) -> tuple[FakeTensorRT, PlanBuilder]:
    fake = FakeTensorRT(build_error)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr("ldm_runtime.backends.tensorrt._trt_logger", None)  # a logger of the fake's ILogger
    monkeypatch.setattr("export.tensorrt.require_tensorrt", lambda: None)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"a cache from another GPU")
    return fake, PlanBuilder(opt_level=3, timing_cache=cache)


LATENT_PROFILE = {"latent": {"min": [1, 4, 4, 4], "opt": [1, 4, 8, 8], "max": [2, 4, 16, 16]}}


def test_rejected_timing_cache_errors_stay_out_of_a_later_build_error(monkeypatch, tmp_path, caplog):
    _, builder = fake_plan_builder(monkeypatch, tmp_path, build_error="out of device memory for tactic 3")
    with caplog.at_level(logging.WARNING, logger="export.tensorrt"), pytest.raises(EngineBuildError) as e:
        builder.build(tmp_path / "vae_decoder.onnx", LATENT_PROFILE)
    print(e.value)
    assert str(e.value) == "vae_decoder.onnx: TensorRT could not build the engine: out of device memory for tactic 3"
    warning = [r.getMessage() for r in caplog.records if r.name == "export.tensorrt"]
    assert any("starting a fresh one" in w and "header mismatch" in w for w in warning), warning


def test_network_strongly_typed_and_no_precision_flags(monkeypatch, tmp_path):
    """TensorRT 11 removed BuilderFlag.FP16 and weak typing: the build must not depend on them."""
    fake, builder = fake_plan_builder(monkeypatch, tmp_path, build_error=None)
    assert builder.build(tmp_path / "unet.onnx", LATENT_PROFILE) == b"plan"
    assert fake.network_flags == [1 << FakeTensorRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED]
    assert fake.config_flags == []


def test_parity_checked_at_min_opt_and_max_shapes():
    assert parity_shape_sets(LATENT_PROFILE) == [{"latent": [1, 4, 4, 4]}, {"latent": [1, 4, 8, 8]},
                                                 {"latent": [2, 4, 16, 16]}]


# -- on a GPU with TensorRT: build and run a tiny bundle ---------------------------------------------------------------
needs_trt = pytest.mark.skipif(trt_reason() is not None, reason=f"TensorRT backend unavailable: {trt_reason()}")


@pytest.mark.gpu
@needs_trt
def test_gpu_build_run_and_refuse(tmp_path, caplog):
    import onnxruntime as ort

    root = make_bundle(tmp_path / "b")
    cache = tmp_path / "timing.cache"
    recs = build_engines(root, BuildOptions(min_size=32, max_size=128, max_batch=2, opt_level=1, timing_cache=str(cache)))
    assert sorted(r["component"] for r in recs) == ["unet", "vae_decoder"] and cache.is_file()
    for r in recs:
        print(r["component"], r["file"], "parity rel L2", r["parity"]["worst"])
        assert r["parity"]["passed"] and r["parity"]["worst"] <= 1e-2
    m = Manifest.load(root)
    rng = np.random.default_rng(5)
    for use_graph in (False, True):
        eng = TensorRTEngine.from_manifest(m, "vae_decoder", use_cuda_graph=use_graph)
        sess = ort.InferenceSession(str(root / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
        # repeats replay the graph; (2, 4, 16, 16) is the profile's max (the build checks min, opt and max)
        for shape in ((1, 4, 5, 7), (1, 4, 5, 7), (2, 4, 16, 8), (2, 4, 16, 16), (1, 4, 5, 7), (1, 4, 5, 7)):
            x = rng.standard_normal(shape).astype(np.float16)
            out = eng.run({"latent": x})["image"]
            (ref,) = sess.run(["image"], {"latent": x})
            err = rel_l2(out, ref)
            print(f"graph={use_graph} {shape}: rel L2 {err:.2e}")
            assert out.shape == (shape[0], 3, shape[2] * 8, shape[3] * 8) and err <= 1e-2
        assert eng.cuda_graph_active is use_graph  # a failed capture falls back to enqueues: caught here
        first = eng.run({"latent": x})["image"]
        eng.run({"latent": (x * 2).astype(np.float16)})
        assert np.array_equal(first, eng.run({"latent": x})["image"])  # outputs are fresh arrays the caller owns
        with pytest.raises(EngineInputError, match="outside the TensorRT profile"):
            eng.run({"latent": np.zeros((3, 4, 8, 8), np.float16)})
        eng.close()
    # a second build on the same timing cache: the cache is accepted, not replaced by a fresh one
    again = make_bundle(tmp_path / "b2")
    with caplog.at_level(logging.WARNING, logger="export.tensorrt"):
        recs2 = build_engines(again, BuildOptions(min_size=32, max_size=128, max_batch=2, opt_level=1,
                                                  timing_cache=str(cache), components=("vae_decoder",)))
    assert not [r for r in caplog.records if "timing cache" in r.getMessage()], caplog.text
    assert recs2[0]["parity"]["passed"] and len(recs2[0]["parity"]["checks"]) == 3
    # the ONNX changes (re-export): the recorded plan is refused as stale
    data = json.loads((root / MANIFEST_NAME).read_text())
    data["files"]["unet.onnx"]["sha256"] = SHA_B
    with pytest.raises(BundleError, match="stale plan"):
        TensorRTEngine.from_manifest(Manifest(root=root, data=data), "unet")
