"""Stage 1: train the KL autoencoder, then measure the latent scale factor.

    python -m training.cli train vae --out_dir=runs/vae --max_steps=3000
    torchrun --nproc_per_node 2 -m training.cli train vae ...     (DDP; gloo on CPU)

Reads top to bottom: config, setup, data, model, optimizers, loop (loss, eval, checkpoint, log),
then the scale factor and the exported `vae/` folder (config.json with `scaling_factor` +
model.safetensors) that `ldm train unet --vae=OUT/vae` takes.

Loss per step: L1 + perceptual_weight * perceptual + kl_weight * KL (+ after `disc_start`, the
PatchGAN hinge loss with the adaptive weight of Esser et al. 2021). L1 and the perceptual term
are per-pixel means; the KL is the mean per latent element.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from training import common
from training.checkpoint import load_vae, save_vae
from training.common import ConfigError
from training.data import FolderDataset, ShapesDataset
from training.losses import LPIPS, PatchDiscriminator, RandomFeaturePerceptual, adaptive_gan_weight, hinge_d_loss
from training.models.vae import AutoencoderKL, VAEConfig

logger = logging.getLogger(__name__)


@dataclass
class VAETrainConfig:
    out_dir: str = "runs/vae"
    data: str = "shapes"  # "shapes" (built-in) or a folder of images with captions
    image_size: int = 64
    crop_size: int = 32  # train on random crops (the model is convolutional); 0: whole images
    train_length: int = 20_000  # samples of the built-in data per epoch
    seed: int = 0
    # model
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # 3 levels: spatial factor 4
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    mid_block_add_attention: bool = False
    # optimisation
    batch_size: int = 16  # global, split over processes
    max_steps: int = 3000
    lr: float = 4e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # loss
    kl_weight: float = 1e-6
    pixel_loss: str = "l1"  # "l1" or "mse" (what PSNR measures; SD's ft-MSE decoder used it)
    perceptual_weight: float = 0.25
    lpips_weights: str = ""  # local LPIPS-VGG safetensors; empty: the download-free perceptual term
    disc_start: int = 2000  # the GAN joins after the reconstruction has converged
    disc_weight: float = 0.1
    disc_lr: float = 2e-4
    # bookkeeping
    log_every: int = 10
    eval_every: int = 500
    eval_images: int = 256
    ckpt_every: int = 100
    scale_images: int = 1024  # images whose latents set the scale factor (>= 1000)
    device: str = "auto"
    threads: int = 0  # torch CPU threads per process; 0: torch's default
    max_minutes: float = 0.0  # stop early (state + export written) after this wall time; 0: no limit
    progress: bool = True
    # fine-tuning: start from a trained vae/ folder (its architecture replaces the options above);
    # --train_encoder=false freezes the encoder so its latents (and any U-Net trained on them) stay valid
    init: str = ""
    train_encoder: bool = True

    def __post_init__(self) -> None:
        common.check_positive(self, "image_size", "batch_size", "max_steps", "lr", "eval_images", "ckpt_every",
                              "log_every", "eval_every", "scale_images")
        if self.crop_size and (self.crop_size > self.image_size or self.crop_size % 2 ** (len(self.block_out_channels) - 1)):
            raise ConfigError(f"--crop_size={self.crop_size}: expected 0 or a multiple of the spatial factor "
                              f"{2 ** (len(self.block_out_channels) - 1)} no larger than --image_size={self.image_size}")
        if self.pixel_loss not in ("l1", "mse"):
            raise ConfigError(f"--pixel_loss={self.pixel_loss!r}: expected 'l1' or 'mse'")


# ----------------------------------------------------------------------------------------------
# data

class ImageSource:
    """Images by index as uint8 (S, S, 3); the built-in ones are rendered once and cached."""

    def __init__(self, data: str, size: int, length: int, seed: int, split: str = "train"):
        self.ds: ShapesDataset | FolderDataset
        if data == "shapes":
            self.ds = ShapesDataset(split, size=size, length=length, seed=seed)
            self.cache: dict[int, np.ndarray] = {}
        else:
            self.ds = FolderDataset(data, size=size)  # raises DatasetError naming the problem
            self.cache = {}
        self.builtin = data == "shapes"

    def __len__(self) -> int:
        return len(self.ds)

    def batch(self, idx: np.ndarray) -> torch.Tensor:
        """(B, 3, S, S) float in [-1, 1]."""
        if isinstance(self.ds, ShapesDataset):
            for i in idx.tolist():
                if i not in self.cache:
                    self.cache[i] = self.ds.sample(i)[0]
            arr = np.stack([self.cache[i] for i in idx.tolist()])
            return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return torch.stack([self.ds[i][0] for i in idx.tolist()])


def random_crop(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Independent crops per image: (B, C, H, W) -> (B, C, size, size)."""
    b, _, h, w = x.shape
    ys = torch.randint(0, h - size + 1, (b,), generator=g).tolist()
    xs = torch.randint(0, w - size + 1, (b,), generator=g).tolist()
    return torch.stack([x[i, :, y:y + size, xx:xx + size] for i, (y, xx) in enumerate(zip(ys, xs))])


def image_sources(cfg: VAETrainConfig) -> tuple[ImageSource, ImageSource]:
    """(training images, validation images): the built-in data has a validation split, a folder validates on itself."""
    train_images = ImageSource(cfg.data, cfg.image_size, cfg.train_length, cfg.seed, "train")  # DatasetError if unusable
    val_images = (ImageSource("shapes", cfg.image_size, max(cfg.eval_images, 1), cfg.seed, "val")
                  if cfg.data == "shapes" else train_images)
    return train_images, val_images


def training_batch(cfg: VAETrainConfig, images: ImageSource, idx: np.ndarray, g: torch.Generator) -> torch.Tensor:
    """The global batch (B, 3, S, S), with --crop_size crops drawn for all of it: the same on every rank."""
    x = images.batch(idx)
    return random_crop(x, cfg.crop_size, g) if cfg.crop_size else x


# ----------------------------------------------------------------------------------------------
# metrics

def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image PSNR in dB of images in [0, 1]: (B, C, H, W) -> (B,)."""
    mse = (x - y).pow(2).mean((1, 2, 3)).clamp(min=1e-10)
    return -10 * torch.log10(mse)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per image SSIM (Wang et al. 2004; Gaussian window 11, sigma 1.5, per channel, valid region) of images in [0, 1]."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ax = torch.arange(window, dtype=x.dtype) - (window - 1) / 2
    g = torch.exp(-ax ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3))


@torch.no_grad()
def evaluate(vae: AutoencoderKL, images: ImageSource, n: int, batch: int = 64) -> dict[str, float]:
    """Reconstruction PSNR / SSIM from the posterior mean over the first n images of `images`."""
    was = vae.training
    vae.eval()
    ps, ss = [], []
    for a in range(0, n, batch):
        x = images.batch(np.arange(a, min(n, a + batch)))
        mean, _ = vae.encode(x)
        r = ((vae.decode(mean) + 1) / 2).clamp(0, 1)
        r = (r * 255).round() / 255  # score what a saved PNG would hold
        x01 = (x + 1) / 2
        ps.append(psnr(r, x01))
        ss.append(ssim(r, x01))
    vae.train(was)
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean())}


@torch.no_grad()
def latent_scale_factor(vae: AutoencoderKL, images: ImageSource, n: int, seed: int, batch: int = 64) -> tuple[float, float]:
    """1 / std of posterior draws z ~ q(z|x) over n images -> (scaling_factor, std)."""
    g = torch.Generator().manual_seed(seed)
    zs = []
    for a in range(0, n, batch):
        mean, logvar = vae.encode(images.batch(np.arange(a, min(n, a + batch))))
        zs.append(vae.sample(mean, logvar, g).flatten())
    std = float(torch.cat(zs).double().std())
    return 1.0 / std, std


# ----------------------------------------------------------------------------------------------
# model and the two optimisation steps

def build_vae(cfg: VAETrainConfig) -> AutoencoderKL:
    """A new autoencoder, or the --init one (whose architecture replaces the options); with
    --train_encoder=false its encoder is frozen."""
    if not cfg.train_encoder and not cfg.init:
        raise ConfigError("--train_encoder=false fine-tunes the decoder of a trained VAE: it needs --init=VAE_FOLDER")
    if cfg.init:
        vae = load_vae(cfg.init)  # ConfigError if the folder is incomplete
    else:
        vae = AutoencoderKL(VAEConfig(latent_channels=cfg.latent_channels, block_out_channels=cfg.block_out_channels,
                                      layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
                                      mid_block_add_attention=cfg.mid_block_add_attention, sample_size=cfg.image_size,
                                      scaling_factor=1.0))
    if not cfg.train_encoder:
        for m in (vae.encoder, vae.quant_conv):
            if m is not None:
                m.requires_grad_(False)
    return vae


def autoencoder_loss(cfg: VAETrainConfig, vae: AutoencoderKL, disc: PatchDiscriminator, perceptual: torch.nn.Module,
                     x: torch.Tensor, g_noise: torch.Generator, rows: slice, gan_on: bool):
    """The autoencoder's loss on this rank's images `x`: (loss, reconstruction, (l1, perceptual, kl, g_loss), w_adv).

    The posterior draws are made for the global batch, then this rank's rows are taken."""
    with torch.set_grad_enabled(cfg.train_encoder):
        mean, logvar = vae.encode(x)
    eps = torch.randn((cfg.batch_size, *mean.shape[1:]), generator=g_noise)[rows].to(x.device)
    recon = vae.decode(mean + torch.exp(0.5 * logvar) * eps)
    l1 = (recon - x).abs().mean()
    pixel = l1 if cfg.pixel_loss == "l1" else (recon - x).pow(2).mean()
    perc = perceptual(recon, x).mean() if cfg.perceptual_weight > 0 else torch.zeros(())
    nll = pixel + cfg.perceptual_weight * perc
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = nll + cfg.kl_weight * kl
    g_loss = w_adv = torch.zeros(())
    if gan_on:
        disc.requires_grad_(False)
        g_loss = -disc(recon).mean()
        w_adv = adaptive_gan_weight(nll, g_loss, vae.decoder.conv_out.weight) * cfg.disc_weight
        loss = loss + w_adv * g_loss
        disc.requires_grad_(True)
    return loss, recon, (l1, perc, kl, g_loss), w_adv


def discriminator_step(disc: PatchDiscriminator, opt_d: torch.optim.Optimizer, x: torch.Tensor, recon: torch.Tensor,
                       d: common.Dist) -> torch.Tensor:
    """One hinge-loss step of the PatchGAN on the real images and the (detached) reconstructions."""
    d_loss = hinge_d_loss(disc(x.detach()), disc(recon.detach()))
    _optimizer_step(opt_d, d_loss, list(disc.parameters()), d)
    return d_loss


def _optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.nn.Parameter],
                    d: common.Dist, grad_clip: float | None = None) -> torch.Tensor | None:
    """Backward, gradients averaged over the processes, clipped to `grad_clip` if given, then the step;
    returns the gradient norm before clipping (None without clipping)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if d.enabled:
        _allreduce_grads(params, d.world_size)
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip is not None else None
    opt.step()
    return gnorm


def _allreduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    # one flat all_reduce; DDP's wrapper is not used here because the adaptive GAN weight needs
    # autograd.grad on the local graph, which DDP's reducer does not take part in
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    o = 0
    for g in grads:
        g.copy_(flat[o:o + g.numel()].view_as(g))
        o += g.numel()


# ----------------------------------------------------------------------------------------------
# the loop

LOSS_TERMS = ("loss", "loss_l1", "loss_perceptual", "kl", "loss_g", "loss_d")  # logged as means since the last line


def train(cfg: VAETrainConfig, resume: bool = False) -> dict:
    """Train (or resume) the autoencoder; returns the final metrics (psnr, ssim, scaling_factor, ...)."""
    cfg, d = common.start_run(cfg, resume)
    out = Path(cfg.out_dir)

    # data
    train_images, val_images = image_sources(cfg)
    rows = common.shard(cfg.batch_size, d)

    # model, losses, optimisers, and the training state that holds them
    vae = build_vae(cfg).to(d.device)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    disc = PatchDiscriminator(width=32, n_layers=2, groups=8).to(d.device)
    perceptual = (LPIPS(cfg.lpips_weights) if cfg.lpips_weights else RandomFeaturePerceptual()).to(d.device)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
    g_data = torch.Generator().manual_seed(cfg.seed + 1)  # crops
    g_noise = torch.Generator().manual_seed(cfg.seed + 2)  # posterior draws
    state = dict(modules={"vae": vae, "disc": disc}, emas={}, optimizers={"vae": opt, "disc": opt_d},
                 generators={"data": g_data, "noise": g_noise})
    metrics = common.MetricsLog(out / "metrics.jsonl", d.is_main)
    step, pos = common.start_or_resume(cfg, resume, d, metrics, state)
    if d.is_main:
        logger.info("VAE %.2fM params, spatial factor %d, %d processes", vae.num_parameters() / 1e6,
                    vae.config.spatial_factor, d.world_size)

    t0, last_eval, window = time.time(), {}, common.LossWindow(LOSS_TERMS)
    bar = common.progress(cfg.max_steps, step, cfg.progress and d.is_main, "vae")
    vae.train()
    while step < cfg.max_steps:
        idx, pos = common.batch_indices(len(train_images), cfg.batch_size, pos, cfg.seed)
        x = training_batch(cfg, train_images, idx, g_data)[rows].to(d.device)
        lr = common.scheduled_lr(opt, step, cfg)
        gan_on = step >= cfg.disc_start and cfg.disc_weight > 0
        loss, recon, terms, w_adv = autoencoder_loss(cfg, vae, disc, perceptual, x, g_noise, rows, gan_on)
        gnorm = _optimizer_step(opt, loss, trainable, d, cfg.grad_clip)
        d_loss = discriminator_step(disc, opt_d, x, recon, d) if gan_on else torch.zeros(())
        step += 1
        bar.update(1)
        window.add(loss, *terms, d_loss)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            rec, dt = window.means(d)
            metrics.write(step=step, lr=lr, grad_norm=float(gnorm), w_adv=float(w_adv),
                          sec_per_step=dt, elapsed_s=time.time() - t0, **rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", l1=f"{rec['loss_l1']:.4f}", s_it=f"{dt:.2f}")
        if step % cfg.ckpt_every == 0:
            common.save_run_state(cfg, step, pos, d, state)
        if d.is_main and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            last_eval = evaluate_and_log(cfg, vae, val_images, step, metrics)
        if common.out_of_time(cfg, t0, step):
            break
    bar.close()
    common.save_run_state(cfg, step, pos, d, state)
    result = export_vae(cfg, vae, train_images, val_images, last_eval, step, t0, metrics) if d.is_main else {}
    common.end_run(d)
    return result


# ----------------------------------------------------------------------------------------------
# evaluation and the exported folder

def evaluate_and_log(cfg: VAETrainConfig, vae: AutoencoderKL, val_images: ImageSource, step: int,
                     metrics: common.MetricsLog) -> dict[str, float]:
    """Validation PSNR / SSIM into the log, a reconstruction grid and the loss curves into OUT_DIR."""
    out = Path(cfg.out_dir)
    scores = evaluate(vae, val_images, cfg.eval_images)
    metrics.write(step=step, **{f"val_{k}": v for k, v in scores.items()})
    logger.info("step %d: val PSNR %.2f dB, SSIM %.4f", step, scores["psnr"], scores["ssim"])
    _save_recon_grid(vae, val_images, out / "samples" / f"recon_{step:06d}.png")
    common.plot_curves(out / "metrics.jsonl", out / "loss_curves.png",
                       ("loss", "loss_l1", "loss_perceptual", "loss_d", "val_psnr", "val_ssim"))
    return scores


def scale_factor_of(cfg: VAETrainConfig, vae: AutoencoderKL, train_images: ImageSource) -> tuple[float, float, int]:
    """(scaling_factor, latent std, images used) over --scale_images training images. With a frozen
    encoder the factor stays the init's, which a U-Net may already have been trained with (recomputed
    from the same draws, it agrees up to float rounding)."""
    n = cfg.scale_images
    src = ImageSource("shapes", cfg.image_size, n, cfg.seed, "train") if cfg.data == "shapes" else train_images
    n = min(n, len(src))
    factor, std = latent_scale_factor(vae, src, n, cfg.seed)
    return (factor if cfg.train_encoder else vae.config.scaling_factor), std, n


def export_vae(cfg: VAETrainConfig, vae: AutoencoderKL, train_images: ImageSource, val_images: ImageSource,
               last_eval: dict, step: int, t0: float, metrics: common.MetricsLog) -> dict:
    """OUT_DIR/vae with the measured scale factor (what `ldm train unet --vae` takes); returns the result."""
    out = Path(cfg.out_dir)
    vae.eval()
    if not last_eval:
        last_eval = evaluate(vae, val_images, cfg.eval_images)
    factor, std, n = scale_factor_of(cfg, vae, train_images)
    vae.config.scaling_factor = factor
    result = {"step": step, "psnr": last_eval["psnr"], "ssim": last_eval["ssim"], "scaling_factor": factor,
              "latent_std": std, "scale_images": n, "train_seconds": time.time() - t0,
              "params": vae.num_parameters()}
    save_vae(vae, out / "vae", result)
    metrics.write(step=step, scaling_factor=factor, latent_std=std)
    logger.info("VAE done: PSNR %.2f dB, SSIM %.4f, scaling_factor %.5f (latent std %.4f over %d images) -> %s",
                result["psnr"], result["ssim"], factor, std, n, out / "vae")
    return result


@torch.no_grad()
def _save_recon_grid(vae: AutoencoderKL, images: ImageSource, path: Path, n: int = 8) -> None:
    """Top row originals, bottom row reconstructions (posterior mean)."""
    was = vae.training
    vae.eval()
    x = images.batch(np.arange(min(n, len(images))))
    r = vae.decode(vae.encode(x)[0])
    vae.train(was)
    both = torch.cat([x, r]).add(1).div(2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    common.save_grid(both, path, ncols=len(x))

