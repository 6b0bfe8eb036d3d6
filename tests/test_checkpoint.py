"""Checkpoint folder round trips and diffusers-folder import, against diffusers/transformers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from training.checkpoint import (CheckpointError, LatentDiffusion, detect_kind, export_diffusers, load_models,
                                 save_checkpoint)
from training.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from training.models.unet import UNet, UNetConfig
from training.models.vae import AutoencoderKL, VAEConfig

BPE = Path(__file__).resolve().parent / "data" / "clip-bpe"  # OpenAI CLIP's BPE files, kept for the tests

SCHED = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "set_alpha_to_one": False,
         "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "timestep_spacing": "leading"}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def tiny_models(seed: int = 0) -> LatentDiffusion:
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention=(True, False), num_heads=2,
                           cross_attention_dim=32, norm_num_groups=8))
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.5))
    text = CLIPTextEncoder(TextEncoderConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2))
    for i, m in enumerate((unet, vae, text)):
        _randomize(m, seed + i)
    return LatentDiffusion(unet=unet, vae=vae, text_encoder=text, tokenizer_dir=BPE,
                           tokenizer_config={"model_max_length": 77, "pad_token": "<|endoftext|>",
                                             "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"},
                           scheduler_config=dict(SCHED), default_size=(32, 32))


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10.5, 900.0])
    ctx = torch.randn(2, 77, 32, generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    img = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    return x, t, ctx, ids, img


def _outputs(ld: LatentDiffusion):
    x, t, ctx, ids, img = _inputs()
    with torch.no_grad():
        return (ld.unet(x, t, ctx), ld.vae.decode(x), ld.vae.encode(img)[0], ld.text_encoder(ids))


def test_save_load_bit_exact(tmp_path):
    ld = tiny_models()
    out = save_checkpoint(ld, tmp_path / "ckpt")
    assert detect_kind(out) == "checkpoint"
    back = load_models(out)
    for a, b in ((ld.unet, back.unet), (ld.vae, back.vae), (ld.text_encoder, back.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), "save then load must be bit-exact"
        assert a.config == b.config
    for ya, yb in zip(_outputs(ld), _outputs(back)):
        assert torch.equal(ya, yb)
    assert back.scheduler_config == SCHED and back.default_size == (32, 32)
    assert back.vae_config.scaling_factor == 0.5 and back.scheduler_name == "pndm"


def test_fp16_weights_load_as_fp32(tmp_path):
    ld = tiny_models()
    back = load_models(save_checkpoint(ld, tmp_path / "ckpt", dtype=torch.float16))
    w = ld.unet.conv_in.weight.detach()
    assert back.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(back.unet.conv_in.weight, w.half().float())
    assert (tmp_path / "ckpt" / "unet" / "model.safetensors").stat().st_size < 0.6 * sum(
        p.numel() * 4 for p in ld.unet.parameters())


def test_existing_unrelated_folder_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(tiny_models(), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no temporary folders left behind"


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import training.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tiny_models(), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


# --- diffusers folders ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    """Our tiny models written in diffusers layout, then re-saved by diffusers itself."""
    from diffusers import StableDiffusionPipeline

    ld = tiny_models(seed=3)
    src = export_diffusers(ld, tmp_path_factory.mktemp("d") / "ours")
    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    out = tmp_path_factory.mktemp("d") / "sd"
    pipe.save_pretrained(out, safe_serialization=True)
    return ld, pipe, out


def test_diffusers_import_matches_diffusers(diffusers_dir):
    ld, pipe, folder = diffusers_dir
    assert detect_kind(folder) == "diffusers"
    back = load_models(folder)
    assert back.source_kind == "diffusers" and back.scheduler_name == "pndm"
    x, t, ctx, ids, img = _inputs(1)
    with torch.no_grad():
        d_unet = (back.unet(x, t, ctx) - pipe.unet(x, t, ctx).sample).abs().max().item()
        d_dec = (back.vae.decode(x) - pipe.vae.decode(x).sample).abs().max().item()
        d_enc = (back.vae.encode(img)[0] - pipe.vae.encode(img).latent_dist.mean).abs().max().item()
        d_txt = (back.text_encoder(ids) - pipe.text_encoder(ids).last_hidden_state).abs().max().item()
    print(f"diffusers import max abs: unet {d_unet:.2e} vae.decode {d_dec:.2e} vae.encode {d_enc:.2e} text {d_txt:.2e}")
    assert max(d_unet, d_dec, d_enc, d_txt) <= 1e-4
    # our own export and diffusers' re-save hold identical weights
    for a, b in ((ld.unet, back.unet), (ld.vae, back.vae), (ld.text_encoder, back.text_encoder)):
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert back.default_size == ld.default_size
    assert back.tokenizer_config["pad_token"] == "<|endoftext|>" and back.tokenizer_config["model_max_length"] == 77


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_missing_file_is_named(diffusers_dir, tmp_path):
    d = _copy(diffusers_dir[2], tmp_path)
    (d / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"vae/config.json: missing file"):
        load_models(d)


def test_pickle_weights_are_refused(diffusers_dir, tmp_path):
    d = _copy(diffusers_dir[2], tmp_path)
    w = d / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match=r"unet.*pickle.*diffusion_pytorch_model.bin"):
        load_models(d)


def test_corrupt_safetensors_is_named(diffusers_dir, tmp_path):
    d = _copy(diffusers_dir[2], tmp_path)
    (d / "text_encoder" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"text_encoder/model.safetensors: not a readable safetensors"):
        load_models(d)


def test_shape_mismatch_is_named(diffusers_dir, tmp_path):
    d = _copy(diffusers_dir[2], tmp_path)
    cfg = json.loads((d / "text_encoder" / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"text_encoder/model.safetensors: tensor '.*fc1.(weight|bias)' has shape \[64\], the config expects \[48\]"):
        load_models(d)


@pytest.mark.parametrize("key,value", [("addition_embed_type", "text_time"), ("class_embed_type", "timestep")])
def test_unsupported_unet_feature_is_refused(diffusers_dir, tmp_path, key, value):
    d = _copy(diffusers_dir[2], tmp_path)
    cfg = json.loads((d / "unet" / "config.json").read_text())
    cfg[key] = value
    (d / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"unet/config.json: .*{key}"):
        load_models(d)


def test_unknown_key_in_our_config_is_refused(tmp_path):
    out = save_checkpoint(tiny_models(), tmp_path / "ckpt")
    cfg = json.loads((out / "vae" / "config.json").read_text())
    cfg["mystery_knob"] = 3
    (out / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"vae/config.json: unknown VAEConfig keys \['mystery_knob'\]"):
        load_models(out)


def test_neither_kind_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="neither an ldm checkpoint folder"):
        load_models(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_models(tmp_path / "nope")


def test_outdated_scheduler_config_is_fixed_like_diffusers(diffusers_dir, tmp_path):
    """StableDiffusionPipeline rewrites steps_offset and clip_sample on load; so do we."""
    from diffusers import StableDiffusionPipeline

    d = _copy(diffusers_dir[2], tmp_path)
    cfg = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    cfg.update(steps_offset=0, clip_sample=True)
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    ours = load_models(d).scheduler_config
    theirs = StableDiffusionPipeline.from_pretrained(d, safety_checker=None, requires_safety_checker=False).scheduler.config
    assert (ours["steps_offset"], ours["clip_sample"]) == (theirs["steps_offset"], theirs["clip_sample"]) == (1, False)
