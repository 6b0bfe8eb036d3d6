"""The CLIP text transformer (Radford et al. 2021) that conditions Stable Diffusion.

Pre-LayerNorm transformer with learned absolute positions and a causal mask. `forward` gives the
last hidden state after `final_layer_norm` (SD 1.x and 2.x use every token, not a pooled one);
`encode` gives every hidden state and the pooled output too, and `sd_prompt_embeds` /
`sdxl_prompt_embeds` pick what diffusers' SD and SDXL pipelines condition on (`clip_skip`
included). With `projection_dim` set the model is transformers' `CLIPTextModelWithProjection`
(SDXL's second text encoder): the pooled output goes through a bias-free `text_projection`.
Parameter names equal the keys of transformers' `CLIPTextModel` checkpoints as transformers 4
wrote them (`text_model.embeddings...`, every Stable Diffusion release; plus
`text_projection.weight` with a projection), so `text_encoder/model.safetensors` loads with
`load_state_dict(strict=True)`. Two other layouts of the same weights load too (a load pre-hook
that only renames or drops, never reshapes; the same mapping is public as
`state_dict_from_transformers`):
- transformers >= 5 drops the `text_model.` prefix from `CLIPTextModel` (in memory and in the
  files it writes; `CLIPTextModelWithProjection` keeps it): when no key has the prefix, it is
  added to every key but `text_projection.weight`;
- transformers < 4.31 saved the constant `text_model.embeddings.position_ids` buffer: it is
  dropped, since positions are always 0..L-1 here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.models.unet import UnsupportedConfigError  # one error type for every model's config

logger = logging.getLogger(__name__)

_ACTIVATIONS = ("quick_gelu", "gelu")  # quick_gelu: SD 1.x (OpenAI CLIP); gelu (erf): SD 2.x (OpenCLIP)
# Additive mask value for future positions. Finite and inside fp16's range (max 65504) so an fp16
# export never adds -inf or overflows; exp(-1e4) is exactly 0 in every float type, so the result
# equals a hard mask. (SDPA's is_causal exports as a float32 -inf constant: wrong type under fp16.)
_MASK_VALUE = -1e4


@dataclass
class TextEncoderConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # "quick_gelu" (SD 1.x) or "gelu" (SD 2.x)
    layer_norm_eps: float = 1e-5
    # the tokenizer's ids; the model reads only eos_token_id, to find the pooled token (see `pooled_positions`)
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407
    projection_dim: int | None = None  # width of text_projection (CLIPTextModelWithProjection); None: no projection

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TextEncoderConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"TextEncoderConfig.hidden_size={self.hidden_size} must be a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"TextEncoderConfig.hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"TextEncoderConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"TextEncoderConfig.{name} must be an int, got {value!r}")
        p = self.projection_dim
        if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p < 1):
            raise ValueError(f"TextEncoderConfig.projection_dim must be a positive int or None, got {p!r}")

    @classmethod
    def from_transformers(cls, d: dict[str, Any], *, with_projection: bool = False) -> TextEncoderConfig:
        """Map transformers' `text_encoder/config.json`; raise UnsupportedConfigError for what we cannot honour.

        with_projection=False reads a `CLIPTextModel` (SD's `text_encoder/`, SDXL's first one);
        True a `CLIPTextModelWithProjection` (SDXL's `text_encoder_2/`), keeping `projection_dim`.
        Keys that do not change the forward pass (dropout rates, initializer ranges, dtype,
        generation settings, `projection_dim` of a model that has no projection) are ignored.
        A missing key takes transformers' own `CLIPTextConfig` default.
        """
        which = "text_encoder_2" if with_projection else "text_encoder"

        def refuse(key: str, why: str) -> UnsupportedConfigError:
            return UnsupportedConfigError(f"{which} config: {key}={d[key]!r} is not supported: {why}")

        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise refuse("model_type", "expected 'clip_text_model'")
        if with_projection and d.get("architectures") not in (None, ["CLIPTextModelWithProjection"]):
            raise refuse("architectures", "expected ['CLIPTextModelWithProjection'] (with a text projection)")
        if not with_projection and d.get("architectures") not in (None, ["CLIPTextModel"]):
            raise refuse("architectures", "expected ['CLIPTextModel'] (no text projection)")
        if d.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
            raise refuse("hidden_act", f"expected one of {_ACTIVATIONS}")
        # transformers' CLIPTextConfig defaults, used for keys the file omits
        t: dict[str, Any] = {
            "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
            "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
            **({"projection_dim": 512} if with_projection else {}),
        }
        t.update({k: d[k] for k in t if k in d})
        if t["eos_token_id"] == 2:
            # configs saved before transformers PR #24773 carry placeholder ids (bos 0, eos 2, pad 1)
            logger.info("%s config has the legacy placeholder token ids bos=%s eos=%s pad=%s; kept as given "
                        "(the pooled token is then the largest id, as transformers finds it)",
                        which, t["bos_token_id"], t["eos_token_id"], t["pad_token_id"])
        try:
            return cls(**t)
        except (TypeError, ValueError) as e:
            raise UnsupportedConfigError(f"{which} config: {e}") from e

    def to_transformers(self) -> dict[str, Any]:
        """A dict accepted by `transformers.CLIPTextConfig(**d)`."""
        return {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act, "layer_norm_eps": self.layer_norm_eps,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            **({} if self.projection_dim is None else {"projection_dim": self.projection_dim}),
        }


# ----------------------------------------------------------------------------------------------
# blocks

class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:L]  # (B, L, D)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        # (B, L, D) -> (B, nh, L, hs)
        q, k, v = (p(x).view(B, L, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale hs^-0.5
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))  # (B, nh, L, hs) -> (B, L, D)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick else F.gelu(h)  # OpenAI CLIP's sigmoid approximation
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        n = cfg.max_position_embeddings
        # additive causal mask (L, L): 0 on and below the diagonal, _MASK_VALUE above. A buffer, not
        # a state-dict key, and cast with the model, so it has the dtype of the scores.
        mask = torch.full((n, n), _MASK_VALUE).triu(1)
        self.causal_mask: torch.Tensor
        self.register_buffer("causal_mask", mask, persistent=False)

    def hidden_states(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """The embeddings' output, then every layer's (num_hidden_layers + 1 tensors, no final layer norm)."""
        L = input_ids.shape[1]
        mask = self.causal_mask[:L, :L]
        states = [self.embeddings(input_ids)]
        for layer in self.encoder.layers:
            states.append(layer(states[-1], mask))
        return states

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.hidden_states(input_ids)[-1])


# ----------------------------------------------------------------------------------------------
# the model

class TextEncoderOutput(NamedTuple):
    """Everything one pass of the text encoder gives."""

    last_hidden_state: torch.Tensor  # (B, L, D), after final_layer_norm
    hidden_states: tuple[torch.Tensor, ...]  # num_hidden_layers + 1 of (B, L, D): embeddings first, no final norm
    pooled: torch.Tensor  # (B, D) the EOS token's last_hidden_state; (B, projection_dim) through text_projection


class CLIPTextEncoder(nn.Module):
    """Token ids (B, L), L <= max_position_embeddings -> last hidden state (B, L, hidden_size).

    Causal attention and no padding mask, as Stable Diffusion calls its text encoder.
    """

    def __init__(self, config: TextEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or TextEncoderConfig()
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.register_load_state_dict_pre_hook(_load_pre_hook)  # see state_dict_from_transformers

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(input_ids)
        return self.text_model(input_ids)

    def encode(self, input_ids: torch.Tensor) -> TextEncoderOutput:
        """Last hidden state, every hidden state and the pooled output of one pass (transformers' meanings)."""
        self._check_ids(input_ids)
        states = self.text_model.hidden_states(input_ids)
        last = self.text_model.final_layer_norm(states[-1])
        pooled = last[torch.arange(last.shape[0], device=last.device), self.pooled_positions(input_ids)]
        if self.config.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return TextEncoderOutput(last, tuple(states), pooled)

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) the index of each row's pooled token, located as transformers 5 locates it.

        The first `eos_token_id`; with the legacy placeholder `eos_token_id == 2` of configs saved
        before transformers PR #24773, the largest id (CLIP's EOS is the last vocabulary entry).
        """
        ids = input_ids.to(torch.int32)  # argmax of int64 is missing from older ONNX opsets
        if self.config.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.config.eos_token_id).to(torch.int32).argmax(dim=-1)

    def sd_prompt_embeds(self, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """(B, L, D) as diffusers' `StableDiffusionPipeline` conditions on it.

        clip_skip None: the last hidden state; k: the output k layers before the last, through the
        final layer norm (`hidden_states[-(k + 1)]`; k=0 equals None).
        """
        if clip_skip is None:
            return self(input_ids)
        self._check_clip_skip(clip_skip, self.config.num_hidden_layers)
        return self.text_model.final_layer_norm(self.encode(input_ids).hidden_states[-(clip_skip + 1)])

    def sdxl_prompt_embeds(self, input_ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """(B, L, D) as diffusers' `StableDiffusionXLPipeline` takes it from each text encoder.

        The penultimate layer's output without the final layer norm (`hidden_states[-2]`); with
        clip_skip k, k layers before that (`hidden_states[-(k + 2)]`; k=0 equals None).
        """
        k = 0 if clip_skip is None else clip_skip
        self._check_clip_skip(k, self.config.num_hidden_layers - 1)
        return self.encode(input_ids).hidden_states[-(k + 2)]

    @staticmethod
    def _check_clip_skip(clip_skip: int, most: int) -> None:
        if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 0 <= clip_skip <= most:
            raise ValueError(f"clip_skip must be an int in 0..{most} (layers this text encoder can skip), "
                             f"got {clip_skip!r}")

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if torch.jit.is_tracing():  # under ONNX tracing, Python shape checks become constants and warn
            return
        L_max = self.config.max_position_embeddings
        if input_ids.dim() != 2 or input_ids.shape[1] > L_max or input_ids.dtype.is_floating_point:
            raise ValueError(f"expected integer input_ids of shape (B, L) with L <= {L_max}, "
                             f"got {input_ids.dtype} {tuple(input_ids.shape)}")


def state_dict_from_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any layout of a `CLIPTextModel` / `CLIPTextModelWithProjection` state dict -> ours.

    Ours is the key set of `CLIPTextEncoder.state_dict()`. Adds the `text_model.` prefix when no
    key has it (transformers >= 5 `CLIPTextModel`; `text_projection.weight` stays at the top) and
    drops the constant `position_ids` buffer (transformers < 4.31). `load_state_dict` does this by
    itself; call this where keys are compared before loading.
    """
    sd = dict(state_dict)
    _normalize_layout_(sd, prefix="")
    return sd


def _normalize_layout_(sd: dict, prefix: str) -> None:
    keys = [k for k in sd if k.startswith(prefix) and not k.startswith(prefix + "text_projection.")]
    if keys and not any(k.startswith(prefix + "text_model.") for k in keys):
        for k in keys:
            sd[prefix + "text_model." + k[len(prefix):]] = sd.pop(k)
    ids = sd.pop(prefix + "text_model.embeddings.position_ids", None)
    if ids is not None:
        expected = torch.arange(ids.shape[-1], device=ids.device)
        if ids.dtype.is_floating_point or not torch.equal(ids.reshape(-1).to(expected.dtype), expected):
            # some community checkpoints carry corrupted (float or shifted) ids; positions are 0..L-1 regardless
            logger.warning("ignoring %stext_model.embeddings.position_ids that are not 0..%d", prefix,
                           ids.shape[-1] - 1)


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    _normalize_layout_(state_dict, prefix)
