"""Bounds (issue 15 point 4): the memory estimate and budget, engine batches, sizes, the tokenizer's cache and logs.

Refusals are checked with engines that fail if they run (nothing may run before a refusal);
engine batching against the unsplit call on the tiny fp32 bundle (fixed latents and seed); the
estimate's buffer part against its closed form; the tokenizer against transformers' ids.
"""
from __future__ import annotations

import logging
import random
import string
import sys

import numpy as np
import pytest

import ldm_runtime.tokenizer as tokenizer_module
from ldm_runtime import memory
from ldm_runtime.manifest import Manifest
from ldm_runtime.pipeline import Img2ImgPipeline, Pipeline, PipelineInputError
from ldm_runtime.tokenizer import CLIPTokenizer

from conftest import CLIP_BPE

BUDGET = 16 << 30  # an explicit budget, so the refusals do not depend on this machine's memory
PROMPT = "a red circle on a blue background"
PARITY_TOL = 1e-6  # max abs on the "np" output, engine batches vs one batch


class Forbidden:
    """An engine that fails the test if anything runs it."""

    def __init__(self, name: str):
        self.name, self.inputs, self.outputs = name, (), ()

    def run(self, feeds):
        raise AssertionError(f"{self.name} ran before the call was refused")


class ShapeEngine:
    """Returns zeros of the shapes the real component would, and records the rows of every run."""

    def __init__(self, manifest: Manifest, name: str):
        info = manifest.component(name)
        self.name, self.inputs, self.outputs = name, info.inputs, info.outputs
        self.m, self.rows = manifest, []

    def run(self, feeds):
        first = next(iter(feeds.values()))
        n, f = first.shape[0], self.m.vae_scale_factor
        self.rows.append(n)
        if self.name == "text_encoder":
            return {"last_hidden_state": np.zeros((n, self.m.text_max_length, self.m.text_hidden_size), np.float32)}
        if self.name == "unet":
            return {"out_sample": np.zeros_like(feeds["sample"])}
        if self.name == "vae_decoder":
            _, _, h, w = feeds["latent"].shape
            return {"image": np.zeros((n, 3, h * f, w * f), np.float32)}
        _, _, h, w = feeds["image"].shape
        z = np.zeros((n, self.m.latent_channels, h // f, w // f), np.float32)
        return {"mean": z, "logvar": z}


def with_engines(cls, bundle, engine, **kw):
    p = cls.load(bundle, threads=1, memory_budget_bytes=BUDGET, **kw)
    for c in p.required_components:
        p.engines[c] = engine(p.manifest, c) if engine is ShapeEngine else engine(c)
    return p


# -- refusals before any engine runs -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, what", [
    (dict(num_images_per_prompt=10**6), "1000000 image(s) of 64x64"),
    (dict(height=100000, width=100000), "1 image(s) of 100000x100000"),
    (dict(prompt=[PROMPT] * 200_000), "200000 image(s) of 64x64"),
])
def test_text_to_image_refused_above_budget_before_running(tiny_fp32_bundle, kwargs, what):
    p = with_engines(Pipeline, tiny_fp32_bundle, Forbidden)
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(PipelineInputError) as e:
        p(kwargs.pop("prompt"), num_inference_steps=2, **kwargs)
    msg = str(e.value)
    assert "needs an estimated " in msg and what in msg, msg
    assert "more than the memory budget of 16.0 GiB" in msg and "memory_budget_bytes" in msg, msg
    assert "\n" not in msg


def test_img2img_refused_above_budget_before_converting(tiny_fp32_bundle, monkeypatch):
    p = with_engines(Img2ImgPipeline, tiny_fp32_bundle, Forbidden)
    converted = []
    monkeypatch.setattr("ldm_runtime.pipeline.preprocess", lambda *a: converted.append(a))
    refused = r"1 image\(s\) of 4000x4000: .* more than the memory budget of 16.0 GiB"
    with pytest.raises(PipelineInputError, match=refused):
        p(PROMPT, image=np.zeros((4000, 4000, 3), np.uint8), num_inference_steps=2)
    assert not converted  # refused from the array's shape, before preprocess copied it


def test_budget_is_configurable(tiny_fp32_bundle):
    p = with_engines(Pipeline, tiny_fp32_bundle, ShapeEngine)
    p(PROMPT, num_inference_steps=1, output_type="np")  # 64x64 fits 16 GiB
    p.memory_budget_bytes = 1 << 20
    with pytest.raises(PipelineInputError, match=r"more than the memory budget of 1.0 MiB"):
        p(PROMPT, num_inference_steps=1)
    for bad in (0, -5, 1.5, "1G", True):
        with pytest.raises(ValueError, match="memory_budget_bytes must be None or an int >= 1"):
            Pipeline.load(tiny_fp32_bundle, memory_budget_bytes=bad)


def test_estimate_buffers_closed_form(tiny_fp32_bundle):
    """The whole-call buffers for B images of H x W with guidance (C=4, f=8, L=77, D=32 on the tiny bundle)."""
    p = Pipeline.load(tiny_fp32_bundle)
    B, H, W = 6, 128, 96
    got = memory.call_buffers(p.model_dims, memory.CallShape(3, B, H, W, True, init_images=2))
    assert got == {"latents": 10 * B * 4 * (H // 8) * (W // 8) * 4,
                   "embeddings": 6 * B * 77 * 32 * 4,
                   "images": 72 * B * H * W + 72 * 2 * H * W}


def test_plan_picks_the_largest_batch_that_fits(tiny_fp32_bundle):
    """The bisection against trying every batch, over budgets from nothing fits to everything does."""
    dims = Pipeline.load(tiny_fp32_bundle).model_dims
    call = memory.CallShape(40, 80, 256, 192, True, init_images=40)
    need = [sum(memory.call_buffers(dims, call).values()) + memory.working_memory(dims, call, b) for b in range(1, 81)]
    for budget in [need[0] - 1, *need, need[-1] * 2, *(n + 1 for n in need[::7])]:
        fitting = [b for b, n in enumerate(need, 1) if n <= budget]
        got = memory.plan(dims, call, budget, 64)
        assert got.engine_batch == min(max(fitting, default=0), 64)
        assert got.need == need[max(got.engine_batch, 1) - 1]


def test_default_budget_from_meminfo_and_cgroup(tmp_path, monkeypatch):
    (tmp_path / "meminfo").write_text("MemTotal:  8000000 kB\nMemAvailable:  4000000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(memory, "CGROUP", tmp_path / "no-cgroup")
    assert memory.available_memory() == 4000000 * 1024
    assert memory.default_budget() == int(0.75 * 4000000 * 1024)
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "memory.max").write_text("3000000000\n")
    (tmp_path / "cg" / "memory.current").write_text("1000000000\n")
    monkeypatch.setattr(memory, "CGROUP", tmp_path / "cg")
    assert memory.available_memory() == 2000000000  # the cgroup's room is smaller than MemAvailable
    (tmp_path / "cg" / "memory.max").write_text("max\n")
    assert memory.available_memory() == 4000000 * 1024
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "missing")
    monkeypatch.setattr(memory, "_sysconf_available", lambda: None)
    assert memory.default_budget() == memory.FALLBACK_BUDGET


# -- the manifest's size range on onnxruntime ----------------------------------------------------

@pytest.mark.parametrize("height, width", [(60, 64), (64, 0), (-8, 64), (64.0, 64), (4, 64)])
def test_sizes_outside_what_the_manifest_records_refused(tiny_fp32_bundle, height, width):
    """The manifest records the default size and the VAE factor (8), no min/max: sizes must be positive
    multiples of the factor, checked before any engine runs."""
    p = with_engines(Pipeline, tiny_fp32_bundle, Forbidden)
    with pytest.raises(PipelineInputError, match="must be a positive multiple of 8"):
        p(PROMPT, height=height, width=width, num_inference_steps=2)


def test_img2img_size_not_multiple_refused(tiny_fp32_bundle):
    p = with_engines(Img2ImgPipeline, tiny_fp32_bundle, Forbidden)
    with pytest.raises(PipelineInputError, match="positive multiples of 8"):
        p(PROMPT, image=np.zeros((68, 64, 3), np.uint8), num_inference_steps=2)


# -- engine batches ------------------------------------------------------------------------------

def test_500_prompts_run_in_engine_batches(tiny_fp32_bundle):
    p = with_engines(Pipeline, tiny_fp32_bundle, ShapeEngine)
    out = p([f"prompt {i}" for i in range(500)], num_inference_steps=2, scheduler="ddim", output_type="np",
            guidance_scale=5.0)
    assert out.images.shape == (500, 64, 64, 3)
    e = memory.DEFAULT_MAX_ENGINE_BATCH
    assert max(p.engines["text_encoder"].rows) == e  # 500 prompts and 1 distinct negative, e at a time
    assert max(p.engines["unet"].rows) == 2 * e and sum(p.engines["unet"].rows) == 2 * 500 * 2  # [neg; pos], 2 steps
    assert max(p.engines["vae_decoder"].rows) == e and sum(p.engines["vae_decoder"].rows) == 500


def test_budget_picks_the_engine_batch(tiny_fp32_bundle):
    p = with_engines(Pipeline, tiny_fp32_bundle, ShapeEngine)
    call = memory.CallShape(12, 12, 64, 64, True)
    p.memory_budget_bytes = memory.plan(p.model_dims, call, BUDGET, 3).need  # exactly what batch 3 needs
    p([PROMPT] * 12, num_inference_steps=1, output_type="np")
    assert max(p.engines["vae_decoder"].rows) == 3 and max(p.engines["unet"].rows) == 6


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])
def test_engine_batches_match_one_batch(tiny_fp32_bundle, scheduler):
    """5 prompts x 2 images with guidance, 3 images per engine run (6 U-Net rows) against all 10 at once."""
    p = Pipeline.load(tiny_fp32_bundle, threads=1)
    latents = np.random.default_rng(1).standard_normal((10, 4, 8, 8), dtype=np.float32)
    kw = dict(num_images_per_prompt=2, num_inference_steps=3, seed=0, latents=latents, output_type="np",
              scheduler=scheduler, guidance_scale=4.0)
    prompts = ["a red circle", "a blue square", "green", "two dots", "a photo of a cat"]
    p.max_engine_batch = 10
    whole = p(prompts, **kw).images
    p.max_engine_batch = 3
    split = p(prompts, **kw).images
    assert np.abs(split - whole).max() <= PARITY_TOL


def test_img2img_engine_batches_match_one_batch(tiny_fp32_bundle):
    p = Img2ImgPipeline.load(tiny_fp32_bundle, threads=1)
    images = np.random.default_rng(2).random((3, 64, 64, 3), dtype=np.float32)
    kw = dict(image=images, strength=0.6, num_images_per_prompt=2, num_inference_steps=4, seed=3, output_type="np")
    p.max_engine_batch = 6
    whole = p(["a", "b", "c"], **kw).images
    p.max_engine_batch = 2
    split = p(["a", "b", "c"], **kw).images
    assert np.abs(split - whole).max() <= PARITY_TOL


# -- the tokenizer -------------------------------------------------------------------------------

def entries_bytes(tok: CLIPTokenizer) -> int:
    return sum(sys.getsizeof(w) + sys.getsizeof(o) + sum(map(sys.getsizeof, o)) for w, o in tok._cache.items())


def test_bpe_cache_bounded_in_bytes(monkeypatch):
    """30 distinct prompts of 4k characters of random words under a 64 KiB bound: the cache never holds
    more, and the ids stay transformers'."""
    transformers = pytest.importorskip("transformers")
    bound = 64 << 10
    monkeypatch.setattr(tokenizer_module, "CACHE_BYTES", bound)
    tok = CLIPTokenizer(CLIP_BPE / "vocab.json", CLIP_BPE / "merges.txt")
    ref = transformers.CLIPTokenizer(str(CLIP_BPE / "vocab.json"), str(CLIP_BPE / "merges.txt"), model_max_length=77)
    rng = random.Random(0)
    peak = 0
    for i in range(30):
        words = ("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 40))) for _ in range(250))
        prompt = " ".join(words)[:4000]
        got = tok(prompt)
        assert tok.cache_bytes == entries_bytes(tok) <= bound
        peak = max(peak, tok.cache_bytes)
        if i % 5 == 0:
            want = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
            np.testing.assert_array_equal(got[0], want)
    assert peak > bound // 2  # the bound, not a lack of words, is what kept it small


def test_long_prompt_log_line_is_short(caplog):
    """A 100k-character prompt (33k tokens) logs one truncation warning under 400 characters."""
    tok = CLIPTokenizer(CLIP_BPE / "vocab.json", CLIP_BPE / "merges.txt")
    with caplog.at_level(logging.WARNING, logger="ldm_runtime.tokenizer"):
        tok("cat " * 25_000)
    msgs = [r.getMessage() for r in caplog.records if r.name == "ldm_runtime.tokenizer"]
    assert len(msgs) == 1 and len(msgs[0]) < 400, msgs
    assert "24925 tokens dropped" in msgs[0] and "(cut; 24925 tokens dropped in all)" in msgs[0]


def test_gpu_engines_count_only_host_buffers(tiny_fp32_bundle):
    """On CUDA the engines' activations are GPU memory: the host estimate is the call's buffers alone
    (closed form: ``call_buffers``), while on the CPU the working memory is added."""
    man = Manifest.load(tiny_fp32_bundle)
    call = memory.CallShape(1, 2, 512, 512, True)
    cpu = memory.ModelDims.from_manifest(man, "onnxruntime", "cpu", cpu_variant=True)
    gpu = memory.ModelDims.from_manifest(man, "onnxruntime", "cuda", cpu_variant=False)
    assert gpu.on_device and not cpu.on_device
    assert memory.working_memory(gpu, call, 2) == 0 and memory.working_memory(cpu, call, 2) > 0
    buffers = sum(memory.call_buffers(gpu, call).values())
    assert memory.plan(gpu, call, budget=buffers, max_engine_batch=8) == memory.MemoryPlan(2, buffers, buffers, 0)
