"""SDXL's text encoders against transformers: CLIPTextModelWithProjection, the penultimate hidden state, clip_skip.

Oracles: transformers 5's `CLIPTextModel` / `CLIPTextModelWithProjection` with the same (random)
weights, and diffusers' `encode_prompt` formulas applied to transformers' `hidden_states`:
SD `final_layer_norm(hidden_states[-(clip_skip + 1)])`, SDXL `hidden_states[-(clip_skip + 2)]`.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_text_encoder import prompt_ids, randomize_

from training.models.text_encoder import (CLIPTextEncoder, TextEncoderConfig, UnsupportedConfigError,
                                          state_dict_from_transformers)

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32, CPU

# stabilityai/stable-diffusion-xl-base-1.0 `text_encoder_2/config.json` (OpenCLIP bigG), the keys that matter
SDXL_TE2_CONFIG = {
    "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "bos_token_id": 0,
    "eos_token_id": 2, "pad_token_id": 1, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 20, "num_hidden_layers": 32,
    "projection_dim": 1280, "vocab_size": 49408, "dropout": 0.0, "torch_dtype": "float16",
}

CONFIGS = {
    # real token ids: the pooled token is the first eos_token_id
    "eos_id": TextEncoderConfig(vocab_size=1000, bos_token_id=998, eos_token_id=999, pad_token_id=999, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, hidden_act="gelu",
                                projection_dim=24),
    # diffusers' tiny SDXL test config: legacy placeholder ids (eos 2), so the pooled token is the largest id
    "legacy_eos_2": TextEncoderConfig(vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32,
                                      intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                                      hidden_act="gelu", projection_dim=32),
}


def ids_for(cfg: TextEncoderConfig) -> torch.Tensor:
    """Prompt-like ids whose EOS is the last vocabulary entry, so the first-EOS and the largest-id rules agree."""
    assert cfg.eos_token_id in (2, cfg.vocab_size - 1)
    return prompt_ids(TextEncoderConfig(vocab_size=cfg.vocab_size, bos_token_id=cfg.vocab_size - 2,
                                        eos_token_id=cfg.vocab_size - 1, pad_token_id=cfg.vocab_size - 1), batch=3)


def make_pair(cfg: TextEncoderConfig):
    tcfg = transformers.CLIPTextConfig(**cfg.to_transformers())
    cls = transformers.CLIPTextModelWithProjection if cfg.projection_dim else transformers.CLIPTextModel
    ref = cls(tcfg).eval()
    randomize_(ref)
    ours = CLIPTextEncoder(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def final_norm(ref):
    """transformers 5's final_layer_norm: CLIPTextModel holds it, the projection model one level down."""
    return (ref.text_model if isinstance(ref, transformers.CLIPTextModelWithProjection) else ref).final_layer_norm


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    d = (got - want).abs().max().item()
    print(f"{name}: max abs diff {d:.2e}")
    assert got.shape == want.shape and d <= TOL, (name, d)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("projection", [True, False], ids=["with_projection", "plain"])
def test_parity_with_transformers(name, projection):
    cfg = CONFIGS[name] if projection else TextEncoderConfig(**{**vars(CONFIGS[name]), "projection_dim": None})
    ref, ours = make_pair(cfg)
    assert ours.num_parameters() == ref.num_parameters()
    ids = ids_for(cfg)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        out = ours.encode(ids)
        check(f"{name} last_hidden_state", out.last_hidden_state, want.last_hidden_state)
        check(f"{name} forward", ours(ids), want.last_hidden_state)
        assert len(out.hidden_states) == len(want.hidden_states) == cfg.num_hidden_layers + 1
        check(f"{name} hidden_states[-2]", out.hidden_states[-2], want.hidden_states[-2])
        check(f"{name} pooled", out.pooled, want.text_embeds if projection else want.pooler_output)
        for k in (0, 1, 2):
            sd_want = final_norm(ref)(want.hidden_states[-(k + 1)])
            check(f"{name} SD clip_skip={k}", ours.sd_prompt_embeds(ids, clip_skip=k), sd_want)
            check(f"{name} SDXL clip_skip={k}", ours.sdxl_prompt_embeds(ids, clip_skip=k), want.hidden_states[-(k + 2)])
        assert torch.equal(ours.sd_prompt_embeds(ids), ours(ids))
        assert torch.equal(ours.sdxl_prompt_embeds(ids), out.hidden_states[-2])
    # the penultimate state has no final layer norm: it differs from the normed last layer's input by more than TOL
    assert (final_norm(ref)(want.hidden_states[-2]) - out.hidden_states[-2]).abs().max() > 10 * TOL


def test_pooled_token_follows_the_config_eos_rule():
    cfg = CONFIGS["eos_id"]
    ours = CLIPTextEncoder(cfg)
    ids = torch.tensor([[998, 5, 999, 0, 0], [998, 999, 999, 999, 7]])
    assert ours.pooled_positions(ids).tolist() == [2, 1]  # the first EOS, not the largest id
    legacy = CLIPTextEncoder(CONFIGS["legacy_eos_2"])
    assert legacy.pooled_positions(torch.tensor([[0, 5, 999, 3, 3]])).tolist() == [2]  # the largest id


def test_every_key_layout_loads(tmp_path):
    cfg = CONFIGS["eos_id"]
    ref, ours = make_pair(cfg)
    ids = ids_for(cfg)
    ref.save_pretrained(tmp_path / "ref")  # transformers 5 keeps `text_model.` for the projection model
    on_disk = load_file(tmp_path / "ref" / "model.safetensors")
    assert "text_projection.weight" in on_disk
    assert all(k.startswith(("text_model.", "text_projection.")) for k in on_disk)
    bare = {k.removeprefix("text_model."): v for k, v in on_disk.items()}  # the CLIPTextModel style of transformers 5
    with torch.no_grad():
        want = ours.encode(ids).pooled
        for layout in (on_disk, bare):
            assert set(state_dict_from_transformers(layout)) == set(ours.state_dict())
            model = CLIPTextEncoder(cfg).eval()
            model.load_state_dict(layout, strict=True)
            assert torch.equal(model.encode(ids).pooled, want)
    # our file, loaded by transformers' CLIPTextModelWithProjection
    (tmp_path / "ours").mkdir()
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "ours" / "model.safetensors")
    (tmp_path / "ours" / "config.json").write_text(json.dumps(
        {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", **cfg.to_transformers()}))
    with torch.no_grad():
        back = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "ours").eval()(ids).text_embeds
    check("our file in transformers: text_embeds", back, want)


def test_config_mapping_with_projection():
    cfg = TextEncoderConfig.from_transformers(SDXL_TE2_CONFIG, with_projection=True)
    assert (cfg.projection_dim, cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_act) == (1280, 1280, 32, "gelu")
    for c in CONFIGS.values():
        assert TextEncoderConfig.from_transformers(c.to_transformers(), with_projection=True) == c
        full = transformers.CLIPTextConfig(**c.to_transformers()).to_dict()
        assert TextEncoderConfig.from_transformers(full, with_projection=True) == c
    # the first SDXL encoder (no projection) keeps reading as before, projection_dim ignored
    plain = TextEncoderConfig.from_transformers({**SDXL_TE2_CONFIG, "architectures": ["CLIPTextModel"]})
    assert plain.projection_dim is None
    with pytest.raises(UnsupportedConfigError, match=r"text_encoder_2 config: architectures=\['CLIPTextModel'\]"):
        TextEncoderConfig.from_transformers({**SDXL_TE2_CONFIG, "architectures": ["CLIPTextModel"]},
                                            with_projection=True)
    with pytest.raises(UnsupportedConfigError, match="projection_dim"):
        TextEncoderConfig.from_transformers({**SDXL_TE2_CONFIG, "projection_dim": 0}, with_projection=True)


def test_sdxl_text_encoder_2_on_meta_device():
    cfg = TextEncoderConfig.from_transformers(SDXL_TE2_CONFIG, with_projection=True)
    with torch.device("meta"):
        ours = CLIPTextEncoder(cfg)
        ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg.to_transformers()))
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"SDXL text_encoder_2: parameters ours {ours.num_parameters():,} transformers {n_ref:,}")
    assert ours.num_parameters() == n_ref == 694_659_840


@pytest.mark.parametrize("method, bad", [("sd_prompt_embeds", 5), ("sdxl_prompt_embeds", 4),
                                         ("sdxl_prompt_embeds", -1), ("sd_prompt_embeds", True)])
def test_clip_skip_out_of_range(method, bad):
    ours = CLIPTextEncoder(CONFIGS["eos_id"])  # 4 layers: SD can skip 0..4, SDXL (from the penultimate) 0..3
    with pytest.raises(ValueError, match=r"clip_skip must be an int in 0\.\.[34]") as e:
        getattr(ours, method)(torch.zeros(1, 77, dtype=torch.long), clip_skip=bad)
    print(e.value)
