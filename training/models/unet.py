"""The text-conditioned denoiser eps_theta(z_t, t, c) of latent diffusion (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models"): ResNet blocks that take a
sinusoidal timestep embedding, transformer blocks (self-attention, cross-attention to the text
embeddings, GEGLU feed-forward) at the chosen levels, and down/up paths joined by skips. SDXL's
U-Nets (base, refiner, Turbo) add a pooled text embedding and micro-conditioning time ids to the
timestep embedding (`addition_embed_type="text_time"`) and vary heads and transformer depth per level.

Parameter names equal the state-dict keys of diffusers' `UNet2DConditionModel`, so its
`unet/diffusion_pytorch_model.safetensors` loads with `load_state_dict(strict=True)` and no
renaming. `UNetConfig.from_diffusers` maps a diffusers `unet/config.json` to `UNetConfig` and
refuses, naming the key, every feature this model does not implement.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


class UnsupportedConfigError(ValueError):
    """A checkpoint's config asks for something this model cannot reproduce."""


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"UNetConfig.{name} must be a positive int, got {value!r}")


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # one per resolution level
    layers_per_block: int = 2  # resnets per down level; each up level has one more
    attention: tuple[bool, ...] = (True, True, True, False)  # cross-attention at down level i (up mirrors)
    num_heads: int | tuple[int, ...] | None = 8  # per level; exactly one of num_heads / head_dim is set
    head_dim: int | None = None  # heads = channels // head_dim per level (SD 2.x style)
    cross_attention_dim: int = 768  # width of the text encoder's hidden states
    use_linear_projection: bool = False  # proj_in/proj_out as Linear (SD 2.x, SDXL) instead of 1x1 conv
    transformer_layers_per_block: int | tuple[int, ...] = 1  # transformer depth, one or one per level
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    upcast_attention: bool = False  # attention in fp32 when the model runs in fp16/bf16
    dropout: float = 0.0  # in the resnets, as diffusers applies it
    sample_size: int | tuple[int, int] | None = None  # default latent size; metadata only
    time_cond_proj_dim: int | None = None  # LCM guidance embedding width (`timestep_cond`); None: no input
    # SDXL's added conditioning: "text_time" takes `text_embeds` (the pooled text embedding) and
    # `time_ids` (micro-conditioning), each id embedded with addition_time_embed_dim sinusoids;
    # [text_embeds, embedded ids] is projection_class_embeddings_input_dim wide
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    gradient_checkpointing: bool = False  # training option: recompute blocks in backward

    def __post_init__(self) -> None:
        # JSON gives lists back; keep tuples so configs compare equal after a round trip
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention = tuple(bool(a) for a in self.attention)
        if isinstance(self.num_heads, list):
            self.num_heads = tuple(self.num_heads)
        if isinstance(self.transformer_layers_per_block, list):
            self.transformer_layers_per_block = tuple(self.transformer_layers_per_block)
        if isinstance(self.sample_size, list):
            self.sample_size = tuple(self.sample_size)

        for name in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "norm_num_groups"):
            _positive_int(name, getattr(self, name))
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("UNetConfig.block_out_channels must have at least one level, got ()")
        if isinstance(self.transformer_layers_per_block, tuple):
            if len(self.transformer_layers_per_block) != n:
                raise ValueError(f"UNetConfig.transformer_layers_per_block as a tuple needs one entry per level "
                                 f"({n}), got {self.transformer_layers_per_block}")
            for depth in self.transformer_layers_per_block:
                _positive_int("transformer_layers_per_block[*]", depth)
        else:
            _positive_int("transformer_layers_per_block", self.transformer_layers_per_block)
        for c in self.block_out_channels:
            _positive_int("block_out_channels[*]", c)
        if len(self.attention) != n:
            raise ValueError(f"UNetConfig.attention needs one flag per level ({n}, as block_out_channels="
                             f"{self.block_out_channels}), got {len(self.attention)}: {self.attention}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"UNetConfig.norm_num_groups={self.norm_num_groups} must divide every entry of "
                             f"block_out_channels={self.block_out_channels}; it does not divide {bad}")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(f"UNetConfig: set exactly one of num_heads and head_dim (the other None), got "
                             f"num_heads={self.num_heads!r}, head_dim={self.head_dim!r}")
        if self.head_dim is not None:
            _positive_int("head_dim", self.head_dim)
        elif isinstance(self.num_heads, tuple):
            if len(self.num_heads) != n:
                raise ValueError(f"UNetConfig.num_heads as a tuple needs one entry per level ({n}), got "
                                 f"{self.num_heads}")
            for h in self.num_heads:
                _positive_int("num_heads[*]", h)
        else:
            _positive_int("num_heads", self.num_heads)
        # the mid block always attends, so the last level counts as attending
        for i, c in enumerate(self.block_out_channels):
            if not (self.attention[i] or i == n - 1):
                continue
            if self.head_dim is not None and c % self.head_dim:
                raise ValueError(f"UNetConfig.head_dim={self.head_dim} must divide the channels of every "
                                 f"attending level; level {i} has {c}")
            heads = self.heads_per_level()[i]
            if c % heads:
                raise ValueError(f"UNetConfig: level {i} has {c} channels, not divisible by its {heads} "
                                 f"attention heads")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"UNetConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if self.time_cond_proj_dim is not None:
            _positive_int("time_cond_proj_dim", self.time_cond_proj_dim)
        self._check_addition_embedding()

    def _check_addition_embedding(self) -> None:
        widths = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
        if self.addition_embed_type is None:
            for name in widths:
                if getattr(self, name) is not None:
                    raise ValueError(f"UNetConfig.{name}={getattr(self, name)!r} is only used with "
                                     f"addition_embed_type='text_time', which is not set")
            return
        if self.addition_embed_type != "text_time":
            raise ValueError(f"UNetConfig.addition_embed_type must be None or 'text_time', "
                             f"got {self.addition_embed_type!r}")
        for name in widths:
            _positive_int(name, getattr(self, name))

    def transformer_depths(self) -> tuple[int, ...]:
        """Transformer blocks per attention layer at each level (the mid block uses the last one)."""
        depth = self.transformer_layers_per_block
        return depth if isinstance(depth, tuple) else (depth,) * len(self.block_out_channels)

    def text_embeds_dim(self, num_time_ids: int) -> int:
        """Width of `text_embeds` when `time_ids` has `num_time_ids` values per row (SDXL base 6, refiner 5).

        The U-Net config fixes only the sum of the two widths; which split a checkpoint uses is
        decided by its pipeline (the second text encoder's projection width).
        """
        total, per_id = self.projection_class_embeddings_input_dim, self.addition_time_embed_dim
        if total is None or per_id is None:
            raise ValueError("this UNet takes no text_embeds (addition_embed_type is not 'text_time')")
        width = total - num_time_ids * per_id
        if num_time_ids < 1 or width < 1:
            raise ValueError(f"{num_time_ids} time ids of {per_id} channels each leave no room for a text "
                             f"embedding in projection_class_embeddings_input_dim={total}")
        return width

    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads at each level (the mid block uses the last one)."""
        n = len(self.block_out_channels)
        if self.head_dim is not None:
            # a level without attention never uses its count; keep it >= 1 for diffusers' config
            return tuple(max(1, c // self.head_dim) for c in self.block_out_channels)
        if isinstance(self.num_heads, int):
            return (self.num_heads,) * n
        return tuple(self.num_heads or ())  # a tuple; __post_init__ rules out None here

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> UNetConfig:
        """Map a diffusers `UNet2DConditionModel` config dict (its `unet/config.json`) to ours.

        Raises UnsupportedConfigError naming the key and value of anything we cannot honour.
        Missing keys take diffusers' defaults, as diffusers itself does.
        """
        unknown = sorted(k for k in d if not k.startswith("_") and k not in _DIFFUSERS_KEYS)
        if unknown:
            k = unknown[0]
            raise UnsupportedConfigError(f"unknown diffusers UNet config key {k!r}={d[k]!r} (all unknown: "
                                         f"{unknown}); refusing rather than ignoring it")

        def get(key: str) -> Any:
            return d.get(key, _DIFFUSERS_DEFAULTS[key])

        def refuse(key: str, why: str) -> NoReturn:
            raise UnsupportedConfigError(f"diffusers UNet config {key}={get(key)!r} is not supported: {why}")

        # report every unsupported feature at once, not just the first one found
        problems = [f"{key}={get(key)!r} ({why})" for key, ok, why in _DIFFUSERS_CHECKS if not ok(get(key))]
        problems += _addition_embedding_problems(get)
        if problems:
            raise UnsupportedConfigError("diffusers UNet config asks for features this UNet does not implement: "
                                         + "; ".join(problems))

        down, up = list(get("down_block_types")), list(get("up_block_types"))
        channels = tuple(get("block_out_channels"))
        n = len(channels)
        if len(down) != n:
            refuse("down_block_types", f"need one per block_out_channels entry ({n})")
        if len(up) != n:
            refuse("up_block_types", f"need one per block_out_channels entry ({n})")
        for t in down:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                refuse("down_block_types", f"block type {t!r}; only CrossAttnDownBlock2D and DownBlock2D")
        for t in up:
            if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                refuse("up_block_types", f"block type {t!r}; only CrossAttnUpBlock2D and UpBlock2D")
        attention = tuple(t == "CrossAttnDownBlock2D" for t in down)
        if tuple(t == "CrossAttnUpBlock2D" for t in reversed(up)) != attention:
            refuse("up_block_types", f"the up path must mirror down_block_types={down}")

        def uniform(key: str, scalar_type: type) -> Any:
            # per-level lists are fine when every level has the same value
            value = get(key)
            if isinstance(value, (list, tuple)):
                if len(value) != n:
                    refuse(key, f"need one entry per level ({n})")
                if any(isinstance(v, (list, tuple)) for v in value) or len(set(value)) != 1:
                    refuse(key, "per-level values that differ are not implemented")
                value = value[0]
            if not isinstance(value, scalar_type) or isinstance(value, bool):
                refuse(key, f"expected {scalar_type.__name__}")
            return value

        layers_per_block = uniform("layers_per_block", int)
        cross_attention_dim = uniform("cross_attention_dim", int)

        # one transformer depth per level (SDXL: [1, 2, 10]); nested per-layer lists are not implemented
        depths = get("transformer_layers_per_block")
        if isinstance(depths, (list, tuple)):
            if len(depths) != n or not all(isinstance(t, int) and not isinstance(t, bool) for t in depths):
                refuse("transformer_layers_per_block", f"need an int or {n} ints (one per level); per-layer "
                                                        f"nested lists are not implemented")
            depths = depths[0] if len(set(depths)) == 1 else tuple(depths)

        # diffusers: heads = num_attention_heads or attention_head_dim, i.e. `attention_head_dim`
        # holds the number of heads (a historical misnomer); `num_attention_heads` itself is
        # rejected by UNet2DConditionModel.__init__, so we reject it too
        heads = get("attention_head_dim")
        if isinstance(heads, (list, tuple)):
            if len(heads) != n or not all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
                refuse("attention_head_dim", f"need {n} ints (one per level; it is the number of heads)")
            heads = tuple(heads)
        elif not isinstance(heads, int) or isinstance(heads, bool):
            refuse("attention_head_dim", "expected an int or a list of ints (the number of heads)")

        try:
            return cls(
                in_channels=get("in_channels"), out_channels=get("out_channels"),
                block_out_channels=channels, layers_per_block=layers_per_block, attention=attention,
                num_heads=heads, head_dim=None, cross_attention_dim=cross_attention_dim,
                use_linear_projection=bool(get("use_linear_projection")),
                transformer_layers_per_block=depths, norm_num_groups=get("norm_num_groups"),
                norm_eps=float(get("norm_eps")), flip_sin_to_cos=bool(get("flip_sin_to_cos")),
                freq_shift=get("freq_shift"), upcast_attention=bool(get("upcast_attention")),
                dropout=float(get("dropout")), sample_size=get("sample_size"),
                time_cond_proj_dim=get("time_cond_proj_dim"), addition_embed_type=get("addition_embed_type"),
                addition_time_embed_dim=get("addition_time_embed_dim"),
                projection_class_embeddings_input_dim=get("projection_class_embeddings_input_dim"),
            )
        except ValueError as e:
            raise UnsupportedConfigError(f"diffusers UNet config does not make a valid UNetConfig: {e}") from e

    def to_diffusers(self) -> dict[str, Any]:
        """A config dict that `UNet2DConditionModel(**d)` accepts and that builds this architecture."""
        heads = self.heads_per_level()
        return {
            "sample_size": list(self.sample_size) if isinstance(self.sample_size, tuple) else self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": False,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention)],
            "only_cross_attention": False,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "dropout": self.dropout,
            "act_fn": "silu",
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "cross_attention_dim": self.cross_attention_dim,
            "transformer_layers_per_block": (self.transformer_layers_per_block
                                             if isinstance(self.transformer_layers_per_block, int)
                                             else list(self.transformer_layers_per_block)),
            # diffusers reads the number of heads from `attention_head_dim` (see from_diffusers)
            "attention_head_dim": self.num_heads if isinstance(self.num_heads, int) else list(heads),
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "resnet_time_scale_shift": "default",
            "time_embedding_type": "positional",
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "attention_type": "default",
            "time_cond_proj_dim": self.time_cond_proj_dim,
            "addition_embed_type": self.addition_embed_type,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
        }


# diffusers keys and their UNet2DConditionModel defaults; `sample_size` and
# `addition_embed_type_num_heads` (read only by the addition embedding types "text" and
# "text_image", which we refuse) are harmless, keys starting with "_" (`_class_name`,
# `_diffusers_version`, `_name_or_path`) are ignored
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
_DIFFUSERS_KEYS = frozenset(_DIFFUSERS_DEFAULTS)


def _is_none(v: Any) -> bool:
    return v is None


def _falsy(v: Any) -> bool:
    return not any(v) if isinstance(v, (list, tuple)) else not v


# (key, accepted?, why not) for every feature we do not implement
_DIFFUSERS_CHECKS: list[tuple[str, Any, str]] = [
    ("class_embed_type", _is_none, "class embeddings are not implemented"),
    ("num_class_embeds", _is_none, "class embeddings are not implemented"),
    ("class_embeddings_concat", _falsy, "class embeddings are not implemented"),
    ("encoder_hid_dim", _is_none, "an encoder hidden-state projection (encoder_hid_proj: a text projection "
                                  "or an IP-Adapter's image projection) is not implemented"),
    ("encoder_hid_dim_type", _is_none, "an encoder hidden-state projection (encoder_hid_proj: a text projection "
                                       "or an IP-Adapter's image projection) is not implemented"),
    ("time_embedding_dim", _is_none, "the time embedding width is fixed at 4 * block_out_channels[0]"),
    ("time_embedding_act_fn", _is_none, "an activation after the time embedding is not implemented"),
    ("timestep_post_act", _is_none, "a post-activation in the time embedding is not implemented"),
    ("time_embedding_type", lambda v: v == "positional", "only 'positional' timestep embeddings"),
    ("dual_cross_attention", _falsy, "dual cross-attention is not implemented"),
    ("only_cross_attention", _falsy, "cross-attention-only transformer blocks are not implemented"),
    ("mid_block_only_cross_attention", _falsy, "cross-attention-only mid block is not implemented"),
    ("cross_attention_norm", _is_none, "a norm on the cross-attention context is not implemented"),
    ("attention_type", lambda v: v == "default", "only 'default' attention (no gated/GLIGEN)"),
    ("num_attention_heads", _is_none, "UNet2DConditionModel rejects it too; the head count is "
                                      "`attention_head_dim`"),
    ("reverse_transformer_layers_per_block", _is_none, "separate up-path transformer depths are not "
                                                      "implemented (the up path mirrors the down path)"),
    ("resnet_time_scale_shift", lambda v: v == "default", "only 'default' (additive) time conditioning"),
    ("resnet_skip_time_act", _falsy, "the resnets always apply SiLU to the time embedding"),
    ("resnet_out_scale_factor", lambda v: v == 1, "resnet outputs are not rescaled"),
    ("act_fn", lambda v: v == "silu", "only SiLU activations"),
    ("conv_in_kernel", lambda v: v == 3, "conv_in is 3x3"),
    ("conv_out_kernel", lambda v: v == 3, "conv_out is 3x3"),
    ("center_input_sample", _falsy, "input centering (2x - 1) is not implemented"),
    ("mid_block_type", lambda v: v == "UNetMidBlock2DCrossAttn", "only UNetMidBlock2DCrossAttn"),
    ("downsample_padding", lambda v: v == 1, "downsamplers pad by 1"),
    ("mid_block_scale_factor", lambda v: v == 1, "the mid block output is not rescaled"),
    ("norm_num_groups", lambda v: v is not None, "GroupNorm is required (None drops the output norm)"),
]


def _addition_embedding_problems(get: Any) -> list[str]:
    """What a config's added-conditioning keys ask for that we do not implement (only SDXL's text_time)."""
    kind = get("addition_embed_type")
    widths = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
    if kind is None:
        return [f"{k}={get(k)!r} (used only with addition_embed_type='text_time', which is not set; class "
                f"embeddings are not implemented)" for k in widths if get(k) is not None]
    if kind != "text_time":
        return [f"addition_embed_type={kind!r} (only 'text_time', SDXL's pooled-text and time-id conditioning, "
                f"is implemented)"]
    return [f"{k}={get(k)!r} (addition_embed_type='text_time' needs it as a positive int)" for k in widths
            if not isinstance(get(k), int) or isinstance(get(k), bool) or get(k) < 1]


# -----------------------------------------------------------------------------
# blocks


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) values, (...) -> (..., dim), in float32.

    The DDPM/Transformer embedding, with frequencies exp(-log(max_period) * i / (dim/2 - freq_shift)),
    computed in the same order as diffusers' `get_timestep_embedding` so the two agree bitwise;
    every element is embedded on its own (timesteps (B,), SDXL's time ids (B, k)).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    args = t[..., None].float() * freqs  # (..., half)
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)  # (..., 2 * half)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _run(fn: nn.Module, *args: torch.Tensor, ckpt: bool) -> torch.Tensor:
    # trade compute for memory: keep only the block inputs, recompute the insides in backward
    return checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal timestep embedding; with `cond_dim`, a bias-free projection of a
    condition (LCM's guidance embedding) is added to its input first."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim is not None else None
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_proj is not None:
            x = x + self.cond_proj(cond)  # (B, cond_dim) -> (B, in_dim)
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between, with a skip."""

    def __init__(self, cin: int, cout: int, temb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, cin, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, cout, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # temb arrives already through SiLU (the model applies it once for all resnets)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(temb)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when context is None, else cross-attention."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])  # diffusers' index 1 is a dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        # (B, L, C) -> (B, nh, L, hd); unflatten with -1 keeps B and L symbolic for ONNX
        q, k, v = (p(s).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for p, s in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            # large-head models (SD 2.x) overflow fp16 in the softmax logits
            q, k, v = q.float(), k.float(), v.float()
        y = F.scaled_dot_product_attention(q, k, v).to(dtype)  # (B, nh, L, hd)
        return self.to_out[0](y.transpose(1, 2).flatten(2))  # (B, nh, L, hd) -> (B, L, C)


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # the Identity holds diffusers' dropout slot so the output layer is `net.2`
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        # LayerNorm eps is diffusers' Transformer2DModel default (1e-5), not the UNet's norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, dim, heads, upcast)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, context_dim, heads, upcast)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class LevelAttention(NamedTuple):
    """The attention of one level: heads per attention layer, transformer blocks in each."""

    heads: int
    depth: int


class Transformer2D(nn.Module):
    """Feature map -> token sequence -> transformer blocks -> feature map, with a residual."""

    def __init__(self, channels: int, attn: LevelAttention, cfg: UNetConfig):
        super().__init__()
        self.use_linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)  # diffusers fixes 1e-6 here
        proj = (lambda: nn.Linear(channels, channels)) if self.use_linear else \
            (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, attn.heads, cfg.cross_attention_dim, cfg.upcast_attention)
            for _ in range(attn.depth))
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(x.shape)  # (B, HW, C) -> (B, C, H, W); shape stays symbolic
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # nearest-upsample to the skip's size, not 2x: odd sizes were rounded up on the way down
        return self.conv(F.interpolate(x, size=like.shape[-2:], mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, attn: LevelAttention | None, downsample: bool,
                 cfg: UNetConfig):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, temb_dim, cfg) for i in range(n))
        self.attentions = nn.ModuleList(Transformer2D(cout, attn, cfg) for _ in range(n)) if attn is not None else None
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if downsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                ckpt: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = _run(resnet, h, temb, ckpt=ckpt)
            if self.attentions is not None:
                h = _run(self.attentions[i], h, context, ckpt=ckpt)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    def __init__(self, channels: int, temb_dim: int, attn: LevelAttention, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, temb_dim, cfg) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2D(channels, attn, cfg)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, ckpt: bool) -> torch.Tensor:
        h = _run(self.resnets[0], h, temb, ckpt=ckpt)
        h = _run(self.attentions[0], h, context, ckpt=ckpt)
        return _run(self.resnets[1], h, temb, ckpt=ckpt)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, skip_last: int, temb_dim: int, attn: LevelAttention | None,
                 upsample: bool, cfg: UNetConfig):
        super().__init__()
        n = cfg.layers_per_block + 1
        # resnet j sees the previous output concatenated with one skip; the last skip comes from
        # the level above (or conv_in), hence its own width
        self.resnets = nn.ModuleList(
            ResnetBlock((cin if j == 0 else cout) + (skip_last if j == n - 1 else cout), cout, temb_dim, cfg)
            for j in range(n))
        self.attentions = nn.ModuleList(Transformer2D(cout, attn, cfg) for _ in range(n)) if attn is not None else None
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                ckpt: bool) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C, H, W) + (B, Cs, H, W) -> (B, C + Cs, H, W)
            h = _run(resnet, h, temb, ckpt=ckpt)
            if self.attentions is not None:
                h = _run(self.attentions[j], h, context, ckpt=ckpt)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, skips[-1])  # to the size of the next skip we will concatenate
        return h


# -----------------------------------------------------------------------------
# the model


class UNet(nn.Module):
    """eps_theta(z_t, t, c): a latent, a timestep and text embeddings to a noise prediction."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        attn = [LevelAttention(h, d) for h, d in zip(cfg.heads_per_level(), cfg.transformer_depths())]
        temb_dim = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim, cfg.time_cond_proj_dim)
        # SDXL: [text_embeds, sinusoidal time ids] -> MLP, added to the time embedding
        self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_dim)
                              if cfg.projection_class_embeddings_input_dim is not None else None)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], temb_dim, attn[i] if cfg.attention[i] else None, i < n - 1, cfg)
            for i in range(n))
        self.mid_block = MidBlock(ch[-1], temb_dim, attn[-1], cfg)
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[min(lvl + 1, n - 1)], ch[lvl], ch[max(lvl - 1, 0)], temb_dim,
                    attn[lvl] if cfg.attention[lvl] else None, lvl > 0, cfg)
            for lvl in reversed(range(n)))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        logger.debug("UNet with %.1fM parameters", self.num_parameters() / 1e6)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _check_inputs(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                      timestep_cond: torch.Tensor | None) -> None:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, h, w), got {tuple(sample.shape)}")
        b = sample.shape[0]
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must be (B, L, {cfg.cross_attention_dim}) with "
                             f"B={sample.shape[0]}, got {tuple(context.shape)}")
        if timestep.ndim > 1 or timestep.numel() not in (1, sample.shape[0]):
            raise ValueError(f"timestep must be 0-dim, (1,) or (B,)=({sample.shape[0]},), "
                             f"got {tuple(timestep.shape)}")
        dim = cfg.time_cond_proj_dim
        if dim is None and timestep_cond is not None:
            raise ValueError("timestep_cond was given, but this UNet has no time_cond_proj_dim (it takes no "
                             "guidance embedding)")
        if dim is not None and (timestep_cond is None or tuple(timestep_cond.shape) != (b, dim)):
            got = None if timestep_cond is None else tuple(timestep_cond.shape)
            raise ValueError(f"timestep_cond (the guidance embedding) must be (B, {dim}) with B={b}, got {got}")

    def _check_added_inputs(self, b: int, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None) -> None:
        cfg = self.config
        if cfg.addition_embed_type is None:
            if text_embeds is not None or time_ids is not None:
                raise ValueError("text_embeds/time_ids were given, but this UNet has no addition_embed_type "
                                 "(it takes no SDXL added conditioning)")
            return
        if time_ids is None or time_ids.ndim != 2 or time_ids.shape[0] != b:
            got = None if time_ids is None else tuple(time_ids.shape)
            raise ValueError(f"time_ids (SDXL micro-conditioning) must be (B, k) with B={b} (k=6 for a base "
                             f"model, 5 for a refiner), got {got}")
        width = cfg.text_embeds_dim(time_ids.shape[1])
        if text_embeds is None or tuple(text_embeds.shape) != (b, width):
            got = None if text_embeds is None else tuple(text_embeds.shape)
            raise ValueError(f"text_embeds (the pooled text embedding) must be (B, {width}) with B={b} for "
                             f"{time_ids.shape[1]} time ids, got {got}")

    def _added_embedding(self, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None,
                         dtype: torch.dtype) -> torch.Tensor:
        # SDXL: every time id embedded on its own, text first: (B, d) + (B, k, D) -> (B, d + k * D)
        cfg = self.config
        assert self.add_embedding is not None and cfg.addition_time_embed_dim is not None
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet (addition_embed_type='text_time') needs text_embeds and time_ids")
        ids = timestep_embedding(time_ids, cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        return self.add_embedding(torch.cat([text_embeds.to(dtype), ids.flatten(1).to(dtype)], dim=-1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise in `sample`.

        sample: (B, in_channels, h, w) noisy latents; any h, w >= 1.
        timestep: (B,) or 0-dim float tensor (a scalar broadcasts over the batch); fractional ok.
        encoder_hidden_states: (B, L, cross_attention_dim) text embeddings.
        timestep_cond: (B, time_cond_proj_dim), required exactly when the config sets that key: the
            guidance embedding of an LCM-distilled model (`ldm_runtime.guidance.guidance_scale_embedding`).
        text_embeds, time_ids: required exactly when addition_embed_type is "text_time" (SDXL), what
            diffusers passes as `added_cond_kwargs`: the pooled text embedding (B, d) and the
            micro-conditioning (B, k), with d + k * addition_time_embed_dim equal to
            projection_class_embeddings_input_dim (base: original size, crop top-left, target size,
            k=6; refiner: original size, crop top-left, aesthetic score, k=5).
        Returns (B, out_channels, h, w).
        """
        cfg = self.config
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32, device=sample.device)
        if not torch.jit.is_tracing():  # under the ONNX tracer sizes are tensors; checks would warn
            self._check_inputs(sample, timestep, encoder_hidden_states, timestep_cond)
            self._check_added_inputs(sample.shape[0], text_embeds, time_ids)
        t = timestep.reshape(-1).expand(sample.shape[0])  # broadcast a scalar; (B,)
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(t_emb.to(sample.dtype), timestep_cond)
        if self.add_embedding is not None:  # text_time: _check_added_inputs required both tensors
            emb = emb + self._added_embedding(text_embeds, time_ids, emb.dtype)
        temb = F.silu(emb)  # every resnet applies SiLU before its projection; do it once
        ckpt = cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, temb, encoder_hidden_states, ckpt)
            skips.extend(s)
        h = self.mid_block(h, temb, encoder_hidden_states, ckpt)
        for block in self.up_blocks:
            h = block(h, skips, temb, encoder_hidden_states, ckpt)  # pops its skips off the end
        return self.conv_out(F.silu(self.conv_norm_out(h)))
