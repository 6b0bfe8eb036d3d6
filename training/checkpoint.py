"""The checkpoint folder (what training writes and export reads), the VAE folder and diffusers-folder import.

Our checkpoint folder::

    ckpt/
      ldm_checkpoint.json            format marker, version, default image size
      unet/config.json               our UNetConfig            unet/model.safetensors
      vae/config.json                our VAEConfig (holds the latent scaling factor)
      text_encoder/config.json       our TextEncoderConfig     text_encoder/model.safetensors
      tokenizer/vocab.json, merges.txt, tokenizer_config.json
      scheduler/scheduler_config.json   diffusers keys, with "_class_name"
    SDXL checkpoints add (the marker then holds an "sdxl" object, see ``SDXLOptions``):
      text_encoder_2/config.json     our TextEncoderConfig with projection_dim   text_encoder_2/model.safetensors
      tokenizer_2/vocab.json, merges.txt, tokenizer_config.json
    and a refiner has no text_encoder/ and tokenizer/.

A diffusers pipeline folder (``model_index.json`` + ``unet/ vae/ text_encoder/ tokenizer/
scheduler/``; a ``StableDiffusionPipeline`` or a ``LatentConsistencyModelPipeline``, whose U-Net
takes a guidance embedding; or a ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline``
with ``text_encoder_2/ tokenizer_2/`` too) loads into the same models: its configs are mapped to
ours (unsupported features are refused by the config mappers) and its weights load by name, since
our parameter names are diffusers'/transformers' own. Weights are read from safetensors only;
nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import functools
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
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
# model_index.json entries of an SDXL folder: components read here, and those that may be set but are not used
SDXL_COMPONENTS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
SDXL_UNUSED_COMPONENTS = ("feature_extractor",)  # only IP-Adapter (image_encoder, refused) reads it


class CheckpointError(ValueError):
    """A checkpoint or diffusers folder that cannot be loaded; the message names the file."""


@dataclass(frozen=True)
class SDXLOptions:
    """What an SDXL pipeline folder says besides its models (the checkpoint marker's "sdxl" object)."""

    pipeline: str = "StableDiffusionXLPipeline"  # or "StableDiffusionXLImg2ImgPipeline" (a refiner is one)
    force_zeros_for_empty_prompt: bool = True  # negative_prompt=None gives all-zero negative (pooled) embeddings
    requires_aesthetics_score: bool = False  # time ids end with an aesthetic score: 5 per row, not 6
    vae_force_upcast: bool = True  # the VAE's force_upcast: it runs in fp32 inside an fp16 pipeline

    def __post_init__(self) -> None:
        if self.pipeline not in SDXL_PIPELINES:
            raise ValueError(f"pipeline must be one of {SDXL_PIPELINES}, got {self.pipeline!r}")
        for f in dataclasses.fields(self)[1:]:
            if not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be true or false, got {getattr(self, f.name)!r}")

    @property
    def num_time_ids(self) -> int:
        """Values per row of the U-Net's `time_ids`: sizes and crop (6), or with the aesthetic score 5."""
        return 5 if self.requires_aesthetics_score else 6


@dataclass
class LatentDiffusion:
    """The models of a latent diffusion system plus what sampling needs besides them.

    SD has one text encoder; SDXL (``sdxl`` set) adds ``text_encoder_2`` (with projection; its
    pooled output feeds the U-Net's ``text_embeds``), and an SDXL refiner has only that one
    (``text_encoder``, ``tokenizer_dir`` and ``tokenizer_config`` are then None).
    """

    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder | None
    tokenizer_dir: Path | None
    tokenizer_config: dict | None
    scheduler_config: dict
    default_size: tuple[int, int]
    source_kind: str = "checkpoint"
    extra: dict = field(default_factory=dict)
    text_encoder_2: CLIPTextEncoder | None = None
    tokenizer_2_dir: Path | None = None
    tokenizer_2_config: dict | None = None
    sdxl: SDXLOptions | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.sdxl is not None

    def text_encoders(self) -> dict[str, CLIPTextEncoder]:
        """The text encoders present, by folder name, in the order their hidden states are concatenated."""
        return {name: te for name, te in (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2))
                if te is not None}

    @property
    def unet_config(self) -> UNetConfig:
        return self.unet.config

    @property
    def vae_config(self) -> VAEConfig:
        return self.vae.config

    @property
    def text_config(self) -> TextEncoderConfig:
        if self.text_encoder is None:
            raise CheckpointError("this SDXL refiner has no text_encoder (only text_encoder_2)")
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
    for m in (ld.unet, ld.vae, *ld.text_encoders().values()):
        m.float().eval().requires_grad_(False)
    return ld


def is_sdxl_source(src: str | os.PathLike) -> bool:
    """Whether ``src`` (a checkpoint or diffusers folder) holds an SDXL pipeline; reads its JSON only."""
    root = Path(src)
    if detect_kind(root) == "checkpoint":
        return "sdxl" in _read_json(root / MARKER)
    return _is_sdxl_index(_read_json(root / "model_index.json"))


def load_checkpoint(path: str | os.PathLike) -> LatentDiffusion:
    root = Path(path)
    meta = _read_json(root / MARKER)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{root / MARKER}: expected format {FORMAT!r}, got {meta.get('format')!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{root / MARKER}: unknown checkpoint version {meta.get('version')!r} (this code reads {FORMAT_VERSION})")
    sdxl = _sdxl_options(meta, root / MARKER)
    names = ["text_encoder"] if sdxl is None else [n for n in ("text_encoder", "text_encoder_2") if (root / n).is_dir()]
    configs = {"unet": _our_config(root, "unet", UNetConfig), "vae": _our_config(root, "vae", VAEConfig),
               **{n: _our_config(root, n, TextEncoderConfig) for n in names}}
    _check_text_conditioning(configs, sdxl, root)
    models = _build_models(root, configs, lambda name: "model")
    size = meta.get("default_size", {})
    tok, tok_2 = (root / "tokenizer", root / "tokenizer_2")
    return LatentDiffusion(
        unet=models["unet"], vae=models["vae"], text_encoder=models.get("text_encoder"),
        tokenizer_dir=tok if "text_encoder" in models else None,
        tokenizer_config=_tokenizer_config(tok) if "text_encoder" in models else None,
        scheduler_config=_read_json(root / "scheduler" / "scheduler_config.json"),
        default_size=(int(size.get("height", 64)), int(size.get("width", 64))),
        source_kind="checkpoint",
        extra={k: v for k, v in meta.items() if k not in ("format", "version", "default_size", "sdxl")},
        text_encoder_2=models.get("text_encoder_2"),
        tokenizer_2_dir=tok_2 if "text_encoder_2" in models else None,
        tokenizer_2_config=_tokenizer_config(tok_2) if "text_encoder_2" in models else None,
        sdxl=sdxl,
    )


def _our_config(root: Path, name: str, cls):
    path = root / name / "config.json"
    return _config_from_dict(cls, _read_json(path), path)


def _sdxl_options(meta: dict, where: Path) -> SDXLOptions | None:
    if "sdxl" not in meta:
        return None
    if not isinstance(meta["sdxl"], dict):
        raise CheckpointError(f"{where}: 'sdxl' must be an object of {SDXLOptions.__name__} keys, got {meta['sdxl']!r}")
    return _config_from_dict(SDXLOptions, meta["sdxl"], where)


def _build_models(root: Path, configs: dict[str, Any], weights_stem) -> dict[str, torch.nn.Module]:
    """Build each model of ``configs`` and load its weights from ``root/<name>/<weights_stem(name)>.safetensors``."""
    classes = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder, "text_encoder_2": CLIPTextEncoder}
    models: dict[str, torch.nn.Module] = {}
    for name, cfg in configs.items():
        model = classes[name](cfg)
        files = _find_weights(root / name, (weights_stem(name),))
        _load_into(model, _load_weights(files), files[0])
        models[name] = model
    return models


def _diffusers_weights_stem(name: str) -> str:
    return "model" if name.startswith("text_encoder") else "diffusion_pytorch_model"


def load_diffusers(path: str | os.PathLike) -> LatentDiffusion:
    root = Path(path)
    index = _read_json(root / "model_index.json")
    if _is_sdxl_index(index):
        return _load_sdxl_diffusers(root, index)
    for comp in COMPONENT_DIRS:
        if comp not in index:
            raise CheckpointError(f"{root / 'model_index.json'}: no {comp!r} entry (a Stable Diffusion pipeline folder needs {list(COMPONENT_DIRS)})")
        if not (root / comp).is_dir():
            raise CheckpointError(f"{root / comp}: missing component folder")
    configs = _diffusers_configs(root, {"text_encoder": False})
    _check_text_conditioning(configs, None, root)
    models = _build_models(root, configs, _diffusers_weights_stem)
    scheduler_cfg = _read_json(root / "scheduler" / "scheduler_config.json")
    if index.get("_class_name") != "LatentConsistencyModelPipeline":  # its __init__ leaves the config as is
        scheduler_cfg = _sd_scheduler_fixups(scheduler_cfg)
    return LatentDiffusion(
        unet=models["unet"], vae=models["vae"], text_encoder=models["text_encoder"],
        tokenizer_dir=_tokenizer_dir(root / "tokenizer"), tokenizer_config=_tokenizer_config(root / "tokenizer"),
        scheduler_config=scheduler_cfg, default_size=_diffusers_default_size(root, configs["vae"]),
        source_kind="diffusers",
    )


def _diffusers_configs(root: Path, text_encoders: dict[str, bool]) -> dict[str, Any]:
    """Our configs for the U-Net, the VAE and the named text encoders (name -> with projection)."""
    configs = {"unet": _mapped(UNetConfig.from_diffusers, root / "unet" / "config.json"),
               "vae": _mapped(VAEConfig.from_diffusers, root / "vae" / "config.json")}
    for name, with_projection in text_encoders.items():
        configs[name] = _mapped(functools.partial(TextEncoderConfig.from_transformers, with_projection=with_projection),
                                root / name / "config.json")
    return configs


def _diffusers_default_size(root: Path, vae_cfg: VAEConfig) -> tuple[int, int]:
    """The pipelines' default image size: the U-Net's sample_size times the VAE's spatial factor."""
    sample_size = _read_json(root / "unet" / "config.json").get("sample_size") or 64
    if isinstance(sample_size, (list, tuple)):
        h, w = int(sample_size[0]), int(sample_size[1])
    else:
        h = w = int(sample_size)
    f = vae_cfg.spatial_factor
    return h * f, w * f


def _is_sdxl_index(index: dict) -> bool:
    return str(index.get("_class_name", "")).startswith("StableDiffusionXL") or "text_encoder_2" in index


def _sdxl_options_from_index(index: dict, vae_config: dict, where: Path) -> SDXLOptions:
    """The SDXL flags of ``model_index.json`` (diffusers' defaults where absent); refuses what we do not implement."""
    cls = index.get("_class_name")
    if cls not in SDXL_PIPELINES:
        raise CheckpointError(f"{where}: {cls} is not supported "
                              f"(SDXL folders are imported as {' or '.join(SDXL_PIPELINES)})")
    for key, value in index.items():
        if key.startswith("_") or key in SDXL_COMPONENTS or key in SDXL_UNUSED_COMPONENTS:
            continue
        if key == "image_encoder" and _is_set(value):
            raise CheckpointError(f"{where}: an image_encoder (IP-Adapter) is not supported")
        if isinstance(value, list) and _is_set(value):
            raise CheckpointError(f"{where}: component {key!r} ({'.'.join(map(str, value))}) is not supported")
        if not isinstance(value, list) and key not in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
            raise CheckpointError(f"{where}: pipeline option {key}={value!r} is not supported")
    # only the img2img pipeline reads requires_aesthetics_score; the text-to-image one always builds 6 time ids
    aesthetics = index.get("requires_aesthetics_score", False) if cls == "StableDiffusionXLImg2ImgPipeline" else False
    try:
        return SDXLOptions(pipeline=cls, force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                           requires_aesthetics_score=aesthetics, vae_force_upcast=vae_config.get("force_upcast", True))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _is_set(entry: Any) -> bool:
    """A model_index component entry that names a class (not ``[null, null]``)."""
    return isinstance(entry, list) and any(v is not None for v in entry)


def _load_sdxl_diffusers(root: Path, index: dict) -> LatentDiffusion:
    """A ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` folder (a refiner has no text_encoder)."""
    where = root / "model_index.json"
    options = _sdxl_options_from_index(index, _read_json(root / "vae" / "config.json"), where)
    present = [c for c in SDXL_COMPONENTS if _is_set(index.get(c))]
    for comp in ("unet", "vae", "scheduler", "text_encoder_2", "tokenizer_2"):
        if comp not in present:
            raise CheckpointError(f"{where}: no {comp!r} entry (an SDXL pipeline folder needs unet, vae, scheduler, "
                                  "text_encoder_2 and tokenizer_2; text_encoder and tokenizer are optional together)")
    if ("text_encoder" in present) != ("tokenizer" in present):
        raise CheckpointError(f"{where}: text_encoder and tokenizer come together; this folder has only "
                              f"{'text_encoder' if 'text_encoder' in present else 'tokenizer'}")
    for comp in present:
        if not (root / comp).is_dir():
            raise CheckpointError(f"{root / comp}: missing component folder")
    configs = _diffusers_configs(root, {n: n == "text_encoder_2" for n in ("text_encoder", "text_encoder_2")
                                        if n in present})
    _check_text_conditioning(configs, options, root)
    models = _build_models(root, configs, _diffusers_weights_stem)
    te = models.get("text_encoder")
    return LatentDiffusion(
        unet=models["unet"], vae=models["vae"], text_encoder=te,
        tokenizer_dir=_tokenizer_dir(root / "tokenizer") if te is not None else None,
        tokenizer_config=_tokenizer_config(root / "tokenizer") if te is not None else None,
        scheduler_config=_read_json(root / "scheduler" / "scheduler_config.json"),  # SDXL pipelines rewrite nothing
        default_size=_diffusers_default_size(root, configs["vae"]), source_kind="diffusers",
        text_encoder_2=models["text_encoder_2"], tokenizer_2_dir=_tokenizer_dir(root / "tokenizer_2"),
        tokenizer_2_config=_tokenizer_config(root / "tokenizer_2"), sdxl=options,
    )


def check_text_conditioning(ld: LatentDiffusion, where: str | os.PathLike) -> None:
    """The import's check of the U-Net's text inputs against the text encoders, for models built in memory."""
    configs = {"unet": ld.unet_config, **{n: te.config for n, te in ld.text_encoders().items()}}
    _check_text_conditioning(configs, ld.sdxl, Path(where))


def _check_text_conditioning(configs: dict[str, Any], sdxl: SDXLOptions | None, where: Path) -> None:
    """The U-Net's text inputs fit the text encoders: the context width and, for SDXL, the pooled width."""
    u = configs["unet"]
    widths = {n: c.hidden_size for n, c in configs.items() if n in ("text_encoder", "text_encoder_2")}
    if sum(widths.values()) != u.cross_attention_dim:
        given = " + ".join(f"{n} {w}" for n, w in widths.items())
        raise CheckpointError(f"{where}: the U-Net expects a {u.cross_attention_dim}-wide text context "
                              f"(cross_attention_dim), but the text encoders give {sum(widths.values())} ({given})")
    if sdxl is None:
        if u.addition_embed_type is not None:
            raise CheckpointError(f"{where}: the U-Net takes text_embeds and time_ids (addition_embed_type="
                                  f"{u.addition_embed_type!r}, SDXL), which need an SDXL pipeline with text_encoder_2")
        return
    if "text_encoder_2" not in configs:
        raise CheckpointError(f"{where}: an SDXL pipeline needs text_encoder_2 "
                              "(its pooled output is the U-Net's text_embeds)")
    if u.addition_embed_type != "text_time":
        raise CheckpointError(f"{where}: an SDXL pipeline needs a U-Net with addition_embed_type='text_time', "
                              f"got {u.addition_embed_type!r}")
    projection = configs["text_encoder_2"].projection_dim
    n = sdxl.num_time_ids
    try:
        text_embeds = u.text_embeds_dim(n)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if projection != text_embeds:
        raise CheckpointError(
            f"{where}: the U-Net's projection_class_embeddings_input_dim={u.projection_class_embeddings_input_dim} "
            f"is {n} time ids x {u.addition_time_embed_dim} + a {text_embeds}-wide text_embeds, but text_encoder_2 "
            f"projects to {projection} (requires_aesthetics_score={str(sdxl.requires_aesthetics_score).lower()}: "
            "5 time ids with it, 6 without)")


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


def _copy_tokenizer(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, dest / name)


def save_checkpoint(ld: LatentDiffusion, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    extra: dict | None = None) -> Path:
    """Write ``ld`` as our checkpoint folder, atomically. ``dtype`` (e.g. fp16) casts the weights."""
    tokenizers = {"text_encoder": ("tokenizer", ld.tokenizer_dir, ld.tokenizer_config),
                  "text_encoder_2": ("tokenizer_2", ld.tokenizer_2_dir, ld.tokenizer_2_config)}

    def write(tmp: Path) -> None:
        for name, model in (("unet", ld.unet), ("vae", ld.vae), *ld.text_encoders().items()):
            _write_json(tmp / name / "config.json", _json_config(model.config))
            save_file(_state_dict(model, dtype), str(tmp / name / "model.safetensors"))
        for name in ld.text_encoders():
            folder, src, config = tokenizers[name]
            if src is None or config is None:
                raise CheckpointError(f"{name} has no {folder} (its folder and options are both needed)")
            _copy_tokenizer(src, tmp / folder)
            _write_json(tmp / folder / "tokenizer_config.json", dict(config))
        _write_json(tmp / "scheduler" / "scheduler_config.json", dict(ld.scheduler_config))
        meta: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION,
                                "default_size": {"height": ld.default_size[0], "width": ld.default_size[1]}}
        if ld.sdxl is not None:
            meta["sdxl"] = dataclasses.asdict(ld.sdxl)
        meta.update(ld.extra)
        meta.update(extra or {})
        _write_json(tmp / MARKER, meta)  # the marker last: a folder without it is not a checkpoint

    return _atomic_folder(Path(path), lambda p: (p / MARKER).is_file(), write)


def export_diffusers(ld: LatentDiffusion, path: str | os.PathLike) -> Path:
    """Write ``ld`` as a diffusers ``StableDiffusionPipeline`` folder (safetensors), atomically."""
    if ld.is_sdxl or ld.text_encoder is None or ld.tokenizer_dir is None or ld.tokenizer_config is None:
        raise CheckpointError("writing an SDXL checkpoint as a diffusers folder is not implemented "
                              "(export_diffusers writes StableDiffusionPipeline folders only)")
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
        _copy_tokenizer(ld.tokenizer_dir, tmp / "tokenizer")
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


__all__ = ["CheckpointError", "LatentDiffusion", "SDXLOptions", "detect_kind", "export_diffusers", "is_sdxl_source",
           "load_checkpoint", "load_diffusers", "load_models", "load_vae", "save_checkpoint", "save_vae",
           "set_checkpoint_vae"]
