"""The CLIP text transformer (Radford et al. 2021) that conditions Stable Diffusion.

Pre-LayerNorm transformer with learned absolute positions and a causal mask; the output is the
last hidden state after `final_layer_norm` (SD 1.x and 2.x use every token, not a pooled one).
Parameter names equal the keys of transformers' `CLIPTextModel` checkpoints as transformers 4
wrote them (`text_model.embeddings...`, every Stable Diffusion release), so
`text_encoder/model.safetensors` loads with `load_state_dict(strict=True)`. Two other layouts of
the same weights load too (a load pre-hook that only renames or drops, never reshapes; the same
mapping is public as `state_dict_from_transformers`):
- transformers >= 5 drops the `text_model.` prefix (in memory and in the files it writes): when
  no key has the prefix, it is added;
- transformers < 4.31 saved the constant `text_model.embeddings.position_ids` buffer: it is
  dropped, since positions are always 0..L-1 here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    # the tokenizer's ids; informational (the model never reads them), the tokenizer folder rules
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407

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

    @classmethod
    def from_transformers(cls, d: dict[str, Any]) -> TextEncoderConfig:
        """Map transformers' `text_encoder/config.json`; raise UnsupportedConfigError for what we cannot honour.

        Keys that do not change the forward pass (dropout rates, initializer ranges, dtype,
        generation settings, `projection_dim` of a model that has no projection) are ignored.
        A missing key takes transformers' own `CLIPTextConfig` default.
        """
        def refuse(key: str, why: str) -> UnsupportedConfigError:
            return UnsupportedConfigError(f"text_encoder config: {key}={d[key]!r} is not supported: {why}")

        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise refuse("model_type", "expected 'clip_text_model'")
        if d.get("architectures") not in (None, ["CLIPTextModel"]):
            raise refuse("architectures", "expected ['CLIPTextModel'] (no text projection)")
        if d.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
            raise refuse("hidden_act", f"expected one of {_ACTIVATIONS}")
        # transformers' CLIPTextConfig defaults, used for keys the file omits
        t: dict[str, Any] = {
            "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
            "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        }
        t.update({k: d[k] for k in t if k in d})
        if t["eos_token_id"] == 2:
            # configs saved before transformers PR #24773 carry placeholder ids (bos 0, eos 2, pad 1)
            logger.info("text_encoder config has the legacy placeholder token ids bos=%s eos=%s pad=%s; "
                        "kept as given (the model does not use them, the tokenizer's ids rule)",
                        t["bos_token_id"], t["eos_token_id"], t["pad_token_id"])
        try:
            return cls(**t)
        except (TypeError, ValueError) as e:
            raise UnsupportedConfigError(f"text_encoder config: {e}") from e

    def to_transformers(self) -> dict[str, Any]:
        """A dict accepted by `transformers.CLIPTextConfig(**d)`."""
        return {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act, "layer_norm_eps": self.layer_norm_eps,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
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

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        x = self.embeddings(input_ids)
        mask = self.causal_mask[:L, :L]
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.final_layer_norm(x)


# ----------------------------------------------------------------------------------------------
# the model

class CLIPTextEncoder(nn.Module):
    """Token ids (B, L), L <= max_position_embeddings -> last hidden state (B, L, hidden_size).

    Causal attention and no padding mask, as Stable Diffusion calls its text encoder.
    """

    def __init__(self, config: TextEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or TextEncoderConfig()
        self.text_model = CLIPTextTransformer(config)
        self.register_load_state_dict_pre_hook(_load_pre_hook)  # see state_dict_from_transformers

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():  # under ONNX tracing, Python shape checks become constants and warn
            L_max = self.config.max_position_embeddings
            if input_ids.dim() != 2 or input_ids.shape[1] > L_max or input_ids.dtype.is_floating_point:
                raise ValueError(f"expected integer input_ids of shape (B, L) with L <= {L_max}, "
                                 f"got {input_ids.dtype} {tuple(input_ids.shape)}")
        return self.text_model(input_ids)


def state_dict_from_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any layout of a `CLIPTextModel` state dict -> ours (the key set of `CLIPTextEncoder.state_dict()`).

    Adds the `text_model.` prefix when no key has it (transformers >= 5) and drops the constant
    `position_ids` buffer (transformers < 4.31). `load_state_dict` does this by itself; call this
    where keys are compared before loading.
    """
    sd = dict(state_dict)
    _normalize_layout_(sd, prefix="")
    return sd


def _normalize_layout_(sd: dict, prefix: str) -> None:
    keys = [k for k in sd if k.startswith(prefix)]
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
