"""The runtime on SDXL bundles without a live oracle: what the U-Net is fed, the negative-prompt rule and
its cache, the second tokenizer's files, micro-conditioning defaults, ``ldm generate``'s SDXL
arguments, and bad input (one clear error each, before any model runs).

Parity with diffusers is in test_parity_sdxl.py; here the references are closed forms (the time
ids diffusers builds, all-zero negatives) and the runtime's own calls (prompt_2=None against
prompt_2=prompt).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldm_runtime.conditioning import Conditioning, TextEncoder
from ldm_runtime.generate import main as generate_main
from ldm_runtime.images import read_parameters
from ldm_runtime.manifest import Manifest
from ldm_runtime.pipeline import Img2ImgPipeline, Pipeline, PipelineInputError, files_in_use

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a red circle on a blue background"


class Feeds:
    """An Engine that forwards to another and keeps a copy of every feed."""

    def __init__(self, engine):
        self.engine, self.name = engine, engine.name
        self.inputs, self.outputs = engine.inputs, engine.outputs
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, feeds):
        self.calls.append({k: np.array(v) for k, v in feeds.items()})
        return self.engine.run(feeds)


@pytest.fixture(scope="module")
def base(tiny_sdxl_bundle) -> Pipeline:
    return Pipeline.load(tiny_sdxl_bundle, threads=1)


def recording(pipe: Pipeline, cls=Pipeline) -> tuple[Pipeline, dict[str, Feeds]]:
    """A new pipeline (own negative cache) on ``pipe``'s engines, each wrapped in ``Feeds``."""
    p = cls(pipe.manifest, options=pipe.options)
    rec = {c: Feeds(pipe.engine(c)) for c in ("text_encoder", "text_encoder_2", "unet", "vae_decoder")}
    p.engines.update(rec)
    return p, rec


def test_unet_gets_pooled_embeddings_and_time_ids_negatives_first(base):
    p, rec = recording(base)
    p(PROMPT, num_inference_steps=2, guidance_scale=5.0, height=40, width=72, original_size=(96, 128),
      crops_coords_top_left=(8, 16), seed=0, output_type="np")
    feeds = rec["unet"].calls[0]
    assert feeds["encoder_hidden_states"].shape == (2, 77, 64) and feeds["text_embeds"].shape == (2, 32)
    # text to image without negative sizes: the negative row repeats the positive ids (diffusers' rule)
    assert feeds["time_ids"].dtype == np.float32
    assert feeds["time_ids"].tolist() == [[96, 128, 8, 16, 40, 72]] * 2
    # negative_prompt None on a force_zeros_for_empty_prompt bundle: all-zero negatives, none encoded
    assert not feeds["encoder_hidden_states"][0].any() and not feeds["text_embeds"][0].any()
    assert feeds["text_embeds"][1].any()
    assert len(rec["text_encoder"].calls) == len(rec["text_encoder_2"].calls) == 1
    # the pooled embedding is text_encoder_2's, the context both hidden states side by side
    te1, te2 = (rec[c].engine.run({"input_ids": p.tokenizers[t]([PROMPT])})
                for c, t in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")))
    np.testing.assert_array_equal(feeds["text_embeds"][1], te2["text_embeds"][0])
    np.testing.assert_array_equal(feeds["encoder_hidden_states"][1],
                                  np.concatenate([te1["hidden_states"][0], te2["hidden_states"][0]], axis=-1))


def test_empty_negative_is_encoded_and_cached_apart_from_none(base):
    p, rec = recording(base)
    kw = dict(prompt=PROMPT, num_inference_steps=1, guidance_scale=5.0, seed=0, output_type="np")
    zeros = p(**kw).images
    assert p.negative_cache.misses == 0  # zeros: nothing encoded, nothing cached
    empty = p(**kw, negative_prompt="").images
    again = p(**kw, negative_prompt="").images
    assert (p.negative_cache.misses, p.negative_cache.hits) == (1, 1)
    assert [len(rec[c].calls) for c in ("text_encoder", "text_encoder_2")] == [4, 4]  # 3 prompts, 1 negative
    assert empty.tobytes() == again.tobytes() and np.abs(empty - zeros).max() > 1e-2
    assert rec["unet"].calls[1]["text_embeds"][0].any()


def test_guidance_zero_runs_one_unet_row_and_no_negative(base):
    p, rec = recording(base)
    p(PROMPT, num_inference_steps=2, guidance_scale=0.0, seed=0, output_type="np")
    assert [c["sample"].shape[0] for c in rec["unet"].calls] == [1, 1]
    assert [c["time_ids"].shape for c in rec["unet"].calls] == [(1, 6)] * 2
    assert len(rec["text_encoder_2"].calls) == 1


def test_prompt_2_none_is_prompt_and_a_second_prompt_counts(base):
    kw = dict(prompt=["a red circle", "a cat"], num_inference_steps=1, guidance_scale=5.0, seed=1, output_type="np")
    same = base(**kw).images
    assert base(**kw, prompt_2=["a red circle", "a cat"]).images.tobytes() == same.tobytes()
    other = base(**kw, prompt_2="a green square").images  # one str for every prompt
    assert np.abs(other - same).max() > 1e-3  # a tiny random model: the prompt moves pixels by about 1e-2
    assert base(**kw, negative_prompt="x", negative_prompt_2=None).images.tobytes() == \
        base(**kw, negative_prompt="x", negative_prompt_2="x").images.tobytes()


def test_engine_shapes_and_files_cover_the_second_encoder(base):
    shapes = base.engine_shapes(2, 3, 40, 72, guided=True)
    assert shapes["text_encoder"] == shapes["text_encoder_2"] == {"input_ids": (2, 77)}
    assert shapes["unet"]["text_embeds"] == (6, 32) and shapes["unet"]["time_ids"] == (6, 6)
    assert base.required_components == ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
    files = files_in_use(base.manifest, base.required_components, "onnxruntime", "cpu")
    assert {"tokenizer/vocab.json", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt"} <= set(files)


def test_refiner_is_image_to_image_with_aesthetic_scores(tiny_sdxl_refiner_bundle):
    p = Img2ImgPipeline.load(tiny_sdxl_refiner_bundle, threads=1)
    assert p.required_components == ("text_encoder_2", "unet", "vae_decoder", "vae_encoder")
    assert "tokenizer" not in p.tokenizers and p.tokenizers["tokenizer_2"].pad_token == "!"
    unet = p.engines["unet"] = Feeds(p.engine("unet"))
    image = np.full((64, 64, 3), 0.5, np.float32)
    p(PROMPT, image=image, strength=0.5, num_inference_steps=2, guidance_scale=5.0, crops_coords_top_left=(4, 8),
      seed=0, output_type="np")
    # diffusers' img2img: [original_size, crops, score]; the negative crops default to (0, 0) here
    assert unet.calls[0]["time_ids"].tolist() == [[64, 64, 0, 0, 2.5], [64, 64, 4, 8, 6.0]]
    assert unet.calls[0]["encoder_hidden_states"].shape == (2, 77, 32)


@pytest.mark.parametrize("bundle, default", [("tiny_sdxl_refiner_bundle", 0.3), ("tiny_fp32_bundle", 0.8)])
def test_img2img_default_strength_is_diffusers_for_the_pipeline(request, bundle, default):
    """StableDiffusionXLImg2ImgPipeline defaults to strength 0.3, StableDiffusionImg2ImgPipeline to 0.8:
    the call without ``strength`` equals the call with that value, bit for bit."""
    p = Img2ImgPipeline.load(request.getfixturevalue(bundle), threads=1)
    size = p.manifest.default_size
    image = np.linspace(0, 1, size[0] * size[1] * 3, dtype=np.float32).reshape(*size, 3)
    kw = dict(num_inference_steps=10, guidance_scale=5.0, seed=0, output_type="np")
    np.testing.assert_array_equal(p(PROMPT, image=image, **kw).images, p(PROMPT, image=image, strength=default, **kw).images)


def test_refiner_text_to_image_is_refused_naming_the_pipeline(tiny_sdxl_refiner_bundle):
    with pytest.raises(PipelineInputError, match=r"image-to-image model .*StableDiffusionXLImg2ImgPipeline.*"
                                                 r"use Img2ImgPipeline"):
        Pipeline.load(tiny_sdxl_refiner_bundle)
    with pytest.raises(PipelineInputError, match="image-to-image model"):
        Pipeline(Manifest.load(tiny_sdxl_refiner_bundle))


@pytest.mark.parametrize("kwargs, message", [
    (dict(original_size=(0, 64)), r"original_size must be a pair \(height, width\) of ints >= 1 .*got \(0, 64\)"),
    (dict(original_size=(64.5, 64)), r"original_size must be a pair .*got \(64.5, 64\)"),
    (dict(original_size=(64,)), r"original_size must be a pair .*got \(64,\)"),
    (dict(target_size="64,64"), r"target_size must be a pair .*got '64,64'"),
    (dict(crops_coords_top_left=(-1, 0)), r"crops_coords_top_left must be a pair \(top, left\) of ints >= 0"),
    (dict(negative_original_size=(True, 64)), r"negative_original_size must be a pair"),
    (dict(original_size=(1 << 24, 64)), r"original_size must be a pair .*below 16777216"),
    (dict(aesthetic_score=6.0), r"aesthetic_score: not an input of this bundle's U-Net, whose 6 time ids are "
                                r"original_size \(height, width\), crops_coords_top_left \(top, left\), target_size"),
    (dict(prompt_2=["a", "b"]), r"prompt_2 has 2 entries but there are 1 prompts"),
    (dict(prompt_2=3), r"prompt_2 must be a str or a list of str, got int"),
    (dict(negative_prompt_2=["a", "b"]), r"negative_prompt_2 has 2 entries"),
])
def test_sdxl_bad_input_is_refused_before_any_model(tiny_sdxl_bundle, kwargs, message):
    p = Pipeline.load(tiny_sdxl_bundle, threads=1)
    with pytest.raises(PipelineInputError, match=message):
        p(PROMPT, **kwargs)
    assert p.engines == {}


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_size=(64, 64)),
     r"target_size: not an input of this bundle's U-Net, whose 5 time ids .*aesthetic_score"),
    (dict(prompt_2="x"), r"prompt_2 is the text for a second text encoder, but this bundle has one \(text_encoder_2\)"),
    (dict(aesthetic_score=float("nan")), r"aesthetic_score must be a finite number, got nan"),
])
def test_refiner_bad_input(tiny_sdxl_refiner_bundle, kwargs, message):
    p = Img2ImgPipeline.load(tiny_sdxl_refiner_bundle, threads=1)
    with pytest.raises(PipelineInputError, match=message):
        p(PROMPT, image=np.zeros((64, 64, 3), np.uint8), **kwargs)
    assert p.engines == {}


@pytest.mark.parametrize("kwargs, message", [
    (dict(original_size=(64, 64)),
     r"original_size: SDXL micro-conditioning, but this bundle's U-Net takes no time_ids"),
    (dict(crops_coords_top_left=(0, 0), aesthetic_score=6.0), r"crops_coords_top_left, aesthetic_score: SDXL"),
    (dict(negative_prompt_2="x"), r"negative_prompt_2 is the text for a second text encoder, but this bundle has one "
                                  r"\(text_encoder\)"),
])
def test_sdxl_arguments_to_an_sd_bundle_are_refused(tiny_fp32_bundle, kwargs, message):
    p = Pipeline.load(tiny_fp32_bundle, threads=1)
    with pytest.raises(PipelineInputError, match=message):
        p(PROMPT, **kwargs)
    assert p.engines == {}


def conditioning(aesthetic: bool) -> Conditioning:
    enc = (TextEncoder("text_encoder_2", "tokenizer_2", "hidden_states", "text_embeds"),)
    return Conditioning(enc, requires_aesthetics_score=aesthetic, time_ids=5 if aesthetic else 6)


@pytest.mark.parametrize("img2img, args, positive, negative", [
    # diffusers' StableDiffusionXLPipeline: negative sizes given -> negative crops default (0, 0)
    (False, dict(crops_coords_top_left=(2, 3), negative_original_size=(32, 32), negative_target_size=(16, 24)),
     [40, 72, 2, 3, 40, 72], [32, 32, 0, 0, 16, 24]),
    (False, dict(crops_coords_top_left=(2, 3)), [40, 72, 2, 3, 40, 72], [40, 72, 2, 3, 40, 72]),
    # its Img2Img pipeline without aesthetics: the negative crops are the positive ones
    (True, dict(crops_coords_top_left=(2, 3), negative_target_size=(16, 24)), [40, 72, 2, 3, 40, 72],
     [40, 72, 2, 3, 16, 24]),
])
def test_time_ids_follow_diffusers_defaults(img2img, args, positive, negative):
    pos, neg = conditioning(False).time_ids_pair(40, 72, args, img2img=img2img)
    assert pos.tolist() == positive and neg.tolist() == negative


def test_aesthetic_time_ids():
    pos, neg = conditioning(True).time_ids_pair(40, 72, dict(original_size=(96, 128), aesthetic_score=7),
                                                img2img=True)
    assert pos.tolist() == [96, 128, 0, 0, 7.0] and neg.tolist() == [96, 128, 0, 0, 2.5]


# -- ldm generate -------------------------------------------------------------------------------

def test_generate_records_sdxl_arguments_and_reproduces(tiny_sdxl_bundle, base, tmp_path, capsys):
    rc = generate_main([str(tiny_sdxl_bundle), "a red circle", "--prompt-2", "a blue cat", "--steps", "2",
                        "--seed", "3", "--guidance-scale", "5", "--original-size", "96,128",
                        "--crops-coords-top-left", "8,16", "--negative-target-size", "32,32",
                        "--out", str(tmp_path / "xl.png")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    params = read_parameters(out.out.strip())
    assert (params["prompt_2"], params["original_size"], params["crops_coords_top_left"]) == \
        ("a blue cat", [96, 128], [8, 16])
    assert params["negative_target_size"] == [32, 32] and "aesthetic_score" not in params
    again = base("a red circle", prompt_2="a blue cat", num_inference_steps=2, seed=3, guidance_scale=5.0,
                 original_size=(96, 128), crops_coords_top_left=(8, 16), negative_target_size=(32, 32)).images[0]
    from PIL import Image

    with Image.open(out.out.strip()) as im:
        assert np.asarray(im).tobytes() == np.asarray(again).tobytes()


@pytest.mark.parametrize("bundle, args, message", [
    ("sdxl", ["--original-size", "64"], "argument --original-size: expected two integers as A,B, got '64'"),
    ("sdxl", ["--original-size", "0,64"], "original_size must be a pair (height, width) of ints >= 1"),
    ("sdxl", ["--aesthetic-score", "6"], "aesthetic_score: not an input of this bundle's U-Net"),
    ("sd", ["--target-size", "64,64"], "target_size: SDXL micro-conditioning"),
    ("refiner", [], "image-to-image model"),
])
def test_generate_sdxl_bad_input_exit_2(request, tmp_path, capsys, bundle, args, message):
    path = request.getfixturevalue({"sdxl": "tiny_sdxl_bundle", "sd": "tiny_fp32_bundle",
                                    "refiner": "tiny_sdxl_refiner_bundle"}[bundle])
    rc = generate_main([str(path), "a dog", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(Path(tmp_path).glob("*.png"))
