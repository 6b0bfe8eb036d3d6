"""Stages 2 and 3: train the text-conditioned U-Net (and, jointly, the text encoder) on frozen-VAE latents.

    python -m training.cli train unet --out_dir=runs/unet --vae=runs/vae/vae --max_steps=20000
    torchrun --nproc_per_node 2 -m training.cli train unet ...     (DDP; gloo on CPU, nccl on GPU)

Reads top to bottom: config, setup, tokenizer (a small BPE learned from the captions), data
(latents of the frozen VAE, cached once), models, optimiser, loop (loss, EMA, checkpoint, eval
with sample grids, log), then the checkpoint folder (EMA weights) that `ldm export` reads.

The text encoder is trained jointly with the U-Net from scratch, the LDM paper's recipe for its
text-to-image model (Rombach et al. 2022, Sec. 4.3.1); `--text_encoder=DIR` starts from a
pretrained one instead (`--train_text_encoder=false` freezes it). `--init=CHECKPOINT` fine-tunes
a trained checkpoint (its U-Net, text encoder and tokenizer; the architecture flags are then read
from it), e.g. with `--timestep_bias=earlier`, which draws low-noise timesteps more often (the
`--timestep_bias_*` options follow diffusers' training scripts).

Every random draw of a step (posterior sample, noise, timestep, caption dropout) is made for the
whole global batch from one generator and then sliced by rank, so N processes with batch B/N each
see exactly the samples one process with batch B sees.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ldm_runtime.noise_schedule import alphas_cumprod_from_betas, make_betas, rescale_zero_terminal_snr
from ldm_runtime.tokenizer import EOT_LITERAL, SOT_LITERAL, CLIPTokenizer
from training import common
from training.bpe import train_tokenizer
from training.checkpoint import LatentDiffusion, load_vae, save_checkpoint
from training.common import ConfigError
from training.data import FolderDataset, ShapesDataset
from training.evaluate import evaluate_prompts
from training.losses import min_snr_weights
from training.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from training.models.unet import UNet, UNetConfig

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_BIAS = ("none", "earlier", "later", "range")


@dataclass
class UNetTrainConfig:
    out_dir: str = "runs/unet"
    vae: str = "runs/vae/vae"  # the vae/ folder written by `ldm train vae` (its config holds scaling_factor)
    data: str = "shapes"  # "shapes" (built-in) or a folder of images with captions
    image_size: int = 64
    train_length: int = 20_000  # samples of the built-in data
    seed: int = 0
    # tokenizer and text encoder
    tokenizer: str = ""  # folder with vocab.json + merges.txt; empty: learn a BPE from the training captions
    bpe_merges: int = 1000
    text_encoder: str = ""  # pretrained text encoder folder (config.json + model.safetensors); empty: from scratch
    train_text_encoder: bool = True
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 512
    # fine-tuning: start from a trained checkpoint folder (U-Net, text encoder, tokenizer); "" trains from scratch
    init: str = ""
    # with --init: cross-attention per level, a superset of the checkpoint's; each added block starts as the
    # identity (its proj_out zero), so the fine-tune starts from the checkpoint's exact outputs. Empty: as is
    grow_attention: tuple[bool, ...] = ()
    # U-Net (with --init, the architecture comes from the checkpoint)
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 1
    head_dim: int = 32
    norm_num_groups: int = 32
    gradient_checkpointing: bool = False
    # diffusion
    prediction_type: str = "epsilon"  # or "v_prediction"
    zero_snr: bool = False  # rescale betas to zero terminal SNR; sampling then uses trailing timesteps
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    min_snr_gamma: float = 0.0  # > 0: Min-SNR-gamma loss weights (5 is the paper's choice)
    caption_dropout: float = 0.1  # empty caption this often, for classifier-free guidance
    # which timesteps get trained: uniform ("none"), or `multiplier` times as often in the first ("earlier",
    # low noise) or last ("later", high noise) `portion` of the schedule, or in [begin, end) ("range")
    timestep_bias: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    # optimisation
    batch_size: int = 32  # global, split over processes
    max_steps: int = 20_000
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = True  # bf16 autocast where available (CUDA)
    # bookkeeping
    log_every: int = 10
    ckpt_every: int = 100
    eval_every: int = 1000
    eval_prompts: int = 8  # half from the validation split, half with held-out combinations
    eval_guidance: float = 5.0
    sample_steps: int = 25
    export_dir: str = ""  # final checkpoint folder; empty: OUT_DIR/checkpoint
    export_dtype: str = "fp32"  # or "fp16"
    device: str = "auto"
    threads: int = 0
    max_minutes: float = 0.0  # stop early (state + checkpoint written) after this wall time; 0: no limit
    progress: bool = True

    def __post_init__(self) -> None:
        common.check_positive(self, "image_size", "batch_size", "max_steps", "lr", "log_every", "ckpt_every",
                              "eval_every", "sample_steps", "num_train_timesteps")
        common.check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        common.check_choice("export_dtype", self.export_dtype, ("fp32", "fp16"))
        common.check_choice("beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        if self.zero_snr and self.prediction_type != "v_prediction":
            raise ConfigError("--zero_snr=true needs --prediction_type=v_prediction (epsilon is undefined at SNR 0)")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"--caption_dropout: expected a probability in [0, 1), got {self.caption_dropout}")
        common.check_choice("timestep_bias", self.timestep_bias, TIMESTEP_BIAS)
        if not self.timestep_bias_multiplier > 0:
            raise ConfigError(f"--timestep_bias_multiplier: expected a number > 0, got {self.timestep_bias_multiplier}")
        if not 0.0 < self.timestep_bias_portion <= 1.0:
            raise ConfigError(f"--timestep_bias_portion: expected a fraction in (0, 1], got {self.timestep_bias_portion}")
        if self.timestep_bias == "range" and not (
                0 <= self.timestep_bias_begin < self.timestep_bias_end <= self.num_train_timesteps):
            raise ConfigError(f"--timestep_bias=range needs 0 <= --timestep_bias_begin < --timestep_bias_end <= "
                              f"--num_train_timesteps ({self.num_train_timesteps}), got [{self.timestep_bias_begin}, "
                              f"{self.timestep_bias_end})")
        if len(self.attention) != len(self.block_out_channels):
            raise ConfigError(f"--attention needs one flag per level of --block_out_channels "
                              f"({len(self.block_out_channels)}), got {len(self.attention)}")


# ----------------------------------------------------------------------------------------------
# pieces

class Denoiser(torch.nn.Module):
    """U-Net + text encoder as one module, so DDP averages the gradients of both in one reducer."""

    def __init__(self, unet: UNet, text_encoder: CLIPTextEncoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t, t, self.text_encoder(input_ids))  # (B, C, h, w), context (B, 77, D)


def scheduler_config(cfg: UNetTrainConfig) -> dict:
    """The diffusers DDIMScheduler config the checkpoint carries: the training schedule plus sampling defaults."""
    return {
        "_class_name": "DDIMScheduler", "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "beta_schedule": cfg.beta_schedule,
        "prediction_type": cfg.prediction_type, "rescale_betas_zero_snr": cfg.zero_snr,
        # zero terminal SNR only helps if sampling starts at t = T - 1 (Lin et al. 2023, Sec. 3.3)
        "timestep_spacing": "trailing" if cfg.zero_snr else "leading",
        "steps_offset": 0 if cfg.zero_snr else 1, "set_alpha_to_one": False, "clip_sample": False,
    }


def training_alphas_cumprod(cfg: UNetTrainConfig) -> torch.Tensor:
    """alpha_bar_t of the training schedule (float32), from the runtime's own schedule code."""
    betas = make_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule)
    if cfg.zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.from_numpy(alphas_cumprod_from_betas(betas))


def timestep_weights(cfg: UNetTrainConfig) -> torch.Tensor | None:
    """Probabilities of drawing each training timestep, or None for uniform draws (plain `randint`).

    The biased timesteps get `multiplier` times the weight of the others: with "earlier" and portion p,
    a draw lands in the first p * T timesteps with probability p m / (p m + 1 - p).
    """
    T = cfg.num_train_timesteps
    if cfg.timestep_bias == "none" or cfg.timestep_bias_multiplier == 1.0:
        return None
    k = max(1, int(round(cfg.timestep_bias_portion * T)))
    biased = {"earlier": slice(0, k), "later": slice(T - k, T),
              "range": slice(cfg.timestep_bias_begin, cfg.timestep_bias_end)}[cfg.timestep_bias]
    w = torch.ones(T, dtype=torch.float64)
    w[biased] *= cfg.timestep_bias_multiplier
    return w / w.sum()


def init_models(cfg: UNetTrainConfig, vae_config) -> "LatentDiffusion":
    """The checkpoint --init names, checked against this run: same training schedule and prediction
    type, and latents of the same autoencoder (latent channels and scale factor)."""
    from training.checkpoint import CheckpointError, load_models
    try:
        ld = load_models(cfg.init)
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"--init={cfg.init}: {e}") from e
    ours, theirs = scheduler_config(cfg), ld.scheduler_config
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "rescale_betas_zero_snr")
    defaults = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}  # diffusers' when a config omits them
    diff = [f"{k}: checkpoint {theirs.get(k, defaults.get(k))!r}, this run {ours[k]!r}" for k in keys
            if theirs.get(k, defaults.get(k)) != ours[k]]
    if diff:
        raise ConfigError(f"--init={cfg.init} was trained with another diffusion schedule; set the options to match "
                          f"({'; '.join(diff)})")
    vc = ld.vae_config
    if vc.latent_channels != vae_config.latent_channels or abs(vc.scaling_factor - vae_config.scaling_factor) > 1e-6:
        raise ConfigError(f"--init={cfg.init}: its U-Net was trained on latents of another autoencoder (latent channels "
                          f"{vc.latent_channels}, scale factor {vc.scaling_factor:.6g}), --vae={cfg.vae} has "
                          f"{vae_config.latent_channels} and {vae_config.scaling_factor:.6g}")
    return ld


def load_captions(cfg: UNetTrainConfig) -> tuple[ShapesDataset | FolderDataset, list[str]]:
    if cfg.data == "shapes":
        shapes = ShapesDataset("train", size=cfg.image_size, length=cfg.train_length, seed=cfg.seed)
        return shapes, shapes.caption_corpus()
    folder = FolderDataset(cfg.data, size=cfg.image_size)  # raises DatasetError naming the problem
    return folder, [c for _, c in folder.items]


@torch.no_grad()
def encode_dataset(vae, ds, n: int, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, logvar) of every image, (N, C, h, w) each: the VAE is frozen, so this runs once."""
    means, logvars = [], []
    for a in range(0, n, batch):
        idx = range(a, min(n, a + batch))
        if isinstance(ds, ShapesDataset):
            x = torch.from_numpy(np.stack([ds.sample(i)[0] for i in idx])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        else:
            x = torch.stack([ds[i][0] for i in idx])
        m, lv = vae.encode(x)
        means.append(m)
        logvars.append(lv)
    # contiguous (NCHW) whatever layout the convolutions returned: a reloaded cache is NCHW, and the
    # U-Net's kernels (hence the float rounding) depend on the layout, which would break bit-exact resume
    return torch.cat(means).contiguous(), torch.cat(logvars).contiguous()


def latent_cache(cfg: UNetTrainConfig, vae, ds, n: int, d: common.Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """Load OUT_DIR/latents.safetensors when it matches this VAE and data, else compute (rank 0 writes it)."""
    path = Path(cfg.out_dir) / "latents.safetensors"
    vae_file = Path(cfg.vae) / "model.safetensors"
    key = json.dumps({"vae": str(vae_file.resolve()), "vae_mtime": vae_file.stat().st_mtime_ns, "data": cfg.data,
                      "n": n, "size": cfg.image_size, "seed": cfg.seed})
    if path.is_file():
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return f.get_tensor("mean"), f.get_tensor("logvar")
    t = time.time()
    mean, logvar = encode_dataset(vae, ds, n)
    logger.info("encoded %d images to latents %s in %.0f s", n, tuple(mean.shape[1:]), time.time() - t)
    if d.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".latents.tmp.safetensors")
        save_file({"mean": mean.contiguous(), "logvar": logvar.contiguous()}, str(tmp), metadata={"key": key})
        tmp.replace(path)
    return mean, logvar


def eval_prompts(cfg: UNetTrainConfig, n: int) -> tuple[list[str], list | None]:
    """Fixed prompts (and their ground truth when the data is built in): half validation, half held-out."""
    if cfg.data != "shapes":
        _, captions = load_captions(cfg)
        return captions[:n], None
    prompts, attrs = [], []
    for split, k in (("val", (n + 1) // 2), ("heldout", n // 2)):
        ds = ShapesDataset(split, size=cfg.image_size, length=max(k, 1), seed=cfg.seed)
        for i in range(k):
            a, cap = ds.attrs(i)
            prompts.append(cap)
            attrs.append(a)
    return prompts, attrs


@dataclass
class TokenizerFiles:
    """A tokenizer folder (CLIP-format vocab.json + merges.txt) and its options."""

    dir: Path
    config: dict

    def tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer(self.dir / "vocab.json", self.dir / "merges.txt", **self.config)

    def vocab(self) -> dict[str, int]:
        return json.loads((self.dir / "vocab.json").read_text(encoding="utf-8"))


def tokenizer_files(cfg: UNetTrainConfig, captions: list[str], init: LatentDiffusion | None,
                    d: common.Dist) -> TokenizerFiles:
    """--tokenizer, else the --init checkpoint's, else a BPE learned from the captions into OUT_DIR/tokenizer
    (by rank 0, once: a resumed run reuses it)."""
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else init.tokenizer_dir if init else Path(cfg.out_dir) / "tokenizer"
    tok_config = {"model_max_length": 77, "pad_token": EOT_LITERAL, "bos_token": SOT_LITERAL, "eos_token": EOT_LITERAL}
    if init and not cfg.tokenizer:
        tok_config.update({k: v for k, v in init.tokenizer_config.items() if k in tok_config})
    if not cfg.tokenizer and not init and not (tok_dir / "vocab.json").is_file() and d.is_main:
        train_tokenizer(captions, tok_dir, cfg.bpe_merges)
    if d.enabled:
        dist.barrier()
    for name in ("vocab.json", "merges.txt"):
        if not (tok_dir / name).is_file():
            raise ConfigError(f"--tokenizer: {tok_dir / name} is missing (expected a CLIP-format vocab.json + merges.txt)")
    return TokenizerFiles(tok_dir, tok_config)


@dataclass
class TrainingSet:
    """What every step draws from: the posterior of every image and the token ids of every caption."""

    mean: torch.Tensor  # (N, C, h, w)
    logvar: torch.Tensor  # (N, C, h, w)
    ids: torch.Tensor  # (N, 77) int64
    empty_ids: torch.Tensor  # (77,): the unconditional prompt of classifier-free guidance
    shift: float  # the VAE's latent shift and scale: z = (sample - shift) * scale
    scale: float

    def __len__(self) -> int:
        return len(self.ids)


def training_set(cfg: UNetTrainConfig, vae, ds, captions: list[str], tokenizer: CLIPTokenizer,
                 d: common.Dist) -> TrainingSet:
    ids = torch.from_numpy(tokenizer(captions))
    empty_ids = torch.from_numpy(tokenizer([""]))[0]
    vcfg = vae.config
    if cfg.image_size % vcfg.spatial_factor:
        raise ConfigError(f"--image_size={cfg.image_size} must be a multiple of the VAE's spatial factor {vcfg.spatial_factor}")
    mean, logvar = latent_cache(cfg, vae, ds, len(captions), d)
    return TrainingSet(mean, logvar, ids, empty_ids, shift=vcfg.shift_factor or 0.0, scale=vcfg.scaling_factor)


def build_text_encoder(cfg: UNetTrainConfig, init: LatentDiffusion | None, vocab: dict[str, int]) -> CLIPTextEncoder:
    """The --init checkpoint's text encoder, a pretrained one (--text_encoder=DIR), or a new one for the vocabulary."""
    if init and cfg.text_encoder:
        raise ConfigError("--init and --text_encoder both name a text encoder; give one")
    if init:
        text_encoder = init.text_encoder.float()
    elif cfg.text_encoder:
        text_encoder = load_text_encoder(Path(cfg.text_encoder))
    else:
        text_encoder = CLIPTextEncoder(TextEncoderConfig(
            vocab_size=len(vocab), hidden_size=cfg.text_hidden_size, intermediate_size=cfg.text_intermediate_size,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, max_position_embeddings=77,
            hidden_act="gelu", bos_token_id=vocab[SOT_LITERAL], eos_token_id=vocab[EOT_LITERAL],
            pad_token_id=vocab[EOT_LITERAL]))
    if text_encoder.config.vocab_size < len(vocab):  # a pretrained one with a larger tokenizer
        which = "--init" if init else "--text_encoder"
        raise ConfigError(f"{which}: its text encoder's vocab_size {text_encoder.config.vocab_size} is smaller than "
                          f"the tokenizer's {len(vocab)}")
    return text_encoder.requires_grad_(cfg.train_text_encoder)


def load_text_encoder(folder: Path) -> CLIPTextEncoder:
    """A pretrained text encoder folder: our config.json + model.safetensors."""
    text_encoder = CLIPTextEncoder(common.config_from_dict(TextEncoderConfig, json.loads((folder / "config.json").read_text())))
    text_encoder.load_state_dict(load_file(str(folder / "model.safetensors")))
    return text_encoder


def build_unet(cfg: UNetTrainConfig, init: LatentDiffusion | None, vcfg, context_dim: int) -> UNet:
    """The --init checkpoint's U-Net (trainable, fp32), or a new one for these latents and text embeddings."""
    if init:
        unet = init.unet.float()
        if cfg.grow_attention:
            unet = grow_attention(unet, cfg.grow_attention)
        unet.requires_grad_(True)
        unet.config.gradient_checkpointing = cfg.gradient_checkpointing
        return unet
    if cfg.grow_attention:
        raise ConfigError("--grow_attention adds attention to an --init checkpoint's U-Net; give --init, or set "
                          "--attention for a U-Net trained from scratch")
    return UNet(UNetConfig(in_channels=vcfg.latent_channels, out_channels=vcfg.latent_channels,
                           block_out_channels=cfg.block_out_channels, attention=cfg.attention,
                           layers_per_block=cfg.layers_per_block, num_heads=None, head_dim=cfg.head_dim,
                           cross_attention_dim=context_dim, norm_num_groups=cfg.norm_num_groups,
                           sample_size=cfg.image_size // vcfg.spatial_factor,
                           gradient_checkpointing=cfg.gradient_checkpointing))


def grow_attention(unet: UNet, attention: tuple[bool, ...]) -> UNet:
    """A copy of `unet` with cross-attention at every level `attention` marks, computing the same function:
    the trained weights are copied, and each added Transformer2D has a zero proj_out, so its residual
    adds nothing until training moves it (the zero-initialised output projection of LDM's own blocks)."""
    old = tuple(unet.config.attention)
    if len(attention) != len(old):
        raise ConfigError(f"--grow_attention needs one flag per U-Net level ({len(old)}, the checkpoint's "
                          f"attention={old}), got {len(attention)}: {attention}")
    dropped = [i for i, (a, b) in enumerate(zip(old, attention)) if a and not b]
    if dropped:
        raise ConfigError(f"--grow_attention={attention} drops the checkpoint's attention at level(s) {dropped} "
                          f"(it has {old}); it can only add levels")
    added = [i for i, (a, b) in enumerate(zip(old, attention)) if b and not a]
    grown = UNet(dataclasses.replace(unet.config, attention=tuple(attention)))
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    n = len(old)
    new_prefixes = tuple(f"down_blocks.{i}.attentions." for i in added) + \
        tuple(f"up_blocks.{n - 1 - i}.attentions." for i in added)
    stray = [k for k in missing if not k.startswith(new_prefixes)]
    if unexpected or stray:  # the architectures differ beyond the added blocks: a bug here, not bad input
        raise RuntimeError(f"grow_attention: weights that do not carry over: missing {stray}, unexpected {unexpected}")
    with torch.no_grad():
        for name, module in grown.named_modules():
            if name.startswith(new_prefixes) and name.endswith("proj_out"):
                module.weight.zero_()
                module.bias.zero_()
    logger.info("grew cross-attention at level(s) %s: U-Net %.2fM -> %.2fM params", added,
                unet.num_parameters() / 1e6, grown.num_parameters() / 1e6)
    return grown


def build_model(cfg: UNetTrainConfig, init: LatentDiffusion | None, vcfg, vocab: dict[str, int],
                d: common.Dist) -> tuple[Denoiser, torch.nn.Module]:
    """The text encoder and the U-Net as one module on the device, and that module as the loop calls it
    (wrapped in DDP when there are several processes)."""
    text_encoder = build_text_encoder(cfg, init, vocab)
    model = Denoiser(build_unet(cfg, init, vcfg, text_encoder.config.hidden_size), text_encoder).to(d.device)
    if not d.enabled:
        return model, model
    device_ids = [d.local_rank] if d.device.type == "cuda" else None
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def make_optimizer(cfg: UNetTrainConfig, model: torch.nn.Module) -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
    """AdamW over the trainable parameters, with no weight decay on norms and biases; (optimizer, parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    return opt, params


def log_setup(cfg: UNetTrainConfig, d: common.Dist, model: Denoiser, vocab_size: int, vcfg, n: int) -> None:
    if not d.is_main:
        return
    if cfg.init:
        logger.info("fine-tuning %s: U-Net %s", cfg.init, model.unet.config)
    h = cfg.image_size // vcfg.spatial_factor
    logger.info("U-Net %.2fM params, text encoder %.2fM params (vocab %d), latents %dx%dx%d, %d images, %d processes",
                model.unet.num_parameters() / 1e6, model.text_encoder.num_parameters() / 1e6, vocab_size,
                vcfg.latent_channels, h, h, n, d.world_size)
    if cfg.zero_snr and cfg.min_snr_gamma > 0:
        logger.warning("--min_snr_gamma=%g with --zero_snr: the v-prediction weight min(SNR, gamma) / (SNR + 1) is 0 "
                       "at t = T - 1, so the first sampling step is never trained; consider --min_snr_gamma=0",
                       cfg.min_snr_gamma)


# ----------------------------------------------------------------------------------------------
# one step

def draw_batch(cfg: UNetTrainConfig, data: TrainingSet, idx: np.ndarray, g: torch.Generator,
               t_weights: torch.Tensor | None, rows: slice, device: torch.device):
    """Every draw for the global batch (posterior sample, noise, timestep, caption dropout), then this
    rank's rows: (z0, noise, t, input_ids)."""
    b, idx_t = cfg.batch_size, torch.from_numpy(idx)
    post_eps = torch.randn((b, *data.mean.shape[1:]), generator=g)
    noise = torch.randn((b, *data.mean.shape[1:]), generator=g)
    t = (torch.randint(0, cfg.num_train_timesteps, (b,), generator=g) if t_weights is None
         else torch.multinomial(t_weights, b, replacement=True, generator=g))
    drop = torch.rand((b,), generator=g) < cfg.caption_dropout
    mean, logvar = data.mean[idx_t], data.logvar[idx_t]
    z0 = ((mean + torch.exp(0.5 * logvar) * post_eps) - data.shift) * data.scale
    input_ids = torch.where(drop[:, None], data.empty_ids[None, :], data.ids[idx_t])
    return tuple(v[rows].to(device) for v in (z0, noise, t, input_ids))


def diffusion_loss(cfg: UNetTrainConfig, model: torch.nn.Module, alphas_cumprod: torch.Tensor, z0: torch.Tensor,
                   noise: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the eps or v prediction at q(z_t | z_0), Min-SNR-gamma weighted if asked;
    the forward pass runs under bf16 autocast on CUDA (--bf16)."""
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * noise  # q(z_t | z_0)
    target = noise if cfg.prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * z0
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and z_t.device.type == "cuda"):
        pred = model(z_t, t.float(), input_ids)
    per_sample = (pred.float() - target).pow(2).mean((1, 2, 3))
    if cfg.min_snr_gamma > 0:
        snr = (ab / (1 - ab)).flatten()
        per_sample = per_sample * min_snr_weights(snr, cfg.min_snr_gamma, cfg.prediction_type)
    return per_sample.mean()


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter],
                   grad_clip: float) -> torch.Tensor:
    """Backward (DDP averages the gradients), clip, step; returns the gradient norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return gnorm


# ----------------------------------------------------------------------------------------------
# the loop

def train(cfg: UNetTrainConfig, resume: bool = False) -> dict:
    """Train (or resume) the U-Net and text encoder; writes the checkpoint folder; returns final figures."""
    cfg, d = common.start_run(cfg, resume)

    # a checkpoint to fine-tune brings its models and tokenizer; the autoencoder must be the one it was trained on
    vae = load_vae(cfg.vae).eval().requires_grad_(False)
    init = init_models(cfg, vae.config) if cfg.init else None

    # data: tokenized captions and the latents of the frozen autoencoder
    ds, captions = load_captions(cfg)
    tok = tokenizer_files(cfg, captions, init, d)
    data = training_set(cfg, vae, ds, captions, tok.tokenizer(), d)

    # models, optimiser, EMA, and the training state that holds them
    vocab = tok.vocab()
    model, ddp_model = build_model(cfg, init, vae.config, vocab, d)
    opt, params = make_optimizer(cfg, model)
    ema = common.EMA(model, cfg.ema_decay)
    g = torch.Generator().manual_seed(cfg.seed + 3)  # every random draw of a step
    state = dict(modules={"model": model}, emas={"model": ema}, optimizers={"model": opt}, generators={"train": g})
    metrics = common.MetricsLog(Path(cfg.out_dir) / "metrics.jsonl", d.is_main)
    step, pos = common.start_or_resume(cfg, resume, d, metrics, state)
    log_setup(cfg, d, model, len(vocab), vae.config, len(data))

    alphas_cumprod, t_weights = training_alphas_cumprod(cfg).to(d.device), timestep_weights(cfg)
    rows = common.shard(cfg.batch_size, d)
    prompts, prompt_attrs = eval_prompts(cfg, cfg.eval_prompts)
    snapshot = EMASnapshot(cfg, model, ema, vae, tok)
    t0, last_eval, window = time.time(), {}, common.LossWindow(("loss",))
    bar = common.progress(cfg.max_steps, step, cfg.progress and d.is_main, "unet")
    model.train()
    while step < cfg.max_steps:
        idx, pos = common.batch_indices(len(data), cfg.batch_size, pos, cfg.seed)
        z0, noise, t, input_ids = draw_batch(cfg, data, idx, g, t_weights, rows, d.device)
        lr = common.scheduled_lr(opt, step, cfg)
        loss = diffusion_loss(cfg, ddp_model, alphas_cumprod, z0, noise, t, input_ids)
        gnorm = optimizer_step(opt, loss, params, cfg.grad_clip)
        ema.update(model)
        step += 1
        bar.update(1)
        window.add(loss)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            rec, dt = window.means(d)
            metrics.write(step=step, **rec, lr=lr, grad_norm=float(gnorm), sec_per_step=dt, elapsed_s=time.time() - t0)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", s_it=f"{dt:.2f}")
        if step % cfg.ckpt_every == 0:
            common.save_run_state(cfg, step, pos, d, state)
        if d.is_main and step % cfg.eval_every == 0:
            last_eval = evaluate_and_export(cfg, snapshot, prompts, prompt_attrs, step, metrics)
        if common.out_of_time(cfg, t0, step):
            break
    bar.close()
    common.save_run_state(cfg, step, pos, d, state)
    result: dict = {"step": step, "train_seconds": time.time() - t0}
    if d.is_main:
        result.update(export_final(cfg, snapshot, model, last_eval, step, result))
    common.end_run(d)
    return result


# ----------------------------------------------------------------------------------------------
# evaluation and the checkpoint folder

class EMASnapshot:
    """The EMA weights (in a copy of the model) with the frozen VAE and the tokenizer: what is sampled and saved."""

    def __init__(self, cfg: UNetTrainConfig, model: Denoiser, ema: common.EMA, vae, tok: TokenizerFiles):
        self.cfg, self.ema, self.vae, self.tok = cfg, ema, vae, tok
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.export_dir = Path(cfg.export_dir) if cfg.export_dir else Path(cfg.out_dir) / "checkpoint"

    def latent_diffusion(self, step: int) -> LatentDiffusion:
        """The current EMA weights on the CPU, with the run's config and step for the checkpoint's record."""
        self.ema.copy_to(self.ema_model)
        cfg = self.cfg
        return LatentDiffusion(
            unet=self.ema_model.unet.cpu(), vae=self.vae, text_encoder=self.ema_model.text_encoder.cpu(),
            tokenizer_dir=self.tok.dir, tokenizer_config=dict(self.tok.config), scheduler_config=scheduler_config(cfg),
            default_size=(cfg.image_size, cfg.image_size),
            extra={"training": {"step": step, "config": common.config_to_dict(cfg)}})

    def save(self, step: int) -> Path:
        """The checkpoint folder (--export_dir, --export_dtype) that `ldm export` reads."""
        ld = self.latent_diffusion(step)
        ld.unet.config.gradient_checkpointing = False  # a training option; the exported config is for inference
        path = save_checkpoint(ld, self.export_dir, dtype=torch.float16 if self.cfg.export_dtype == "fp16" else None)
        ld.unet.config.gradient_checkpointing = self.cfg.gradient_checkpointing
        return path


def _plot_curves(out: Path) -> None:
    common.plot_curves(out / "metrics.jsonl", out / "loss_curves.png", ("loss", "eval_colour", "eval_shape", "eval_position"))


def evaluate_and_export(cfg: UNetTrainConfig, snapshot: EMASnapshot, prompts: list[str], attrs: list | None,
                        step: int, metrics: common.MetricsLog) -> dict:
    """Sample and score the fixed prompts with the EMA weights, log the scores, save the checkpoint folder."""
    out = Path(cfg.out_dir)
    scores = evaluate_prompts(snapshot.latent_diffusion(step), prompts, attrs, cfg.sample_steps, cfg.eval_guidance,
                              cfg.seed, out / "samples" / f"step_{step:06d}.png")
    metrics.write(step=step, **{f"eval_{k}": v for k, v in scores.items()})
    snapshot.save(step)
    _plot_curves(out)
    return scores


def export_final(cfg: UNetTrainConfig, snapshot: EMASnapshot, model: Denoiser, last_eval: dict, step: int,
                 result: dict) -> dict:
    """The final checkpoint folder and OUT_DIR/result.json; returns what it adds to `result`."""
    out = Path(cfg.out_dir)
    path = snapshot.save(step)
    _plot_curves(out)
    added = dict(checkpoint=str(path), unet_params=model.unet.num_parameters(),
                 text_params=model.text_encoder.num_parameters(), **{f"eval_{k}": v for k, v in last_eval.items()})
    (out / "result.json").write_text(json.dumps({**result, **added}, indent=2) + "\n")
    logger.info("U-Net done at step %d: checkpoint %s", step, path)
    return added
