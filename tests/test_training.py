"""Training: config and data errors, BPE vocabulary, losses, scale factor, overfitting, SIGKILL resume, 2-process DDP.

Tiny configs throughout (32 px images, f=2 VAE of 16 channels, a 0.1M U-Net); the runs that must be
separate processes (SIGKILL, torchrun) start `python -m training.cli` with one torch thread each.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training import common
from training.bpe import learn_bpe, save_bpe
from training.checkpoint import load_vae, save_vae
from training.cli import main as cli_main
from training.common import ConfigError, parse_config
from training.data import caption_corpus
from training.losses import LPIPS, PatchDiscriminator, hinge_d_loss, min_snr_weights
from training.models.vae import AutoencoderKL, VAEConfig
from training.train_unet import UNetTrainConfig
from training.train_vae import ImageSource, VAETrainConfig, latent_scale_factor, psnr, ssim

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

TINY_UNET_ARGS = [
    "--image_size=32", "--train_length=16", "--block_out_channels=16,32", "--attention=false,true", "--head_dim=16",
    "--norm_num_groups=8", "--text_hidden_size=32", "--text_layers=1", "--text_heads=2",
    "--text_intermediate_size=64", "--bpe_merges=200", "--batch_size=4", "--threads=1", "--progress=false",
    "--eval_every=100000", "--warmup_steps=2", "--lr=2e-3",
]


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A random-init f=2 VAE (16 channels) for 32 px images, saved as `ldm train vae` saves it."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8,
                                  latent_channels=4, sample_size=32, mid_block_add_attention=False))
    with torch.no_grad():  # latents of std ~5, not ~1, so the scale factor has something to correct
        vae.quant_conv.weight[:4] *= 5.0
        vae.quant_conv.bias[:4] *= 5.0
    return save_vae(vae.eval(), tmp_path_factory.mktemp("vae") / "vae")


def _run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", "train", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)


def _state(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / common.STATE_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ----------------------------------------------------------------------------------------------
# configs and data errors

def test_config_overrides_and_errors():
    cfg, resume = parse_config(UNetTrainConfig, ["--batch_size=8", "--attention=true,false,true", "--zero_snr",
                                                 "--prediction_type=v_prediction", "--resume"])
    assert (cfg.batch_size, cfg.attention, cfg.zero_snr, resume) == (8, (True, False, True), True, True)
    with pytest.raises(ConfigError, match=r"unknown option --batch_sise \(did you mean --batch_size"):
        parse_config(UNetTrainConfig, ["--batch_sise=8"])
    with pytest.raises(ConfigError, match=r"--batch_size: expected int, got 'eight'"):
        parse_config(UNetTrainConfig, ["--batch_size=eight"])
    with pytest.raises(ConfigError, match=r"--bf16: expected a boolean"):
        parse_config(UNetTrainConfig, ["--bf16=maybe"])
    with pytest.raises(ConfigError, match=r"zero_snr=true needs --prediction_type=v_prediction"):
        parse_config(UNetTrainConfig, ["--zero_snr=true"])
    with pytest.raises(ConfigError, match=r"--prediction_type: expected one of epsilon, v_prediction"):
        parse_config(UNetTrainConfig, ["--prediction_type=x0"])
    with pytest.raises(ConfigError, match=r"--crop_size=30"):
        parse_config(VAETrainConfig, ["--crop_size=30"])


def test_cli_reports_bad_options_and_data_folders(tmp_path, capsys):
    assert cli_main(["train", "unet", "--max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown option --max_stepz" in err and "--max_steps" in err
    assert cli_main(["train", "gan"]) == 2
    assert "expected 'vae', 'unet', 'lcm' or 'set-vae'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "cat.png").write_bytes(b"not a png")  # unreadable, and without a caption
    assert cli_main(["train", "vae", f"--data={empty}", f"--out_dir={tmp_path / 'out'}", "--max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "no usable image/caption pairs" in err and str(empty) in err
    assert cli_main(["train", "unet", f"--out_dir={tmp_path / 'u'}", "--resume"]) == 2
    assert "no training state" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# BPE

def test_bpe_vocab_round_trips_through_both_tokenizers(tmp_path):
    from transformers import CLIPTokenizer as HFTokenizer

    from ldm_runtime.tokenizer import CLIPTokenizer

    corpus = caption_corpus(1000)
    vocab, merges = learn_bpe(corpus, max_merges=1000)
    folder = save_bpe(vocab, merges, tmp_path / "tok")
    # CLIP's layout: 512 byte symbols, the merges, the two specials last
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"] and len(vocab) == 512 + len(merges) + 2
    assert len(vocab) < 1000
    ours = CLIPTokenizer(folder / "vocab.json", folder / "merges.txt", pad_token="<|endoftext|>")
    hf = HFTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    texts = corpus[:50] + caption_corpus(50, split="heldout") + ["", "A Zebra!! 123, unseen words", "naïve café"]
    ids = ours(texts)
    ref = np.array(hf(texts, padding="max_length", max_length=77, truncation=True)["input_ids"])
    mismatched = int((ids != ref).any(1).sum())
    print(f"vocab {len(vocab)} tokens, {len(merges)} merges; {mismatched}/{len(texts)} prompts differ from transformers")
    assert mismatched == 0
    # every caption word of the built-in data is a single token, and decoding gives the text back
    assert all(len(ours.tokenize(w)) == 1 for c in corpus[:200] for w in c.replace(",", " ").replace(":", " ").split())
    for t in corpus[:20]:  # CLIP's decoding puts a space at every word end ("centre ,"), so compare without spaces
        assert ours.decode(ours.encode(t)[1:-1]).replace(" ", "") == t.lower().replace(" ", "")


# ----------------------------------------------------------------------------------------------
# losses and metrics

def test_losses_and_metrics(tmp_path):
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(psnr(x, x + 0.1), torch.full((2,), 20.0), atol=1e-4)  # mse 0.01 -> 20 dB
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    d = PatchDiscriminator(width=16, n_layers=2, groups=8)
    assert d(torch.randn(1, 3, 32, 32)).shape == (1, 1, 6, 6)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))  # relu(1 - r), relu(1 + f)
    snr = torch.tensor([0.0, 1.0, 5.0, 100.0])
    assert torch.allclose(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.05]))
    assert torch.allclose(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.0, 0.5, 5 / 6, 5 / 101]))
    # LPIPS from a local file: identical images are at distance 0; wrong files are refused by name
    torch.manual_seed(0)
    shapes = {}
    cin = 3
    for i, v in zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
                    (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)):
        k = 1 + sum(i >= a for a in (4, 9, 16, 23))
        shapes[f"net.slice{k}.{i}.weight"], shapes[f"net.slice{k}.{i}.bias"] = (v, cin, 3, 3), (v,)
        cin = v
    for k, c in enumerate((64, 128, 256, 512, 512)):
        shapes[f"lin{k}.model.1.weight"] = (1, c, 1, 1)
    save_file({k: torch.randn(s) * 0.05 for k, s in shapes.items()}, str(tmp_path / "lpips.safetensors"))
    lp = LPIPS(tmp_path / "lpips.safetensors")
    a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(lp(a, a)) == 0.0 and float(lp(a, b).abs()) > 0
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not LPIPS-VGG weights"):
        LPIPS(tmp_path / "bad.safetensors")


def test_training_state_is_safetensors_and_restores_exactly(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    ema, g = common.EMA(m, 0.9), torch.Generator().manual_seed(5)
    ema.update(m)
    cfg = UNetTrainConfig()
    p = common.save_state(tmp_path / common.STATE_FILE, config=cfg, step=7, data_pos=(1, 3), modules={"m": m},
                          emas={"m": ema}, optimizers={"m": opt}, generators={"g": g})
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed into place
    expect = (torch.randn(3, generator=g), np.random.rand(), m.weight.detach().clone())
    m2 = torch.nn.Linear(4, 3)
    opt2, ema2, g2 = torch.optim.AdamW(m2.parameters(), lr=1e-2), common.EMA(m2, 0.9), torch.Generator()
    index = common.load_state(p, modules={"m": m2}, emas={"m": ema2}, optimizers={"m": opt2}, generators={"g": g2})
    assert index["step"] == 7 and index["data_pos"] == [1, 3] and index["config"]["batch_size"] == cfg.batch_size
    assert torch.equal(torch.randn(3, generator=g2), expect[0]) and np.random.rand() == expect[1]
    assert torch.equal(m2.weight, expect[2]) and ema2.num_updates == 1
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(opt2.state_dict()["state"][0][k], v)
    with open(p, "rb") as f:  # a safetensors file: 8-byte header length, then a JSON header
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["__metadata__"]["index"]


# ----------------------------------------------------------------------------------------------
# the latent scale factor

def test_scale_factor_gives_unit_std_latents(tiny_vae_dir):
    vae = load_vae(tiny_vae_dir).eval()
    factor, std = latent_scale_factor(vae, ImageSource("shapes", 32, 1000, 0, "train"), 1000, seed=0, batch=250)
    # held-out images (the validation split), another posterior draw
    x = ImageSource("shapes", 32, 256, 0, "val").batch(np.arange(256))
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        z = vae.sample(mean, logvar, torch.Generator().manual_seed(1)) * factor
    s = float(z.std())
    print(f"scale factor {factor:.4f} (std {std:.4f} over 1000 images); scaled val latents std {s:.4f}")
    assert abs(s - 1.0) < 0.05


# ----------------------------------------------------------------------------------------------
# training runs

@pytest.mark.slow
def test_vae_stage_overfits_with_gan_and_writes_scale_factor(tmp_path):
    from training.train_vae import train
    cfg, _ = parse_config(VAETrainConfig, [
        f"--out_dir={tmp_path}", "--image_size=32", "--crop_size=0", "--train_length=4", "--batch_size=4",
        "--block_out_channels=16,16", "--norm_num_groups=8", "--max_steps=80", "--lr=3e-3", "--warmup_steps=5",
        "--disc_start=60", "--disc_weight=0.5", "--log_every=10", "--eval_every=80", "--eval_images=4",
        "--scale_images=16", "--ckpt_every=40", "--threads=1", "--progress=false"])
    result = train(cfg)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    l1 = [r["loss_l1"] for r in rows if "loss_l1" in r]
    gan = [r for r in rows if r.get("loss_d")]
    print(f"VAE overfit 4 images: mean L1 {l1[0]:.4f} (steps 1-10) -> {l1[-1]:.4f} (steps 71-80), "
          f"x{l1[0] / l1[-1]:.1f}; val PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.3f}; "
          f"GAN from step 60: adaptive weights {[round(r['w_adv'], 4) for r in gan]}")
    assert l1[-1] < l1[0] / 2
    assert gan and all(r["step"] > 60 and r["w_adv"] > 0 for r in gan)  # the delayed start, then a live weight
    vae = load_vae(tmp_path / "vae")
    assert vae.config.scaling_factor == pytest.approx(result["scaling_factor"]) and result["scale_images"] == 16
    assert (tmp_path / "loss_curves.png").is_file() and (tmp_path / "samples" / "recon_000080.png").is_file()


@pytest.mark.slow
def test_decoder_finetune_keeps_the_encoder_then_goes_into_the_checkpoint(tmp_path, tiny_checkpoint_dir):
    """--init + --train_encoder=false: the latents a U-Net was trained on stay valid (encoder bit-identical,
    scale factor kept) while the decoder alone learns (MSE down by a quarter or more on 4 images); `ldm train set-vae` then puts that decoder into the
    checkpoint, and refuses a VAE whose encoder differs (leaving the checkpoint as it was)."""
    import shutil

    from training.checkpoint import load_checkpoint
    from training.train_vae import evaluate, train

    ckpt = Path(shutil.copytree(tiny_checkpoint_dir, tmp_path / "ckpt"))
    init = load_vae(ckpt / "vae")  # a checkpoint's vae/ folder is a valid --init
    images = ImageSource("shapes", 32, 4, 0, "train")
    before = evaluate(init, images, 4)
    cfg, _ = parse_config(VAETrainConfig, [
        f"--out_dir={tmp_path / 'ft'}", f"--init={ckpt / 'vae'}", "--train_encoder=false", "--image_size=32",
        "--crop_size=0", "--train_length=4", "--batch_size=4", "--max_steps=60", "--lr=3e-3", "--warmup_steps=5",
        "--perceptual_weight=0", "--disc_weight=0", "--pixel_loss=mse", "--eval_every=60", "--eval_images=4",
        "--scale_images=16", "--ckpt_every=60", "--threads=1", "--progress=false"])
    train(cfg)
    ft = load_vae(tmp_path / "ft" / "vae")
    a, b = init.state_dict(), ft.state_dict()
    frozen = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    assert ft.config.scaling_factor == init.config.scaling_factor == 0.5  # the checkpoint's, not recomputed
    mse = lambda r: 10 ** (-r["psnr"] / 10)  # noqa: E731
    after = evaluate(ft, images, 4)
    print(f"decoder fine-tune, 60 steps on 4 images: PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB")
    assert mse(after) < 0.75 * mse(before)  # a random f=8 encoder keeps little; the decoder still learns

    # a VAE with another encoder does not fit the U-Net: refused, checkpoint untouched
    other = load_vae(tmp_path / "ft" / "vae")
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.01)
    save_vae(other, tmp_path / "other" / "vae")
    before_bytes = (ckpt / "vae" / "model.safetensors").read_bytes()
    assert cli_main(["train", "set-vae", str(ckpt), str(tmp_path / "other" / "vae")]) == 2
    assert (ckpt / "vae" / "model.safetensors").read_bytes() == before_bytes
    assert cli_main(["train", "set-vae", str(ckpt), str(tmp_path / "ft" / "vae")]) == 0
    ld = load_checkpoint(ckpt)
    got = ld.vae.state_dict()
    assert all(torch.equal(got[k], b[k]) for k in b)
    assert ld.extra["vae"]["decoder_finetune"] == str(tmp_path / "ft" / "vae")
    orig = load_checkpoint(tiny_checkpoint_dir)  # the U-Net and text encoder are untouched
    assert all(torch.equal(v, ld.unet.state_dict()[k]) for k, v in orig.unet.state_dict().items())

    with pytest.raises(ConfigError, match="--init"):
        train(parse_config(VAETrainConfig, [f"--out_dir={tmp_path / 'x'}", "--train_encoder=false"])[0])
    with pytest.raises(ConfigError, match="pixel_loss"):
        parse_config(VAETrainConfig, ["--pixel_loss=l2"])


def test_gradient_checkpointing_gives_the_same_gradients():
    from training.models.unet import UNet, UNetConfig
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=4, out_channels=4, block_out_channels=(16, 32), attention=(True, True),
                     layers_per_block=1, num_heads=None, head_dim=16, cross_attention_dim=32, norm_num_groups=8)
    grads = []
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 32)
    for ckpt in (False, True):
        torch.manual_seed(0)
        unet = UNet(UNetConfig(**{**cfg.__dict__, "gradient_checkpointing": ckpt})).train()
        unet(x, t, ctx).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    d = float((grads[0] - grads[1]).abs().max())
    print(f"gradient checkpointing: max grad diff {d:.2e}")
    assert d < 1e-6


def test_grow_attention_keeps_the_function_then_trains_the_new_blocks():
    """--grow_attention adds cross-attention to a trained U-Net: the grown one computes the same output
    (exactly: each new block's zero proj_out makes its residual add 0.0), every old weight carries over,
    only the new blocks' weights are new, a backward pass reaches them, and dropping a level is refused."""
    from types import SimpleNamespace

    from training.models.unet import UNet, UNetConfig
    from training.train_unet import build_unet, grow_attention
    torch.manual_seed(0)
    old = UNet(UNetConfig(in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), attention=(False, False, True),
                          layers_per_block=1, num_heads=None, head_dim=16, cross_attention_dim=32,
                          norm_num_groups=8)).eval()
    grown = grow_attention(old, (False, True, True)).eval()
    assert grown.config.attention == (False, True, True) and old.config.attention == (False, False, True)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.equal(old(x, t, ctx), grown(x, t, ctx))
    a, b = old.state_dict(), grown.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    added = sorted({k.split(".attentions.")[0] for k in b.keys() - a.keys()})
    assert added == ["down_blocks.1", "up_blocks.1"], added  # level 1 down, and its mirror on the way up
    grown.train()
    grown(x, t, ctx).pow(2).mean().backward()
    proj = grown.down_blocks[1].attentions[0].proj_out.weight
    assert float(proj.abs().max()) == 0.0 and float(proj.grad.abs().max()) > 0  # zero, yet it learns

    with pytest.raises(ConfigError, match=r"drops the checkpoint's attention at level\(s\) \[2\]"):
        grow_attention(old, (True, True, False))
    with pytest.raises(ConfigError, match=r"one flag per U-Net level \(3, .* got 2"):
        grow_attention(old, (True, True))
    cfg = UNetTrainConfig(grow_attention=(True, True, True))
    with pytest.raises(ConfigError, match=r"--grow_attention adds attention to an --init checkpoint's U-Net"):
        build_unet(cfg, None, SimpleNamespace(latent_channels=4, spatial_factor=2), 32)


@pytest.mark.slow
def test_unet_overfits_a_tiny_batch_and_exports(tmp_path, tiny_vae_dir):
    from training.checkpoint import load_models
    from training.train_unet import train

    cfg, _ = parse_config(UNetTrainConfig, [*TINY_UNET_ARGS, f"--out_dir={tmp_path}", f"--vae={tiny_vae_dir}",
                                            "--train_length=4", "--caption_dropout=0", "--max_steps=100",
                                            "--log_every=10", "--ckpt_every=1000", "--lr=3e-3"])
    t = time.time()
    train(cfg)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    first, last = losses[0], float(np.mean(losses[-2:]))
    print(f"overfit 4 latents: mean loss {first:.4f} (steps 1-10) -> {last:.4f} (steps 81-100), x{first / last:.1f}, "
          f"{time.time() - t:.1f} s")
    assert last < first / 3
    assert (tmp_path / "loss_curves.png").is_file()
    ld = load_models(tmp_path / "checkpoint")
    assert ld.text_config.vocab_size < 1000 and ld.scheduler_config["prediction_type"] == "epsilon"
    assert ld.vae_config.scaling_factor == json.loads((tiny_vae_dir / "config.json").read_text())["scaling_factor"]
    # the EMA weights are the exported ones
    state = _state(tmp_path)
    w = "unet.conv_out.weight"
    assert torch.equal(ld.unet.state_dict()["conv_out.weight"], state[f"ema/model/{w}"])


def test_zero_snr_scheduler_config_and_schedule():
    from training.train_unet import scheduler_config, training_alphas_cumprod
    cfg, _ = parse_config(UNetTrainConfig, ["--prediction_type=v_prediction", "--zero_snr=true"])
    sc = scheduler_config(cfg)
    assert (sc["rescale_betas_zero_snr"], sc["timestep_spacing"], sc["prediction_type"]) == (True, "trailing", "v_prediction")
    ab = training_alphas_cumprod(cfg)
    assert float(ab[-1]) == 0.0 and float(ab[0]) > 0.99  # SNR(T) = 0 exactly
    assert float(training_alphas_cumprod(UNetTrainConfig())[-1]) > 1e-3


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path, tiny_vae_dir):
    args = [*TINY_UNET_ARGS, f"--vae={tiny_vae_dir}", "--max_steps=24", "--ckpt_every=4", "--log_every=4",
            "--min_snr_gamma=5"]
    ref = _run_cli(["unet", *args, f"--out_dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", "train", "unet", *args, f"--out_dir={out}"],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    index = out / "train_state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if index.is_file() and json.loads(index.read_text())["step"] >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read()[-1000:]}")
    killed_at = json.loads(index.read_text())["step"]
    res = _run_cli(["unet", *args, f"--out_dir={out}", "--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _state(tmp_path / "ref"), _state(out)
    assert a.keys() == b.keys()
    differ = [k for k in a if not k.startswith("rng/") and not torch.equal(a[k], b[k])]
    print(f"killed after the state at step {killed_at}; resumed to 24: {len(a)} tensors, {len(differ)} differ")
    assert not differ, differ[:5]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, tiny_vae_dir):
    args = [*TINY_UNET_ARGS, f"--vae={tiny_vae_dir}", "--max_steps=4", "--ckpt_every=4", "--log_every=1",
            "--batch_size=4"]
    from training.train_unet import train
    train(parse_config(UNetTrainConfig, [*args, f"--out_dir={tmp_path / 'one'}"])[0])  # in this process
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "training.cli", "train", "unet", *args, f"--out_dir={tmp_path / 'two'}"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _state(tmp_path / "one"), _state(tmp_path / "two")
    diff = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a if k.startswith("model/")])
    la = [r["loss"] for r in map(json.loads, (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    lb = [r["loss"] for r in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    print(f"2 procs x batch 2 vs 1 proc x batch 4, 4 steps (lr 2e-3): weight diff mean {float(diff.mean()):.2e}, "
          f"max {float(diff.max()):.2e}, {float((diff > 1e-6).double().mean()):.2%} of {diff.numel()} above 1e-6; "
          f"losses {la} vs {lb}")
    # The gradients differ only by float summation order (all_reduce of two half-batch means vs one
    # mean). Adam divides by sqrt(v): where a gradient entry is ~0, a rounding-level change in it moves
    # that weight by up to a fraction of lr, so the bound is on the mean and, loosely, on the maximum.
    assert float(diff.mean()) < 1e-6 and float(diff.max()) < 0.1 * 2e-3
    assert np.allclose(la, lb, rtol=1e-5, atol=0)
    assert len(lb) == len(la) == 4  # one line per step: only rank 0 writes the log


def test_timestep_bias_weights_match_the_closed_form():
    """--timestep_bias: the biased share of draws is p m / (p m + 1 - p) ("earlier"/"later"), and the
    draws follow the weights (binomial 5-sigma band on 200,000 draws); bad values are refused."""
    from training.train_unet import timestep_weights
    assert timestep_weights(UNetTrainConfig()) is None  # uniform: plain randint, as before
    for bias, p, m in (("earlier", 0.4, 4.0), ("later", 0.25, 3.0)):
        w = timestep_weights(UNetTrainConfig(timestep_bias=bias, timestep_bias_portion=p, timestep_bias_multiplier=m))
        k = int(round(p * 1000))
        part = w[:k] if bias == "earlier" else w[-k:]
        expect = p * m / (p * m + 1 - p)
        assert abs(float(part.sum()) - expect) < 1e-12 and abs(float(w.sum()) - 1) < 1e-12
        draws = torch.multinomial(w, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
        share = float(((draws < k) if bias == "earlier" else (draws >= 1000 - k)).double().mean())
        assert abs(share - expect) < 5 * (expect * (1 - expect) / 200_000) ** 0.5, (bias, share, expect)
    w = timestep_weights(UNetTrainConfig(timestep_bias="range", timestep_bias_begin=100, timestep_bias_end=300,
                                         timestep_bias_multiplier=0.5))  # < 1 draws the range less often
    assert torch.allclose(w[150] / w[50], torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"--timestep_bias: expected one of none, earlier, later, range"):
        parse_config(UNetTrainConfig, ["--timestep_bias=early"])
    with pytest.raises(ConfigError, match=r"--timestep_bias_multiplier: expected a number > 0, got 0"):
        parse_config(UNetTrainConfig, ["--timestep_bias=earlier", "--timestep_bias_multiplier=0"])
    with pytest.raises(ConfigError, match=r"--timestep_bias=range needs 0 <= .* got \[300, 1200\)"):
        parse_config(UNetTrainConfig, ["--timestep_bias=range", "--timestep_bias_begin=300", "--timestep_bias_end=1200"])


@pytest.mark.slow
def test_init_fine_tunes_a_checkpoint_and_refuses_a_mismatched_one(tmp_path, tiny_vae_dir):
    """--init starts from a trained checkpoint's U-Net, text encoder and tokenizer: after 2 Adam steps at
    lr 1e-3 every exported weight is within 2 lr (plus weight decay) of the checkpoint's, and the run
    keeps its architecture; a checkpoint with another schedule or autoencoder is refused."""
    from training.checkpoint import load_models
    from training.train_unet import train

    base = [*TINY_UNET_ARGS, f"--vae={tiny_vae_dir}", "--ckpt_every=1000", "--log_every=1"]
    train(parse_config(UNetTrainConfig, [*base, f"--out_dir={tmp_path / 'a'}", "--max_steps=3"])[0])
    src = load_models(tmp_path / "a" / "checkpoint")
    cfg, _ = parse_config(UNetTrainConfig, [*base, f"--out_dir={tmp_path / 'b'}", f"--init={tmp_path / 'a' / 'checkpoint'}",
                                            "--max_steps=2", "--lr=1e-3", "--warmup_steps=0", "--min_lr_ratio=1",
                                            "--block_out_channels=8,8", "--timestep_bias=earlier",
                                            "--timestep_bias_multiplier=3"])
    train(cfg)
    got = load_models(tmp_path / "b" / "checkpoint")
    assert got.unet.config.block_out_channels == (16, 32)  # from the checkpoint, not the flag
    assert (tmp_path / "b" / "checkpoint" / "tokenizer" / "vocab.json").read_bytes() == \
        (tmp_path / "a" / "checkpoint" / "tokenizer" / "vocab.json").read_bytes()
    for name in ("unet", "text_encoder"):
        a, b = getattr(src, name).state_dict(), getattr(got, name).state_dict()
        d = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"--init, 2 steps at lr 1e-3: {name} max weight change {d:.2e}")
        assert 0 < d <= 2 * 1e-3 * 1.01 + 1e-3 * 0.01 * 2 * max(float(v.abs().max()) for v in a.values())

    with pytest.raises(ConfigError, match=r"another diffusion schedule.*prediction_type: checkpoint 'epsilon', this run 'v_prediction'"):
        train(parse_config(UNetTrainConfig, [*base, f"--out_dir={tmp_path / 'c'}", f"--init={tmp_path / 'a' / 'checkpoint'}",
                                             "--prediction_type=v_prediction"])[0])
    other = AutoencoderKL(VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8,
                                    latent_channels=4, sample_size=32, mid_block_add_attention=False, scaling_factor=0.7))
    other_dir = save_vae(other.eval(), tmp_path / "other" / "vae")
    with pytest.raises(ConfigError, match=r"trained on latents of another autoencoder"):
        train(parse_config(UNetTrainConfig, [*base, f"--out_dir={tmp_path / 'd'}", f"--vae={other_dir}",
                                             f"--init={tmp_path / 'a' / 'checkpoint'}"])[0])
    with pytest.raises(ConfigError, match=r"--init=.*nowhere"):
        train(parse_config(UNetTrainConfig, [*base, f"--out_dir={tmp_path / 'e'}", f"--init={tmp_path / 'nowhere'}"])[0])
