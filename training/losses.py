"""Losses of the two training stages.

Autoencoder (Esser et al. 2021 "Taming Transformers", Rombach et al. 2022): L1 + KL + perceptual
+ a PatchGAN discriminator with hinge loss, an adaptive weight and a delayed start.
- Perceptual: pretrained VGG/LPIPS weights cannot be downloaded here, so the default is
  `RandomFeaturePerceptual`: LPIPS's distance (channel-normalised feature differences at
  several depths) over a *fixed, seeded, random* conv net plus image gradients at three scales.
  Random conv features are a reasonable texture/edge statistic (Ulyanov et al. 2018, "Deep
  Image Prior"; Gatys-style losses work with random weights). `LPIPS` loads real LPIPS-VGG
  weights from a local safetensors file when one is given.
- The discriminator uses GroupNorm, not BatchNorm, so it behaves the same under DDP and at
  batch size 1.

Diffusion: `min_snr_weights` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy").
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# perceptual terms

def _normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)  # unit length along channels, as LPIPS


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences: (B, C, H, W) -> dx (B, C, H, W-1), dy (B, C, H-1, W)."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class RandomFeaturePerceptual(nn.Module):
    """Download-free perceptual distance: LPIPS-style distance over a frozen random conv net + gradients.

    forward(x, y) for images in [-1, 1] of shape (B, 3, H, W) -> per-sample distance (B,).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), seed: int = 1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)  # the same "network" on every run and rank
        layers, cin = [], 3
        for i, w in enumerate(widths):
            conv = nn.Conv2d(cin, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False)
            # He init keeps feature magnitudes stable with depth; zero mean filters ignore flat colour shifts
            # only partially, which is what we want (colour errors must still cost)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (cin * 9)) ** 0.5)
            layers.append(conv)
            cin = w
        self.layers = nn.ModuleList(layers)
        self.requires_grad_(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for conv in self.layers:
            x = F.leaky_relu(conv(x), 0.2)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = x.new_zeros(x.shape[0])
        for fx, fy in zip(self.features(x), self.features(y)):
            d = d + (_normalize(fx) - _normalize(fy)).pow(2).sum(1).mean((1, 2))
        # gradient (edge) agreement at full, half and quarter resolution
        for s in range(3):
            if s:
                x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            (gx, gy), (hx, hy) = image_gradients(x), image_gradients(y)
            d = d + (gx - hx).abs().mean((1, 2, 3)) + (gy - hy).abs().mean((1, 2, 3))
        return d


# LPIPS-VGG16 (Zhang et al. 2018): VGG16 conv layers cut after relu1_2, 2_2, 3_3, 4_3, 5_3; key names
# as the `lpips` package's LPIPS module (`net.sliceK.<index>.weight`, `linK.model.1.weight`)
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
_VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS-VGG distance with weights from a local safetensors file (backbone `net.*` and heads `lin*`)."""

    def __init__(self, weights: str | Path):
        super().__init__()
        from safetensors.torch import load_file

        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                cin = int(v)
        self.net = nn.Module()
        for k, (a, b) in enumerate(_VGG_SLICES, 1):
            seq = nn.Sequential()
            for i in range(a, b):
                seq.add_module(str(i), layers[i])
            setattr(self.net, f"slice{k}", seq)
        for k, c in enumerate((64, 128, 256, 512, 512)):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(c, 1, 1, bias=False))
            setattr(self, f"lin{k}", lin)
        self.shift: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--lpips_weights: no file at {path} (expected an LPIPS-VGG safetensors file)")
        sd = load_file(str(path))
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"{path}: not LPIPS-VGG weights: {len(missing)} missing keys (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        self.load_state_dict(sd)
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        d = x.new_zeros(x.shape[0])
        for k in range(5):
            x, y = getattr(self.net, f"slice{k + 1}")(x), getattr(self.net, f"slice{k + 1}")(y)
            diff = (_normalize(x) - _normalize(y)).pow(2)
            d = d + getattr(self, f"lin{k}").model(diff).mean((1, 2, 3))
        return d


# ----------------------------------------------------------------------------------------------
# PatchGAN

class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) with GroupNorm: (B, 3, H, W) -> logits (B, 1, H/2^n - 2, W/2^n - 2)."""

    def __init__(self, in_channels: int = 3, width: int = 32, n_layers: int = 2, groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, n_layers + 1):
            c_next = width * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), nn.GroupNorm(groups, c_next), nn.LeakyReLU(0.2)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # the taming-transformers init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """||d nll / d last|| / ||d g_loss / d last||: balances the GAN gradient against the reconstruction one."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------------------------
# diffusion

def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v), as in Min-SNR-gamma."""
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        # at SNR 0 (zero-terminal-SNR's last step) epsilon is unlearnable anyway; weight 1 keeps it finite
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
