"""Import of diffusers SDXL folders (base and refiner) into our models and our checkpoint folder.

Oracles: diffusers' own `StableDiffusionXLPipeline.encode_prompt` / `UNet2DConditionModel` and
transformers' text encoders loaded from the same folder; the flags as the folder states them.
The folders are tiny random SDXL pipelines saved with `save_pretrained` (`conftest.build_tiny_sdxl`).
"""

import functools
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import build_tiny_sdxl

from ldm_runtime.tokenizer import TOKENIZER_OPTIONS, CLIPTokenizer
from training.checkpoint import (CheckpointError, SDXLOptions, is_sdxl_source, load_checkpoint, load_models,
                                 save_checkpoint)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32, CPU
PROMPTS = ["a red cube on a table, studio light", "two cats"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {"base": build_tiny_sdxl(root / "base"),
            "refiner": build_tiny_sdxl(root / "refiner", refiner=True, force_zeros_for_empty_prompt=False)}


@pytest.fixture(scope="module")
def imported(folders):
    """Both folders through our import (read-only in the tests)."""
    return {kind: load_models(folder) for kind, folder in folders.items()}


def tokenize(folder, config: dict, prompts) -> torch.Tensor:
    """Our runtime tokenizer with the options the import carried."""
    tok = runtime_tokenizer(folder, tuple((k, config[k]) for k in TOKENIZER_OPTIONS if k in config))
    return torch.from_numpy(np.asarray(tok(prompts), dtype=np.int64))


@functools.lru_cache(maxsize=4)
def runtime_tokenizer(folder, options: tuple) -> CLIPTokenizer:
    return CLIPTokenizer(folder / "vocab.json", folder / "merges.txt", **dict(options))


def our_encode_prompt(ld, prompts, clip_skip=None):
    """SDXL's prompt_embeds (both encoders' states concatenated) and pooled embeds, from our imported models."""
    states, pooled = [], None
    for te, tok_dir, tok_cfg in ((ld.text_encoder, ld.tokenizer_dir, ld.tokenizer_config),
                                 (ld.text_encoder_2, ld.tokenizer_2_dir, ld.tokenizer_2_config)):
        if te is None:
            continue
        ids = tokenize(tok_dir, tok_cfg, prompts)
        states.append(te.sdxl_prompt_embeds(ids, clip_skip=clip_skip))
        pooled = te.encode(ids).pooled
    return torch.cat(states, dim=-1), pooled


def check(name, got, want, tol=TOL):
    d = (got - want).abs().max().item()
    print(f"{name}: max abs diff {d:.2e}")
    assert got.shape == want.shape and d <= tol, (name, d)


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_text_encoders_match_diffusers_encode_prompt(folders, imported, kind):
    cls = diffusers.StableDiffusionXLPipeline if kind == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
    pipe = cls.from_pretrained(folders[kind])
    ld = imported[kind]
    assert (ld.text_encoder is None) == (kind == "refiner")
    with torch.no_grad():
        for clip_skip in (None, 1):
            want, _, want_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False,
                                                         clip_skip=clip_skip)
            got, pooled = our_encode_prompt(ld, PROMPTS, clip_skip)
            check(f"{kind} prompt_embeds clip_skip={clip_skip}", got, want)
            check(f"{kind} pooled_prompt_embeds clip_skip={clip_skip}", pooled, want_pooled)
        # and each encoder against transformers directly: last state, penultimate state, pooled
        for name, te in ld.text_encoders().items():
            ref = getattr(pipe, name)
            ids = tokenize(ld.tokenizer_2_dir if name.endswith("_2") else ld.tokenizer_dir,
                           ld.tokenizer_2_config if name.endswith("_2") else ld.tokenizer_config, PROMPTS)
            out, want = te.encode(ids), ref(ids, output_hidden_states=True)
            check(f"{kind} {name} last_hidden_state", out.last_hidden_state, want.last_hidden_state)
            check(f"{kind} {name} hidden_states[-2]", out.hidden_states[-2], want.hidden_states[-2])
            check(f"{kind} {name} pooled", out.pooled, want[0] if name.endswith("_2") else want.pooler_output)


def test_second_tokenizer_pads_with_bang(folders, imported):
    ld = imported["base"]
    assert ld.tokenizer_2_config["pad_token"] == "!" and ld.tokenizer_config["pad_token"] == "<|endoftext|>"
    ref = transformers.CLIPTokenizer.from_pretrained(folders["base"] / "tokenizer_2")
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    got = tokenize(ld.tokenizer_2_dir, ld.tokenizer_2_config, PROMPTS).numpy()
    assert np.array_equal(got, want) and (got[1, -1] == ref.convert_tokens_to_ids("!"))


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_unet_and_vae_import(folders, imported, kind):
    """The U-Net takes diffusers' text_embeds/time_ids (slice E's model), the VAE keeps its scaling factor."""
    ref = diffusers.UNet2DConditionModel.from_pretrained(folders[kind] / "unet").eval()
    ld = imported[kind]
    n_ids = 5 if kind == "refiner" else 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, ref.config.cross_attention_dim, generator=g)
    text_embeds = torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64][:n_ids], [96.0, 48, 8, 4, 64, 32][:n_ids]])
    with torch.no_grad():
        want = ref(x, torch.tensor([999.0, 10.0]), ctx,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        got = ld.unet(x, torch.tensor([999.0, 10.0]), ctx, text_embeds=text_embeds, time_ids=time_ids)
    check(f"{kind} unet", got, want)
    assert ld.vae.config.scaling_factor == 0.13025


def test_flags_round_trip_through_our_checkpoint(folders, imported, tmp_path):
    base, refiner = imported["base"], imported["refiner"]
    assert base.sdxl == SDXLOptions("StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True,
                                    requires_aesthetics_score=False, vae_force_upcast=True)
    assert refiner.sdxl == SDXLOptions("StableDiffusionXLImg2ImgPipeline", force_zeros_for_empty_prompt=False,
                                       requires_aesthetics_score=True, vae_force_upcast=True)
    for name, ld in (("base", base), ("refiner", refiner)):
        out = save_checkpoint(ld, tmp_path / name)
        assert is_sdxl_source(out) and is_sdxl_source(folders[name])
        assert json.loads((out / "ldm_checkpoint.json").read_text())["sdxl"]["pipeline"] == ld.sdxl.pipeline
        assert (out / "text_encoder").is_dir() == (out / "tokenizer").is_dir() == (name == "base")
        back = load_checkpoint(out)
        assert back.sdxl == ld.sdxl and back.tokenizer_2_config == ld.tokenizer_2_config
        assert back.tokenizer_config == ld.tokenizer_config and back.vae.config == ld.vae.config
        assert back.text_encoder_2.config == ld.text_encoder_2.config
        assert back.text_encoder_2.config.projection_dim == 32
        with torch.no_grad():
            got, pooled = our_encode_prompt(back, PROMPTS)
            want, want_pooled = our_encode_prompt(ld, PROMPTS)
        assert torch.equal(got, want) and torch.equal(pooled, want_pooled)
    bad = json.loads((tmp_path / "base" / "ldm_checkpoint.json").read_text())
    bad["sdxl"]["force_zeros_for_empty_prompt"] = "yes"
    (tmp_path / "base" / "ldm_checkpoint.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="force_zeros_for_empty_prompt must be true or false, got 'yes'"):
        load_checkpoint(tmp_path / "base")


def edited_copy(src, dst, index=None, unet=None, drop=(), text_encoder_2=None):
    """A copy of the folder ``src`` with model_index.json / unet config keys replaced and folders removed."""
    shutil.copytree(src, dst)
    for name, changes in (("model_index.json", index), ("unet/config.json", unet),
                          ("text_encoder_2/config.json", text_encoder_2)):
        if changes:
            d = json.loads((dst / name).read_text())
            d.update(changes)
            (dst / name).write_text(json.dumps({k: v for k, v in d.items() if v != "DELETE"}))
    for name in drop:
        shutil.rmtree(dst / name)
    return dst


@pytest.mark.parametrize("kind, edits, message", [
    # one text encoder (an SD folder) where the U-Net expects a 2048-wide context
    ("base", dict(index={"_class_name": "StableDiffusionPipeline", "text_encoder_2": "DELETE", "tokenizer_2": "DELETE"},
                  unet={"cross_attention_dim": 2048}, drop=("text_encoder_2", "tokenizer_2")),
     r"the U-Net expects a 2048-wide text context \(cross_attention_dim\), but the text encoders give 32 "
     r"\(text_encoder 32\)"),
    # an SD folder with an SDXL U-Net of the right width still lacks the pooled encoder
    ("base", dict(index={"_class_name": "StableDiffusionPipeline", "text_encoder_2": "DELETE", "tokenizer_2": "DELETE"},
                  unet={"cross_attention_dim": 32}, drop=("text_encoder_2", "tokenizer_2")),
     r"addition_embed_type='text_time', SDXL\), which need an SDXL pipeline with text_encoder_2"),
    ("base", dict(index={"text_encoder_2": [None, None]}), r"no 'text_encoder_2' entry"),
    ("base", dict(index={"image_encoder": ["transformers", "CLIPVisionModelWithProjection"]}),
     r"an image_encoder \(IP-Adapter\) is not supported"),
    ("base", dict(index={"_class_name": "StableDiffusionXLInpaintPipeline"}),
     r"StableDiffusionXLInpaintPipeline is not supported"),
    ("base", dict(index={"controlnet": ["diffusers", "ControlNetModel"]}),
     r"component 'controlnet' \(diffusers.ControlNetModel\) is not supported"),
    ("base", dict(index={"add_watermarker": True}), r"pipeline option add_watermarker=True is not supported"),
    ("base", dict(unet={"addition_embed_type": "text_image"}), r"addition_embed_type"),
    ("base", dict(text_encoder_2={"architectures": ["CLIPTextModel"]}),
     r"text_encoder_2 config: architectures=\['CLIPTextModel'\] is not supported"),
    ("refiner", dict(index={"requires_aesthetics_score": False}),
     r"projection_class_embeddings_input_dim=72 is 6 time ids x 8 \+ a 24-wide text_embeds, but text_encoder_2 "
     r"projects to 32 \(requires_aesthetics_score=false"),
])
def test_refusals_name_the_feature(folders, tmp_path, kind, edits, message):
    src = edited_copy(folders[kind], tmp_path / "edited", **edits)
    with pytest.raises(CheckpointError, match=message) as e:
        load_models(src)
    print(e.value)
    assert "\n" not in str(e.value)
