"""The KL autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", the "KL-f8" first stage of Stable Diffusion).

The encoder maps an image in [-1, 1] to a diagonal Gaussian over latents (mean, logvar), the
decoder maps latents back to pixels. Parameter names equal the state-dict keys of diffusers'
`AutoencoderKL`, so its `vae/diffusion_pytorch_model.safetensors` loads with
`load_state_dict(strict=True)` and no renaming.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.models.unet import UnsupportedConfigError  # one error type for every model's config

logger = logging.getLogger(__name__)


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one per resolution level
    layers_per_block: int = 2  # resnets per encoder level; the decoder has one more
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # diffusion runs on (z - shift_factor) * scaling_factor
    shift_factor: float | None = None  # None: no shift (SD 1.x / 2.x)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512  # default image size in pixels

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                     "norm_num_groups", "sample_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {value!r}")
        if not self.block_out_channels or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.block_out_channels
        ):
            raise ValueError(f"VAEConfig.block_out_channels must be a non-empty tuple of positive ints, "
                             f"got {self.block_out_channels!r}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAEConfig.norm_num_groups={self.norm_num_groups} must divide every entry of "
                             f"block_out_channels={self.block_out_channels}; it does not divide {bad}")
        if not self.scaling_factor > 0:
            raise ValueError(f"VAEConfig.scaling_factor must be > 0, got {self.scaling_factor!r}")
        if self.sample_size % self.spatial_factor:
            raise ValueError(f"VAEConfig.sample_size={self.sample_size} must be a multiple of the spatial "
                             f"factor {self.spatial_factor}")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> VAEConfig:
        """Map diffusers' `vae/config.json`; raise UnsupportedConfigError for what we cannot honour.

        A key missing from `d` takes diffusers' own default, as diffusers would.
        """
        unknown = sorted(k for k in d if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
        if unknown:
            raise UnsupportedConfigError(f"vae config: unknown keys {unknown} (known: {sorted(_DIFFUSERS_DEFAULTS)})")
        d = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}

        def refuse(key: str, why: str) -> UnsupportedConfigError:
            return UnsupportedConfigError(f"vae config: {key}={d[key]!r} is not supported: {why}")

        if d["act_fn"] != "silu":
            raise refuse("act_fn", "only 'silu' is implemented")
        if not isinstance(d["block_out_channels"], (list, tuple)):
            raise refuse("block_out_channels", "expected a list of ints")
        n = len(d["block_out_channels"])
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != block for t in d[key]):
                raise refuse(key, f"only {block} is implemented")
            if len(d[key]) != n:
                raise refuse(key, f"need one entry per block_out_channels entry ({n})")
        for key in ("latents_mean", "latents_std"):
            if d[key] is not None:
                raise refuse(key, "per-channel latent statistics are not implemented (expected null)")
        groups = d["norm_num_groups"]
        if not isinstance(groups, int) or groups < 1 or any(c % groups for c in d["block_out_channels"]):
            raise refuse("norm_num_groups", f"must divide every entry of block_out_channels={d['block_out_channels']}")
        if not isinstance(d["sample_size"], int):
            raise refuse("sample_size", "expected one int (square default size)")
        # force_upcast only asks diffusers to run the VAE in fp32 inside an fp16 pipeline; precision is the
        # exporter's choice here, so any value is accepted
        try:
            return cls(
                in_channels=d["in_channels"], out_channels=d["out_channels"], latent_channels=d["latent_channels"],
                block_out_channels=tuple(d["block_out_channels"]), layers_per_block=d["layers_per_block"],
                norm_num_groups=groups, scaling_factor=float(d["scaling_factor"]),
                shift_factor=None if d["shift_factor"] is None else float(d["shift_factor"]),
                use_quant_conv=bool(d["use_quant_conv"]), use_post_quant_conv=bool(d["use_post_quant_conv"]),
                mid_block_add_attention=bool(d["mid_block_add_attention"]), sample_size=d["sample_size"],
            )
        except (TypeError, ValueError) as e:
            raise UnsupportedConfigError(f"vae config: {e}") from e

    def to_diffusers(self) -> dict[str, Any]:
        """A dict accepted by diffusers' `AutoencoderKL(**d)` (and written as its config.json)."""
        n = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
            "act_fn": "silu", "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size, "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor, "latents_mean": None, "latents_std": None, "force_upcast": True,
            "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv,
            "mid_block_add_attention": self.mid_block_add_attention,
        }


# diffusers' AutoencoderKL.__init__ defaults (diffusers 0.30 - 0.42), used for keys a config.json omits
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}


# ----------------------------------------------------------------------------------------------
# blocks

def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)  # every norm of the LDM autoencoder uses eps 1e-6


class ResnetBlock(nn.Module):
    """Pre-activation residual block without a timestep input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions, head width C, with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list so the key is `to_out.0`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # scale C^-0.5, (B, HW, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(x.shape)  # (B, HW, C) -> (B, C, H, W)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pad right and bottom only, as the original LDM code: (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, H, W) -> (B, C, 2H, 2W)


class DownEncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """resnet -> (attention) -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f): mean and logvar stacked."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, add_downsample=i < len(ch) - 1)
            for i in range(len(ch))
        ])
        self.mid_block = MidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = _group_norm(groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, out_channels, h*f, w*f), any h and w."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups, add_upsample=i < len(ch) - 1)
            for i in range(len(ch))
        ])
        self.conv_norm_out = _group_norm(groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------
# the model

class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: `encode` to a diagonal Gaussian, `decode` back to pixels.

    Images are float in [-1, 1], (B, in_channels, H, W) with H and W multiples of
    `config.spatial_factor`; latents are (B, latent_channels, H/f, W/f) and unscaled (apply
    `scaling_factor` / `shift_factor` outside, where the diffusion model is fed).
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, in_channels, H, W) in [-1, 1] -> mean, logvar, each (B, latent_channels, H/f, W/f)."""
        _check_input(x, self.config.in_channels, "image")
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)  # (B, 2C, h, w) -> 2 x (B, C, h, w)
        # the clamp keeps exp(logvar) finite for any encoder output, as diffusers does
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f), about [-1, 1]."""
        _check_input(z, self.config.latent_channels, "latents")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw z = mean + exp(logvar / 2) * eps, eps ~ N(0, I)."""
        # draw where the generator lives, then move: a CPU generator gives the same z on any device
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * eps

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: returns (reconstruction, mean, logvar)."""
        mean, logvar = self.encode(x)
        z = self.sample(mean, logvar, generator) if sample_posterior else mean
        return self.decode(z), mean, logvar


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch axis: (B, C, h, w) -> (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def _check_input(x: torch.Tensor, channels: int, what: str) -> None:
    # eager path only: under ONNX tracing a Python check on shapes becomes a constant and warns
    if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != channels):
        raise ValueError(f"expected {what} of shape (B, {channels}, H, W), got {tuple(x.shape)}")
