"""The checkpoint folder (what training writes and export reads), the VAE folder and diffusers-folder import.

Our checkpoint folder::

    ckpt/
      ldm_checkpoint.json            format marker, version, default image size
      unet/config.json               our UNetConfig            unet/model.safetensors
      vae/config.json                our VAEConfig (holds the latent scaling factor)
      text_encoder/config.json       our TextEncoderConfig     text_encoder/model.safetensors
      tokenizer/vocab.json, merges.txt, tokenizer_config.json
      scheduler/scheduler_config.json   diffusers keys, with "_class_name"

A diffusers pipeline folder (``model_index.json`` + ``unet/ vae/ text_encoder/ tokenizer/
scheduler/``; a ``StableDiffusionPipeline`` or a ``LatentConsistencyModelPipeline``, whose U-Net
takes a guidance embedding) loads into the same models: its configs are mapped to ours
(unsupported features are refused by the config mappers) and its weights load by name, since our
parameter names are diffusers'/transformers' own. Weights are read from safetensors only; nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ldm_runtime.schedulers import scheduler_name_for
from ldm_runtime.tokenizer import SPECIAL_TOKENS
from training import common
from training.common import ConfigError
from training.models.text_encoder import CLIPTextEncoder, TextEncoderConfig, state_dict_from_transformers
from training.models.unet import UNet, UNetConfig
from training.models.vae import AutoencoderKL, VAEConfig

log = logging.getLogger(__name__)

FORMAT = "ldm-checkpoint"
FORMAT_VERSION = 1
MARKER = "ldm_checkpoint.json"
COMPONENT_DIRS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class CheckpointError(ValueError):
    """A checkpoint or diffusers folder that cannot be loaded; the message names the file."""


@dataclass
class LatentDiffusion:
    """The three models of a latent diffusion system plus what sampling needs besides them."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    tokenizer_dir: Path
    tokenizer_config: dict
    scheduler_config: dict
    default_size: tuple[int, int]
    source_kind: str = "checkpoint"
    extra: dict = field(default_factory=dict)

    @property
    def unet_config(self) -> UNetConfig:
        return self.unet.config

    @property
    def vae_config(self) -> VAEConfig:
        return self.vae.config

    @property
    def text_config(self) -> TextEncoderConfig:
        return self.text_encoder.config

    @property
    def scheduler_name(self) -> str:
        return scheduler_name_for(self.scheduler_config)


# ---------------------------------------------------------------------------------------------
# small file helpers with errors that name the file


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _config_from_dict(cls, d: dict, path: Path):
    """Rebuild a config dataclass from JSON: lists become tuples, unknown keys are refused."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise CheckpointError(f"{path}: unknown {cls.__name__} keys {unknown}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid {cls.__name__}: {e}") from None


def _find_weights(folder: Path, stems: tuple[str, ...]) -> list[Path]:
    """The safetensors file(s) of a component folder; refuses pickle-based weights by name."""
    for stem in stems:
        for suffix in ("", ".fp16"):
            single = folder / f"{stem}{suffix}.safetensors"
            if single.is_file():
                return [single]
            index = folder / f"{stem}{suffix}.safetensors.index.json"
            if index.is_file():
                shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                if not shards:
                    raise CheckpointError(f"{index}: empty weight_map")
                return [folder / s for s in shards]
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickled:
        raise CheckpointError(
            f"{folder}: weights are in pickle-based file(s) {pickled}; only safetensors are loaded "
            f"(convert them with a trusted tool first, e.g. save_pretrained(..., safe_serialization=True))"
        )
    raise CheckpointError(f"{folder}: missing weights file (expected {stems[0]}.safetensors)")


def _load_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing weights shard")
        try:
            sd.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return sd


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: Path) -> None:
    """Strict, shape-checked load by name; casts to the model's dtype (fp16 files are fine)."""
    own = model.state_dict()
    if isinstance(model, CLIPTextEncoder):  # transformers 5 drops the text_model. prefix; old ones add position_ids
        sd = state_dict_from_transformers(sd)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the model config: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{where}: tensor {k!r} has shape {list(v.shape)}, the config expects {list(own[k].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def _tokenizer_dir(folder: Path) -> Path:
    """A folder holding ``vocab.json`` + ``merges.txt`` for ``folder``.

    transformers 5 saves only ``tokenizer.json``; its BPE model holds the same vocabulary and
    merges, which are written out once to a temporary folder in CLIP's file format.
    """
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
        raise CheckpointError(f"{folder / missing[0]}: missing tokenizer file (and no tokenizer.json to read it from)")
    model = _read_json(tj).get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise CheckpointError(f"{tj}: expected a BPE tokenizer model with 'vocab' and 'merges', got type {model.get('type')!r}")
    out = Path(tempfile.mkdtemp(prefix="ldm-tokenizer-"))
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def _tokenizer_config(folder: Path) -> dict:
    cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = folder / name
        if p.is_file():
            for k, v in _read_json(p).items():
                if k in SPECIAL_TOKENS:
                    cfg[k] = v["content"] if isinstance(v, dict) else v
                elif k == "model_max_length":
                    cfg[k] = int(v)
    cfg.setdefault("model_max_length", 77)
    cfg.setdefault("bos_token", "<|startoftext|>")
    cfg.setdefault("eos_token", "<|endoftext|>")
    cfg.setdefault("pad_token", cfg["eos_token"])
    if cfg["model_max_length"] > 10_000:  # transformers' "no limit" sentinel
        cfg["model_max_length"] = 77
    return cfg


# ---------------------------------------------------------------------------------------------
# loading


def detect_kind(src: str | os.PathLike) -> str:
    """'checkpoint' or 'diffusers'; raises CheckpointError for anything else."""
    p = Path(src)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a folder (expected an ldm checkpoint folder or a diffusers pipeline folder)")
    if (p / MARKER).is_file():
        return "checkpoint"
    if (p / "model_index.json").is_file():
        return "diffusers"
    raise CheckpointError(f"{p}: neither an ldm checkpoint folder (no {MARKER}) nor a diffusers pipeline folder (no model_index.json)")


def load_models(src: str | os.PathLike) -> LatentDiffusion:
    """Load our checkpoint folder or a diffusers pipeline folder into our models (fp32, eval)."""
    kind = detect_kind(src)
    ld = load_checkpoint(src) if kind == "checkpoint" else load_diffusers(src)
    for m in (ld.unet, ld.vae, ld.text_encoder):
        m.float().eval().requires_grad_(False)
    return ld


def load_checkpoint(path: str | os.PathLike) -> LatentDiffusion:
    root = Path(path)
    meta = _read_json(root / MARKER)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{root / MARKER}: expected format {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{root / MARKER}: unknown checkpoint version {meta.get('version')!r} (this code reads {FORMAT_VERSION})")
    models = {}
    for name, cfg_cls, model_cls in (("unet", UNetConfig, UNet), ("vae", VAEConfig, AutoencoderKL),
                                     ("text_encoder", TextEncoderConfig, CLIPTextEncoder)):
        cfg_path = root / name / "config.json"
        cfg = _config_from_dict(cfg_cls, _read_json(cfg_path), cfg_path)
        model = model_cls(cfg)
        files = _find_weights(root / name, ("model",))
        _load_into(model, _load_weights(files), files[0])
        models[name] = model
    size = meta.get("default_size", {})
    return LatentDiffusion(
        unet=models["unet"], vae=models["vae"], text_encoder=models["text_encoder"],
        tokenizer_dir=root / "tokenizer", tokenizer_config=_tokenizer_config(root / "tokenizer"),
        scheduler_config=_read_json(root / "scheduler" / "scheduler_config.json"),
        default_size=(int(size.get("height", 64)), int(size.get("width", 64))),
        source_kind="checkpoint", extra={k: v for k, v in meta.items() if k not in ("format", "version", "default_size")},
    )


def load_diffusers(path: str | os.PathLike) -> LatentDiffusion:
    root = Path(path)
    index = _read_json(root / "model_index.json")
    for comp in COMPONENT_DIRS:
        if comp not in index:
            raise CheckpointError(f"{root / 'model_index.json'}: no {comp!r} entry (a Stable Diffusion pipeline folder needs {list(COMPONENT_DIRS)})")
        if not (root / comp).is_dir():
            raise CheckpointError(f"{root / comp}: missing component folder")
    unet_cfg = _mapped(UNetConfig.from_diffusers, root / "unet" / "config.json")
    vae_cfg = _mapped(VAEConfig.from_diffusers, root / "vae" / "config.json")
    text_cfg = _mapped(TextEncoderConfig.from_transformers, root / "text_encoder" / "config.json")
    unet, vae, text = UNet(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextEncoder(text_cfg)
    for model, folder, stems in ((unet, "unet", ("diffusion_pytorch_model",)), (vae, "vae", ("diffusion_pytorch_model",)),
                                 (text, "text_encoder", ("model",))):
        files = _find_weights(root / folder, stems)
        _load_into(model, _load_weights(files), files[0])
    sample_size = _read_json(root / "unet" / "config.json").get("sample_size") or 64
    if isinstance(sample_size, (list, tuple)):
        h, w = int(sample_size[0]), int(sample_size[1])
    else:
        h = w = int(sample_size)
    f = vae_cfg.spatial_factor
    scheduler_cfg = _read_json(root / "scheduler" / "scheduler_config.json")
    if index.get("_class_name") != "LatentConsistencyModelPipeline":  # its __init__ leaves the config as is
        scheduler_cfg = _sd_scheduler_fixups(scheduler_cfg)
    return LatentDiffusion(
        unet=unet, vae=vae, text_encoder=text,
        tokenizer_dir=_tokenizer_dir(root / "tokenizer"), tokenizer_config=_tokenizer_config(root / "tokenizer"),
        scheduler_config=scheduler_cfg,
        default_size=(h * f, w * f), source_kind="diffusers",
    )


def _sd_scheduler_fixups(cfg: dict) -> dict:
    """The two rewrites ``StableDiffusionPipeline.__init__`` applies to outdated scheduler configs.

    diffusers forces ``steps_offset=1`` and ``clip_sample=False`` when it loads such a folder, so
    the same folder must give the same schedule here to give the same images.
    """
    cfg = dict(cfg)
    if cfg.get("steps_offset", 1) != 1:
        log.warning("scheduler config has steps_offset=%s; using 1, as diffusers' StableDiffusionPipeline does", cfg["steps_offset"])
        cfg["steps_offset"] = 1
    if cfg.get("clip_sample") is True:
        log.warning("scheduler config has clip_sample=True; using False, as diffusers' StableDiffusionPipeline does")
        cfg["clip_sample"] = False
    return cfg


def _mapped(mapper, path: Path):
    try:
        return mapper(_read_json(path))
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # UnsupportedConfigError is a ValueError
        raise CheckpointError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# saving


def _state_dict(model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def _json_config(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _atomic_folder(out: Path, is_ours, writer) -> Path:
    """Run ``writer(tmp)`` in a temporary folder beside ``out``, then move it into place.

    An existing ``out`` is replaced only if ``is_ours(out)``; unrelated folders are refused.
    """
    out = Path(out)
    if out.exists() and not is_ours(out):
        raise CheckpointError(f"{out}: exists and is not a folder of this kind; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        writer(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_tokenizer(ld: LatentDiffusion, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(ld.tokenizer_dir / name, dest / name)


def save_checkpoint(ld: LatentDiffusion, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    extra: dict | None = None) -> Path:
    """Write ``ld`` as our checkpoint folder, atomically. ``dtype`` (e.g. fp16) casts the weights."""

    def write(tmp: Path) -> None:
        for name, model in (("unet", ld.unet), ("vae", ld.vae), ("text_encoder", ld.text_encoder)):
            _write_json(tmp / name / "config.json", _json_config(model.config))
            save_file(_state_dict(model, dtype), str(tmp / name / "model.safetensors"))
        _copy_tokenizer(ld, tmp / "tokenizer")
        _write_json(tmp / "tokenizer" / "tokenizer_config.json", dict(ld.tokenizer_config))
        _write_json(tmp / "scheduler" / "scheduler_config.json", dict(ld.scheduler_config))
        meta = {"format": FORMAT, "version": FORMAT_VERSION,
                "default_size": {"height": ld.default_size[0], "width": ld.default_size[1]}}
        meta.update(ld.extra)
        meta.update(extra or {})
        _write_json(tmp / MARKER, meta)  # the marker last: a folder without it is not a checkpoint

    return _atomic_folder(Path(path), lambda p: (p / MARKER).is_file(), write)


def export_diffusers(ld: LatentDiffusion, path: str | os.PathLike) -> Path:
    """Write ``ld`` as a diffusers ``StableDiffusionPipeline`` folder (safetensors), atomically."""
    import diffusers  # dev/bench dependency only: version stamp for the configs
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover
        tf_version = "unknown"

    def write(tmp: Path) -> None:
        unet_cfg = {"_class_name": "UNet2DConditionModel", "_diffusers_version": diffusers.__version__, **ld.unet.config.to_diffusers()}
        vae_cfg = {"_class_name": "AutoencoderKL", "_diffusers_version": diffusers.__version__, **ld.vae.config.to_diffusers()}
        text_cfg = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "transformers_version": tf_version,
                    **ld.text_encoder.config.to_transformers()}
        f = ld.vae.config.spatial_factor
        if unet_cfg.get("sample_size") is None:
            unet_cfg["sample_size"] = ld.default_size[0] // f
        _write_json(tmp / "unet" / "config.json", unet_cfg)
        save_file(_state_dict(ld.unet, None), str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
        _write_json(tmp / "vae" / "config.json", vae_cfg)
        save_file(_state_dict(ld.vae, None), str(tmp / "vae" / "diffusion_pytorch_model.safetensors"))
        _write_json(tmp / "text_encoder" / "config.json", text_cfg)
        save_file(_state_dict(ld.text_encoder, None), str(tmp / "text_encoder" / "model.safetensors"))
        _copy_tokenizer(ld, tmp / "tokenizer")
        tc = ld.tokenizer_config
        specials = {"unk_token": tc["eos_token"], **{k: tc[k] for k in SPECIAL_TOKENS if k in tc}}
        _write_json(tmp / "tokenizer" / "tokenizer_config.json", {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": tc["model_max_length"], **specials,
            "do_lower_case": True})
        _write_json(tmp / "tokenizer" / "special_tokens_map.json", specials)
        _write_json(tmp / "scheduler" / "scheduler_config.json", dict(ld.scheduler_config))
        _write_json(tmp / "model_index.json", {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "image_encoder": [None, None],
            "scheduler": ["diffusers", ld.scheduler_config.get("_class_name", "DDIMScheduler")],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})

    return _atomic_folder(Path(path), lambda p: (p / "model_index.json").is_file(), write)


# ---------------------------------------------------------------------------------------------
# the VAE folder that `ldm train vae` writes (and every checkpoint's vae/ is one)


def save_vae(vae: AutoencoderKL, folder: Path, metrics: dict | None = None) -> Path:
    """`folder/config.json` (our VAEConfig, holding scaling_factor) + `folder/model.safetensors`."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    tmp = folder / ".model.safetensors.tmp"
    save_file(sd, str(tmp))
    tmp.replace(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(common.config_to_dict(vae.config), indent=2) + "\n")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return folder


def load_vae(folder: str | Path) -> AutoencoderKL:
    """Read what `save_vae` wrote (or the `vae/` folder of a checkpoint)."""
    folder = Path(folder)
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ConfigError(f"--vae: {p} is missing (expected the vae/ folder written by `ldm train vae`)")
    cfg = common.config_from_dict(VAEConfig, json.loads(cfg_path.read_text()))
    vae = AutoencoderKL(cfg)
    vae.load_state_dict(load_file(str(w_path)))
    return vae


def set_checkpoint_vae(checkpoint: str | Path, vae_folder: str | Path) -> Path:
    """Put a decoder fine-tune (``--init=... --train_encoder=false``) into a trained checkpoint, in place.

    The U-Net of ``checkpoint`` was trained on its VAE's latents, so the new VAE must have the
    same architecture, the same encoder weights (compared at the checkpoint's storage dtype) and
    the same scaling factor; otherwise ``ConfigError`` and the checkpoint is left as it was. The
    weights keep the checkpoint's dtype; the write is atomic (temporary folder, then rename).
    """
    checkpoint = Path(checkpoint)
    ld = load_checkpoint(checkpoint)
    dtype = _stored_dtype(checkpoint / "vae" / "model.safetensors")
    new = load_vae(vae_folder)
    _check_same_vae_config(ld.vae, new, checkpoint, vae_folder)
    _check_same_encoder(ld.vae, new, dtype, checkpoint, vae_folder)
    ld.vae = new.eval().requires_grad_(False)
    metrics = Path(vae_folder) / "metrics.json"
    note = {"decoder_finetune": str(vae_folder),
            **({"metrics": json.loads(metrics.read_text())} if metrics.is_file() else {})}
    return save_checkpoint(ld, checkpoint, dtype=dtype if dtype != torch.float32 else None, extra={"vae": note})


def _stored_dtype(weights: Path) -> torch.dtype:
    """The dtype of the first tensor of a safetensors file (checkpoints store one dtype)."""
    with safe_open(str(weights), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def _check_same_vae_config(old: AutoencoderKL, new: AutoencoderKL, checkpoint: Path, vae_folder) -> None:
    old_cfg, new_cfg = common.config_to_dict(old.config), common.config_to_dict(new.config)
    diff = sorted(k for k in old_cfg if old_cfg[k] != new_cfg.get(k))
    if diff:
        raise ConfigError(f"{vae_folder}: its config differs from {checkpoint}/vae in {', '.join(diff)} "
                          f"({', '.join(f'{k}: {old_cfg[k]!r} vs {new_cfg.get(k)!r}' for k in diff)}); "
                          "only a decoder fine-tune of the checkpoint's VAE (--train_encoder=false) fits its U-Net")


def _check_same_encoder(old: AutoencoderKL, new: AutoencoderKL, dtype: torch.dtype, checkpoint: Path,
                        vae_folder) -> None:
    """The encoder tensors must be equal once rounded to the checkpoint's storage dtype."""
    old_sd, new_sd = old.state_dict(), new.state_dict()
    changed = [k for k in old_sd if k.startswith(("encoder.", "quant_conv."))
               and not torch.equal(old_sd[k], new_sd[k].to(dtype).to(old_sd[k].dtype))]
    if changed:
        raise ConfigError(f"{vae_folder}: {len(changed)} encoder tensors differ from {checkpoint}/vae (first: {changed[0]}); "
                          "the U-Net was trained on the old encoder's latents: fine-tune with --train_encoder=false")


__all__ = ["CheckpointError", "LatentDiffusion", "detect_kind", "export_diffusers", "load_checkpoint",
           "load_diffusers", "load_models", "load_vae", "save_checkpoint", "save_vae", "set_checkpoint_vae"]
