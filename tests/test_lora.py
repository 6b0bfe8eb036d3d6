"""LoRA at load time on exported bundles, against diffusers' ``load_lora_weights`` + ``fuse_lora``.

A tiny diffusers pipeline (real CLIP vocabulary) is exported once to an fp32 bundle; each case
writes a LoRA file, loads it into the bundle with ``Pipeline.load(..., loras=)`` and into a fresh
diffusers pipeline that fuses it, and compares the "np" images for the same latents (PNDM, 2
steps, CFG). The bundle on disk is hashed before and after: loading LoRAs never changes it.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors.numpy import save_file  # noqa: E402

from export.bundle import export_bundle  # noqa: E402
from ldm_runtime.lora import LoraError  # noqa: E402
from ldm_runtime.lora_apply import load_loras, read_lora_map  # noqa: E402
from ldm_runtime.manifest import Manifest  # noqa: E402
from ldm_runtime.pipeline import Pipeline  # noqa: E402

# the live oracle (diffusers) and two exports: slow tier
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TOL = 2e-3  # max abs on the "np" output (CONTRACT.md)
PROMPT = "a red circle on a blue background"
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
CALL = dict(num_inference_steps=2, guidance_scale=7.5)


@pytest.fixture(scope="module")
def bundle(tiny_diffusers_dir, tmp_path_factory) -> Path:
    return export_bundle(tiny_diffusers_dir, tmp_path_factory.mktemp("lora") / "bundle", precision="fp32",
                         components=("text_encoder", "unet", "vae_decoder"))


@pytest.fixture(scope="module")
def base_images(bundle) -> dict[bool, np.ndarray]:
    """The bundle's image without LoRA, on the CPU variant (True) and the portable graph (False)."""
    return {cpu: run_ours(bundle, [], cpu_variant=cpu) for cpu in (True, False)}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def latents() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)


def run_ours(bundle: Path, loras: list, cpu_variant: bool = True) -> np.ndarray:
    before = digest(bundle)
    pipe = Pipeline.load(bundle, threads=1, cpu_variant=cpu_variant, loras=loras)
    images = pipe(PROMPT, latents=latents(), output_type="np", **CALL).images
    assert digest(bundle) == before
    return images


def run_diffusers(folder: Path, loras: list[tuple[Path, float]]) -> np.ndarray:
    """diffusers' image with each LoRA loaded and fused at its scale, one after the other."""
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(str(folder))
    sd.set_progress_bar_config(disable=True)
    for path, scale in loras:
        sd.load_lora_weights(str(path.parent), weight_name=path.name)
        sd.fuse_lora(lora_scale=scale)
        sd.unload_lora_weights()
    with torch.no_grad():
        return sd(PROMPT, latents=torch.from_numpy(latents()), output_type="np", **CALL).images


def check(ours: np.ndarray, ref: np.ndarray, base: np.ndarray, what: str) -> None:
    d, moved = float(np.abs(ours - ref).max()), float(np.abs(ref - base).max())
    print(f"{what}: max abs vs diffusers {d:.2e} (the LoRA moves the image by {moved:.2e})")
    assert ours.shape == ref.shape
    assert moved > 10 * TOL  # the LoRA changes the image well beyond the tolerance
    assert d <= TOL


def peft_unet_lora(folder: Path, out: Path, rank: int, alpha: float, metadata: bool, seed: int = 0,
                   targets: tuple[str, ...] = ATTN) -> Path:
    """A peft-format U-Net LoRA (diffusers' ``add_adapter`` on the tiny U-Net, B != 0) saved as diffusers saves it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    unet.add_adapter(config)
    layers = get_peft_model_state_dict(unet)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=layers, weight_name="lora.safetensors",
                                              **({"unet_lora_adapter_metadata": config.to_dict()} if metadata else {}))
    return out / "lora.safetensors"


def normal(rng: np.random.Generator, *shape: int, std: float = 0.2) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def shapes_of(bundle: Path) -> dict[str, list[int]]:
    man = Manifest.load(bundle, verify=False)
    return {k: list(s) for c in ("unet", "text_encoder") for k, (s, _) in read_lora_map(man, c).items()}


def kohya_conv_lora(bundle: Path, out: Path, rank: int = 2, alpha: float = 1.0) -> Path:
    """A kohya (LoCon) file by hand: a 3x3 ResNet conv, its time_emb_proj and an attention projection."""
    shapes = shapes_of(bundle)
    rng = np.random.default_rng(3)
    sd: dict[str, np.ndarray] = {}
    for module in ("down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.time_emb_proj",
                   "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"):
        shape = shapes[f"unet.{module}.weight"]
        name = "lora_unet_" + module.replace(".", "_")
        if len(shape) == 4:
            down, up = normal(rng, rank, shape[1], *shape[2:]), normal(rng, shape[0], rank, 1, 1)
        else:
            down, up = normal(rng, rank, shape[1]), normal(rng, shape[0], rank)
        sd.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                   f"{name}.alpha": np.array(alpha, dtype=np.float32)})
    save_file(sd, str(out))
    return out


def text_encoder_lora(bundle: Path, out: Path, rank: int = 4) -> Path:
    """A text-encoder LoRA as a peft-format state dict (q/k/v/out_proj of every layer), alpha = rank."""
    shapes = shapes_of(bundle)
    rng = np.random.default_rng(5)
    sd: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        if key.startswith("text_encoder.") and ".self_attn." in key:
            module = key[: -len(".weight")]
            sd[f"{module}.lora_A.weight"] = normal(rng, rank, shape[1], std=0.5)
            sd[f"{module}.lora_B.weight"] = normal(rng, shape[0], rank, std=0.5)
    save_file(sd, str(out))
    return out


# -- parity --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metadata", [True, False], ids=["with-metadata", "without-metadata"])
def test_peft_unet_lora_with_alpha_other_than_rank_matches_fuse_lora(bundle, base_images, tiny_diffusers_dir,
                                                                     tmp_path, metadata):
    # alpha 8, rank 4: with the metadata the scale is 2 x the file's product, without it 1 x (alpha = rank)
    path = peft_unet_lora(tiny_diffusers_dir, tmp_path, rank=4, alpha=8, metadata=metadata)
    ref = run_diffusers(tiny_diffusers_dir, [(path, 0.7)])
    check(run_ours(bundle, [(path, 0.7)]), ref, base_images[True], f"peft U-Net LoRA, metadata {metadata}")


def test_portable_graph_and_cpu_variant_both_take_the_lora(bundle, base_images, tiny_diffusers_dir, tmp_path):
    path = peft_unet_lora(tiny_diffusers_dir, tmp_path, rank=4, alpha=8, metadata=True, seed=1)
    ref = run_diffusers(tiny_diffusers_dir, [(path, 1.0)])
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["components"]["unet"]["cpu_variant"]["file"]  # the default CPU load opens the variant
    check(run_ours(bundle, [(path, 1.0)], cpu_variant=False), ref, base_images[False], "portable graph")
    check(run_ours(bundle, [(path, 1.0)], cpu_variant=True), ref, base_images[True], "CPU variant")


def test_kohya_locon_file_with_3x3_conv_and_time_emb_proj_matches_fuse_lora(bundle, base_images,
                                                                            tiny_diffusers_dir, tmp_path):
    path = kohya_conv_lora(bundle, tmp_path / "locon.safetensors", rank=2, alpha=1.0)
    check(run_ours(bundle, [(path, 0.9)]), run_diffusers(tiny_diffusers_dir, [(path, 0.9)]), base_images[True],
          "kohya LoCon")


def test_text_encoder_lora_matches_fuse_lora(bundle, base_images, tiny_diffusers_dir, tmp_path):
    path = text_encoder_lora(bundle, tmp_path / "te.safetensors")
    check(run_ours(bundle, [(path, 1.0)]), run_diffusers(tiny_diffusers_dir, [(path, 1.0)]), base_images[True],
          "text-encoder LoRA")


def test_two_loras_at_different_scales_match_fusing_both(bundle, base_images, tiny_diffusers_dir, tmp_path):
    a = peft_unet_lora(tiny_diffusers_dir, tmp_path / "a", rank=4, alpha=8, metadata=True, seed=2)
    b = kohya_conv_lora(bundle, tmp_path / "b.safetensors")
    loras = [(a, 0.6), (b, -0.8)]
    check(run_ours(bundle, loras), run_diffusers(tiny_diffusers_dir, loras), base_images[True], "two LoRAs")


def test_scale_zero_gives_the_base_image_bit_for_bit(bundle, base_images, tiny_diffusers_dir, tmp_path):
    path = peft_unet_lora(tiny_diffusers_dir, tmp_path, rank=4, alpha=8, metadata=True)
    te = text_encoder_lora(bundle, tmp_path / "te.safetensors")
    for cpu in (True, False):
        assert np.array_equal(run_ours(bundle, [(path, 0.0), (te, 0.0)], cpu_variant=cpu), base_images[cpu])


def test_no_lora_loads_as_before(bundle):
    pipe = Pipeline.load(bundle, threads=1)
    assert pipe.loras is None
    assert Pipeline.load(bundle, threads=1, loras=[]).loras is None


# -- the map ----------------------------------------------------------------------------------------------

def test_the_map_names_every_targetable_weight_as_an_external_initializer(bundle):
    import onnx

    from export.weights import external_ref

    man = Manifest.load(bundle, verify=True)
    for component in ("unet", "text_encoder"):
        entry = man.data["components"][component]
        assert entry["lora_map"] in man.data["files"]
        targets = read_lora_map(man, component)
        graphs = [entry["file"], *([entry["cpu_variant"]["file"]] if entry.get("cpu_variant") else [])]
        for g in graphs:
            inits = {t.name: t for t in onnx.load(str(bundle / g), load_external_data=False).graph.initializer}
            for key, (shape, per_graph) in targets.items():
                w = per_graph[g]
                t = inits[w.initializer]
                assert external_ref(t) == (w.location, w.offset, w.length)
                assert list(t.dims) == (list(shape) if w.layout == "as_is" else list(shape)[::-1])
    keys = set(read_lora_map(man, "unet")) | set(read_lora_map(man, "text_encoder"))
    # attention projections, ff, proj_in/out (1x1 convs here), ResNet convs, time_emb_proj; the text encoder's
    block = "unet.down_blocks.0.attentions.0"
    for key in (f"{block}.transformer_blocks.0.attn1.to_q.weight", f"{block}.transformer_blocks.0.attn2.to_out.0.weight",
                f"{block}.transformer_blocks.0.ff.net.0.proj.weight", f"{block}.transformer_blocks.0.ff.net.2.weight",
                f"{block}.proj_in.weight", f"{block}.proj_out.weight", "unet.down_blocks.0.resnets.0.conv1.weight",
                "unet.down_blocks.0.resnets.0.time_emb_proj.weight",
                "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.weight",
                "text_encoder.text_model.encoder.layers.1.mlp.fc2.weight"):
        assert key in keys, key


def test_fp16_bundle_fuses_in_fp16_and_refuses_a_fused_weight_beyond_its_range(tiny_checkpoint_dir, tmp_path):
    out = export_bundle(tiny_checkpoint_dir, tmp_path / "fp16", precision="fp16", components=("unet",))
    man = Manifest.load(out, verify=True)
    targets = read_lora_map(man, "unet")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    shape, per_graph = targets[key]
    w = per_graph["unet.onnx"]
    assert w.dtype == "float16"
    module = key[: -len(".weight")]
    rng = np.random.default_rng(0)
    down, up = normal(rng, 2, shape[1]), normal(rng, shape[0], 2)
    save_file({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}, str(tmp_path / "ok.safetensors"))
    fused = load_loras(man, [(tmp_path / "ok.safetensors", 1.0)], {"unet": "unet.onnx"}).for_graph("unet", "unet.onnx")
    base = np.fromfile(out / w.location, dtype=np.uint8)[w.offset:w.offset + w.length].view(np.float16)
    base = base.reshape(shape[::-1] if w.layout == "transposed" else shape).astype(np.float32)
    delta = up @ down
    want = (base + (delta.T if w.layout == "transposed" else delta)).astype(np.float16)
    assert fused[w.initializer].dtype == np.float16
    np.testing.assert_array_equal(fused[w.initializer], want)
    save_file({f"{module}.lora_A.weight": down * 1e3, f"{module}.lora_B.weight": up * 1e3},
              str(tmp_path / "big.safetensors"))
    before = digest(out)
    with pytest.raises(LoraError, match=rf"big\.safetensors.*{key}.*float16 range"):
        load_loras(man, [(tmp_path / "big.safetensors", 1.0)], {"unet": "unet.onnx"})
    assert digest(out) == before


# -- bad input: one clear error naming file and key, before any session, bundle untouched ---------------

def _no_sessions(monkeypatch):
    import onnxruntime

    def refuse(*a, **k):
        raise AssertionError("a session was created")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def _refused(bundle: Path, monkeypatch, loras: list, match: str, error: type[Exception] = LoraError) -> None:
    before = digest(bundle)
    _no_sessions(monkeypatch)
    with pytest.raises(error, match=match):
        pipe = Pipeline.load(bundle, threads=1, loras=loras)
        pipe.open_engines()
    assert digest(bundle) == before


def test_a_lora_for_another_model_family_is_refused(bundle, tmp_path, monkeypatch):
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"unet.{module}.lora_A.weight": np.ones((4, 320), np.float32),  # SD 1.5's width, not 32
               f"unet.{module}.lora_B.weight": np.ones((320, 4), np.float32)}, str(tmp_path / "sd15.safetensors"))
    _refused(bundle, monkeypatch, [(tmp_path / "sd15.safetensors", 1.0)], rf"sd15\.safetensors.*{module}")


def test_a_file_that_is_not_safetensors_is_refused(bundle, tmp_path, monkeypatch):
    import pickle

    (tmp_path / "lora.ckpt").write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": [1.0]}))
    _refused(bundle, monkeypatch, [(tmp_path / "lora.ckpt", 1.0)], r"lora\.ckpt")


def test_a_truncated_file_is_refused(bundle, tiny_diffusers_dir, tmp_path, monkeypatch):
    path = peft_unet_lora(tiny_diffusers_dir, tmp_path, rank=4, alpha=8, metadata=True)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _refused(bundle, monkeypatch, [(tmp_path / "cut.safetensors", 1.0)], r"cut\.safetensors")


def test_keys_that_target_nothing_in_the_bundle_are_refused(bundle, tmp_path, monkeypatch):
    module = "down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"unet.{module}.lora_A.weight": np.ones((4, 32), np.float32),
               f"unet.{module}.lora_B.weight": np.ones((32, 4), np.float32)}, str(tmp_path / "nothing.safetensors"))
    _refused(bundle, monkeypatch, [(tmp_path / "nothing.safetensors", 1.0)], rf"nothing\.safetensors.*{module}")


@pytest.mark.parametrize("scale", [math.nan, math.inf])
def test_a_non_finite_scale_is_refused(bundle, tmp_path, monkeypatch, scale):
    path = text_encoder_lora(bundle, tmp_path / "te.safetensors")
    _refused(bundle, monkeypatch, [(path, scale)], r"te\.safetensors.*scale")


def test_loras_that_are_not_path_scale_pairs_are_refused(bundle, monkeypatch):
    _refused(bundle, monkeypatch, ["style.safetensors"], r"\(path, scale\)", TypeError)


# -- ldm generate --lora and the PNG parameters ---------------------------------------------------------------

def test_lora_arg_takes_an_optional_scale_after_the_last_colon():
    from ldm_runtime.generate import lora_arg

    assert lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert lora_arg("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert lora_arg("dir:x/style.safetensors") == ("dir:x/style.safetensors", 1.0)
    assert lora_arg("a:b.safetensors:-1.5") == ("a:b.safetensors", -1.5)


def test_ldm_generate_with_loras_names_them_in_the_png(bundle, tmp_path, capsys):
    from ldm_runtime.cli import main
    from ldm_runtime.images import read_parameters

    te = text_encoder_lora(bundle, tmp_path / "te.safetensors")
    locon = kohya_conv_lora(bundle, tmp_path / "locon.safetensors")
    loras = [(te, 0.5), (locon, 1.0)]
    code = main(["generate", str(bundle), PROMPT, "--steps", "2", "--seed", "3", "--out", str(tmp_path / "a.png"),
                 "--lora", f"{te}:0.5", "--lora", str(locon)])
    assert code == 0, capsys.readouterr().err
    params = read_parameters(tmp_path / "a.png")
    assert params["loras"] == [{"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "scale": s}
                               for p, s in loras]
    from PIL import Image

    want = Pipeline.load(bundle, loras=loras)(PROMPT, num_inference_steps=2, seed=3).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png").convert("RGB")), np.asarray(want))
    assert "loras" not in read_parameters(Path(_plain_png(bundle, tmp_path)))


def _plain_png(bundle: Path, tmp_path: Path) -> str:
    from ldm_runtime.cli import main

    assert main(["generate", str(bundle), PROMPT, "--steps", "1", "--seed", "3", "--out", str(tmp_path / "b.png")]) == 0
    return str(tmp_path / "b.png")


def test_ldm_generate_refuses_a_bad_lora_in_one_line(bundle, tmp_path, capsys):
    from ldm_runtime.cli import main

    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    code = main(["generate", str(bundle), PROMPT, "--steps", "1", "--out", str(tmp_path / "x.png"),
                 "--lora", f"{tmp_path / 'bad.safetensors'}:0.7"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "bad.safetensors" in err, err
    assert not (tmp_path / "x.png").exists()
