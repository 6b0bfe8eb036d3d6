"""The KL autoencoder against diffusers' AutoencoderKL: same keys, same numbers, same size; ONNX export."""

import numpy as np
import pytest
import torch

from training.models.vae import AutoencoderKL, UnsupportedConfigError, VAEConfig, kl_divergence

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # fp32, CPU

# Stable Diffusion 1.x / 2.x `vae/config.json`, as shipped (diffusers 0.6 era: no scaling_factor key)
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD_VAE_PARAMS = 83_653_863

CONFIGS = {
    "f2": VAEConfig(block_out_channels=(32, 64), norm_num_groups=8, sample_size=64),
    "f4_lpb1": VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, sample_size=64),
    "lat8_noattn": VAEConfig(block_out_channels=(32, 64), norm_num_groups=8, latent_channels=8,
                             mid_block_add_attention=False, sample_size=64),
    "noquant": VAEConfig(block_out_channels=(16, 32), norm_num_groups=4, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.1, scaling_factor=0.3, sample_size=64),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Fresh random weights everywhere (some libraries zero-init output convs), scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(r / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)


def make_pair(cfg: VAEConfig):
    ref = diffusers.AutoencoderKL(**cfg.to_diffusers()).eval()
    randomize_(ref)
    ours = AutoencoderKL(cfg).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_diffusers(name):
    cfg = CONFIGS[name]
    ref, ours = make_pair(cfg)
    assert ours.num_parameters() == ref.num_parameters()
    f = cfg.spatial_factor
    x = torch.rand(2, 3, 8 * f, 6 * f, generator=torch.Generator().manual_seed(1)) * 2 - 1  # non-square
    z = torch.randn(2, cfg.latent_channels, 5, 7, generator=torch.Generator().manual_seed(2))  # odd latent size
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        recon_ref = ref.decode(z).sample
        recon = ours.decode(z)
        fwd_ref = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        fwd, fwd_mean, _ = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
    assert mean.shape == (2, cfg.latent_channels, 8, 6) and recon.shape == (2, cfg.out_channels, 5 * f, 7 * f)
    d_mean = (mean - post.mean).abs().max().item()
    d_logvar = (logvar - post.logvar).abs().max().item()
    d_dec = (recon - recon_ref).abs().max().item()
    d_fwd = (fwd - fwd_ref).abs().max().item()
    d_kl = (kl_divergence(mean, logvar) - post.kl()).abs().max().item() / post.kl().abs().max().item()
    print(f"{name}: max abs diff mean {d_mean:.2e} logvar {d_logvar:.2e} decode {d_dec:.2e} "
          f"forward(sampled) {d_fwd:.2e}; kl rel diff {d_kl:.2e}")
    assert d_mean <= TOL and d_logvar <= TOL and d_dec <= TOL and d_fwd <= TOL and d_kl <= TOL
    assert recon.abs().mean() > 0.05  # the comparison was not between two near-zero tensors


def test_sd_vae_on_meta_device():
    cfg = VAEConfig.from_diffusers(SD_VAE_CONFIG)
    assert cfg == VAEConfig()  # our defaults are SD's VAE
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        ref = diffusers.AutoencoderKL(**{k: v for k, v in SD_VAE_CONFIG.items() if not k.startswith("_")})
    n_ours, n_ref = ours.num_parameters(), sum(p.numel() for p in ref.parameters())
    print(f"SD VAE parameters: ours {n_ours:,} diffusers {n_ref:,}")
    assert n_ours == n_ref == SD_VAE_PARAMS
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert cfg.spatial_factor == 8


def test_config_round_trip():
    for cfg in CONFIGS.values():
        assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    # harmless keys are accepted: force_upcast (we keep fragile ops in fp32 at export) and `_`-prefixed metadata
    assert VAEConfig.from_diffusers({**SD_VAE_CONFIG, "force_upcast": False, "_name_or_path": "x"}) == VAEConfig()


@pytest.mark.parametrize("key, value", [
    ("act_fn", "relu"),
    ("down_block_types", ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"] * 3),
    ("latents_mean", [0.0] * 4),
    ("latents_std", [1.0] * 4),
    ("norm_num_groups", 24),
    ("sample_size", [512, 768]),
    ("mystery_option", 1),
])
def test_from_diffusers_refuses(key, value):
    with pytest.raises(UnsupportedConfigError, match=key) as e:
        VAEConfig.from_diffusers({**SD_VAE_CONFIG, key: value})
    print(e.value)


def test_config_validation():
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(32, 48), norm_num_groups=32)
    with pytest.raises(ValueError, match="latent_channels"):
        VAEConfig(latent_channels=0)
    with pytest.raises(ValueError, match="sample_size"):
        VAEConfig(sample_size=100)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        AutoencoderKL(CONFIGS["f2"]).decode(torch.zeros(1, 3, 4, 4))


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
def test_onnx_export_decoder_and_encoder(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cfg = VAEConfig(block_out_channels=(16, 32), norm_num_groups=4, sample_size=64)
    _, model = make_pair(cfg)

    class Decode(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return self.vae.decode(z)

    class Encode(Decode):
        def forward(self, x):
            return self.vae.encode(x)

    axes = {0: "B", 2: "H", 3: "W"}
    torch.onnx.export(Decode(model), (torch.randn(1, 4, 8, 8),), tmp_path / "dec.onnx", dynamo=False,
                      opset_version=18, input_names=["latents"], output_names=["image"],
                      dynamic_axes={"latents": axes, "image": axes})
    torch.onnx.export(Encode(model), (torch.randn(1, 3, 16, 16),), tmp_path / "enc.onnx", dynamo=False,
                      opset_version=18, input_names=["image"], output_names=["mean", "logvar"],
                      dynamic_axes={"image": axes, "mean": axes, "logvar": axes})
    dec = ort.InferenceSession(str(tmp_path / "dec.onnx"), providers=["CPUExecutionProvider"])
    enc = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(4)
    for shape in [(1, 4, 6, 10), (2, 4, 7, 5)]:  # neither is the export shape
        z = torch.randn(shape, generator=g)
        with torch.no_grad():
            want = model.decode(z).numpy()
        got = dec.run(None, {"latents": z.numpy()})[0]
        d = float(np.abs(got - want).max())
        print(f"decoder onnxruntime vs torch at latents {shape}: max abs diff {d:.2e}")
        assert got.shape == want.shape and d <= TOL
    x = torch.rand(2, 3, 12, 20, generator=g) * 2 - 1
    with torch.no_grad():
        want = [t.numpy() for t in model.encode(x)]
    got = enc.run(None, {"image": x.numpy()})
    d = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    print(f"encoder onnxruntime vs torch at image {tuple(x.shape)}: max abs diff {d:.2e}")
    assert d <= TOL
