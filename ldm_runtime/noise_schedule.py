"""The diffusion noise schedule as numpy arrays: betas -> alphas_cumprod -> sigmas, timestep grids.

This module holds data, not algorithms: the training schedule (beta_t, alpha_bar_t, the noise
levels sigma_t) and the inference timestep grids that diffusers lays out, as plain arrays and
pure functions. The samplers that step through these arrays, one class per diffusers scheduler,
live in ``schedulers.py``. Everything here mirrors the dtype path of diffusers' schedulers (torch
float32 where diffusers uses torch, numpy float64 where it uses numpy), because the low-noise end
of the schedule (1 - alphas_cumprod near t=0) amplifies rounding differences.
"""
from __future__ import annotations

import functools

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """torch.linspace(start, end, num, dtype=float32) bit for bit: float32 step, filled from both ends.

    torch computes start + step * i for the first half and end - step * (num - 1 - i) for the
    second, each as one fused multiply-add; step * i is exact in float64, and rounding the float64
    sum to float32 gives torch's result (the tests check this on random ranges). Bit-equal betas
    keep 1 - alpha_bar near t = 0, where rounding is amplified most, equal to diffusers'.
    """
    if num == 1:
        return np.array([start], dtype=np.float32)
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    ramp = np.where(i < num // 2, np.float64(s) + step * i, np.float64(e) - step * (num - 1 - i))
    return ramp.astype(np.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: np.ndarray | None = None,
) -> np.ndarray:
    """Per-step noise variances beta_t, float32 (Ho et al. 2020; cosine: Nichol & Dhariwal 2021)."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if beta_schedule == "linear":
        return linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        # linear in sqrt(beta), squared in float32 as diffusers does
        return linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
        alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023, Alg. 1); float32."""
    alphas_cumprod = alphas_cumprod_from_betas(betas)
    sqrt_ab = np.sqrt(alphas_cumprod)
    sqrt_ab_0, sqrt_ab_T = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - sqrt_ab_T) * (sqrt_ab_0 / (sqrt_ab_0 - sqrt_ab_T))
    alpha_bar = sqrt_ab**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s): float64 running product, rounded to float32 (torch's CPU cumprod)."""
    alphas = (np.float32(1.0) - betas.astype(np.float32)).astype(np.float64)
    return np.cumprod(alphas).astype(np.float32)


def training_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                            trained_betas: tuple[float, ...] | None = None,
                            rescale_betas_zero_snr: bool = False) -> np.ndarray:
    """alpha_bar_t of a training schedule (``make_betas``, optionally ``rescale_zero_terminal_snr``), float32 (T,).

    A new array each call (a scheduler may change it), copied from one computed once per set of values:
    every pipeline call builds its scheduler, and this is most of what building one costs.
    """
    if trained_betas is not None:  # a long tuple: not worth hashing
        return _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                               rescale_betas_zero_snr)
    return _cached_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                  bool(rescale_betas_zero_snr)).copy()


def _alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                    trained_betas: tuple[float, ...] | None, rescale_betas_zero_snr: bool) -> np.ndarray:
    betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return alphas_cumprod_from_betas(betas)


@functools.lru_cache(maxsize=16)
def _cached_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                           rescale_betas_zero_snr: bool) -> np.ndarray:
    out = _alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule, None, rescale_betas_zero_snr)
    out.flags.writeable = False  # shared by every caller: only its copies leave this module
    return out


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the variance-exploding noise level; float32."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def spaced_timesteps(
    num_steps: int,
    num_train_timesteps: int,
    spacing: str,
    steps_offset: int = 0,
    *,
    skip_zero: bool = False,
    fractional: bool = False,
) -> np.ndarray:
    """Descending inference timesteps as diffusers spaces them (Lin et al. 2023, Table 2).

    skip_zero: the multistep solvers lay out num_steps + 1 points and drop t=0 (linspace, leading).
    fractional: the Euler schedulers keep float32 timesteps and do not round linspace.
    """
    T = num_train_timesteps
    n = num_steps + 1 if skip_zero else num_steps
    if spacing == "linspace":
        if fractional:
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
        else:
            ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1]
        ts = ts.astype(np.float32 if fractional else np.int64) + steps_offset
        if n and ts[0] >= T:  # e.g. 1000 steps with steps_offset 1: diffusers would index past its schedule
            raise ValueError(f"{num_steps} steps with leading spacing and steps_offset {steps_offset} reach timestep "
                             f"{int(ts[0])}, past the schedule's last ({T - 1}): use fewer steps")
    elif spacing == "trailing":
        ts = np.arange(T, 0, -T / num_steps).round()
        ts = ts.astype(np.float32 if fractional else np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    if skip_zero and spacing != "trailing":
        ts = ts[:-1]
    return np.ascontiguousarray(ts).astype(np.float32 if fractional else np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5); float64, descending."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, linear in log sigma between the two nearest levels."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]  # (T, n)
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def alpha_sigma_from_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VE noise level -> VP (alpha_t, sigma_t) with alpha_t^2 + sigma_t^2 = 1; float32."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def log_snr(sigma: np.floating) -> np.floating:
    """lambda_t = log(alpha_t / sigma_t), the half log-SNR of DPM-Solver (Lu et al. 2022); +inf at sigma 0."""
    alpha_t, sigma_t = alpha_sigma_from_sigma(sigma)
    with np.errstate(divide="ignore"):
        return np.log(alpha_t) - np.log(sigma_t)


def consistency_timesteps(
    num_steps: int,
    num_train_timesteps: int,
    original_steps: int,
    strength: float = 1.0,
    *,
    every_timestep: bool = False,
) -> np.ndarray:
    """Descending int64 timesteps of the consistency samplers (LCM, Luo et al. 2023; TCD), as diffusers lays them out.

    The distillation grid is original_steps evenly spaced training timesteps k - 1, 2k - 1, ...
    (k = T // original_steps), or every training timestep when ``every_timestep``; img2img keeps
    its first int(len * strength); num_steps of those are taken evenly by index from the top.
    ValueError when num_steps exceeds original_steps or what the grid keeps.
    """
    T = num_train_timesteps
    if original_steps > T:
        raise ValueError(f"original_inference_steps={original_steps} is more than num_train_timesteps={T}")
    if every_timestep:
        origin = np.arange(int(T * strength), dtype=np.int64)
    else:
        origin = np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * (T // original_steps) - 1
    if num_steps > original_steps:
        raise ValueError(f"num_inference_steps={num_steps} is more than original_inference_steps={original_steps}: "
                         f"the steps are a subset of the {original_steps}-step distillation schedule")
    if num_steps > len(origin):
        raise ValueError(f"num_inference_steps={num_steps} is more than the {len(origin)} timesteps that strength "
                         f"{strength} keeps of the distillation schedule; lower the steps or raise strength")
    index = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return np.ascontiguousarray(origin[::-1][index])
