"""The SDXL U-Net features of training/models/unet.py against diffusers' UNet2DConditionModel.

text_time added conditioning (pooled text embedding + sinusoidal time ids through add_embedding),
per-level transformer depths and head counts, levels without attention; CPU, fp32, random weights.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from training.models.unet import UNet, UNetConfig, UnsupportedConfigError
from test_unet import randomize_

TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, as diffusers wrote them
_SDXL_COMMON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_norm": None, "downsample_padding": 1, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_BASE = dict(
    _SDXL_COMMON, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    projection_class_embeddings_input_dim=2816, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
SDXL_REFINER = dict(
    _SDXL_COMMON, attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536],
    cross_attention_dim=1280, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    projection_class_embeddings_input_dim=2560, transformer_layers_per_block=4,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])

# tiny diffusers configs: (config, time ids per row, latent sizes)
TINY = {
    # diffusers' own SDXL pipeline test U-Net (block_out_channels (32, 64), so GroupNorm's default 32 groups)
    "sdxl_test": (dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                       use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                       transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,  # 6*8 + 32
                       cross_attention_dim=64), 6, [(8, 8), (9, 13)]),
    # refiner-style: 5 time ids (aesthetic score last), no attention at the first and last level,
    # a uniform depth of 2, the mid block at the last level's head count
    "refiner_like": (dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                          attention_head_dim=[2, 4, 8], use_linear_projection=True, addition_embed_type="text_time",
                          addition_time_embed_dim=6, transformer_layers_per_block=2,
                          projection_class_embeddings_input_dim=54, cross_attention_dim=24),  # 5*6 + 24
                     5, [(8, 8), (7, 10)]),
    # three attending levels with per-level heads and depths, conv projections, an odd time-id width,
    # no sin/cos flip and freq_shift 1 (add_time_proj must take both from the config)
    "three_levels": (dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                          down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                          attention_head_dim=[1, 2, 4], transformer_layers_per_block=[1, 2, 3],
                          addition_embed_type="text_time", addition_time_embed_dim=5,
                          projection_class_embeddings_input_dim=46, cross_attention_dim=32,  # 6*5 + 16
                          flip_sin_to_cos=False, freq_shift=1), 6, [(8, 8), (5, 7)]),
}


def time_ids(k: int) -> torch.Tensor:
    # base: original (h, w), crop (top, left), target (h, w); refiner: original, crop, aesthetic score
    rows = [[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0], [512.0, 512.0, 16.0, 0.0, 768.0, 1344.0]]
    if k == 5:
        rows = [r[:4] + [a] for r, a in zip(rows, (6.0, 2.5))]
    return torch.tensor(rows)


def converted(d: dict, tmp_path) -> tuple[UNet2DConditionModel, UNet]:
    """A random diffusers U-Net and ours from its config.json and state dict."""
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**d).eval()
    randomize_(ref, seed=1)
    ref.save_config(tmp_path)  # through config.json, as a real checkpoint goes
    cfg = UNetConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    ours = UNet(cfg).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.num_parameters() == sum(p.numel() for p in ref.parameters())
    return ref, ours


@pytest.mark.parametrize("name", list(TINY))
def test_parity_with_diffusers(name: str, tmp_path) -> None:
    d, k, sizes = TINY[name]
    ref, ours = converted(d, tmp_path)
    cfg = ours.config
    assert cfg.text_embeds_dim(k) == d["projection_class_embeddings_input_dim"] - k * d["addition_time_embed_dim"]
    back = UNet2DConditionModel(**cfg.to_diffusers()).eval()  # our weights exported to diffusers' format
    back.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(2)
    ids, t = time_ids(k), torch.tensor([17.25, 503.5])
    for h, w in sizes:
        x = torch.randn(2, cfg.in_channels, h, w, generator=g)
        c = torch.randn(2, 11, cfg.cross_attention_dim, generator=g)
        pooled = torch.randn(2, cfg.text_embeds_dim(k), generator=g)
        with torch.no_grad():
            want = ref(x, t, c, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
            got = ours(x, t, c, text_embeds=pooled, time_ids=ids)
            again = back(x, t, c, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
            moved = ours(x, t, c, text_embeds=pooled, time_ids=ids.flip(0))  # rows' conditioning swapped
        assert got.shape == (2, cfg.out_channels, h, w)
        diff = (got - want).abs().max().item()
        shift = (moved - got).abs().max().item()
        print(f"{name} {h}x{w}: max abs diff {diff:.2e} (output std {want.std():.3f}, {ours.num_parameters():,} "
              f"params); swapping the time ids moves the output by {shift:.2e}")
        assert want.std() > 0.05 and shift > 1e-3  # real outputs, and the time ids reach them
        assert diff <= TOL
        assert torch.equal(again, want)  # the way back builds the same diffusers model


@pytest.mark.parametrize("d,expected", [(SDXL_BASE, 2_567_463_684), (SDXL_REFINER, 2_259_526_660),
                                        (dict(SDXL_BASE, time_cond_proj_dim=256), 2_567_545_604)],
                         ids=["base", "refiner", "lcm_sdxl"])
def test_real_configs_on_meta_match_diffusers(d: dict, expected: int) -> None:
    cfg = UNetConfig.from_diffusers(d)
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = UNet2DConditionModel(**{k: v for k, v in d.items() if not k.startswith("_")})
        back = UNet2DConditionModel(**cfg.to_diffusers())  # to_diffusers builds the same architecture
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert shapes == {k: v.shape for k, v in back.state_dict().items()}
    n_ref = sum(p.numel() for p in ref.parameters())
    print(f"{d['block_out_channels']}: ours {ours.num_parameters():,}, diffusers {n_ref:,}")
    assert ours.num_parameters() == n_ref == expected
    assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    # our checkpoint folder stores the config as JSON (lists come back as tuples)
    assert UNetConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_real_config_mapping() -> None:
    base, refiner = UNetConfig.from_diffusers(SDXL_BASE), UNetConfig.from_diffusers(SDXL_REFINER)
    assert base.attention == (False, True, True) and base.transformer_depths() == (1, 2, 10)
    assert base.heads_per_level() == (5, 10, 20)  # attention_head_dim holds head counts: 64-wide heads
    assert (base.text_embeds_dim(6), refiner.text_embeds_dim(5)) == (1280, 1280)
    assert refiner.attention == (False, True, True, False) and refiner.transformer_layers_per_block == 4
    with torch.device("meta"):
        unet = UNet(base)
    assert tuple(unet.add_embedding.linear_1.weight.shape) == (1280, 2816)
    assert [len(b.attentions[0].transformer_blocks) if b.attentions else 0 for b in unet.up_blocks] == [10, 2, 0]
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 10
    assert isinstance(unet.mid_block.attentions[0].proj_in, torch.nn.Linear)


def test_bad_added_inputs_are_named(tmp_path) -> None:
    _, ours = converted(TINY["sdxl_test"][0], tmp_path)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 5, 64)
    ids, pooled = time_ids(6), torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"time_ids \(SDXL micro-conditioning\) must be \(B, k\) with B=2.*got None"):
        ours(x, t, c, text_embeds=pooled)
    with pytest.raises(ValueError, match=r"time_ids .* got \(1, 6\)"):
        ours(x, t, c, text_embeds=pooled, time_ids=ids[:1])
    with pytest.raises(ValueError, match=r"text_embeds \(the pooled text embedding\) must be \(B, 40\) with B=2 "
                                         r"for 5 time ids, got \(2, 32\)"):
        ours(x, t, c, text_embeds=pooled, time_ids=ids[:, :5])
    with pytest.raises(ValueError, match=r"must be \(B, 32\) .* got None"):
        ours(x, t, c, time_ids=ids)
    with pytest.raises(ValueError, match="10 time ids of 8 channels each leave no room"):
        ours.config.text_embeds_dim(10)
    plain = UNet(UNetConfig(block_out_channels=(16,), attention=(True,), layers_per_block=1, num_heads=2,
                            cross_attention_dim=64, norm_num_groups=8))
    with pytest.raises(ValueError, match="has no addition_embed_type"):
        plain(x, t, c, text_embeds=pooled, time_ids=ids)
    with pytest.raises(ValueError, match="takes no text_embeds"):
        plain.config.text_embeds_dim(6)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="addition_time_embed_dim must be a positive int, got None"):
        UNetConfig(addition_embed_type="text_time", projection_class_embeddings_input_dim=2816)
    with pytest.raises(ValueError, match="addition_embed_type must be None or 'text_time', got 'text'"):
        UNetConfig(addition_embed_type="text", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=80 is only used with"):
        UNetConfig(projection_class_embeddings_input_dim=80)
    with pytest.raises(ValueError, match="transformer_layers_per_block as a tuple needs one entry per level"):
        UNetConfig(transformer_layers_per_block=(1, 2))
    with pytest.raises(ValueError, match=r"transformer_layers_per_block\[\*\] must be a positive int, got 0"):
        UNetConfig(transformer_layers_per_block=(1, 0, 1, 1))


REFUSED = [
    # (what is changed on the SDXL base config, text the error must contain)
    ({"encoder_hid_dim_type": "ip_image_proj", "encoder_hid_dim": 1280}, "IP-Adapter"),
    ({"addition_embed_type": "text_image"}, "addition_embed_type='text_image' (only 'text_time'"),
    ({"addition_embed_type": "image"}, "addition_embed_type='image'"),
    ({"addition_time_embed_dim": None}, "addition_time_embed_dim=None (addition_embed_type='text_time' needs it"),
    ({"class_embed_type": "projection"}, "class_embed_type='projection'"),
    ({"transformer_layers_per_block": [[1, 1], [2, 2], [10, 10]]}, "transformer_layers_per_block"),
    ({"reverse_transformer_layers_per_block": [[10, 10, 10], [2, 2, 2], [1, 1, 1]]},
     "reverse_transformer_layers_per_block"),
    ({"num_attention_heads": [5, 10, 20]}, "num_attention_heads"),
]


@pytest.mark.parametrize("change,message", REFUSED, ids=[next(iter(c)) + f"={next(iter(c.values()))}"
                                                         for c, _ in REFUSED])
def test_unimplemented_sdxl_features_are_refused_by_name(change: dict, message: str) -> None:
    with pytest.raises(UnsupportedConfigError) as e:
        UNetConfig.from_diffusers(dict(SDXL_BASE, **change))
    assert message in str(e.value), str(e.value)


@pytest.mark.slow
def test_onnx_export_takes_named_added_inputs(tmp_path) -> None:
    import onnxruntime as ort

    _, ours = converted(TINY["refiner_like"][0], tmp_path)
    names = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]

    class Positional(torch.nn.Module):  # the added inputs follow timestep_cond in our forward
        def __init__(self) -> None:
            super().__init__()
            self.unet = ours

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            return self.unet(sample, timestep, encoder_hidden_states, text_embeds=text_embeds, time_ids=time_ids)

    g = torch.Generator().manual_seed(5)

    def inputs(b: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(b, 4, h, w, generator=g), torch.rand(b, generator=g) * 999,
                torch.randn(b, 7, 24, generator=g), torch.randn(b, 24, generator=g),
                torch.rand(b, 5, generator=g) * 1024)

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(Positional(), inputs(1, 8, 8), f, dynamo=False, opset_version=18, input_names=names,
                          output_names=["out"], dynamic_axes={**{n: {0: "B"} for n in names},
                                                              "sample": {0: "B", 2: "H", 3: "W"}})
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == names
    for b, h, w in [(1, 8, 8), (3, 7, 10)]:
        feeds = inputs(b, h, w)
        with torch.no_grad():
            want = ours(*feeds[:3], text_embeds=feeds[3], time_ids=feeds[4]).numpy()
        got = sess.run(None, {n: v.numpy() for n, v in zip(names, feeds)})[0]
        diff = float(np.abs(got - want).max())
        print(f"onnxruntime {b}x{h}x{w}: max abs diff {diff:.2e}")
        assert got.shape == want.shape and diff <= TOL
