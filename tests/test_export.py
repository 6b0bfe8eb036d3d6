"""`ldm export`: ONNX export of every component (fp32, fp16), parity against torch, dynamic shapes,
the manifest and its hashes, external data, atomicity, and the command line's errors.

Tiny random models (tests/conftest.py): VAE factor 8, default image 64x64 (8x8 latents).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import onnx_export, parity
from export.bundle import export_bundle, sweep_stale
from export.cli import export_main
from export.onnx_export import ParityError, wrap
from export.parity import FP16_GATES, parity_metrics
from export.specs import ModelDims, ProfileError, component_spec, profile, sample_inputs
from export.tensorrt import profile_shapes
from ldm_runtime.backends import load_engine
from ldm_runtime.manifest import COMPONENTS, SCHEMA, Manifest
from training.checkpoint import load_models

REPO = Path(__file__).resolve().parents[1]
SD_COMPONENTS = tuple(c for c in COMPONENTS if c != "text_encoder_2")  # an SD bundle's (text_encoder_2: SDXL)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def sources(tiny_checkpoint_dir, tiny_diffusers_dir) -> dict[str, Path]:
    """Where each precision's bundle comes from: both kinds of SRC are covered, one export each."""
    return {"fp32": tiny_diffusers_dir, "fp16": tiny_checkpoint_dir}


@pytest.fixture(scope="module")
def bundles(sources, tmp_path_factory) -> dict[str, Path]:
    """fp32: the tiny diffusers folder through the command line, end to end; fp16: our tiny
    checkpoint through ``export_bundle`` (all components each)."""
    root = tmp_path_factory.mktemp("bundles")
    t0 = time.perf_counter()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert export_main([str(sources["fp32"]), str(root / "tiny-fp32"), "-q"]) == 0
    assert stdout.getvalue().strip().splitlines()[-1] == str((root / "tiny-fp32").absolute())  # the last line: the bundle
    print(f"fp32 bundle (diffusers folder, CLI) exported in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    fp16 = export_bundle(sources["fp16"], root / "tiny-fp16", precision="fp16")
    print(f"fp16 bundle (checkpoint) exported in {time.perf_counter() - t0:.1f} s")
    return {"fp32": root / "tiny-fp32", "fp16": fp16}


@pytest.fixture(scope="module")
def models(sources):
    """Our torch models, loaded from each bundle's source: the parity reference."""
    return {p: load_models(src) for p, src in sources.items()}


def _gate(component: str, precision: str) -> tuple[str, float, str]:
    return ("max_abs_rel", 1e-4, "max") if precision == "fp32" else FP16_GATES[component]


def _ok(value: float, bound: float, sense: str) -> bool:
    return value <= bound if sense == "max" else value >= bound


# ---------------------------------------------------------------------------------------------
# specs


def test_specs_profiles_and_axes():
    dims = ModelDims(hidden_size=32)
    unet = component_spec("unet", dims)
    assert unet.dynamic_axes() == {"sample": {0: "B", 2: "h", 3: "w"}, "timestep": {0: "B"},
                                   "encoder_hidden_states": {0: "B"}, "out_sample": {0: "B", 2: "h", 3: "w"}}
    p = profile(unet, 8, min_size=256, max_size=1024, max_batch=4, opt_size=(512, 768))
    assert p["sample"] == {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 96], "max": [8, 4, 128, 128]}  # CFG doubles B
    assert p["timestep"] == {"min": [1], "opt": [2], "max": [8]}
    assert p["encoder_hidden_states"]["max"] == [8, 77, 32]
    dec = profile(component_spec("vae_decoder", dims), 8, min_size=256, max_size=1024, max_batch=4)
    assert dec["latent"] == {"min": [1, 4, 32, 32], "opt": [1, 4, 64, 64], "max": [4, 4, 128, 128]}
    enc = profile(component_spec("vae_encoder", dims), 8, max_batch=2)
    assert enc["image"]["max"] == [2, 3, 1024, 1024]
    # the text encoder runs once per prompt batch (negatives in a call of their own): B is not doubled
    assert profile(component_spec("text_encoder", dims), 8, max_batch=3)["input_ids"]["max"] == [3, 77]
    for bad in (dict(min_size=260), dict(min_size=512, max_size=256), dict(max_batch=0), dict(opt_size=(2048, 512))):
        with pytest.raises(ProfileError):
            profile(unet, 8, **bad)
    ids = sample_inputs(component_spec("text_encoder", dims), dims, 2, 64, 64)["input_ids"]
    assert ids.shape == (2, 77) and ids.dtype == np.int64


# ---------------------------------------------------------------------------------------------
# each component, fp32 and fp16: parity on shapes other than the traced one, through the runtime


def _torch_outputs(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*(torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v) for v in feeds.values()))
    return [o.numpy() for o in ([out] if torch.is_tensor(out) else out)]


# (batch, height, width) in pixels: two batches at the default size, then 72x40 px = 9x5 latents
# (not a multiple of 64 px, odd latent sizes on both sides)
SHAPES = [(1, 64, 64), (3, 64, 64), (2, 72, 40)]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("component", SD_COMPONENTS)
def test_component_parity_dynamic_shapes(bundles, models, component, precision):
    bundle = bundles[precision]
    models = models[precision]
    man = Manifest.load(bundle)
    engine = load_engine(man, component, "onnxruntime", "cpu")  # the runtime's own checks of names/dtypes/shapes
    spec = component_spec(component, ModelDims(hidden_size=32))
    module = wrap(component, models)
    metric, bound, sense = _gate(component, precision)
    recorded = man.data["components"][component]["parity"]
    print(f"{component} {precision}: recorded at export {metric}={recorded[metric]:.3g}"
          + (f", emulated fp16 {recorded['emulated_fp16'][metric]:.3g}" if precision == "fp16" else ""))
    assert recorded["passed"] and _ok(recorded[metric], bound, sense)
    dtypes = {s.name: s.dtype for s in engine.inputs}
    for i, (b, h, w) in enumerate(SHAPES):
        feeds = {k: v.astype(dtypes[k]) for k, v in sample_inputs(spec, ModelDims(hidden_size=32), b, h, w, seed=10 + i).items()}
        got = engine.run(feeds)
        refs = _torch_outputs(module, feeds)
        for out_spec, ref in zip(engine.outputs, refs):
            g = got[out_spec.name]
            assert g.shape == ref.shape, (out_spec.name, g.shape, ref.shape)
            assert g.dtype == np.dtype(out_spec.dtype)
            m = parity_metrics(component, ref, g.astype(np.float32))
            print(f"  B={b} {h}x{w}px {out_spec.name} {list(g.shape)}: max abs {m['max_abs']:.2e}, "
                  f"rel L2 {m['rel_l2']:.2e}" + (f", PSNR {m['psnr_db']:.1f} dB" if "psnr_db" in m else ""))
            assert m["nonfinite"] == 0
            assert _ok(m[metric], bound, sense), f"{metric}={m[metric]:.3g} vs {bound}"


# ---------------------------------------------------------------------------------------------
# the manifest


def _graph_io(vi) -> dict:
    tt = vi.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
    return {"name": vi.name, "dtype": np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name, "shape": shape}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_manifest(bundles, precision, tmp_path):
    bundle = bundles[precision]
    man = Manifest.load(bundle)  # verifies every file's size and sha256
    d = man.data
    assert d["schema"] == SCHEMA and d["schema_version"] == 1 and d["precision"] == precision
    assert {"torch", "onnx", "onnxruntime", "ldm_runtime"} <= set(d["producer"])
    assert d["source"]["kind"] == {"fp32": "diffusers", "fp16": "checkpoint"}[precision]
    assert d["opset"] >= 18
    assert d["latent"] == {"channels": 4, "scaling_factor": 0.5, "shift_factor": 0.0, "vae_scale_factor": 8}
    assert d["default_size"] == {"height": 64, "width": 64}
    assert d["text"] == {"max_length": 77, "hidden_size": 32}
    tok = d["tokenizer"]
    assert (bundle / tok["vocab"]).is_file() and (bundle / tok["merges"]).is_file()
    assert tok["model_max_length"] == 77 and tok["pad_token"] == "<|endoftext|>" and tok["bos_token"] == "<|startoftext|>"
    assert d["scheduler"]["name"] == "pndm" and d["scheduler"]["config"]["_class_name"] == "PNDMScheduler"
    assert d["scheduler"]["config"]["prediction_type"] == "epsilon" and d["scheduler"]["config"]["skip_prk_steps"]
    # every file on disk is listed with the right hash, and nothing else is
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(d["files"])
    for rel, rec in d["files"].items():
        data = (bundle / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec["sha256"] and len(data) == rec["bytes"]
    assert set(d["components"]) == set(SD_COMPONENTS)
    for name, comp in d["components"].items():
        path = bundle / comp["file"]
        model = onnx.load(str(path))
        # the manifest's IO specs are exactly what the graph declares
        assert [_graph_io(v) for v in model.graph.input] == comp["inputs"], name
        assert [_graph_io(v) for v in model.graph.output] == comp["outputs"], name
        assert comp["opset"] >= 18 and all(o.version >= 18 for o in model.opset_import if o.domain in ("", "ai.onnx"))
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(tmp_path / f"{name}.inferred.onnx"), strict_mode=True)
        assert comp["nodes"]["after"] < comp["nodes"]["before"], comp["nodes"]
        assert comp["parity"]["passed"]
        assert comp["external_data"] == [f"{name}.weights"]  # every graph: its weights once, beside it
        print(f"{name} ({precision}): nodes {comp['nodes']}, parity {comp['parity']['gate']['metric']}="
              f"{comp['parity'][comp['parity']['gate']['metric']]:.3g}")
        floats = [s["dtype"] for s in comp["inputs"] + comp["outputs"] if s["dtype"].startswith("float")]
        if precision == "fp32":
            assert set(floats) == {"float32"}
            # the onnxruntime-CPU variant beside the portable graph: attention fused, gated against it; none
            # where nothing fuses (the text encoder's causal attention is left as it is)
            if name in ("unet", "vae_decoder", "text_encoder"):
                assert ("cpu_variant" in comp) == (name != "text_encoder"), name
            if "cpu_variant" in comp:
                var = comp["cpu_variant"]
                assert var["external_data"] == comp["external_data"]  # it reads the portable graph's weights
                fused = [n.op_type for n in onnx.load(str(bundle / var["file"])).graph.node]
                print(f"  CPU variant {var['file']}: {var['fused_attention']} attentions fused, "
                      f"max_abs_rel {var['parity']['value']:.1e}")
                assert var["file"] == f"{name}.cpu.onnx" and var["parity"]["value"] <= 1e-4
                assert fused.count("MultiHeadAttention") == var["fused_attention"]
                if name == "unet":  # every attention of the U-Net is fused
                    assert var["fused_attention"] > 0 and "Softmax" not in fused
        else:
            assert "cpu_variant" not in comp  # fp16 bundles: onnxruntime's CPU kernels cast fp16 anyway
            want = ["float32" if s["name"] == "timestep" else "float16" for s in comp["inputs"] + comp["outputs"]
                    if s["dtype"].startswith("float")]
            assert floats == want
        if precision == "fp16":
            # the weights are fp16 but for the few that feed fp32 nodes (norm scales, timestep MLP)
            sizes = {k: 0 for k in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
            for t in model.graph.initializer:
                if t.data_type in sizes:
                    sizes[t.data_type] += int(np.prod(t.dims))
            share = sizes[onnx.TensorProto.FLOAT16] / sum(sizes.values())
            print(f"  fp16 share of float weights {share:.3f}")
            assert share > (0.8 if name == "unet" else 0.95)
            assert comp["fp16"]["nodes_fp32"] > 0 and comp["parity"]["emulated_fp16"]["nonfinite"] == 0
    unet = d["components"]["unet"]
    assert unet["inputs"][0] == {"name": "sample", "dtype": unet["inputs"][0]["dtype"], "shape": ["B", 4, "h", "w"]}
    assert unet["inputs"][1]["shape"] == ["B"] and unet["inputs"][1]["dtype"] == "float32"
    assert d["components"]["vae_decoder"]["outputs"][0]["shape"] == ["B", 3, "H", "W"]
    assert d["components"]["text_encoder"]["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["B", 77]}
    # engine builds take their shape ranges from the IO specs (the manifest records none): CFG doubles the U-Net's batch
    assert not any("profile" in comp for comp in d["components"].values())
    unet_p, dec_p = (profile_shapes(man.component(c), 256, 1024, 4, 8) for c in ("unet", "vae_decoder"))
    assert unet_p["sample"]["max"][0] == 2 * dec_p["latent"]["max"][0] == 8


def test_old_manifest_with_profile_loads(bundles, tmp_path):
    """Bundles written before the per-component ``profile`` was dropped still load; the entry is ignored."""
    old = tmp_path / "old"
    shutil.copytree(bundles["fp16"], old)
    data = json.loads((old / "manifest.json").read_text())
    for comp in data["components"].values():
        comp["profile"] = {"latent": {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [8, 4, 128, 128]}}
    (old / "manifest.json").write_text(json.dumps(data))
    feeds = sample_inputs(component_spec("vae_decoder", ModelDims(hidden_size=32)), ModelDims(hidden_size=32), 1, 64, 64)
    feeds = {"latent": feeds["latent"].astype(np.float16)}
    got = load_engine(Manifest.load(old), "vae_decoder").run(feeds)["image"]
    want = load_engine(Manifest.load(bundles["fp16"]), "vae_decoder").run(feeds)["image"]
    np.testing.assert_array_equal(got, want)  # the same graph: bit-identical


def test_unk_token_survives_export(tmp_path):
    """A checkpoint whose tokenizer config sets a non-default unk_token ("!"): the manifest carries it
    and the runtime tokenizer cuts it out of prompts as a special token, as transformers does."""
    from transformers import CLIPTokenizer as Reference

    from ldm_runtime.tokenizer import CLIPTokenizer
    from training.checkpoint import save_checkpoint

    from conftest import tiny_latent_diffusion

    ld = tiny_latent_diffusion()
    ld = dataclasses.replace(ld, tokenizer_config={**ld.tokenizer_config, "unk_token": "!"})
    ckpt = save_checkpoint(ld, tmp_path / "ckpt")
    out = export_bundle(ckpt, tmp_path / "bundle", components="text_encoder", cpu_variants=False)
    man = Manifest.load(out)
    assert man.tokenizer["unk_token"] == "!"
    ours = CLIPTokenizer.from_manifest_entry(out, man.tokenizer)
    ref = Reference(str(out / man.tokenizer["vocab"]), str(out / man.tokenizer["merges"]), unk_token="!")
    prompts = ["a cat!", "hi!!! there"]
    want = np.asarray(ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids, np.int64)
    np.testing.assert_array_equal(ours(prompts), want)
    assert ours.unk_token_id == 0 and (ours(["a cat!"]) == 0).sum() == 1  # the bare "!" id, not "!</w>"


def test_weights_as_external_data(bundles, models):
    """Every graph of the fp16 bundle keeps its weights in ``<component>.weights`` (see test_bundle_weights.py)."""
    out = bundles["fp16"]
    man = Manifest.load(out)
    for name, comp in man.data["components"].items():
        assert comp["external_data"] == [f"{name}.weights"] and f"{name}.weights" in man.data["files"]
        graph_bytes, data_bytes = (out / f"{name}.onnx").stat().st_size, (out / f"{name}.weights").stat().st_size
        print(f"{name}: graph {graph_bytes} B, external data {data_bytes} B")
        assert data_bytes > graph_bytes
        light = onnx.load(str(out / f"{name}.onnx"), load_external_data=False)
        assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in light.graph.initializer) >= 10
        onnx.checker.check_model(str(out / f"{name}.onnx"))
    # the runtime opens it from the manifest (parity across shapes: test_component_parity_dynamic_shapes)
    ids = sample_inputs(component_spec("text_encoder", ModelDims(hidden_size=32)), ModelDims(hidden_size=32), 1, 64, 64)
    got = load_engine(man, "text_encoder").run(ids)["last_hidden_state"]
    ref = _torch_outputs(wrap("text_encoder", models["fp16"]), ids)[0]
    d = parity_metrics("text_encoder", ref, got.astype(np.float32))
    print(f"external-data fp16 text encoder rel L2 {d['rel_l2']:.2e}")
    assert d["rel_l2"] <= 1e-2


# ---------------------------------------------------------------------------------------------
# atomicity


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_failed_export_leaves_nothing(tiny_checkpoint_dir, monkeypatch, tmp_path):
    real = onnx_export.export_component
    done = []

    def fail_second(component, *args, **kwargs):
        if done:
            raise RuntimeError(f"injected failure while exporting {component}")
        done.append(component)
        return real(component, *args, **kwargs)

    monkeypatch.setattr("export.bundle.export_component", fail_second)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(RuntimeError, match="injected"):
        export_bundle(tiny_checkpoint_dir, out, components="text_encoder,vae_decoder")
    assert done == ["text_encoder"]  # it did fail midway, after one component was written
    assert not out.exists() and _siblings(out) == []


@pytest.mark.slow
def test_parity_failure_keeps_old_bundle_then_replace(tiny_checkpoint_dir, monkeypatch, tmp_path):
    out = export_bundle(tiny_checkpoint_dir, tmp_path / "b", components="text_encoder")
    before = (out / "manifest.json").read_bytes()
    (out / "stale.txt").write_text("from the old bundle")
    monkeypatch.setattr(parity, "FP32_GATE", ("max_abs_rel", -1.0, "max"))  # nothing can pass
    with pytest.raises(ParityError, match="text_encoder"):
        export_bundle(tiny_checkpoint_dir, out, components="text_encoder")
    assert (out / "manifest.json").read_bytes() == before and (out / "stale.txt").is_file()
    assert _siblings(out) == []
    monkeypatch.undo()
    export_bundle(tiny_checkpoint_dir, out, components="text_encoder,vae_encoder")
    assert not (out / "stale.txt").exists() and _siblings(out) == []
    assert set(Manifest.load(out).data["components"]) == {"text_encoder", "vae_encoder"}


_KILLED_CHILD = """
import sys, time
from pathlib import Path
import export.onnx_export as ox
from export.bundle import export_bundle
flag = Path(sys.argv[3])
def hang(*a, **k):
    flag.write_text("in the parity gate")
    time.sleep(600)
ox.check_parity = hang
export_bundle(sys.argv[1], sys.argv[2], components="vae_decoder")
"""


@pytest.mark.slow
def test_sigkill_midway_leaves_no_bundle(tiny_checkpoint_dir, tmp_path):
    out, flag = tmp_path / "killed", tmp_path / "flag"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(tiny_checkpoint_dir), str(out), str(flag)],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the child never reached the parity gate"
            time.sleep(0.1)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    temps = [p for p in tmp_path.iterdir() if p.name.startswith("killed.tmp-")]
    print("left behind:", [p.name for p in temps], [q.name for p in temps for q in p.iterdir()])
    assert not out.exists()
    assert len(temps) == 1 and (temps[0] / "vae_decoder.onnx").is_file() and not (temps[0] / "manifest.json").exists()
    assert sweep_stale(out) == temps and not temps[0].exists()


# ---------------------------------------------------------------------------------------------
# the command line


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_cli_errors(tiny_checkpoint_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    seen = []  # printed at the end: capsys captures prints too
    assert export_main([str(tiny_checkpoint_dir), str(out), "--components", "unet,decoder"]) == 2
    line = _one_line(capsys.readouterr().err)
    seen.append(line)
    assert "'decoder'" in line and all(c in line for c in COMPONENTS) and not out.exists()

    assert export_main([str(tiny_checkpoint_dir), str(out), "--precision", "fp8"]) == 2
    assert "fp8" in _one_line(capsys.readouterr().err) and not out.exists()

    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"not ours")
    assert export_main([str(tiny_checkpoint_dir), str(other)]) == 2
    line = _one_line(capsys.readouterr().err)
    seen.append(line)
    assert "not a bundle" in line and (other / "keep.jpg").read_bytes() == b"not ours" and len(list(other.iterdir())) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_main([str(empty), str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    seen.append(line)
    assert "neither" in line and not out.exists()

    assert export_main([str(tiny_checkpoint_dir)]) == 2
    _one_line(capsys.readouterr().err)

    # a size the models cannot take (not a multiple of the VAE factor 8)
    assert export_main([str(tiny_checkpoint_dir), str(out), "--size", "70x64", "--components", "unet", "-q"]) == 2
    line = _one_line(capsys.readouterr().err)
    seen.append(line)
    assert "70" in line and "multiple" in line and not out.exists() and _siblings(out) == ["empty", "photos"]

    monkeypatch.setattr(parity, "FP32_GATE", ("max_abs_rel", -1.0, "max"))
    assert export_main([str(tiny_checkpoint_dir), str(out), "--components", "text_encoder", "-q"]) == 1
    line = _one_line(capsys.readouterr().err)
    seen.append(line)
    assert "parity" in line and not out.exists() and _siblings(out) == ["empty", "photos"]
    with capsys.disabled():
        print("\n".join(seen))


# ---------------------------------------------------------------------------------------------
# a diffusers pipeline folder, end to end through the command line, against diffusers itself


def test_export_diffusers_folder_end_to_end(bundles, sources):
    """The fp32 bundle came from a diffusers folder via ``ldm export``: compare it with diffusers' own
    UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel loaded from that folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tiny_diffusers_dir = sources["fp32"]
    man = Manifest.load(bundles["fp32"])
    assert man.data["source"]["kind"] == "diffusers" and man.scheduler_name == "pndm"
    assert man.default_size == (64, 64) and man.vae_scale_factor == 8 and man.scaling_factor == 0.5

    unet = UNet2DConditionModel.from_pretrained(tiny_diffusers_dir / "unet").eval()
    vae = AutoencoderKL.from_pretrained(tiny_diffusers_dir / "vae").eval()
    text = CLIPTextModel.from_pretrained(tiny_diffusers_dir / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(tiny_diffusers_dir / "tokenizer")
    rng = np.random.default_rng(0)
    ids = tok(["a red circle on a blue background", ""], padding="max_length", max_length=77,
              return_tensors="np").input_ids.astype(np.int64)
    latent = rng.standard_normal((2, 4, 9, 5)).astype(np.float32)
    image = rng.uniform(-1, 1, (2, 3, 72, 40)).astype(np.float32)
    t = np.array([981.0, 1.0], dtype=np.float32)
    with torch.no_grad():
        ctx = text(torch.from_numpy(ids)).last_hidden_state
        dist = vae.encode(torch.from_numpy(image)).latent_dist
        refs = {
            ("text_encoder", "last_hidden_state"): ({"input_ids": ids}, ctx.numpy()),
            ("unet", "out_sample"): ({"sample": latent, "timestep": t, "encoder_hidden_states": ctx.numpy()},
                                     unet(torch.from_numpy(latent), torch.from_numpy(t), ctx).sample.numpy()),
            ("vae_decoder", "image"): ({"latent": latent}, vae.decode(torch.from_numpy(latent)).sample.numpy()),
            ("vae_encoder", "mean"): ({"image": image}, dist.mean.numpy()),
            ("vae_encoder", "logvar"): ({"image": image}, dist.logvar.numpy()),
        }
    for (comp, name), (feeds, ref) in refs.items():
        got = load_engine(man, comp).run(feeds)[name]
        m = parity_metrics(comp, ref, got)
        print(f"{comp}.{name} vs diffusers/transformers: max abs {m['max_abs']:.2e} (rel to scale {m['max_abs_rel']:.2e})")
        assert m["max_abs_rel"] <= 1e-4
