"""Batches of unlike requests and cancellation, on the tiny fp32 bundle (issue 16, points 4 and 5).

A batched call with per-image seeds, per-prompt negatives and per-prompt guidance scales must
give each image exactly what its own one-prompt, one-image call gives. Measured here: onnxruntime
CPU's results do not depend on the batch for these graphs (max abs 0.0 on the "np" output for every
scheduler below, txt2img and img2img), so the reference is the single call, compared exactly.
"""
from __future__ import annotations

import numpy as np
import pytest

from ldm_runtime import guidance
from ldm_runtime.cancel import CancelToken, Cancelled
from ldm_runtime.pipeline import Img2ImgPipeline, Pipeline, PipelineInputError
from ldm_runtime.rng import ImageGenerators, call_generator

PROMPTS = ["a red circle", "a blue square on grey"]
NEGATIVES = ["blurry", "a green triangle"]
SCALES = [3.0, 6.5]
SEEDS = [11, 2**40 + 3]  # a seed beyond 32 bits: default_rng takes any int >= 0
# scheduler -> step kwargs: deterministic ones, and every stochastic draw kind (ancestral, lcm, tcd's gamma)
SCHEDULERS = {"ddim": {}, "euler_a": {}, "lcm": {}, "dpmpp_2m": {}, "tcd": {"eta": 0.3}}


class Counter:
    """Wraps an engine; counts its runs."""

    def __init__(self, engine):
        self.engine, self.runs = engine, 0
        self.inputs, self.outputs = engine.inputs, engine.outputs

    def run(self, feeds):
        self.runs += 1
        return self.engine.run(feeds)


@pytest.fixture(scope="module")
def pipe(tiny_fp32_bundle):
    return Pipeline.load(tiny_fp32_bundle, threads=1)


@pytest.fixture(scope="module")
def img2img(tiny_fp32_bundle):
    return Img2ImgPipeline.load(tiny_fp32_bundle, threads=1)


@pytest.fixture
def counters(pipe):
    """``pipe``'s engines wrapped in ``Counter``s for one test, then put back."""
    pipe.open_engines()
    real = dict(pipe.engines)
    pipe.engines.update({c: Counter(e) for c, e in real.items()})
    yield pipe.engines
    pipe.engines.update(real)


def _image(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((64, 48, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_batched_txt2img_equals_each_single_call(pipe, scheduler):
    kw = dict(num_inference_steps=3, scheduler=scheduler, eta=SCHEDULERS[scheduler].get("eta", 0.0),
              height=64, width=48, output_type="np")
    batched = pipe(PROMPTS, negative_prompt=NEGATIVES, guidance_scale=SCALES, seed=SEEDS, **kw)
    assert batched.seeds == SEEDS and batched.seed == SEEDS[0]
    for i in range(2):
        single = pipe(PROMPTS[i], negative_prompt=NEGATIVES[i], guidance_scale=SCALES[i], seed=SEEDS[i], **kw)
        np.testing.assert_array_equal(batched.images[i], single.images[0])
    assert not np.array_equal(batched.images[0], batched.images[1])


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_batched_img2img_equals_each_single_call(img2img, scheduler):
    """Each image's posterior draw and added noise come from its own seed, as in its single call."""
    kw = dict(num_inference_steps=5, strength=0.6, scheduler=scheduler,
              eta=SCHEDULERS[scheduler].get("eta", 0.0), output_type="np")
    images = np.stack([_image(0), _image(1)])  # (2, H, W, 3): one image per prompt
    batched = img2img(PROMPTS, images, negative_prompt=NEGATIVES, guidance_scale=SCALES, seed=SEEDS, **kw)
    for i in range(2):
        single = img2img(PROMPTS[i], images[i], negative_prompt=NEGATIVES[i], guidance_scale=SCALES[i],
                         seed=SEEDS[i], **kw)
        np.testing.assert_array_equal(batched.images[i], single.images[0])


def test_one_image_for_all_prompts_and_several_images_per_prompt(img2img):
    """Seeds are per image, prompt-major: image 2p + j is prompt p's j-th."""
    kw = dict(num_inference_steps=4, strength=0.6, scheduler="euler_a", output_type="np")
    seeds = [5, 6, 7, 8]
    batched = img2img(PROMPTS, _image(2), guidance_scale=SCALES, seed=seeds, num_images_per_prompt=2, **kw)
    assert batched.seeds == seeds
    for i, s in enumerate(seeds):
        single = img2img(PROMPTS[i // 2], _image(2), guidance_scale=SCALES[i // 2], seed=s, **kw)
        np.testing.assert_array_equal(batched.images[i], single.images[0])


def test_unguided_scales_batch_as_their_single_calls(pipe, counters):
    kw = dict(num_inference_steps=2, scheduler="euler_a", output_type="np")
    batched = pipe(PROMPTS, guidance_scale=[1.0, 0.5], seed=SEEDS, **kw)
    assert counters["text_encoder"].runs == 1  # the prompts only: no negative pass without guidance
    for i, scale in enumerate([1.0, 0.5]):
        single = pipe(PROMPTS[i], guidance_scale=scale, seed=SEEDS[i], **kw)
        np.testing.assert_array_equal(batched.images[i], single.images[0])


def test_an_int_seed_keeps_one_stream_for_the_batch(pipe):
    kw = dict(num_inference_steps=2, scheduler="euler_a", output_type="np")
    out = pipe(PROMPTS, seed=7, num_images_per_prompt=2, **kw)
    assert out.seed == 7 and out.seeds == [7, 7, 7, 7]
    assert not np.array_equal(out.images[0], out.images[1])  # one stream: each row its own part of it
    np.testing.assert_array_equal(pipe(PROMPTS[0], seed=[7], **kw).images, pipe(PROMPTS[0], seed=7, **kw).images)
    picked = pipe(PROMPTS[0], **kw)
    assert picked.seeds == [picked.seed]


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=[1.0, 7.5]), r"guidance_scale \[1.0, 7.5\] mixes guided \(> 1\) and unguided"),
    (dict(guidance_scale=[7.5]), r"guidance_scale has 1 entries but there are 2 prompts"),
    (dict(guidance_scale=[7.5, float("nan")]), r"guidance_scale must be a finite number .* got \[7.5, nan\]"),
    (dict(guidance_scale=[7.5, "8"]), r"guidance_scale must be a finite number"),
    (dict(seed=[1]), r"seed has 1 entries but the call makes 2 images"),
    (dict(seed=[1, 2], num_images_per_prompt=2), r"seed has 2 entries but the call makes 4 images"),
    (dict(seed=[1, 2.0]), r"seed must be a list of ints >= 0, got 2.0 at index 1"),
    (dict(seed=[True, 2]), r"seed must be a list of ints >= 0, got True at index 0"),
    (dict(seed=[1, -2]), r"seed must be a list of ints >= 0, got -2 at index 1"),
    (dict(cancel=object()), r"cancel must be None or an object with a bool attribute 'cancelled'"),
])
def test_bad_batch_arguments_are_refused_before_any_model_runs(pipe, counters, kwargs, match):
    with pytest.raises(PipelineInputError, match=match):
        pipe(PROMPTS, num_inference_steps=2, **kwargs)
    assert [c.runs for c in counters.values()] == [0] * len(counters)


def test_img2img_refuses_a_mixed_scale_list_before_encoding(img2img):
    with pytest.raises(PipelineInputError, match="mixes guided"):
        img2img(PROMPTS, _image(), guidance_scale=[8.0, 1.0], seed=SEEDS)


@pytest.mark.parametrize("k", [1, 2])
def test_a_token_cancelled_at_step_k_stops_after_k_callbacks(pipe, counters, k):
    token, ticks = CancelToken(), []

    def callback(step, t, latents):
        ticks.append(step)
        if len(ticks) == k:
            token.cancel()

    with pytest.raises(Cancelled, match=f"cancelled before step {k + 1} of 4"):
        pipe(PROMPTS, num_inference_steps=4, scheduler="euler_a", callback=callback, cancel=token, seed=1)
    assert ticks == list(range(k))
    assert counters["unet"].runs == k and counters["vae_decoder"].runs == 0


def test_a_token_cancelled_in_the_last_callback_stops_before_the_decoder(pipe, counters):
    token = CancelToken()
    with pytest.raises(Cancelled, match="cancelled before the VAE decoder"):
        pipe(PROMPTS[0], num_inference_steps=2, scheduler="ddim", callback=lambda i, t, z: i == 1 and token.cancel(),
             cancel=token)
    assert counters["unet"].runs == 2 and counters["vae_decoder"].runs == 0


def test_a_token_cancelled_before_the_call_runs_and_opens_no_engine(tiny_fp32_bundle):
    token = CancelToken()
    token.cancel()
    for cls, extra in ((Pipeline, {}), (Img2ImgPipeline, {"image": _image()})):
        fresh = cls.load(tiny_fp32_bundle, threads=1)
        with pytest.raises(Cancelled, match="cancelled before the text encoder"):
            fresh(PROMPTS, num_inference_steps=2, cancel=token, **extra)
        assert fresh.engines == {}


def test_any_object_with_a_cancelled_bool_is_a_token(pipe, counters):
    class Request:
        cancelled = True

    with pytest.raises(Cancelled):
        pipe(PROMPTS[0], num_inference_steps=2, cancel=Request())
    assert counters["text_encoder"].runs == 0
    assert repr(CancelToken()) == "CancelToken(cancelled=False)"


def test_an_embedded_guidance_unet_gets_one_embedding_row_per_image(pipe, counters):
    """A U-Net with ``timestep_cond`` (LCM): each image's row is the embedding of its prompt's scale,
    as its single call feeds it. The tiny U-Net has no such input: a wrapper records it and drops it."""
    fed = []

    class DropsTimestepCond(Counter):
        def run(self, feeds):
            fed.append(np.array(feeds.pop("timestep_cond")))
            return super().run(feeds)

    dim = 8
    counters["unet"] = DropsTimestepCond(counters["unet"].engine)
    pipe.guidance_embedding_dim = dim
    try:
        kw = dict(num_inference_steps=1, output_type="np")
        pipe(PROMPTS, guidance_scale=[1.0, 8.0], num_images_per_prompt=2, seed=[1, 2, 3, 4], **kw)
        pipe(PROMPTS[1], guidance_scale=8.0, seed=3, **kw)
    finally:
        pipe.guidance_embedding_dim = None
    batched, single = fed
    np.testing.assert_array_equal(batched, guidance.guidance_scale_embedding(np.array([1.0, 1.0, 8.0, 8.0]), dim))
    np.testing.assert_array_equal(batched[2], single[0])


def test_combine_with_per_row_scales_equals_each_row_alone():
    pred = np.random.default_rng(0).standard_normal((6, 4, 5, 3), dtype=np.float32)
    scales = [2.0, 7.5, 12.25]
    got = guidance.combine(pred, scales, 0.6)
    for i, s in enumerate(scales):
        alone = guidance.combine(pred[[i, 3 + i]], s, 0.6)
        np.testing.assert_array_equal(got[i], alone[0])
    with pytest.raises(ValueError, match="2 per-row scales for 3 rows"):
        guidance.combine(pred, [2.0, 3.0])


def test_image_generators_draw_each_row_from_its_own_seed():
    gens = ImageGenerators([3, 9])
    first, second = gens.standard_normal((2, 4, 2), dtype=np.float32), gens.standard_normal((2, 5), np.float32)
    for row, seed in enumerate([3, 9]):
        ref = np.random.default_rng(seed)
        np.testing.assert_array_equal(first[row], ref.standard_normal((1, 4, 2), dtype=np.float32)[0])
        np.testing.assert_array_equal(second[row], ref.standard_normal((1, 5), dtype=np.float32)[0])
    with pytest.raises(ValueError, match="should have 2 rows"):
        gens.standard_normal((3, 4))
    seeds, rng = call_generator(4, 3)
    assert seeds == [4, 4, 4] and isinstance(rng, np.random.Generator)
