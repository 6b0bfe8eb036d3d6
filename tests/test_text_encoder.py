"""The CLIP text encoder against transformers' CLIPTextModel: same keys, same numbers, same size; ONNX export."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from training.models.text_encoder import (CLIPTextEncoder, TextEncoderConfig, UnsupportedConfigError,
                                          state_dict_from_transformers)

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # fp32, CPU

# `text_encoder/config.json` of SD 1.5 and SD 2.1 as shipped (legacy placeholder token ids included)
SD15_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
SD21_CONFIG = {
    **SD15_CONFIG, "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder", "hidden_act": "gelu",
    "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
    "projection_dim": 512, "transformers_version": "4.25.0.dev0",
}


def tiny(vocab: int, **kw) -> TextEncoderConfig:
    return TextEncoderConfig(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                             pad_token_id=vocab - 1, **kw)


CONFIGS = {
    "quick_gelu": tiny(1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "gelu_deeper": tiny(1000, hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=6,
                        hidden_act="gelu", layer_norm_eps=1e-6),
    "full_vocab_narrow": tiny(49408, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                              num_attention_heads=2, hidden_act="gelu"),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Fresh random weights everywhere, LayerNorm affine included, scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "embedding" in name:
                p.copy_(r)
            elif p.dim() > 1:
                p.copy_(r / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)


def prompt_ids(cfg: TextEncoderConfig, batch: int = 2, seed: int = 5) -> torch.Tensor:
    """Token ids laid out like tokenized prompts: bos, words, eos, then padding (eos as SD 1.x, 0 as SD 2.x)."""
    g = torch.Generator().manual_seed(seed)
    L = cfg.max_position_embeddings
    ids = torch.randint(0, cfg.vocab_size - 2, (batch, L), generator=g)
    ids[:, 0] = cfg.bos_token_id
    for b in range(batch):
        n = 5 + 31 * b % (L - 6)  # prompt lengths 5, 36, ...
        ids[b, n] = cfg.eos_token_id
        ids[b, n + 1:] = cfg.eos_token_id if b % 2 == 0 else 0
    return ids


def make_pair(cfg: TextEncoderConfig):
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_transformers())).eval()
    randomize_(ref)
    ours = CLIPTextEncoder(cfg).eval()
    ref_keys = {k if k.startswith("text_model.") else "text_model." + k for k in ref.state_dict()}
    assert set(ours.state_dict()) == ref_keys - {"text_model.embeddings.position_ids"}
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_transformers(name):
    cfg = CONFIGS[name]
    ref, ours = make_pair(cfg)
    assert ours.num_parameters() == ref.num_parameters()
    ids = prompt_ids(cfg)
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        got = ours(ids)
    d = (got - want).abs().max().item()
    print(f"{name}: last_hidden_state max abs diff {d:.2e}")
    assert got.shape == (2, 77, cfg.hidden_size) and d <= TOL
    # causal: a token only sees its past, so changing the padding leaves the prompt's states alone
    ids2 = ids.clone()
    ids2[0, 10:] = 7
    with torch.no_grad():
        got2 = ours(ids2)
    assert torch.equal(got2[0, :10], got[0, :10]) and not torch.allclose(got2[0, 10:], got[0, 10:])


def test_loads_every_checkpoint_layout(tmp_path):
    cfg = CONFIGS["quick_gelu"]
    ref, ours = make_pair(cfg)
    ids = prompt_ids(cfg)
    with torch.no_grad():
        want = ours(ids)
    ref.save_pretrained(tmp_path)  # transformers >= 5 writes bare keys, 4.x wrote `text_model.` keys
    on_disk = load_file(tmp_path / "model.safetensors")
    v4 = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in on_disk.items()}
    v4_old = {**v4, "text_model.embeddings.position_ids": torch.arange(77)[None]}  # transformers < 4.31
    for layout in (on_disk, v4, v4_old):
        assert set(state_dict_from_transformers(layout)) == set(ours.state_dict())
        model = CLIPTextEncoder(cfg).eval()
        model.load_state_dict(layout, strict=True)
        with torch.no_grad():
            assert torch.equal(model(ids), want)
    with pytest.raises(RuntimeError, match="text_model.foo"):  # still strict
        CLIPTextEncoder(cfg).load_state_dict({**v4, "text_model.foo": torch.zeros(1)}, strict=True)
    # and the other way: our state dict saved as a file loads in transformers' CLIPTextModel
    ours_dir = tmp_path / "ours"
    ours_dir.mkdir()
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, ours_dir / "model.safetensors")
    (ours_dir / "config.json").write_text(json.dumps(
        {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **cfg.to_transformers()}))
    with torch.no_grad():
        d = (transformers.CLIPTextModel.from_pretrained(ours_dir).eval()(ids).last_hidden_state - want).abs().max()
    print(f"our file loaded by transformers: max abs diff {d:.2e}")
    assert d <= TOL


@pytest.mark.parametrize("config, expected", [(SD15_CONFIG, 123_060_480), (SD21_CONFIG, 340_387_840)])
def test_sd_text_encoders_on_meta_device(config, expected):
    cfg = TextEncoderConfig.from_transformers(config)
    with torch.device("meta"):
        ours = CLIPTextEncoder(cfg)
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_transformers()))
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"{config['_name_or_path']}: parameters ours {ours.num_parameters():,} transformers {n_ref:,}")
    assert ours.num_parameters() == n_ref == expected


def test_config_mapping():
    sd15 = TextEncoderConfig.from_transformers(SD15_CONFIG)
    assert sd15 == TextEncoderConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # ids kept as given
    sd21 = TextEncoderConfig.from_transformers(SD21_CONFIG)
    assert (sd21.hidden_act, sd21.hidden_size, sd21.num_hidden_layers, sd21.num_attention_heads,
            sd21.intermediate_size) == ("gelu", 1024, 23, 16, 4096)
    for cfg in CONFIGS.values():
        assert TextEncoderConfig.from_transformers(cfg.to_transformers()) == cfg
        full = transformers.CLIPTextConfig(**cfg.to_transformers()).to_dict()  # every generic key too
        assert TextEncoderConfig.from_transformers(full) == cfg


@pytest.mark.parametrize("key, value", [
    ("hidden_act", "relu"),
    ("hidden_act", "gelu_new"),
    ("model_type", "clip_vision_model"),
    ("architectures", ["CLIPTextModelWithProjection"]),
    ("num_attention_heads", 5),  # 768 is not a multiple of 5
    ("eos_token_id", [2, 3]),
])
def test_from_transformers_refuses(key, value):
    with pytest.raises(UnsupportedConfigError, match=key) as e:
        TextEncoderConfig.from_transformers({**SD15_CONFIG, key: value})
    print(e.value)


def test_input_validation():
    model = CLIPTextEncoder(CONFIGS["quick_gelu"])
    with pytest.raises(ValueError, match="L <= 77"):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="integer input_ids"):
        model(torch.zeros(1, 77))


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
def test_onnx_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    cfg = CONFIGS["quick_gelu"]
    _, model = make_pair(cfg)
    ids = prompt_ids(cfg, batch=3)
    with torch.no_grad():
        want = model(ids).numpy()
    for precision, tol in (("fp32", TOL), ("fp16", 1e-2)):
        m = CLIPTextEncoder(cfg).eval()
        m.load_state_dict(model.state_dict())
        if precision == "fp16":
            m.half()  # the additive causal mask must stay finite and follow the model's dtype
        path = tmp_path / f"text_encoder_{precision}.onnx"
        torch.onnx.export(m, (ids[:2],), path, dynamo=False, opset_version=18, input_names=["input_ids"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": {0: "B"}, "last_hidden_state": {0: "B"}})
        for init in onnx.load(path).graph.initializer:
            a = onnx.numpy_helper.to_array(init)
            assert a.dtype.kind != "f" or np.isfinite(a).all(), f"non-finite initializer {init.name}"
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch in (1, 3):  # neither is the export batch
            got = sess.run(None, {"input_ids": ids[:batch].numpy()})[0]
            d = float(np.abs(got.astype(np.float32) - want[:batch]).max())
            print(f"{precision} onnxruntime vs fp32 torch at batch {batch}: max abs diff {d:.2e}")
            assert got.dtype == (np.float16 if precision == "fp16" else np.float32)
            assert got.shape == want[:batch].shape and d <= tol
