"""SDXL export: tiny SDXL base and refiner folders (``conftest.build_tiny_sdxl``) through ``ldm export``.

Checked: the manifest fields of the SDXL bundle contract (components, ``tokenizer_2``, ``conditioning``,
``text``, the U-Net's ``text_embeds``/``time_ids``), every component on onnxruntime against the torch
model within the export gates (and the text encoders against transformers on the diffusers folder),
fp16 bundles (``time_ids`` float32, the VAE fp32 under ``force_upcast`` with the reason recorded), the
TensorRT profiles and ``ldm verify`` of the new component, and the refusals at export.
"""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from export.bundle import ExportError, export_bundle
from export.cli import export_main
from export.onnx_export import wrap
from export.parity import FP16_GATES, FP32_GATE, parity_metrics, passes
from export.specs import ModelDims, component_spec, dims_from_models, sample_inputs
from export.tensorrt import profile_shapes
from ldm_runtime.backends import load_engine
from ldm_runtime.manifest import COMPONENTS, BundleError, Manifest, check_manifest
from ldm_runtime.verify import verify_bundle
from training.checkpoint import CheckpointError, load_models, save_checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_torch_thread")]

BASE_CONDITIONING = {
    "text_encoders": [{"component": "text_encoder", "tokenizer": "tokenizer", "hidden": "hidden_states"},
                      {"component": "text_encoder_2", "tokenizer": "tokenizer_2", "hidden": "hidden_states",
                       "pooled": "text_embeds"}],
    "force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False, "pipeline": "StableDiffusionXLPipeline"}
# (batch, height, width) px: the default size, and 72x40 px (9x5 latents: odd, not the traced size)
SHAPES = [(1, 64, 64), (2, 72, 40)]


@pytest.fixture(scope="module")
def models(tiny_sdxl_dir, tiny_sdxl_refiner_dir):
    return {"base": load_models(tiny_sdxl_dir), "refiner": load_models(tiny_sdxl_refiner_dir)}


@pytest.fixture(scope="module")
def fp16_bundle(models, tmp_path_factory):
    """The base as our checkpoint folder, exported fp16 through ``ldm export``."""
    tmp = tmp_path_factory.mktemp("sdxl-fp16")
    ckpt = save_checkpoint(models["base"], tmp / "ckpt")
    assert export_main([str(ckpt), str(tmp / "bundle"), "--precision", "fp16", "-q"]) == 0
    return tmp / "bundle"


def _spec_io(entry: dict) -> tuple[dict, dict]:
    return ({s["name"]: (s["dtype"], s["shape"]) for s in entry["inputs"]},
            {s["name"]: (s["dtype"], s["shape"]) for s in entry["outputs"]})


# ---------------------------------------------------------------------------------------------
# the manifest

def test_base_manifest(tiny_sdxl_bundle):
    d = Manifest.load(tiny_sdxl_bundle).data  # the schema and check_manifest, every file's hash
    assert list(d["components"]) == list(COMPONENTS)
    assert d["conditioning"] == BASE_CONDITIONING
    assert d["text"] == {"max_length": 77, "hidden_size": 64}  # the U-Net's context: 32 + 32
    assert d["default_size"] == {"height": 64, "width": 64}
    assert d["latent"]["scaling_factor"] == pytest.approx(0.13025)
    assert d["scheduler"]["name"] == "euler"
    assert d["tokenizer"]["pad_token"] == "<|endoftext|>" and d["tokenizer_2"]["pad_token"] == "!"
    for field in ("tokenizer", "tokenizer_2"):
        for key in ("vocab", "merges"):
            assert d[field][key].startswith(f"{field}/") and d[field][key] in d["files"]
    comps = d["components"]
    assert _spec_io(comps["text_encoder"]) == ({"input_ids": ("int64", ["B", 77])},
                                               {"hidden_states": ("float32", ["B", 77, 32])})
    assert _spec_io(comps["text_encoder_2"]) == ({"input_ids": ("int64", ["B", 77])},
                                                 {"hidden_states": ("float32", ["B", 77, 32]),
                                                  "text_embeds": ("float32", ["B", 32])})
    unet_in, _ = _spec_io(comps["unet"])
    assert [s["name"] for s in comps["unet"]["inputs"]] == ["sample", "timestep", "encoder_hidden_states",
                                                             "text_embeds", "time_ids"]
    assert unet_in["encoder_hidden_states"] == ("float32", ["B", 77, 64])
    assert unet_in["text_embeds"] == ("float32", ["B", 32]) and unet_in["time_ids"] == ("float32", ["B", 6])
    assert comps["unet"]["batch_mult"] == 2 and "cpu_variant" in comps["unet"]
    assert all("precision" not in e for e in comps.values())  # an fp32 bundle: nothing upcast


def test_refiner_manifest(tiny_sdxl_refiner_bundle):
    d = Manifest.load(tiny_sdxl_refiner_bundle).data
    assert list(d["components"]) == ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    assert "tokenizer" not in d and d["tokenizer_2"]["pad_token"] == "!"
    assert not any(rel.startswith("tokenizer/") for rel in d["files"])
    assert d["conditioning"] == {"text_encoders": [BASE_CONDITIONING["text_encoders"][1]],
                                 "force_zeros_for_empty_prompt": True, "requires_aesthetics_score": True,
                                 "pipeline": "StableDiffusionXLImg2ImgPipeline"}
    assert d["text"] == {"max_length": 77, "hidden_size": 32}
    unet_in, _ = _spec_io(d["components"]["unet"])
    assert unet_in["encoder_hidden_states"] == ("float32", ["B", 77, 32])
    assert unet_in["text_embeds"] == ("float32", ["B", 32]) and unet_in["time_ids"] == ("float32", ["B", 5])


def test_verify_and_files_cover_text_encoder_2(tiny_sdxl_bundle, tiny_sdxl_refiner_bundle):
    from ldm_runtime.pipeline import files_in_use

    for bundle in (tiny_sdxl_bundle, tiny_sdxl_refiner_bundle):
        assert verify_bundle(str(bundle)) == [] and verify_bundle(str(bundle), backend="onnxruntime") == []
        man = Manifest.load(bundle, verify=False)
        used = files_in_use(man, ("text_encoder_2",), "onnxruntime", "cpu")
        assert {"tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "text_encoder_2.onnx",
                "text_encoder_2.weights"} <= set(used)
    broken = tiny_sdxl_bundle.parent / "broken"
    shutil.copytree(tiny_sdxl_bundle, broken)
    with open(broken / "text_encoder_2.weights", "r+b") as f:
        f.write(b"\x00\x01")
    problems = verify_bundle(str(broken))
    assert len(problems) == 1 and "text_encoder_2.weights" in problems[0] and "sha256" in problems[0], problems


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["components"]["unet"]["inputs"][3]["shape"].__setitem__(1, 16),
     r"conditioning.text_encoders\[1\].pooled: the pooled output is 32 wide, but the U-Net's text_embeds is 16"),
    (lambda d: d["conditioning"].__setitem__("requires_aesthetics_score", True),
     r"time_ids has 6 values per row, but requires_aesthetics_score=true needs 5"),
    (lambda d: d.pop("conditioning"), r"manifest field conditioning: the U-Net takes text_embeds and time_ids"),
    (lambda d: d.pop("tokenizer_2"), r"conditioning.text_encoders\[1\].tokenizer: names 'tokenizer_2'"),
    (lambda d: d["conditioning"]["text_encoders"][1].pop("pooled"),
     r"conditioning.text_encoders: expected exactly one entry with 'pooled'"),
    (lambda d: d["conditioning"]["text_encoders"][0].__setitem__("hidden", "last_hidden_state"),
     r"text_encoders\[0\].hidden: text_encoder has no output 'last_hidden_state'"),
    (lambda d: d["components"]["text_encoder"]["outputs"][0]["shape"].__setitem__(2, 16),
     r"text.hidden_size: expected the text encoders' hidden widths summed \(16 \+ 32 = 48\), got 64"),
    (lambda d: d["conditioning"].__setitem__("pipeline", "StableDiffusionXLInpaintPipeline"),
     r"conditioning.pipeline: must be one of"),
])
def test_check_manifest_refuses_inconsistent_conditioning(tiny_sdxl_bundle, mutate, message):
    data = json.loads((tiny_sdxl_bundle / "manifest.json").read_text())
    check_manifest(copy.deepcopy(data), "m.json")
    mutate(data)
    with pytest.raises(BundleError, match=message) as e:
        check_manifest(data, "m.json")
    print(e.value)


def test_an_sd_manifest_still_needs_its_tokenizer(tiny_fp32_bundle):
    data = json.loads((tiny_fp32_bundle / "manifest.json").read_text())
    del data["tokenizer"]
    with pytest.raises(BundleError, match=r"must contain \['tokenizer'\]"):
        check_manifest(data, "m.json")


# ---------------------------------------------------------------------------------------------
# parity of every component against the torch model

def _torch_outputs(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = module(*(torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v) for v in feeds.values()))
    return [o.numpy() for o in ([out] if torch.is_tensor(out) else out)]


def _check_against_torch(bundle, ld, component: str, gate=FP32_GATE) -> dict[str, float]:
    """The engine (onnxruntime CPU, the CPU variant where there is one) against the torch wrapper at SHAPES."""
    metric, bound, sense = gate
    man = Manifest.load(bundle)
    engine = load_engine(man, component, "onnxruntime", "cpu")
    dims, module = dims_from_models(ld), wrap(component, ld)
    spec = component_spec(component, dims)
    dtypes = {s.name: s.dtype for s in engine.inputs}
    worst: dict[str, float] = {}
    for i, (b, h, w) in enumerate(SHAPES):
        feeds = {k: v.astype(dtypes[k]) for k, v in sample_inputs(spec, dims, b, h, w, seed=20 + i).items()}
        got = engine.run(feeds)
        for out_spec, ref in zip(engine.outputs, _torch_outputs(module, feeds)):
            g = got[out_spec.name].astype(np.float32)
            assert g.shape == ref.shape, (out_spec.name, g.shape, ref.shape)
            m = parity_metrics(component, ref, g)
            assert m["nonfinite"] == 0 and passes(m[metric], bound, sense), (out_spec.name, b, h, w, m)
            worst[out_spec.name] = max(worst.get(out_spec.name, 0.0), m["max_abs"])
    print(component, {k: f"{v:.2e}" for k, v in worst.items()})
    return worst


@pytest.mark.parametrize("kind, component", [
    ("base", "text_encoder"), ("base", "text_encoder_2"), ("base", "unet"), ("base", "vae_decoder"),
    ("base", "vae_encoder"), ("refiner", "text_encoder_2"), ("refiner", "unet")])
def test_component_parity_fp32(tiny_sdxl_bundle, tiny_sdxl_refiner_bundle, models, kind, component):
    bundle = {"base": tiny_sdxl_bundle, "refiner": tiny_sdxl_refiner_bundle}[kind]
    recorded = Manifest.load(bundle).data["components"][component]["parity"]
    assert recorded["passed"] and recorded["max_abs_rel"] <= FP32_GATE[1]
    _check_against_torch(bundle, models[kind], component)


def test_text_encoders_match_transformers(tiny_sdxl_bundle, tiny_sdxl_dir):
    """hidden_states = transformers' hidden_states[-2]; text_embeds = CLIPTextModelWithProjection's text_embeds,
    on token ids of real prompts from the bundle's tokenizers (the second pads with "!")."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ldm_runtime.pipeline import load_tokenizer

    man = Manifest.load(tiny_sdxl_bundle)
    prompts = ["a red circle on a blue background", ""]
    for component, field, cls in (("text_encoder", "tokenizer", CLIPTextModel),
                                  ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)):
        ids = np.asarray(load_tokenizer(man, field)(prompts), dtype=np.int64)
        got = load_engine(man, component, "onnxruntime", "cpu").run({"input_ids": ids})
        ref = cls.from_pretrained(tiny_sdxl_dir / component).eval()
        with torch.no_grad():
            out = ref(torch.from_numpy(ids), output_hidden_states=True)
        np.testing.assert_allclose(got["hidden_states"], out.hidden_states[-2].numpy(), atol=1e-4, rtol=0)
        if component == "text_encoder_2":
            np.testing.assert_allclose(got["text_embeds"], out.text_embeds.numpy(), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# fp16

@pytest.mark.slow  # an SDXL export of its own (the fp32 ones are the session fixtures)
def test_fp16_bundle(fp16_bundle, models):
    d = Manifest.load(fp16_bundle).data
    assert d["precision"] == "fp16" and d["source"]["kind"] == "checkpoint"
    assert d["conditioning"] == BASE_CONDITIONING
    comps = d["components"]
    unet_in, unet_out = _spec_io(comps["unet"])
    assert {k: v[0] for k, v in unet_in.items()} == {"sample": "float16", "timestep": "float32",
                                                      "encoder_hidden_states": "float16", "text_embeds": "float16",
                                                      "time_ids": "float32"}
    assert "time_ids" in comps["unet"]["fp16"]["policy"]["fp32_io"]
    for name in ("text_encoder", "text_encoder_2"):
        assert {v[0] for v in _spec_io(comps[name])[1].values()} == {"float16"} and "precision" not in comps[name]
    for name in ("vae_decoder", "vae_encoder"):  # force_upcast: fp32 graphs, the reason recorded
        assert comps[name]["precision"] == "fp32" and comps[name]["precision_reason"] == "force_upcast"
        assert {v[0] for io in _spec_io(comps[name]) for v in io.values()} == {"float32"} and "fp16" not in comps[name]
    assert not any("cpu_variant" in e for e in comps.values())
    _check_against_torch(fp16_bundle, models["base"], "unet", FP16_GATES["unet"])
    _check_against_torch(fp16_bundle, models["base"], "text_encoder_2", FP16_GATES["text_encoder_2"])
    _check_against_torch(fp16_bundle, models["base"], "vae_decoder")  # fp32: the fp32 gate


@pytest.mark.slow
def test_fp16_refiner(tiny_sdxl_refiner_dir, models, tmp_path):
    out = export_bundle(tiny_sdxl_refiner_dir, tmp_path / "bundle", precision="fp16")
    comps = Manifest.load(out).data["components"]
    assert list(comps) == ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    assert _spec_io(comps["unet"])[0]["time_ids"] == ("float32", ["B", 5])
    assert comps["vae_decoder"]["precision_reason"] == "force_upcast"
    _check_against_torch(out, models["refiner"], "unet", FP16_GATES["unet"])


# ---------------------------------------------------------------------------------------------
# TensorRT profiles (pure: no TensorRT needed)

def test_tensorrt_profiles_cover_the_new_inputs(tiny_sdxl_bundle):
    man = Manifest.load(tiny_sdxl_bundle, verify=False)
    unet = profile_shapes(man.component("unet"), 256, 1024, 4, 8, opt_size=(512, 512))
    assert unet["text_embeds"] == {"min": [1, 32], "opt": [2, 32], "max": [8, 32]}
    assert unet["time_ids"] == {"min": [1, 6], "opt": [2, 6], "max": [8, 6]}
    assert unet["encoder_hidden_states"]["max"] == [8, 77, 64] and unet["sample"]["max"] == [8, 4, 128, 128]
    te2 = profile_shapes(man.component("text_encoder_2"), 256, 1024, 4, 8)
    assert te2 == {"input_ids": {"min": [1, 77], "opt": [1, 77], "max": [4, 77]}}


# ---------------------------------------------------------------------------------------------
# bad input at export

def _edited(src, dst, index=None, unet=None, drop=()):
    """A copy of the diffusers folder ``src`` with model_index.json / unet config keys replaced, folders dropped."""
    shutil.copytree(src, dst)
    for name, changes in (("model_index.json", index), ("unet/config.json", unet)):
        if changes:
            d = json.loads((dst / name).read_text())
            d.update(changes)
            (dst / name).write_text(json.dumps(d))
    for name in drop:
        shutil.rmtree(dst / name)
    return dst


def test_export_refuses_one_text_encoder_for_a_wider_context(tiny_sdxl_dir, tmp_path, capsys):
    """A base folder without its first text encoder: the U-Net wants 64 wide, text_encoder_2 gives 32."""
    src = _edited(tiny_sdxl_dir, tmp_path / "one-encoder", index={"text_encoder": [None, None], "tokenizer": [None, None]},
                  drop=("text_encoder", "tokenizer"))
    assert export_main([str(src), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    print(err)
    assert err.startswith("ldm export: error: ") and "\n" not in err
    assert ("the U-Net expects a 64-wide text context (cross_attention_dim), but the text encoders give 32 "
            "(text_encoder_2 32)") in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_models_whose_widths_disagree(tiny_sdxl_dir, models, tmp_path):
    """The same checks for models given in memory (``models=``): context width, then pooled width."""
    import dataclasses

    from training.models.text_encoder import CLIPTextEncoder

    base = models["base"]
    with pytest.raises(CheckpointError, match=r"expects a 64-wide text context \(cross_attention_dim\), but the text "
                                              r"encoders give 32 \(text_encoder_2 32\)"):
        export_bundle(tiny_sdxl_dir, tmp_path / "a", models=dataclasses.replace(base, text_encoder=None))
    narrow = CLIPTextEncoder(dataclasses.replace(base.text_encoder_2.config, projection_dim=16))
    with pytest.raises(CheckpointError, match=r"a 32-wide text_embeds, but text_encoder_2 projects to 16"):
        export_bundle(tiny_sdxl_dir, tmp_path / "b", models=dataclasses.replace(base, text_encoder_2=narrow))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_refuses_components_the_source_lacks(tiny_sdxl_refiner_dir, tiny_checkpoint_dir, tmp_path, capsys):
    with pytest.raises(ExportError, match=r"the source has no text_encoder \(an SDXL refiner\); its components are "
                                          r"text_encoder_2, unet, vae_decoder, vae_encoder"):
        export_bundle(tiny_sdxl_refiner_dir, tmp_path / "a", components="text_encoder,unet")
    assert export_main([str(tiny_checkpoint_dir), str(tmp_path / "b"), "--components", "text_encoder_2", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ldm export: error: the source has no text_encoder_2 (an SD pipeline); its components are "
                   "text_encoder, unet, vae_decoder, vae_encoder"), err


def test_export_refuses_unsupported_sdxl_features(tiny_sdxl_dir, tmp_path, capsys):
    for i, (edits, words) in enumerate([
            (dict(index={"image_encoder": ["transformers", "CLIPVisionModelWithProjection"]}), "IP-Adapter"),
            (dict(unet={"addition_embed_type": "text_image"}), "addition_embed_type")]):
        src = _edited(tiny_sdxl_dir, tmp_path / f"src{i}", **edits)
        assert export_main([str(src), str(tmp_path / "out"), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        print(err)
        assert err.startswith("ldm export: error: ") and words in err and "\n" not in err


# ---------------------------------------------------------------------------------------------
# sample inputs of the new U-Net inputs

def test_time_ids_samples_are_realistic_micro_conditioning():
    from ldm_runtime.manifest import TensorSpec
    from ldm_runtime.shapes import ShapeError, random_feeds

    def draw(k: int) -> np.ndarray:
        spec = TensorSpec("time_ids", "float32", ("B", k))
        return random_feeds((spec,), {"time_ids": (500, k)}, np.random.default_rng(k))["time_ids"]

    base, refiner = draw(6), draw(5)
    for sizes in (base[:, :2], base[:, 4:], refiner[:, :2]):  # original / target sizes: 64..1024 px, multiples of 8
        assert sizes.min() >= 64 and sizes.max() <= 1024 and (sizes % 8 == 0).all() and len(np.unique(sizes)) > 50
    for crops in (base[:, 2:4], refiner[:, 2:4]):
        assert crops.min() >= 0 and crops.max() <= 64 and (crops == np.round(crops)).all()
    assert 2.5 <= refiner[:, 4].min() and refiner[:, 4].max() <= 6.0 and base.dtype == np.float32
    with pytest.raises(ShapeError, match="time_ids rows have 6 values .* or 5 .*, got 4"):
        draw(4)
    dims = ModelDims(hidden_size=32, vocab_size=1000, encoder_widths=(("text_encoder_2", 32),), text_embeds_dim=32,
                     num_time_ids=5)
    feeds = sample_inputs(component_spec("unet", dims), dims, 2, 64, 48, seed=1)
    assert {k: v.shape for k, v in feeds.items()} == {"sample": (2, 4, 8, 6), "timestep": (2,),
                                                      "encoder_hidden_states": (2, 77, 32), "text_embeds": (2, 32),
                                                      "time_ids": (2, 5)}

