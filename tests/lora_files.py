"""LoRA files for tests, written the ways users get them, and diffusers' fused weights as the reference.

- ``save_peft_unet_lora``: peft's ``add_adapter`` on a diffusers U-Net, saved by diffusers'
  ``save_lora_weights`` (with or without the ``lora_adapter_metadata`` that carries alpha);
- ``write_lora`` + ``lora_pair``: a state dict written by hand (kohya names, text encoders:
  peft cannot ``add_adapter`` on transformers 5's CLIP);
- ``fused_deltas``: what diffusers changes, per parameter, after ``load_lora_weights`` +
  ``set_adapters`` + ``fuse_lora`` (fused weight minus base weight), keyed as ``LoraFile.modules``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "time_emb_proj"]  # what LCM-LoRA and LoCon files train


def write_lora(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file of ``tensors`` (kept in their dtypes)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def lora_pair(rng: np.random.Generator, shape: tuple[int, ...], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) float32 for a weight of ``shape``: linear (out, in), or a conv (out, in, kh, kw)
    with a (r, in, kh, kw) down and a (out, r, 1, 1) up, as kohya and peft store them."""
    out, rest = shape[0], tuple(shape[1:])
    up_shape = (out, rank) + (1, 1) * (len(shape) == 4)
    down = rng.normal(0.0, 0.2, (rank, *rest)).astype(np.float32)
    return down, rng.normal(0.0, 0.2, up_shape).astype(np.float32)


def kohya_name(prefix: str, module: str) -> str:
    """kohya's module name: ``lora_unet_`` + the module path with every ``.`` as ``_``."""
    return prefix + module.replace(".", "_")


def load_pipeline(model_dir: Path):
    """The diffusers pipeline in ``model_dir`` (SD or SDXL, as its model_index.json says)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(model_dir))


def with_copied_models(pipe):
    """``pipe`` with its own copies of the models a LoRA changes (U-Net, text encoders), the rest shared."""
    parts = dict(pipe.components)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if parts.get(component) is not None:
            parts[component] = copy.deepcopy(parts[component])
    return type(pipe)(**parts)


def save_peft_unet_lora(pipe, out_dir: Path, *, metadata: bool, seed: int = 0, **config) -> Path:
    """A peft LoRA (random A and B) on a copy of ``pipe``'s U-Net, saved as diffusers saves it;
    ``config`` goes to ``LoraConfig`` (r, lora_alpha, target_modules, ...)."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(init_lora_weights=False, **config))
    state = get_peft_model_state_dict(unet)
    meta = unet.peft_config["default"].to_dict() if metadata else None
    type(pipe).save_lora_weights(str(out_dir), unet_lora_layers=state, unet_lora_adapter_metadata=meta)
    return out_dir / "pytorch_lora_weights.safetensors"


def weights(pipe) -> dict[str, np.ndarray]:
    """Every weight of the pipeline's U-Net and text encoders, keyed as ``LoraFile.modules``."""
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, value in model.state_dict().items():
            if component != "unet" and not name.startswith(("text_model.", "text_projection")):
                name = "text_model." + name  # transformers 5's CLIPTextModel drops the prefix
            out[f"{component}.{name}"] = value.detach().float().numpy().copy()
    return out


def weight_shapes(pipe) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in weights(pipe).items()}


def fused_deltas(pipe, loras: list[tuple[Path, float]]) -> tuple[dict[str, np.ndarray], dict]:
    """(diffusers' fused minus base weight for every weight the LoRAs change, the base weights);
    ``pipe`` itself is left as it was."""
    pipe = with_copied_models(pipe)
    base = weights(pipe)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    pipe.set_adapters(names, [scale for _, scale in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    fused = weights(pipe)
    assert fused.keys() == base.keys()
    return {k: fused[k] - base[k] for k in base if not np.array_equal(fused[k], base[k])}, base
