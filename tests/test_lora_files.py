"""ldm_runtime.lora: LoRA files in every format read without torch, their deltas against
diffusers' ``fuse_lora`` (fused minus base weight, per parameter), and every refusal."""
from __future__ import annotations

import hashlib
import json
import pickle
import zipfile

import numpy as np
import pytest

from ldm_runtime.lora import LoraError, layers_per_block, lora_deltas, read_lora
from tests.lora_files import (TARGETS, fused_deltas, kohya_name, load_pipeline, lora_pair, save_peft_unet_lora,
                              weight_shapes, write_lora)

REL_TOL = 1e-6  # |ours - diffusers| / max |W|: float32 rounding of W + delta is ~6e-8


def assert_deltas_match(ours: dict, ref: dict, base: dict) -> None:
    assert sorted(ours) == sorted(ref)
    for name, delta in ours.items():
        assert delta.dtype == np.float32 and delta.shape == base[name].shape, name
        err = np.abs(delta - ref[name]).max() / np.abs(base[name]).max()
        assert err <= REL_TOL, f"{name}: {err:.2e}"


@pytest.fixture(scope="module")
def sd(tiny_diffusers_dir, one_torch_thread):
    """(the tiny SD pipeline, its weight shapes keyed as LoraFile.modules)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")  # diffusers' load_lora_weights needs it
    pipe = load_pipeline(tiny_diffusers_dir)
    return pipe, weight_shapes(pipe)


@pytest.fixture(scope="module")
def peft_files(sd, tmp_path_factory):
    """peft U-Net LoRAs (r 4, alpha 8, to_k at rank 2, to_v at alpha 16) with and without metadata."""
    out = {}
    for metadata in (True, False):
        d = tmp_path_factory.mktemp(f"peft-{metadata}")
        out[metadata] = save_peft_unet_lora(sd[0], d, metadata=metadata, seed=int(metadata), r=4, lora_alpha=8,
                                            target_modules=TARGETS, rank_pattern={"to_k": 2},
                                            alpha_pattern={"to_v": 16})
    return out


def kohya_sd_file(path, shapes, seed=0):
    """A kohya file for the tiny SD: attention, a 1x1 proj_in, a 3x3 conv, time_emb_proj, ff,
    alphas that differ per U-Net module; the text encoder's q/k/v/out_proj and an MLP fc1 (alpha 2).
    Attention projections share one alpha: diffusers 0.42.1 gives every attention module of a
    kohya file the most common alpha (its alpha_pattern keys name attention processors), while
    kohya's merge and this runtime use each module's own (test_closed_form_delta)."""
    rng = np.random.default_rng(seed)
    unet = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (4, 2.0),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (4, 2.0),
            "down_blocks.0.attentions.0.proj_in": (2, 1.0),
            "down_blocks.0.resnets.0.conv1": (4, 1.0),
            "up_blocks.1.resnets.1.conv_shortcut": (4, 3.0),
            "down_blocks.1.resnets.0.time_emb_proj": (3, 6.0),
            "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": (4, 2.0),
            "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": (4, 2.0)}
    text = {f"text_model.encoder.layers.0.self_attn.{p}_proj": (4, 2.0) for p in "qkvo"}
    text = {k.replace("o_proj", "out_proj"): v for k, v in text.items()}
    text["text_model.encoder.layers.1.mlp.fc1"] = (4, 2.0)
    tensors = {}
    for prefix, component, modules in (("lora_unet_", "unet", unet), ("lora_te_", "text_encoder", text)):
        for module, (rank, alpha) in modules.items():
            name = kohya_name(prefix, module)
            down, up = lora_pair(rng, shapes[f"{component}.{module}.weight"], rank)
            tensors.update({f"{name}.lora_down.weight": down.astype(np.float16), f"{name}.lora_up.weight": up,
                            f"{name}.alpha": np.array(alpha, np.float32)})
    return write_lora(path, tensors)


def text_encoder_file(path, shapes, seed=0, old=False):
    """A text-encoder LoRA as a state dict (peft names; ``old``: diffusers' lora_linear_layer)."""
    rng = np.random.default_rng(seed)
    a, b = (".lora_linear_layer.down", ".lora_linear_layer.up") if old else (".lora_A", ".lora_B")
    tensors = {}
    for layer in (0, 1):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc2"):
            module = f"text_model.encoder.layers.{layer}.{proj}"
            down, up = lora_pair(rng, shapes[f"text_encoder.{module}.weight"], 4)
            tensors.update({f"text_encoder.{module}{a}.weight": down, f"text_encoder.{module}{b}.weight": up})
    return write_lora(path, tensors)


@pytest.mark.parametrize("metadata", [True, False], ids=["metadata", "no-metadata"])
def test_peft_unet_lora_matches_fuse_lora(sd, peft_files, metadata):
    lora = read_lora(peft_files[metadata])
    assert lora.format == "peft"
    assert lora.sha256 == hashlib.sha256(peft_files[metadata].read_bytes()).hexdigest()
    assert any(m.up.ndim == 4 and m.down.shape[2:] == (3, 3) for m in lora.modules.values())  # a 3x3 conv target
    ref, base = fused_deltas(sd[0], [(peft_files[metadata], 0.7)])
    assert_deltas_match(lora_deltas([(lora, 0.7)], sd[1]), ref, base)


def test_peft_metadata_gives_the_scale_rule(peft_files):
    """alpha / rank from the metadata: 8/4, to_k at rank 2 (8/2), to_v at alpha 16 (16/4);
    without metadata alpha = rank (1)."""
    with_meta, without = read_lora(peft_files[True]).modules, read_lora(peft_files[False]).modules
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert [with_meta[f"{attn}.{p}.weight"].scaling for p in ("to_q", "to_k", "to_v")] == [2.0, 4.0, 4.0]
    assert {m.scaling for m in without.values()} == {1.0}


def test_rslora_metadata_and_text_encoder_names_without_text_model(tmp_path):
    """use_rslora: alpha / sqrt(rank); a text-encoder key written without ``text_model.`` (as
    transformers 5 names CLIPTextModel's weights) names the same parameter as one with it."""
    rng = np.random.default_rng(0)
    down, up = lora_pair(rng, (6, 6), 4)
    q = "encoder.layers.0.self_attn.q_proj"
    tensors = {f"text_encoder.{q}.lora_A.weight": down, f"text_encoder.{q}.lora_B.weight": up}
    meta = {"lora_adapter_metadata": json.dumps({"text_encoder.r": 4, "text_encoder.lora_alpha": 8,
                                                 "text_encoder.use_rslora": True})}
    lora = read_lora(write_lora(tmp_path / "rs.safetensors", tensors, meta))
    assert list(lora.modules) == [f"text_encoder.text_model.{q}.weight"]
    assert lora.modules[f"text_encoder.text_model.{q}.weight"].scaling == 8 / 2


def test_kohya_lora_matches_fuse_lora(sd, tmp_path):
    path = kohya_sd_file(tmp_path / "style.safetensors", sd[1])
    lora = read_lora(path)
    assert lora.format == "kohya"
    assert lora.modules["unet.down_blocks.0.attentions.0.proj_in.weight"].up.shape[2:] == (1, 1)  # SD 1.x: 1x1 conv
    ref, base = fused_deltas(sd[0], [(path, 0.8)])
    assert_deltas_match(lora_deltas([(lora, 0.8)], sd[1]), ref, base)


@pytest.mark.parametrize("old", [False, True], ids=["peft", "lora_linear_layer"])
def test_text_encoder_lora_matches_fuse_lora(sd, tmp_path, old):
    path = text_encoder_file(tmp_path / "te.safetensors", sd[1], old=old)
    lora = read_lora(path)
    assert lora.format == ("diffusers-old" if old else "peft")
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in lora.modules)
    ref, base = fused_deltas(sd[0], [(path, 1.3)])
    assert_deltas_match(lora_deltas([(lora, 1.3)], sd[1]), ref, base)


def test_two_loras_at_their_scales_sum(sd, peft_files, tmp_path):
    kohya = kohya_sd_file(tmp_path / "k.safetensors", sd[1], seed=3)
    loras = [(peft_files[True], 0.6), (kohya, -0.4)]
    ref, base = fused_deltas(sd[0], loras)
    ours = lora_deltas([(read_lora(p), s) for p, s in loras], sd[1])
    assert_deltas_match(ours, ref, base)


def test_scale_zero_gives_zero_deltas(sd, peft_files):
    deltas = lora_deltas([(read_lora(peft_files[True]), 0.0)], sd[1])
    assert deltas and all(not d.any() for d in deltas.values())


def test_old_diffusers_unet_format_equals_peft(sd, peft_files, tmp_path):
    """``lora.down``/``lora.up`` and attention processors' ``to_q_lora`` name the same modules as peft."""
    from safetensors.numpy import load_file

    peft = load_file(str(peft_files[False]))
    old = {}
    for key, value in peft.items():
        key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        for proj, proc in (("to_q", "to_q_lora"), ("to_out.0", "to_out_lora")):
            key = key.replace(f".{proj}.lora.", f".processor.{proc}.")
        old[key] = value
    assert any(".processor.to_out_lora." in k for k in old) and any(".lora.down." in k for k in old)
    a, b = read_lora(peft_files[False]), read_lora(write_lora(tmp_path / "old.safetensors", old))
    assert b.format == "diffusers-old" and a.modules.keys() == b.modules.keys()
    want = lora_deltas([(a, 1.0)], sd[1])
    for name, d in lora_deltas([(b, 1.0)], sd[1]).items():
        np.testing.assert_array_equal(d, want[name])


def test_bf16_and_fp16_tensors_read_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    down, up = torch.randn(2, 5, dtype=torch.bfloat16), torch.randn(6, 2, dtype=torch.float16)
    path = tmp_path / "half.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up}, str(path))
    m = read_lora(path).modules["unet.conv_in.weight"]
    np.testing.assert_array_equal(m.down, down.float().numpy())
    np.testing.assert_array_equal(m.up, up.float().numpy())
    assert m.down.dtype == m.up.dtype == np.float32


def every_module(model) -> dict[str, tuple[int, ...]]:
    import torch

    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def test_kohya_names_of_every_module_map_back(sd, tmp_path):
    """Each Linear/Conv2d of the tiny SD U-Net and CLIP, named as kohya names it, reads back
    as that module's weight."""
    pipe = sd[0]
    rng, tensors, want = np.random.default_rng(0), {}, set()
    models = (("lora_unet_", "unet", pipe.unet), ("lora_te_", "text_encoder", pipe.text_encoder))
    for prefix, component, model in models:
        for module, shape in every_module(model).items():
            module = module if component == "unet" else "text_model." + module
            down, up = lora_pair(rng, shape, 1)
            name = kohya_name(prefix, module)
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
            want.add(f"{component}.{module}.weight")
    assert set(read_lora(write_lora(tmp_path / "all.safetensors", tensors)).modules) == want


SGM = {  # sgm name -> diffusers module on the tiny SDXL U-Net (layers_per_block 2)
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_2_0_emb_layers_1": "down_blocks.0.resnets.1.time_emb_proj",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_5_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k",
    "middle_block_1_transformer_blocks_0_attn1_to_q": "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_0_1_transformer_blocks_0_ff_net_2": "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_5_0_skip_connection": "up_blocks.1.resnets.2.conv_shortcut",
    "time_embed_0": "time_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
}


@pytest.mark.slow
def test_sdxl_sgm_kohya_lora_matches_fuse_lora(tmp_path, one_torch_thread):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tests.conftest import build_tiny_sdxl

    pipe = load_pipeline(build_tiny_sdxl(tmp_path / "sdxl"))
    shapes = weight_shapes(pipe)
    rng, tensors = np.random.default_rng(0), {}
    named = {f"lora_unet_{k}": f"unet.{v}" for k, v in SGM.items()}
    for te, component in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            module = f"text_model.encoder.layers.1.self_attn.{proj}"
            named[kohya_name(te, module)] = f"{component}.{module}"
    for name, module in named.items():
        down, up = lora_pair(rng, shapes[f"{module}.weight"], 2)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": np.array(1.0, np.float32)})
    path = write_lora(tmp_path / "sdxl-lora.safetensors", tensors)
    lpb = layers_per_block(shapes)
    assert lpb == 2
    with pytest.raises(LoraError, match="layers_per_block"):
        read_lora(path)
    lora = read_lora(path, unet_layers_per_block=lpb)
    assert set(lora.modules) == {f"{m}.weight" for m in named.values()}
    ref, base = fused_deltas(pipe, [(path, 0.9)])
    assert_deltas_match(lora_deltas([(lora, 0.9)], shapes), ref, base)


# -- refusals: one LoraError naming the file and the key ---------------------------------------

def small_kohya(tmp_path, name="ok.safetensors", extra=None, rank=2, out=6, inp=5):
    rng = np.random.default_rng(0)
    down, up = lora_pair(rng, (out, inp), rank)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": np.array(1.0, np.float32)}
    return write_lora(tmp_path / name, {**tensors, **(extra or {})})


TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"


@pytest.mark.parametrize("extra, match", [
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale": np.ones((1, 5), np.float32)},
     "dora_scale.*DoRA"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1": np.ones((2, 2), np.float32)}, "lokr_w1.*LoKr"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": np.ones((2, 2), np.float32)}, "hada_w1_a.*LoHa"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight": np.ones((2, 2), np.float32)}, "lora_mid.weight"),
    ({"unet.down_blocks.0.resnets.0.conv1.lora_A.weight": np.ones((2, 2), np.float32)}, "peft format"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.alpha": np.array(1.0, np.float32)}, "no lora_down/lora_up"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": np.ones((2, 3), np.float32)}, "no matching up"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": np.array(0.0, np.float32)},
     "non-zero alpha"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": np.full((2, 3), np.nan, np.float32),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": np.ones((4, 2), np.float32)}, "non-finite"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": np.ones((2, 3), np.float32),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": np.ones((4, 3), np.float32)}, "not a LoRA pair"),
    ({"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": np.ones((2, 3), np.float32),
      "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": np.ones((4, 2), np.float32)}, "layers_per_block"),
])
def test_keys_that_cannot_be_applied_are_refused(tmp_path, extra, match):
    path = small_kohya(tmp_path, extra=extra)
    with pytest.raises(LoraError, match=match) as e:
        read_lora(path)
    assert str(path) in str(e.value) and "key '" in str(e.value)


def test_peft_bias_and_dora_metadata_are_refused(tmp_path):
    a, b = np.ones((2, 5), np.float32), np.ones((6, 2), np.float32)
    base = {"unet.conv_in.lora_A.weight": a, "unet.conv_in.lora_B.weight": b}
    with pytest.raises(LoraError, match="lora_B.bias.*biases"):
        read_lora(write_lora(tmp_path / "bias.safetensors", {**base, "unet.conv_in.lora_B.bias": b[:, 0]}))
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2, "unet.use_dora": True})}
    with pytest.raises(LoraError, match="use_dora"):
        read_lora(write_lora(tmp_path / "dora.safetensors", base, meta))
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2})}
    with pytest.raises(LoraError, match="unet.conv_in.lora_A.weight.*rank 2.*r = 4"):
        read_lora(write_lora(tmp_path / "rank.safetensors", base, meta))


def test_files_that_are_not_safetensors_are_refused_unread(tmp_path):
    pt = tmp_path / "lora.pt"
    with zipfile.ZipFile(pt, "w") as z:  # what torch.save writes
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}))
    legacy = tmp_path / "lora.ckpt"
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    for path in (pt, legacy):
        with pytest.raises(LoraError, match="pickle.*never loaded") as e:
            read_lora(path)
        assert str(path) in str(e.value)
    text = tmp_path / "notes.safetensors"
    text.write_bytes(b"hello, this is not a LoRA file at all")
    with pytest.raises(LoraError, match="does not fit|not JSON"):
        read_lora(text)
    with pytest.raises(LoraError, match="cannot be read"):
        read_lora(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("cut", [3, 40, -7])
def test_truncated_file_is_refused(tmp_path, cut):
    path = small_kohya(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(LoraError, match="truncated") as e:
        read_lora(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", None, True])
def test_non_finite_or_non_number_scale_is_refused(tmp_path, scale):
    lora = read_lora(small_kohya(tmp_path))
    with pytest.raises(LoraError, match="scale .* expected a finite number") as e:
        lora_deltas([(lora, scale)], {TO_Q: (6, 5)})
    assert str(lora.path) in str(e.value)


def test_target_absent_from_the_bundle_is_refused(tmp_path):
    lora = read_lora(small_kohya(tmp_path))
    with pytest.raises(LoraError, match="attn1_to_q.lora_down.weight.*not a weight of this bundle") as e:
        lora_deltas([(lora, 1.0)], {"unet.conv_in.weight": (6, 4, 3, 3)})
    assert str(lora.path) in str(e.value)


def test_lora_for_another_model_is_refused_on_shape(tmp_path):
    """An SDXL-sized to_q (640 wide, say) on a smaller model: the delta's shape names both."""
    lora = read_lora(small_kohya(tmp_path))
    with pytest.raises(LoraError, match=r"attn1_to_q.lora_down.weight.*shape \[6, 5\].*shape is \[6, 8\]"):
        lora_deltas([(lora, 1.0)], {TO_Q: (6, 8)})
    assert lora_deltas([(lora, 1.0)], {TO_Q: (6, 5)})[TO_Q].shape == (6, 5)


def test_closed_form_delta(tmp_path):
    """scale x alpha / rank x up @ down, alpha 1 and rank 2; convs by the peft/kohya einsum."""
    lora = read_lora(small_kohya(tmp_path))
    m = lora.modules[TO_Q]
    d = lora_deltas([(lora, 0.5)], {TO_Q: (6, 5)})[TO_Q]
    np.testing.assert_allclose(d, 0.5 * 0.5 * (m.up.astype(np.float64) @ m.down), rtol=1e-6, atol=0)
    rng = np.random.default_rng(1)
    down, up = lora_pair(rng, (4, 3, 3, 3), 2)
    conv = read_lora(write_lora(tmp_path / "c.safetensors", {"lora_unet_conv_in.lora_down.weight": down,
                                                             "lora_unet_conv_in.lora_up.weight": up}))
    d = lora_deltas([(conv, 2.0)], {"unet.conv_in.weight": (4, 3, 3, 3)})["unet.conv_in.weight"]
    want = 2.0 * np.tensordot(up[:, :, 0, 0].astype(np.float64), down, axes=(1, 0))
    np.testing.assert_allclose(d, want, rtol=1e-6, atol=1e-7)
