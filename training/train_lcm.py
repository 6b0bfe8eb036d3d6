"""Stage 4: latent consistency distillation of a trained checkpoint into a few-step student.

    python -m training.cli train lcm --teacher=checkpoints/default --out_dir=runs/lcm --max_steps=2000
    torchrun --nproc_per_node 2 -m training.cli train lcm ...     (DDP; gloo on CPU, nccl on GPU)

Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Alg. 1), one step:
a training latent z0 is noised to a timestep t_n of the distillation grid (`num_ddim_timesteps`
of the teacher's timesteps, k = T / num_ddim_timesteps apart); the frozen teacher, with classifier-
free guidance at a scale w drawn from [w_min, w_max], takes one DDIM step from t_n to t_n - k; the
student maps (z_{t_n}, t_n, w) and an EMA target network maps (z_{t_n - k}, t_n - k, w) to x_0
through the boundary-condition parameterisation c_skip(t) z_t + c_out(t) x0(z_t, t) that the
runtime's `lcm` scheduler applies at inference; the loss is the Huber (or squared) distance of
the two, and only the student trains.

w is LCM's guidance weight: the teacher's guided output is cond + w (cond - uncond), i.e. CFG at
guidance_scale = 1 + w, and the student gets `guidance_scale_embedding(1 + w)`, the embedding the
runtime feeds for that guidance_scale. So a student run at `guidance_scale=G` imitates the teacher
at guidance G, for G in [1 + w_min, 1 + w_max].

The student is the teacher's U-Net plus a guidance embedding (`time_cond_proj_dim`) whose
`cond_proj` starts at zero, so at step 0 it computes exactly what the teacher computes. The text
encoder, tokenizer and VAE are the teacher's, frozen, and go unchanged into the student's
checkpoint folder, which holds the target network's weights and an `lcm` scheduler config
(`original_inference_steps` = num_ddim_timesteps): `ldm export` turns it into a bundle that the
runtime samples with `lcm` by default, in about 4 steps.

The data, the latent cache and the random draws (made for the whole global batch from one
generator, then sliced by rank) work as in train_unet.py.
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

from ldm_runtime.guidance import guidance_scale_embedding
from ldm_runtime.schedulers import make_scheduler
from training import common
from training.checkpoint import CheckpointError, LatentDiffusion, load_models, save_checkpoint
from training.common import ConfigError
from training.evaluate import evaluate_prompts
from training.models.unet import UNet
from training.sample import tokenizer_for
from training.train_unet import TrainingSet, eval_prompts, load_captions, optimizer_step, training_set

logger = logging.getLogger(__name__)

LOSSES = ("huber", "l2")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class LCMTrainConfig:
    out_dir: str = "runs/lcm"
    teacher: str = "checkpoints/default"  # the trained checkpoint folder to distil (ours: `ldm train unet` writes it)
    data: str = "shapes"  # "shapes" (built-in) or a folder of images with captions
    image_size: int = 64
    train_length: int = 20_000  # samples of the built-in data
    seed: int = 0
    # distillation
    time_cond_proj_dim: int = 256  # width of the student's guidance embedding
    w_min: float = 1.0  # LCM's guidance weight w = guidance_scale - 1, drawn uniformly from [w_min, w_max]
    w_max: float = 7.0
    num_ddim_timesteps: int = 50  # the distillation grid; the student's original_inference_steps
    timestep_scaling: float = 10.0  # of the boundary scalings, as the `lcm` scheduler reads it
    loss: str = "huber"  # or "l2"
    huber_c: float = 0.001
    ema_decay: float = 0.95  # of the target network
    # optimisation
    batch_size: int = 32  # global, split over processes
    max_steps: int = 2000
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    bf16: bool = True  # bf16 autocast where available (CUDA)
    # bookkeeping
    log_every: int = 10
    ckpt_every: int = 100
    eval_every: int = 1000
    eval_prompts: int = 8  # half from the validation split, half with held-out combinations; 0: no evaluation
    eval_steps: int = 4
    eval_guidance: float = 3.0  # the runtime's guidance_scale (the student sees w = eval_guidance - 1)
    export_dir: str = ""  # the student checkpoint folder; empty: OUT_DIR/checkpoint
    export_dtype: str = "fp32"  # or "fp16"
    device: str = "auto"
    threads: int = 0
    max_minutes: float = 0.0  # stop early (state + checkpoint written) after this wall time; 0: no limit
    progress: bool = True

    def __post_init__(self) -> None:
        common.check_positive(self, "image_size", "train_length", "time_cond_proj_dim", "num_ddim_timesteps",
                              "timestep_scaling", "huber_c", "batch_size", "max_steps", "lr", "log_every",
                              "ckpt_every", "eval_every", "eval_steps")
        if self.eval_prompts < 0:
            raise ConfigError(f"--eval_prompts: expected a count >= 0, got {self.eval_prompts}")
        common.check_choice("loss", self.loss, LOSSES)
        common.check_choice("export_dtype", self.export_dtype, ("fp32", "fp16"))
        if self.time_cond_proj_dim < 4:
            raise ConfigError(f"--time_cond_proj_dim: expected at least 4 (the embedding's frequencies divide by "
                              f"dim/2 - 1), got {self.time_cond_proj_dim}")
        if not 0 <= self.w_min <= self.w_max:
            raise ConfigError(f"--w_min/--w_max: expected 0 <= w_min <= w_max, got {self.w_min} and {self.w_max}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay: expected a number in [0, 1), got {self.ema_decay}")

    @property
    def vae(self) -> str:
        """The teacher's VAE folder: train_unet's latent cache keys on its weights file."""
        return str(Path(self.teacher) / "vae")


# ----------------------------------------------------------------------------------------------
# the teacher, the schedule and the student

def load_teacher(cfg: LCMTrainConfig) -> LatentDiffusion:
    """The --teacher checkpoint (every model frozen, fp32), checked to be something this loop can distil."""
    try:
        ld = load_models(cfg.teacher)
    except (CheckpointError, OSError) as e:
        raise ConfigError(f"--teacher={cfg.teacher}: {e}") from e
    pred = ld.scheduler_config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ConfigError(f"--teacher={cfg.teacher}: prediction_type {pred!r}; expected one of "
                          f"{', '.join(PREDICTION_TYPES)}")
    if ld.unet_config.time_cond_proj_dim is not None:
        raise ConfigError(f"--teacher={cfg.teacher}: its U-Net already takes a guidance embedding "
                          f"(time_cond_proj_dim {ld.unet_config.time_cond_proj_dim}); expected a model guided by CFG")
    if ld.unet_config.addition_embed_type is not None:
        raise ConfigError(f"--teacher={cfg.teacher}: an SDXL U-Net (addition_embed_type "
                          f"{ld.unet_config.addition_embed_type!r}); this loop distils SD-style U-Nets only")
    if (not (Path(cfg.teacher) / "vae" / "model.safetensors").is_file()):
        raise ConfigError(f"--teacher={cfg.teacher}: expected our checkpoint folder with vae/model.safetensors")
    return ld


# the keys of the teacher's scheduler config that define its training schedule
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "rescale_betas_zero_snr")


def student_scheduler_config(teacher_config: dict, cfg: LCMTrainConfig) -> dict:
    """The teacher's training schedule as an LCMScheduler config over this run's distillation grid."""
    schedule = {k: teacher_config[k] for k in SCHEDULE_KEYS if k in teacher_config}
    return {"_class_name": "LCMScheduler", **schedule, "original_inference_steps": cfg.num_ddim_timesteps,
            "timestep_scaling": cfg.timestep_scaling, "clip_sample": False}


class DDIMSolver:
    """One deterministic DDIM step of the teacher from grid timestep t_n to t_n - k (alpha_bar_0 below the grid).

    The grid is the `lcm` scheduler's: t_n = (n + 1) k - 1 for n < num_ddim_timesteps, k = T // num_ddim_timesteps.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int):
        T = len(alphas_cumprod)
        if num_ddim_timesteps > T:
            raise ConfigError(f"--num_ddim_timesteps={num_ddim_timesteps}: expected at most the teacher's "
                              f"{T} training timesteps")
        self.k = T // num_ddim_timesteps
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1) * self.k - 1  # (N,) int64
        prev = self.timesteps - self.k
        self.prev_timesteps = prev.clamp(min=0)
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], alphas_cumprod[0])

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x_{t_n - k} = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev) eps, per row's grid index n."""
        ab_prev = self.alphas_cumprod_prev[index].view(-1, 1, 1, 1)
        return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps


def boundary_scalings(t: torch.Tensor, timestep_scaling: float, sigma_data: float = 0.5
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at timesteps t, (B, 1, 1, 1) each: c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x."""
    scaled = t.float().view(-1, 1, 1, 1) * timestep_scaling
    s2 = sigma_data ** 2
    return s2 / (scaled ** 2 + s2), scaled / (scaled ** 2 + s2).sqrt()


def x0_and_eps(prediction_type: str, output: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's estimates of x_0 and of the noise in x_t from its epsilon or v output."""
    a, s = alpha_bar.view(-1, 1, 1, 1).sqrt(), (1 - alpha_bar.view(-1, 1, 1, 1)).sqrt()
    if prediction_type == "epsilon":
        return (x - s * output) / a, output
    return a * x - s * output, a * output + s * x  # v = a eps - s x0


def build_student(teacher: UNet, time_cond_proj_dim: int) -> UNet:
    """The teacher's architecture plus a guidance embedding, initialised from the teacher with a zero `cond_proj`."""
    cfg = dataclasses.replace(teacher.config, time_cond_proj_dim=time_cond_proj_dim, gradient_checkpointing=False)
    student = UNet(cfg)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student.float().train().requires_grad_(True)


@torch.no_grad()
def update_target(target: UNet, student: UNet, decay: float) -> None:
    """target <- decay * target + (1 - decay) * student, parameter by parameter."""
    for t, s in zip(target.parameters(), student.parameters()):
        t.lerp_(s.detach(), 1 - decay)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The runtime's embedding for guidance_scale = 1 + w: (B,) -> (B, dim) float32."""
    return torch.from_numpy(guidance_scale_embedding(1.0 + w.double().numpy(), dim))


# ----------------------------------------------------------------------------------------------
# one step

@dataclass
class Batch:
    """This rank's rows of one step's draws."""

    z0: torch.Tensor  # (b, C, h, w) training latents
    noise: torch.Tensor  # (b, C, h, w)
    index: torch.Tensor  # (b,) grid indices n: the start timestep is solver.timesteps[n]
    w: torch.Tensor  # (b,) guidance weights
    input_ids: torch.Tensor  # (b, 77)


def draw_batch(cfg: LCMTrainConfig, data: TrainingSet, idx: np.ndarray, g: torch.Generator, rows: slice,
               device: torch.device) -> Batch:
    """Every draw for the global batch (posterior sample, noise, grid index, guidance weight), then this rank's rows."""
    b, idx_t = cfg.batch_size, torch.from_numpy(idx)
    post_eps = torch.randn((b, *data.mean.shape[1:]), generator=g)
    noise = torch.randn((b, *data.mean.shape[1:]), generator=g)
    index = torch.randint(0, cfg.num_ddim_timesteps, (b,), generator=g)
    w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand((b,), generator=g)
    z0 = ((data.mean[idx_t] + torch.exp(0.5 * data.logvar[idx_t]) * post_eps) - data.shift) * data.scale
    return Batch(*(v[rows].to(device) for v in (z0, noise, index, w, data.ids[idx_t])))


class Distiller:
    """The frozen teacher (U-Net and text encoder), the target network and the solver: what the loss needs besides
    the student."""

    def __init__(self, cfg: LCMTrainConfig, teacher: LatentDiffusion, student: UNet, empty_ids: torch.Tensor,
                 device: torch.device):
        self.cfg, self.device = cfg, device
        self.prediction_type = teacher.scheduler_config.get("prediction_type", "epsilon")
        self.unet = teacher.unet.to(device)
        self.text_encoder = teacher.text_encoder.to(device)
        self.target = copy.deepcopy(student).eval().requires_grad_(False)
        sched = make_scheduler("lcm", student_scheduler_config(teacher.scheduler_config, cfg))
        self.alphas_cumprod = torch.from_numpy(np.asarray(sched.alphas_cumprod, dtype=np.float32)).to(device)
        self.solver = DDIMSolver(self.alphas_cumprod, cfg.num_ddim_timesteps)
        self.uncond = self.encode(empty_ids[None].to(device))  # (1, 77, D)

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)

    def consistency(self, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    w_emb: torch.Tensor) -> torch.Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0(model output): the consistency function both networks define."""
        with self.autocast(x):
            out = model(x, t.float(), context, timestep_cond=w_emb).float()
        c_skip, c_out = boundary_scalings(t, self.cfg.timestep_scaling)
        return c_skip * x + c_out * x0_and_eps(self.prediction_type, out, x, self.alphas_cumprod[t])[0]

    @torch.no_grad()
    def teacher_step(self, x: torch.Tensor, t: torch.Tensor, index: torch.Tensor, context: torch.Tensor,
                     w: torch.Tensor) -> torch.Tensor:
        """The guided teacher's DDIM step from (x, t) to the previous grid timestep."""
        uncond = self.uncond.expand(len(x), -1, -1)
        with self.autocast(x):
            out_u, out_c = self.unet(torch.cat([x, x]), torch.cat([t, t]).float(),
                                     torch.cat([uncond, context])).float().chunk(2)
        guided = out_c + w.view(-1, 1, 1, 1) * (out_c - out_u)  # CFG at guidance_scale 1 + w
        x0, eps = x0_and_eps(self.prediction_type, guided, x, self.alphas_cumprod[t])
        return self.solver.step(x0, eps, index)

    def loss(self, student: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The consistency distillation loss of one batch (gradients reach the student only)."""
        solver, cfg = self.solver, self.cfg
        t = solver.timesteps.to(self.device)[batch.index]
        t_prev = solver.prev_timesteps.to(self.device)[batch.index]
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * batch.z0 + (1 - ab).sqrt() * batch.noise  # q(z_t | z_0)
        context = self.encode(batch.input_ids)
        w_emb = guidance_embedding(batch.w.cpu(), cfg.time_cond_proj_dim).to(self.device)
        pred = self.consistency(student, x_t, t, context, w_emb)
        with torch.no_grad():
            x_prev = self.teacher_step(x_t, t, batch.index, context, batch.w)
            target = self.consistency(self.target, x_prev, t_prev, context, w_emb)
        if cfg.loss == "l2":
            return (pred - target).pow(2).mean()
        return ((pred - target).pow(2) + cfg.huber_c ** 2).sqrt().sub(cfg.huber_c).mean()

    def autocast(self, x: torch.Tensor):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.bf16 and x.device.type == "cuda")


def make_optimizer(cfg: LCMTrainConfig, student: UNet) -> torch.optim.AdamW:
    return torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def wrap_ddp(student: UNet, d: common.Dist) -> torch.nn.Module:
    if not d.enabled:
        return student
    device_ids = [d.local_rank] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(student, device_ids=device_ids)


# ----------------------------------------------------------------------------------------------
# the loop

def train(cfg: LCMTrainConfig, resume: bool = False) -> dict:
    """Distil (or resume distilling) the teacher into a student; writes its checkpoint folder; returns final figures."""
    cfg, d = common.start_run(cfg, resume)

    # the teacher brings the VAE, text encoder and tokenizer; the data are its latents of the training images
    teacher = load_teacher(cfg)
    ds, captions = load_captions(cfg)
    data = training_set(cfg, teacher.vae, ds, captions, tokenizer_for(teacher), d)

    # the student, its optimiser and the target network, and the training state that holds them
    student = build_student(teacher.unet, cfg.time_cond_proj_dim).to(d.device)
    distiller = Distiller(cfg, teacher, student, data.empty_ids, d.device)
    ddp_student = wrap_ddp(student, d)
    opt = make_optimizer(cfg, student)
    g = torch.Generator().manual_seed(cfg.seed + 5)  # every random draw of a step
    state = dict(modules={"student": student, "target": distiller.target}, emas={}, optimizers={"student": opt},
                 generators={"train": g})
    metrics = common.MetricsLog(Path(cfg.out_dir) / "metrics.jsonl", d.is_main)
    step, pos = common.start_or_resume(cfg, resume, d, metrics, state)
    if d.is_main:
        logger.info("distilling %s: student U-Net %.2fM params (guidance embedding %d), %d images, %d processes",
                    cfg.teacher, student.num_parameters() / 1e6, cfg.time_cond_proj_dim, len(data), d.world_size)

    rows = common.shard(cfg.batch_size, d)
    prompts, prompt_attrs = eval_prompts(cfg, cfg.eval_prompts)
    t0, last_eval, window = time.time(), {}, common.LossWindow(("loss",))
    bar = common.progress(cfg.max_steps, step, cfg.progress and d.is_main, "lcm")
    while step < cfg.max_steps:
        idx, pos = common.batch_indices(len(data), cfg.batch_size, pos, cfg.seed)
        batch = draw_batch(cfg, data, idx, g, rows, d.device)
        lr = common.scheduled_lr(opt, step, cfg)
        loss = distiller.loss(ddp_student, batch)
        gnorm = optimizer_step(opt, loss, list(student.parameters()), cfg.grad_clip)
        update_target(distiller.target, student, cfg.ema_decay)
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
            last_eval = evaluate_and_export(cfg, teacher, distiller.target, prompts, prompt_attrs, step, metrics)
        if common.out_of_time(cfg, t0, step):
            break
    bar.close()
    common.save_run_state(cfg, step, pos, d, state)
    result: dict = {"step": step, "train_seconds": time.time() - t0}
    if d.is_main:
        if last_eval.get("step") != step:
            last_eval = evaluate_and_export(cfg, teacher, distiller.target, prompts, prompt_attrs, step, metrics)
        result.update(checkpoint=str(export_dir(cfg)), **{f"eval_{k}": v for k, v in last_eval.items() if k != "step"})
        (Path(cfg.out_dir) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        logger.info("LCM distillation done at step %d: checkpoint %s", step, export_dir(cfg))
    common.end_run(d)
    return result


# ----------------------------------------------------------------------------------------------
# the student's checkpoint folder and its evaluation

def export_dir(cfg: LCMTrainConfig) -> Path:
    return Path(cfg.export_dir) if cfg.export_dir else Path(cfg.out_dir) / "checkpoint"


def student_checkpoint(cfg: LCMTrainConfig, teacher: LatentDiffusion, target: UNet, step: int) -> LatentDiffusion:
    """CPU copies of the target network and of the teacher's VAE and text encoder, the teacher's tokenizer, and
    an `lcm` scheduler."""
    def cpu_copy(m: torch.nn.Module):
        return copy.deepcopy(m).cpu().eval()

    return LatentDiffusion(
        unet=cpu_copy(target), vae=cpu_copy(teacher.vae), text_encoder=cpu_copy(teacher.text_encoder),
        tokenizer_dir=teacher.tokenizer_dir, tokenizer_config=dict(teacher.tokenizer_config),
        scheduler_config=student_scheduler_config(teacher.scheduler_config, cfg), default_size=teacher.default_size,
        extra={"training": {"step": step, "config": common.config_to_dict(cfg)}})


def evaluate_and_export(cfg: LCMTrainConfig, teacher: LatentDiffusion, target: UNet, prompts: list[str],
                        attrs: list | None, step: int, metrics: common.MetricsLog) -> dict:
    """Sample and score the fixed prompts (none: --eval_prompts=0) with the student at --eval_steps (its `lcm`
    scheduler), log the scores, save the checkpoint folder; returns the scores and the step."""
    out = Path(cfg.out_dir)
    ld = student_checkpoint(cfg, teacher, target, step)
    scores = {}
    if prompts:
        scores = evaluate_prompts(ld, prompts, attrs, cfg.eval_steps, cfg.eval_guidance, cfg.seed,
                                  out / "samples" / f"step_{step:06d}.png")
        metrics.write(step=step, **{f"eval_{k}": v for k, v in scores.items()})
    save_checkpoint(ld, export_dir(cfg), dtype=torch.float16 if cfg.export_dtype == "fp16" else None)
    common.plot_curves(out / "metrics.jsonl", out / "loss_curves.png",
                       ("loss", "eval_colour", "eval_shape", "eval_position"))
    return {**scores, "step": step}
