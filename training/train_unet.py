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
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ldm_runtime.schedules import alphas_cumprod_from_betas, make_betas, rescale_zero_terminal_snr
from ldm_runtime.tokenizer import EOT_LITERAL, SOT_LITERAL, CLIPTokenizer
from training import common
from training.bpe import train_tokenizer
from training.checkpoint import LatentDiffusion, save_checkpoint
from training.common import ConfigError
from training.data import FolderDataset, ShapesDataset
from training.losses import min_snr_weights
from training.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from training.models.unet import UNet, UNetConfig
from training.train_vae import load_vae

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_BIAS = ("none", "earlier", "later", "range")
SCORE_KEYS = ("colour", "shape", "position", "size", "count", "background", "all")  # what the evaluations report


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


# ----------------------------------------------------------------------------------------------
# the loop

def train(cfg: UNetTrainConfig, resume: bool = False) -> dict:
    """Train (or resume) the U-Net and text encoder; writes the checkpoint folder; returns final figures."""
    common.set_threads(cfg.threads)
    d = common.setup_distributed(cfg.device)
    out = Path(cfg.out_dir)
    state_path = out / common.STATE_FILE
    if resume:
        cfg = common.resumed_config(common.read_state(state_path)[0], cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    export_dir = Path(cfg.export_dir) if cfg.export_dir else out / "checkpoint"
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (out / "config.json").write_text(json.dumps(common.config_to_dict(cfg), indent=2) + "\n")

    # a checkpoint to fine-tune brings its models and tokenizer; the autoencoder must be the one it was trained on
    vae = load_vae(cfg.vae).eval().requires_grad_(False)
    vcfg = vae.config
    init = init_models(cfg, vcfg) if cfg.init else None

    # data: captions and tokenizer
    ds, captions = load_captions(cfg)
    n = len(captions)
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else init.tokenizer_dir if init else out / "tokenizer"
    tok_config = {"model_max_length": 77, "pad_token": EOT_LITERAL, "bos_token": SOT_LITERAL, "eos_token": EOT_LITERAL}
    if init and not cfg.tokenizer:
        tok_config.update({k: v for k, v in init.tokenizer_config.items() if k in tok_config})
    if not cfg.tokenizer and not init and not (tok_dir / "vocab.json").is_file():
        if d.is_main:
            train_tokenizer(captions, tok_dir, cfg.bpe_merges)
    if d.enabled:
        dist.barrier()
    for name in ("vocab.json", "merges.txt"):
        if not (tok_dir / name).is_file():
            raise ConfigError(f"--tokenizer: {tok_dir / name} is missing (expected a CLIP-format vocab.json + merges.txt)")
    tokenizer = CLIPTokenizer(tok_dir / "vocab.json", tok_dir / "merges.txt", **tok_config)
    ids = torch.from_numpy(tokenizer(captions))  # (N, 77) int64
    empty_ids = torch.from_numpy(tokenizer([""]))[0]  # the unconditional prompt of classifier-free guidance

    # frozen autoencoder -> latents
    if cfg.image_size % vcfg.spatial_factor:
        raise ConfigError(f"--image_size={cfg.image_size} must be a multiple of the VAE's spatial factor {vcfg.spatial_factor}")
    lat_mean, lat_logvar = latent_cache(cfg, vae, ds, n, d)
    shift = vcfg.shift_factor or 0.0

    # models
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    if init:
        if cfg.text_encoder:
            raise ConfigError("--init and --text_encoder both name a text encoder; give one")
        text_encoder, tcfg = init.text_encoder.float(), init.text_config
    elif cfg.text_encoder:
        te_dir = Path(cfg.text_encoder)
        tcfg = common.config_from_dict(TextEncoderConfig, json.loads((te_dir / "config.json").read_text()))
        text_encoder = CLIPTextEncoder(tcfg)
        text_encoder.load_state_dict(load_file(str(te_dir / "model.safetensors")))
    else:
        tcfg = TextEncoderConfig(vocab_size=len(vocab), hidden_size=cfg.text_hidden_size,
                                 intermediate_size=cfg.text_intermediate_size, num_hidden_layers=cfg.text_layers,
                                 num_attention_heads=cfg.text_heads, max_position_embeddings=77, hidden_act="gelu",
                                 bos_token_id=vocab[SOT_LITERAL], eos_token_id=vocab[EOT_LITERAL],
                                 pad_token_id=vocab[EOT_LITERAL])
        text_encoder = CLIPTextEncoder(tcfg)
    if tcfg.vocab_size < len(vocab):  # a pretrained text encoder (--init or --text_encoder) with a larger tokenizer
        which = "--init" if init else "--text_encoder"
        raise ConfigError(f"{which}: its text encoder's vocab_size {tcfg.vocab_size} is smaller than the tokenizer's {len(vocab)}")
    text_encoder.requires_grad_(cfg.train_text_encoder)
    h = cfg.image_size // vcfg.spatial_factor
    if init:
        unet = init.unet.float().requires_grad_(True)
        unet.config.gradient_checkpointing = cfg.gradient_checkpointing
        if d.is_main:
            logger.info("fine-tuning %s: U-Net %s", cfg.init, unet.config)
    else:
        ucfg = UNetConfig(in_channels=vcfg.latent_channels, out_channels=vcfg.latent_channels,
                          block_out_channels=cfg.block_out_channels, attention=cfg.attention,
                          layers_per_block=cfg.layers_per_block, num_heads=None, head_dim=cfg.head_dim,
                          cross_attention_dim=tcfg.hidden_size, norm_num_groups=cfg.norm_num_groups, sample_size=h,
                          gradient_checkpointing=cfg.gradient_checkpointing)
        unet = UNet(ucfg)
    model = Denoiser(unet, text_encoder).to(d.device)
    ddp_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
                 if d.enabled else model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999))
    ema = common.EMA(model, cfg.ema_decay)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    gens = {"train": g}
    alphas_cumprod = training_alphas_cumprod(cfg).to(d.device)
    t_weights = timestep_weights(cfg)
    step, pos = 0, (0, 0)
    metrics = common.MetricsLog(out / "metrics.jsonl", d.is_main)
    if resume:
        index = common.load_state(state_path, modules={"model": model}, emas={"model": ema}, optimizers={"model": opt},
                                  generators=gens)
        step, pos = index["step"], tuple(index["data_pos"])
        metrics.truncate_after(step)
        logger.info("resumed %s at step %d", state_path, step)
    if d.is_main:
        logger.info("U-Net %.2fM params, text encoder %.2fM params (vocab %d), latents %dx%dx%d, %d images, %d processes",
                    unet.num_parameters() / 1e6, text_encoder.num_parameters() / 1e6, len(vocab),
                    vcfg.latent_channels, h, h, n, d.world_size)

    if cfg.zero_snr and cfg.min_snr_gamma > 0 and d.is_main:
        logger.warning("--min_snr_gamma=%g with --zero_snr: the v-prediction weight min(SNR, gamma) / (SNR + 1) is 0 "
                       "at t = T - 1, so the first sampling step is never trained; consider --min_snr_gamma=0",
                       cfg.min_snr_gamma)
    rows = common.shard(cfg.batch_size, d)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and d.device.type == "cuda")
    prompts, prompt_attrs = eval_prompts(cfg, cfg.eval_prompts)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)

    def latent_diffusion() -> LatentDiffusion:
        ema.copy_to(ema_model)
        return LatentDiffusion(
            unet=ema_model.unet.cpu(), vae=vae, text_encoder=ema_model.text_encoder.cpu(), tokenizer_dir=tok_dir,
            tokenizer_config=dict(tok_config),
            scheduler_config=scheduler_config(cfg), default_size=(cfg.image_size, cfg.image_size),
            extra={"training": {"step": step, "config": common.config_to_dict(cfg)}})

    def checkpoint() -> None:
        if d.is_main:
            common.save_state(state_path, config=cfg, step=step, data_pos=pos, modules={"model": model},
                              emas={"model": ema}, optimizers={"model": opt}, generators=gens)

    def export() -> Path:
        ld = latent_diffusion()
        ld.unet.config.gradient_checkpointing = False  # a training option; the exported config is for inference
        path = save_checkpoint(ld, export_dir, dtype=torch.float16 if cfg.export_dtype == "fp16" else None)
        ld.unet.config.gradient_checkpointing = cfg.gradient_checkpointing
        return path

    t0 = t_last = time.time()
    last_eval: dict = {}
    loss_sum = torch.zeros(())  # summed over the steps since the last log line: the logged loss is their mean
    n_sum = 0
    bar = common.progress(cfg.max_steps, step, cfg.progress and d.is_main, "unet")
    model.train()
    while step < cfg.max_steps:
        idx, pos = common.batch_indices(n, cfg.batch_size, pos, cfg.seed)
        idx_t = torch.from_numpy(idx)
        # every draw for the global batch, then this rank's rows
        b = cfg.batch_size
        post_eps = torch.randn((b, *lat_mean.shape[1:]), generator=g)
        noise = torch.randn((b, *lat_mean.shape[1:]), generator=g)
        t = (torch.randint(0, cfg.num_train_timesteps, (b,), generator=g) if t_weights is None
             else torch.multinomial(t_weights, b, replacement=True, generator=g))
        drop = torch.rand((b,), generator=g) < cfg.caption_dropout
        mean, logvar = lat_mean[idx_t], lat_logvar[idx_t]
        z0 = ((mean + torch.exp(0.5 * logvar) * post_eps) - shift) * vcfg.scaling_factor
        input_ids = torch.where(drop[:, None], empty_ids[None, :], ids[idx_t])
        z0, noise, t, input_ids = (v[rows].to(d.device) for v in (z0, noise, t, input_ids))

        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * noise  # q(z_t | z_0)
        target = noise if cfg.prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * z0
        lr = common.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast:
            pred = ddp_model(z_t, t.float(), input_ids)
        per_sample = (pred.float() - target).pow(2).mean((1, 2, 3))
        if cfg.min_snr_gamma > 0:
            snr = (ab / (1 - ab)).flatten()
            per_sample = per_sample * min_snr_weights(snr, cfg.min_snr_gamma, cfg.prediction_type)
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(model)
        step += 1
        bar.update(1)
        loss_sum += loss.detach().float().cpu()
        n_sum += 1

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            lval = common.rank_mean(loss_sum / n_sum, d)
            dt = (time.time() - t_last) / n_sum
            t_last, loss_sum, n_sum = time.time(), torch.zeros(()), 0
            metrics.write(step=step, loss=float(lval), lr=lr, grad_norm=float(gnorm), sec_per_step=dt,
                          elapsed_s=time.time() - t0)
            bar.set_postfix(loss=f"{float(lval):.4f}", s_it=f"{dt:.2f}")
        if step % cfg.ckpt_every == 0:
            checkpoint()
        if d.is_main and step % cfg.eval_every == 0:
            last_eval = _evaluate(latent_diffusion(), prompts, prompt_attrs, cfg, out / "samples" / f"step_{step:06d}.png")
            metrics.write(step=step, **{f"eval_{k}": v for k, v in last_eval.items()})
            export()
            common.plot_curves(out / "metrics.jsonl", out / "loss_curves.png",
                               ("loss", "eval_colour", "eval_shape", "eval_position"))
            ema_model.to(d.device)
        if cfg.max_minutes and time.time() - t0 > cfg.max_minutes * 60:
            logger.warning("stopping at step %d: --max_minutes=%g reached", step, cfg.max_minutes)
            break
    bar.close()
    checkpoint()
    result: dict = {"step": step, "train_seconds": time.time() - t0}
    if d.is_main:
        path = export()
        common.plot_curves(out / "metrics.jsonl", out / "loss_curves.png", ("loss", "eval_colour", "eval_shape", "eval_position"))
        result.update(checkpoint=str(path), unet_params=unet.num_parameters(), text_params=text_encoder.num_parameters(),
                      **{f"eval_{k}": v for k, v in last_eval.items()})
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        logger.info("U-Net done at step %d: checkpoint %s", step, path)
    if d.enabled:
        dist.barrier()
    common.cleanup_distributed()
    return result


@torch.no_grad()
def _evaluate(ld: LatentDiffusion, prompts: list[str], attrs: list | None, cfg: UNetTrainConfig, grid: Path) -> dict:
    """Sample the fixed prompts (fixed seed), save the grid, and score it when the ground truth is known."""
    from training.sample import sample
    images = sample(ld, prompts, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.eval_guidance, seed=cfg.seed)
    common.save_grid(images, grid, ncols=max(1, (len(prompts) + 1) // 2))
    (grid.with_suffix(".txt")).write_text("\n".join(prompts) + "\n")
    if not attrs:
        return {}
    from training.evaluate import evaluate_images
    r = evaluate_images(list(images), attrs)
    return {k: r[k] for k in ("colour", "shape", "position", "count", "background")}


def evaluate_checkpoint(checkpoint: str | Path, n: int = 64, guidance_scales: tuple[float, ...] = (1.0, 3.0, 7.5),
                        steps: int = 20, seed: int = 0, batch: int = 16, out_dir: str | Path | None = None,
                        denoise_strengths: tuple[float, ...] = ()) -> dict:
    """Prompt adherence of a checkpoint on the built-in data: {split: {guidance: scores}}.

    "val" prompts use (colour, kind) combinations seen in training (new samples); "heldout" prompts
    each name at least one combination never seen in training. Images come from `training.sample`
    (the checkpoint's own scheduler), scored by `training.evaluate.evaluate_images`. With
    `out_dir`, the first 16 images of each setting are saved as a grid PNG. Each of `denoise_strengths`
    adds `denoise_scores` at every guidance scale: results["denoise"][strength][guidance].
    """
    from training.checkpoint import load_models
    from training.evaluate import evaluate_images
    from training.sample import sample

    ld = load_models(checkpoint)
    size = ld.default_size[0]
    results: dict = {"vae_reconstruction": vae_reconstruction_scores(ld.vae, size, n, seed)}
    logger.info("VAE reconstructions of %d validation images (the ceiling for generated ones): %s", n,
                {k: round(v, 3) for k, v in results["vae_reconstruction"].items()})
    for split in ("val", "heldout"):
        ds = ShapesDataset(split, size=size, length=n, seed=seed)
        pairs = [ds.attrs(i) for i in range(n)]
        results[split] = {}
        for gs in guidance_scales:
            images = np.concatenate([
                sample(ld, [c for _, c in pairs[a:a + batch]], num_inference_steps=steps, guidance_scale=gs,
                       seed=seed + a) for a in range(0, n, batch)])
            r = evaluate_images(list(images), [a for a, _ in pairs])
            results[split][str(gs)] = {k: r[k] for k in SCORE_KEYS}
            logger.info("%s guidance %g: %s", split, gs, {k: round(v, 3) for k, v in results[split][str(gs)].items()})
            if out_dir is not None:
                common.save_grid(images[:16], Path(out_dir) / f"eval_{split}_g{gs:g}.png", ncols=8)
    for strength in denoise_strengths:
        per = results.setdefault("denoise", {})[f"{strength:g}"] = {}
        for gs in guidance_scales:
            per[str(gs)] = denoise_scores(ld, strength, n, gs, steps, seed, batch)
            logger.info("denoising real latents from strength %g, guidance %g: %s", strength, gs,
                        {k: round(v, 3) for k, v in per[str(gs)].items()})
    return results


@torch.no_grad()
def denoise_scores(ld: LatentDiffusion, strength: float, n: int = 64, guidance_scale: float = 3.0, steps: int = 20,
                   seed: int = 0, batch: int = 16) -> dict:
    """The evaluator on real validation images encoded, noised to `strength` of the schedule and denoised
    with their own captions (img2img through `training.sample`). This separates finishing a shape the
    latents already hold (low strength) from creating one (text to image): a U-Net that scores well
    below `vae_reconstruction_scores` here loses shapes in the last, low-noise steps."""
    from training.evaluate import evaluate_images
    from training.sample import sample_img2img

    ds = ShapesDataset("val", size=ld.default_size[0], length=n, seed=seed)
    items = [ds.sample(i) for i in range(n)]
    images = np.concatenate([
        sample_img2img(ld, [c for _, c, _ in items[a:a + batch]], np.stack([im for im, _, _ in items[a:a + batch]]),
                       strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed + a)
        for a in range(0, n, batch)])
    r = evaluate_images(list(images), [a for _, _, a in items])
    return {k: r[k] for k in SCORE_KEYS}


@torch.no_grad()
def vae_reconstruction_scores(vae, size: int, n: int = 64, seed: int = 0) -> dict:
    """The evaluator on the VAE's reconstructions (posterior mean) of real validation images: what the
    autoencoder keeps of colour, shape, ... is an upper bound for what any generated image can score."""
    from training.evaluate import evaluate_images

    ds = ShapesDataset("val", size=size, length=n, seed=seed)
    attrs = [ds.attrs(i)[0] for i in range(n)]
    x = torch.stack([torch.as_tensor(np.asarray(ds[i][0])) for i in range(n)])
    r = torch.cat([vae.decode(vae.encode(x[a:a + 32])[0]) for a in range(0, n, 32)])
    images = ((r.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    scores = evaluate_images(list(images), attrs)
    return {k: scores[k] for k in SCORE_KEYS}
