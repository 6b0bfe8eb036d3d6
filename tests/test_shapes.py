"""ldm_runtime.shapes (bind_shapes, random_feeds) and export.parity's metrics, against closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest

from export import parity
from export.specs import ModelDims, component_spec, sample_inputs
from ldm_runtime.guidance import guidance_scale_embedding
from ldm_runtime.manifest import ComponentInfo, TensorSpec, check_manifest
from ldm_runtime.shapes import ShapeError, bind_shapes, random_feeds, size_dims

UNET = (TensorSpec("sample", "float32", ("B", 4, "h", "w")), TensorSpec("timestep", "float32", ("B",)),
        TensorSpec("encoder_hidden_states", "float32", ("B", 77, 768)))
IMAGE = (TensorSpec("image", "float16", ("B", 3, "H", "W")),)


def test_bind_shapes_by_hand():
    assert size_dims(512, 768, 8) == {"H": 512, "W": 768, "h": 64, "w": 96}
    assert bind_shapes(UNET, B=6, h=64, w=96) == {"sample": (6, 4, 64, 96), "timestep": (6,),
                                                   "encoder_hidden_states": (6, 77, 768)}
    assert bind_shapes(IMAGE, B=1, **size_dims(512, 768, 8)) == {"image": (1, 3, 512, 768)}
    extra = (TensorSpec("time_ids", "float32", ("B", "T")),)
    assert bind_shapes(extra, B=2, h=1, w=1, T=6) == {"time_ids": (2, 6)}


def test_bind_shapes_refuses_unbound_dim_and_bad_size():
    with pytest.raises(ShapeError, match=r"input 'image' has symbolic dims \['H', 'W'\] that were given no size"):
        bind_shapes(IMAGE, B=1, h=8, w=8)
    with pytest.raises(ShapeError, match="image size 70x64 is not a positive multiple of the VAE factor 8"):
        size_dims(70, 64, 8)


def test_random_feeds_ranges_and_dtypes():
    ids = TensorSpec("input_ids", "int64", ("B", 12))
    specs = (*UNET, ids, *IMAGE)
    shapes = {**bind_shapes(UNET, B=3, h=4, w=5), "input_ids": (3, 12), "image": (3, 3, 32, 40)}
    f = random_feeds(specs, shapes, np.random.default_rng(0), vocab_size=50, train_timesteps=20)
    assert {k: (v.dtype.name, v.shape) for k, v in f.items()} == {
        "sample": ("float32", (3, 4, 4, 5)), "timestep": ("float32", (3,)),
        "encoder_hidden_states": ("float32", (3, 77, 768)), "input_ids": ("int64", (3, 12)),
        "image": ("float16", (3, 3, 32, 40))}
    t = f["input_ids"]
    assert (t[:, 0] == 48).all() and (t[:, 4:] == 49).all()  # BOS = vocab - 2; EOS from 12 // 3 on
    assert t[:, 1:4].min() >= 1 and t[:, 1:4].max() < 48  # ordinary tokens, never BOS/EOS
    ts = f["timestep"]
    assert 0 <= ts.min() and ts.max() <= 19 and (np.diff(ts) <= 0).all()  # descending in the training range
    assert np.abs(f["image"]).max() <= 1
    with pytest.raises(ShapeError, match="vocab_size"):
        random_feeds((ids,), {"input_ids": (1, 12)}, np.random.default_rng(0))
    with pytest.raises(ShapeError, match="integer input 'mask' has no sampling convention"):
        random_feeds((TensorSpec("mask", "int32", ("B",)),), {"mask": (1,)}, np.random.default_rng(0))


def test_guidance_embedding_feed_is_an_embedding_of_a_scale_in_range():
    spec = TensorSpec("timestep_cond", "float32", ("B", 16))
    got = random_feeds((spec,), {"timestep_cond": (4, 16)}, np.random.default_rng(3))["timestep_cond"]
    scales = np.random.default_rng(3).uniform(1.0, 15.0, size=4)  # the draw the convention makes
    np.testing.assert_array_equal(got, guidance_scale_embedding(scales, 16))


def test_sample_inputs_bind_the_export_spec():
    dims = ModelDims(hidden_size=32, vocab_size=1000, max_length=77, time_cond_proj_dim=8)
    feeds = sample_inputs(component_spec("unet", dims), dims, 2, 64, 48, seed=1)
    assert {k: v.shape for k, v in feeds.items()} == {"sample": (2, 4, 8, 6), "timestep": (2,),
                                                      "encoder_hidden_states": (2, 77, 32), "timestep_cond": (2, 8)}
    ids = sample_inputs(component_spec("text_encoder", dims), dims, 2, 64, 64)["input_ids"]
    assert ids.max() == 999 and ids.min() >= 1


def test_batch_mult_recorded_or_implied():
    plain = ComponentInfo.from_dict("unet", {"file": "u.onnx", "inputs": [s.to_dict() for s in UNET], "outputs": []})
    lcm = ComponentInfo.from_dict("unet", {"file": "u.onnx", "outputs": [],
                                           "inputs": [s.to_dict() for s in UNET]
                                           + [{"name": "timestep_cond", "dtype": "float32", "shape": ["B", 8]}]})
    vae = ComponentInfo.from_dict("vae_encoder", {"file": "e.onnx", "inputs": [s.to_dict() for s in IMAGE], "outputs": []})
    assert (plain.batch_mult, lcm.batch_mult, vae.batch_mult) == (2, 1, 1)  # version-1 bundles without the field
    recorded = ComponentInfo.from_dict("unet", {"file": "u.onnx", "batch_mult": 2, "outputs": [],
                                                "inputs": [s.to_dict() for s in UNET]})
    assert recorded.batch_mult == 2


def test_manifest_refuses_a_batch_mult_the_runtime_would_not_feed(tiny_fp32_bundle):
    import json

    data = json.loads((tiny_fp32_bundle / "manifest.json").read_text())
    assert data["components"]["unet"]["batch_mult"] == 2 and data["components"]["vae_decoder"]["batch_mult"] == 1
    check_manifest(data)
    data["components"]["unet"]["batch_mult"] = 1
    with pytest.raises(ValueError, match=r"components.unet.batch_mult: expected 2 .*got 1"):
        check_manifest(data)


def test_metrics_closed_form():
    ref = np.array([3.0, -4.0])
    got = ref + np.array([0.3, 0.4])
    assert parity.max_abs(got, ref) == pytest.approx(0.4, abs=1e-15)
    assert parity.rel_l2(got, ref) == pytest.approx(0.5 / 5.0, abs=1e-15)
    assert parity.max_abs_rel(got, ref) == pytest.approx(0.4 / 4.0, abs=1e-15)  # scale max |ref| = 4
    small = np.array([0.01, -0.02])
    assert parity.max_abs_rel(small + 0.001, small) == pytest.approx(0.001, abs=1e-15)  # scale at least 1
    assert parity.rel_l2(np.array([0.3, 0.4]), np.zeros(2)) == pytest.approx(0.5, abs=1e-15)  # all-zero ref: plain norm
    for bad in (np.array([np.nan, 1.0]), np.zeros(3)):
        assert parity.max_abs(bad, ref) == parity.max_abs_rel(bad, ref) == parity.rel_l2(bad, ref) == math.inf
        assert parity.psnr_db(bad, ref) == -math.inf


def test_psnr_and_parity_metrics():
    ref = np.zeros((1, 3, 2, 2))
    got = np.full((1, 3, 2, 2), 0.2)  # in [0, 1] after (x + 1) / 2: every pixel off by 0.1 -> MSE 0.01
    assert parity.psnr_db(got, ref) == pytest.approx(20.0, abs=1e-9)
    assert parity.psnr_db(ref, ref) == pytest.approx(200.0)
    m = parity.parity_metrics("vae_decoder", ref, got)
    assert m == pytest.approx({"nonfinite": 0, "max_abs": 0.2, "max_abs_rel": 0.2, "rel_l2": math.sqrt(12 * 0.04),
                               "psnr_db": 20.0})
    nan = parity.parity_metrics("unet", ref, np.full_like(ref, np.nan))
    assert nan["nonfinite"] == 12 and nan["max_abs_rel"] == math.inf and "psnr_db" not in nan


def test_gates_named():
    assert parity.gate_for("unet", "fp32") == parity.FP32_GATE == ("max_abs_rel", 1e-4, "max")
    assert parity.gate_for("vae_decoder", "fp16") == ("psnr_db", 35.0, "min")
    assert parity.passes(1e-5, 1e-4, "max") and not parity.passes(34.0, 35.0, "min")
