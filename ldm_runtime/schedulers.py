"""The samplers of the runtime, numpy only, step for step equal to their diffusers counterparts.

A sampler is an algorithm that walks a noise schedule: it turns the U-Net's output at one
timestep into the latents of the next. The schedule itself (betas, alphas_cumprod, sigmas, the
timestep grids) is data and lives in ``noise_schedule.py``; this module holds one class per
diffusers scheduler, each naming its diffusers counterpart (``diffusers_class`` plus the
``diffusers_kwargs`` that select it there), and the lookups between our names and diffusers
configs. The name picks the algorithm, the config the noise schedule. Config keys the diffusers
class does not take are ignored (as its from_config ignores them), and so are the algorithm keys
the name fixes (solver_order, use_karras_sigmas, ...). A value we cannot honour raises ValueError.

Usage, as in diffusers' denoising loop (one fresh scheduler per generation; step keeps state):
    sched = make_scheduler("euler", config); sched.set_timesteps(30)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, generator=rng)
"""
from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .noise_schedule import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    alpha_sigma_from_sigma,
    consistency_timesteps,
    karras_sigmas,
    log_snr,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    training_alphas_cumprod,
)

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler_config.json keys we honour; each scheduler class overrides defaults as diffusers does."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"
    lower_order_final: bool = True
    euler_at_final: bool = False
    interpolation_type: str = "linear"
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0


_CHOICES = {
    "beta_schedule": BETA_SCHEDULES,
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": TIMESTEP_SPACINGS,
    "final_sigmas_type": ("zero", "sigma_min"),
    "interpolation_type": ("linear", "log_linear"),
}
_BOOLS = ("set_alpha_to_one", "clip_sample", "rescale_betas_zero_snr", "lower_order_final", "euler_at_final")
MAX_TIMESTEPS = 1_000_000  # num_train_timesteps and steps_offset: a schedule is arrays of this length


def _check_value(key: str, value: Any) -> None:
    """Raise ValueError naming key and value when a listed key holds something no scheduler can honour."""
    def bad(expected: str) -> ValueError:
        return ValueError(f"scheduler config {key}={value!r}: expected {expected}")

    if key in _CHOICES and value not in _CHOICES[key]:
        if key == "beta_schedule" and value is None:
            return  # only meaningful with trained_betas, checked at construction
        raise bad("one of " + ", ".join(map(repr, _CHOICES[key])))
    if key in _BOOLS and not isinstance(value, (bool, np.bool_)):
        raise bad("true or false")
    if key in ("num_train_timesteps", "original_inference_steps", "steps_offset"):
        positive = key != "steps_offset"
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not int(positive) <= value <= MAX_TIMESTEPS:
            raise bad(f"an integer in [{int(positive)}, {MAX_TIMESTEPS}]")
    if key in ("beta_start", "beta_end", "clip_sample_range", "timestep_scaling"):
        finite = isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and math.isfinite(value))
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not finite:
            raise bad("a finite number")
    if key in ("beta_start", "beta_end") and not 0 < value < 1:
        raise bad("a variance in (0, 1)")
    if key == "clip_sample_range" and value <= 0:
        raise bad("a number > 0")
    if key == "trained_betas" and value is not None:
        if np.ndim(value) != 1 or not np.all(np.isfinite(np.asarray(value, dtype=np.float64))):
            raise bad("null or a list of numbers")


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def denoised_and_eps(prediction_type: str, model_output: np.ndarray, sample: np.ndarray,
                     sigma: Any, alpha: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The model's estimates (x_0, eps) from its output of ``prediction_type``, with v = alpha eps - sigma x_0.

    VP schedulers pass alpha and sigma, x_t = alpha x_0 + sigma eps (Salimans & Ho 2022 for v).
    VE schedulers (Euler) pass sigma only, x = x_0 + sigma eps; their v is taken on the scaled input
    x / sqrt(sigma^2 + 1), and their eps is the ODE derivative (x - x_0) / sigma (Karras et al. 2022,
    Table 1). Each branch keeps diffusers' order of float32 operations.
    """
    if alpha is None:
        if prediction_type == "epsilon":
            denoised = sample - sigma * model_output
        elif prediction_type == "v_prediction":
            denoised = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:
            denoised = model_output
        return denoised, (sample - denoised) / sigma
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    return model_output, (sample - alpha * model_output) / sigma


class Scheduler:
    """Shared part: config resolution, the training schedule alpha_bar_t, set_timesteps, img2img slicing."""
    name: ClassVar[str] = ""
    # the diffusers class and the from_config keyword arguments that make it this algorithm
    diffusers_class: ClassVar[str] = ""
    diffusers_kwargs: ClassVar[dict[str, Any]] = {}
    order: ClassVar[int] = 1
    # the diffusers class's defaults for the keys it reads; keys not listed here are not read
    defaults: ClassVar[dict[str, Any]] = {}
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    # keys of the diffusers class that change results but that we only run at one value
    unsupported: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: SchedulerConfig):
        self.config = c = config
        if c.prediction_type not in self.prediction_types:
            raise ValueError(f"scheduler config prediction_type={c.prediction_type!r}: {self.name!r} supports "
                             + ", ".join(map(repr, self.prediction_types)))
        if c.trained_betas is not None and len(c.trained_betas) != c.num_train_timesteps:
            raise ValueError(f"scheduler config trained_betas has {len(c.trained_betas)} values, expected "
                             f"num_train_timesteps={c.num_train_timesteps}")
        if c.trained_betas is None and c.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"scheduler config beta_schedule={c.beta_schedule!r}: expected one of {BETA_SCHEDULES}")
        self.alphas_cumprod = training_alphas_cumprod(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule,
                                                      c.trained_betas, c.rescale_betas_zero_snr)  # (T,) float32
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.float32)
        self._begin_index: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Scheduler":
        """Build from a diffusers scheduler_config.json dict (any scheduler class's)."""
        values = dict(cls.defaults)
        # an in-memory diffusers config lists the keys its class defaulted; from_config drops them so
        # that the new class's own defaults apply (saved JSON files have no such list)
        defaulted = set(config.get("_use_default_values") or ())
        for key, value in config.items():
            if key in defaulted:
                continue
            if key in cls.unsupported:
                if value != cls.unsupported[key]:
                    raise ValueError(f"scheduler config {key}={value!r} is not supported by {cls.name!r} "
                                     f"(only {cls.unsupported[key]!r})")
                continue
            if key in SchedulerConfig.__dataclass_fields__:
                _check_value(key, value)
            if key in cls.defaults:
                values[key] = value
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
        ignored = sorted(k for k in config if k not in cls.defaults and not k.startswith("_"))
        if ignored:
            logger.debug("%s ignores scheduler config keys %s", cls.name, ignored)
        return cls(SchedulerConfig(**values))

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of z_T: multiply unit-variance noise by it before the first step."""
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Lay out ``timesteps`` (the values fed to the U-Net) for a run of num_inference_steps; resets state."""
        self._start_run(num_inference_steps)
        self._set_timesteps(int(num_inference_steps))

    def _start_run(self, num_inference_steps: int) -> None:
        T = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, numbers.Integral) or not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be an integer in [1, {T}], got {num_inference_steps!r}")
        self.num_inference_steps = int(num_inference_steps)
        self._begin_index = None

    def _set_timesteps(self, n: int) -> None:
        raise NotImplementedError

    @property
    def user_steps(self) -> np.ndarray:
        """One bool per step() call of the run (the timesteps from the begin index on): True where
        the call completes one of the num_inference_steps the user asked for, as diffusers' progress
        bar counts them. The calls beyond num_inference_steps * order come first and are warm-up:
        PNDM's repeated timestep (its first call is a predictor that the second call replaces)."""
        self._require_timesteps()
        warmup = len(self.timesteps) - self.num_inference_steps * self.order
        calls = np.arange(1, len(self.timesteps) - (self._begin_index or 0) + 1)
        visible = (calls > warmup) & (calls % self.order == 0)
        visible[-1:] = True
        return visible

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps(num_inference_steps) before step()")

    def scale_model_input(self, sample: np.ndarray, t: Any) -> np.ndarray:
        """The U-Net's input at timestep t (identity except for the Euler schedulers)."""
        return sample

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray,
             generator: np.random.Generator | None = None) -> np.ndarray:
        """One solver step from timestep t: (B, C, h, w) float32 model output and x_t -> x_{t-1}.

        Call once per entry of ``timesteps``, in order. ``generator`` feeds the stochastic
        schedulers (euler_a, lcm, tcd with eta > 0); without one they draw from a fresh, unseeded
        generator. Each draws float32 standard normals of the model output's shape, one array per
        step that injects noise, in step order.
        """
        raise NotImplementedError

    def step_kwargs(self, eta: Any) -> dict[str, Any]:
        """The keyword arguments of step() that a pipeline call's ``eta=`` becomes; ValueError where it cannot apply.

        diffusers' pipelines pass eta only to schedulers whose step() takes one; here the others
        take eta = 0 (the pipelines' default) and refuse any other value rather than ignore it.
        """
        _check_eta(eta)
        if eta != 0:
            raise ValueError(f"eta={eta!r}: scheduler {self.name!r} takes no eta (tcd does); leave it at 0")
        return {}

    def add_noise(self, original: np.ndarray, noise: np.ndarray, t: Any) -> np.ndarray:
        """x_0 noised to timestep t (a scalar or one per batch item), as diffusers' add_noise."""
        raise NotImplementedError

    def img2img_timesteps(self, num_inference_steps: int, strength: float) -> np.ndarray:
        """set_timesteps, then the tail that img2img runs, as StableDiffusionImg2ImgPipeline.get_timesteps keeps it.

        Also sets the begin index, so that step and add_noise start at the first kept timestep.
        """
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        self.set_timesteps(num_inference_steps)
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        if init_timestep < 1:
            raise ValueError(f"num_inference_steps * strength = {num_inference_steps} * {strength} < 1: "
                             "no denoising step would run; raise either")
        t_start = max(num_inference_steps - init_timestep, 0) * self.order
        self._begin_index = t_start
        return self.timesteps[t_start:]

    @property
    def run_timesteps(self) -> np.ndarray:
        """The timesteps of the step() calls of this run, in order: from the begin index (img2img) on."""
        self._require_timesteps()
        return self.timesteps[self._begin_index or 0:]


# -- alpha_bar-indexed schedulers: the timestep value itself selects alpha_bar_t ------------------

class _AlphaIndexed(Scheduler):
    def _alpha_prev(self, prev_t: int) -> np.float32:
        return self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

    def add_noise(self, original: np.ndarray, noise: np.ndarray, t: Any) -> np.ndarray:
        """q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        alpha_bar = self.alphas_cumprod[np.asarray(t).astype(np.int64).reshape(-1)]
        shape = (-1,) + (1,) * (original.ndim - 1)  # (B,) -> (B, 1, 1, 1)
        return (alpha_bar**0.5).reshape(shape) * original + ((1 - alpha_bar) ** 0.5).reshape(shape) * noise


def _check_eta(eta: Any) -> None:
    if not isinstance(eta, numbers.Real) or isinstance(eta, bool) or not 0 <= float(eta) <= 1:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")


class DDIM(_AlphaIndexed):
    """Deterministic DDIM, eta = 0 (Song et al. 2020, eq. 12)."""
    name = "ddim"
    diffusers_class = "DDIMScheduler"  # eta = 0 is its step()'s default
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                    prediction_type="epsilon", clip_sample_range=1.0, timestep_spacing="leading",
                    rescale_betas_zero_snr=False)
    unsupported = {"thresholding": False}

    def __init__(self, config: SchedulerConfig):
        super().__init__(config)
        self.final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def _set_timesteps(self, n: int) -> None:
        c = self.config
        ts = spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing, c.steps_offset)
        self.timesteps = ts.astype(np.float32)

    def step_kwargs(self, eta: Any) -> dict[str, Any]:
        _check_eta(eta)
        if eta != 0:
            raise ValueError(f"eta={eta!r}: scheduler 'ddim' is deterministic DDIM (eta 0) only; "
                             "for a stochastic few-step sampler use tcd")
        return {}

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray,
             generator: np.random.Generator | None = None) -> np.ndarray:
        self._require_timesteps()
        model_output, sample = _f32(model_output), _f32(sample)
        c = self.config
        t = int(t)
        prev_t = t - c.num_train_timesteps // self.num_inference_steps  # diffusers' step back, whatever the spacing
        alpha_bar, alpha_bar_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        denoised, eps = denoised_and_eps(c.prediction_type, model_output, sample, (1 - alpha_bar) ** 0.5,
                                         alpha_bar**0.5)
        if c.clip_sample:
            denoised = np.clip(denoised, -c.clip_sample_range, c.clip_sample_range)
        return alpha_bar_prev**0.5 * denoised + (1 - alpha_bar_prev) ** 0.5 * eps


class PNDM(_AlphaIndexed):
    """PLMS: linear multistep on eps with a Heun warm-up step (Liu et al. 2022, eqs. 12-13); no Runge-Kutta."""
    name = "pndm"
    diffusers_class = "PNDMScheduler"
    diffusers_kwargs = {"skip_prk_steps": True}
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, set_alpha_to_one=False, prediction_type="epsilon",
                    timestep_spacing="leading", steps_offset=0)
    prediction_types = ("epsilon", "v_prediction")

    def __init__(self, config: SchedulerConfig):
        super().__init__(config)
        self.final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def _set_timesteps(self, n: int) -> None:
        c = self.config
        ts = spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing, c.steps_offset)[::-1]  # ascending
        # the second-to-last timestep appears twice: step 2 re-runs it for the Heun-style average
        self.timesteps = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].astype(np.float32)
        self.ets: list[np.ndarray] = []
        self.counter = 0
        self.cur_sample: np.ndarray | None = None

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray,
             generator: np.random.Generator | None = None) -> np.ndarray:
        self._require_timesteps()
        model_output, sample = _f32(model_output), _f32(sample)
        skip = self.config.num_train_timesteps // self.num_inference_steps
        t = int(t)
        prev_t = t - skip
        if self.counter != 1:
            self.ets = self.ets[-3:] + [model_output]
        else:
            prev_t, t = t, t + skip
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            combined = model_output
            self.cur_sample = sample
        elif len(e) == 1 and self.counter == 1:
            combined = (model_output + e[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(e) == 2:
            combined = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            combined = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            combined = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self.counter += 1
        return self._prev_sample(sample, t, prev_t, combined)

    def _prev_sample(self, sample: np.ndarray, t: int, prev_t: int, model_output: np.ndarray) -> np.ndarray:
        """x_{t-delta} from x_t and the combined model output (Liu et al. 2022, eq. 11)."""
        alpha_bar, alpha_bar_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        beta_bar, beta_bar_prev = 1 - alpha_bar, 1 - alpha_bar_prev
        _, eps = denoised_and_eps(self.config.prediction_type, model_output, sample, beta_bar**0.5, alpha_bar**0.5)
        sample_coeff = (alpha_bar_prev / alpha_bar) ** 0.5
        eps_denom = alpha_bar * beta_bar_prev**0.5 + (alpha_bar * beta_bar * alpha_bar_prev) ** 0.5
        return sample_coeff * sample - (alpha_bar_prev - alpha_bar) * eps / eps_denom


# -- sigma-indexed schedulers: a step counter walks the sigmas array ----------------------------

class _SigmaIndexed(Scheduler):
    """sigmas[i] is the noise level of timesteps[i]; sigmas has one more entry, the final level."""
    missing_timestep_is_last: ClassVar[bool] = False

    def __init__(self, config: SchedulerConfig):
        super().__init__(config)
        if config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2.0**-24  # diffusers' stand-in for alpha_bar_T = 0, so sigma_T stays finite
        self.train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # (T,), ascending in t
        self.sigmas = np.concatenate([self.train_sigmas[::-1], [0.0]]).astype(np.float32)
        self._step_index: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        self._step_index = None

    def index_for_timestep(self, t: Any) -> int:
        """Position of t in timesteps; the second hit when t repeats (as diffusers, for img2img)."""
        hits = np.flatnonzero(self.timesteps == np.float32(t))
        if len(hits) == 0:
            if self.missing_timestep_is_last:
                return len(self.timesteps) - 1
            raise ValueError(f"{self.name}: timestep {t!r} is not in the schedule {self.timesteps.tolist()}")
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _index(self, t: Any) -> int:
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            elif len(self.timesteps) > 1 and self.timesteps[0] == self.timesteps[1] == np.float32(t):
                # Karras sigmas can round to a repeated first timestep; diffusers then starts at the
                # second copy and runs off the end of its sigmas on the last step. Start at the first.
                self._step_index = 0
            else:
                self._step_index = self.index_for_timestep(t)
        if self._step_index >= len(self.timesteps):
            raise RuntimeError(f"{self.name}: step called more often than the {len(self.timesteps)} timesteps")
        return self._step_index

    def _noise_sigmas(self, t: Any, ndim: int) -> np.ndarray:
        ts = np.asarray(t).reshape(-1)
        if self._begin_index is None:
            idx = [self.index_for_timestep(x) for x in ts]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(ts)
        return self.sigmas[idx].reshape((-1,) + (1,) * (ndim - 1))  # (B, 1, 1, 1)



class Euler(_SigmaIndexed):
    """Euler method on the probability-flow ODE in sigma (Karras et al. 2022, Alg. 2 without churn)."""
    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", interpolation_type="linear",
                    timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
                    final_sigmas_type="zero")
    unsupported = {"timestep_type": "discrete"}

    @property
    def init_noise_sigma(self) -> float:
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(sigma_max)
        return float((sigma_max**2 + 1) ** 0.5)  # diffusers: the std of x_0 + sigma eps for leading spacing only

    def _set_timesteps(self, n: int) -> None:
        c = self.config
        self.timesteps = spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing, c.steps_offset,
                                          fractional=True)
        train = self.train_sigmas
        if c.interpolation_type == "linear":
            sigmas = np.interp(self.timesteps, np.arange(len(train)), train)
        else:  # log_linear: n + 1 levels from sigma_max to sigma_min, as diffusers lays them out
            sigmas = np.exp(np.linspace(np.log(train[-1]), np.log(train[0]), n + 1).astype(np.float32))
        sigma_last = train[0] if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

    def scale_model_input(self, sample: np.ndarray, t: Any) -> np.ndarray:
        """c_in = 1 / sqrt(sigma^2 + 1): the U-Net was trained on unit-variance VP inputs."""
        sigma = self.sigmas[self._index(t)]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray,
             generator: np.random.Generator | None = None) -> np.ndarray:
        self._require_timesteps()
        model_output, sample = _f32(model_output), _f32(sample)
        i = self._index(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        _, d = denoised_and_eps(self.config.prediction_type, model_output, sample, sigma)
        self._step_index += 1
        return sample + d * (sigma_next - sigma)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, t: Any) -> np.ndarray:
        """x = x_0 + sigma * noise."""
        return original + noise * self._noise_sigmas(t, original.ndim)


class EulerAncestral(Euler):
    """Euler ancestral: Euler to sigma_down, then new noise of std sigma_up (k-diffusion; Karras et al. 2022)."""
    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", timestep_spacing="linspace",
                    steps_offset=0, rescale_betas_zero_snr=False)
    prediction_types = ("epsilon", "v_prediction")
    unsupported = {}

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray,
             generator: np.random.Generator | None = None) -> np.ndarray:
        self._require_timesteps()
        model_output, sample = _f32(model_output), _f32(sample)
        i = self._index(t)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        _, d = denoised_and_eps(self.config.prediction_type, model_output, sample, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = sample + d * (sigma_down - sigma)
        rng = generator if generator is not None else np.random.default_rng()
        noise = rng.standard_normal(model_output.shape, dtype=np.float32)  # drawn on every step, as diffusers
        self._step_index += 1
        return x + noise * sigma_up


# -- multistep exponential integrators in log-SNR: DPM-Solver++ and UniPC -------------------------

class _Multistep(_SigmaIndexed):
    """Shared by the VP-space solvers: spacing with t=0 dropped, x_0 prediction, VP add_noise."""
    missing_timestep_is_last = True
    use_karras_sigmas: ClassVar[bool] = False

    def _set_timesteps(self, n: int) -> None:
        c = self.config
        train = self.train_sigmas
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(float(train[0]), float(train[-1]), n)
            ts = sigma_to_t(sigmas, np.log(train))
            if c.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            ts = spaced_timesteps(n, c.num_train_timesteps, c.timestep_spacing, c.steps_offset, skip_zero=True)
            sigmas = np.interp(ts, np.arange(len(train)), train)
        sigma_last = train[0] if c.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = ts.astype(np.int64).astype(np.float32)  # diffusers truncates to int64
        self.model_outputs: list[np.ndarray | None] = [None, None]
        self.lower_order_nums = 0

    def _denoised(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        """x_0 prediction in the VP parameterization x = alpha_t x_0 + sigma_t eps."""
        alpha_t, sigma_t = alpha_sigma_from_sigma(sigma)
        return denoised_and_eps(self.config.prediction_type, model_output, sample, sigma_t, alpha_t)[0]

    def add_noise(self, original: np.ndarray, noise: np.ndarray, t: Any) -> np.ndarray:
        """q(x_t | x_0) = alpha_t x_0 + sigma_t noise."""
        alpha_t, sigma_t = alpha_sigma_from_sigma(self._noise_sigmas(t, original.ndim))
        return alpha_t * original + sigma_t * noise


class DPMSolverPP2M(_Multistep):
    """DPM-Solver++(2M): second-order multistep in log-SNR on the x_0 prediction (Lu et al. 2022, Alg. 2)."""
    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    diffusers_kwargs = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", lower_order_final=True,
                    euler_at_final=False, final_sigmas_type="zero", timestep_spacing="linspace",
                    steps_offset=0, rescale_betas_zero_snr=False)
    unsupported = {"thresholding": False, "variance_type": None, "lambda_min_clipped": -float("inf"),
                   "use_flow_sigmas": False, "use_dynamic_shifting": False}

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray,
             generator: np.random.Generator | None = None) -> np.ndarray:
        self._require_timesteps()
        model_output, sample = _f32(model_output), _f32(sample)
        c = self.config
        i, n = self._index(t), len(self.timesteps)
        # first order on the last step: sigma = 0 makes h infinite, and short schedules are steadier
        first_order_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15)
                                            or c.final_sigmas_type == "zero")
        denoised = self._denoised(model_output, sample, self.sigmas[i])
        self.model_outputs = [self.model_outputs[-1], denoised]
        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t, sigma_t_vp = alpha_sigma_from_sigma(sigma_t)
        _, sigma_s0_vp = alpha_sigma_from_sigma(sigma_s0)
        lambda_t, lambda_s0 = log_snr(sigma_t), log_snr(sigma_s0)
        h = lambda_t - lambda_s0
        phi = alpha_t * (np.exp(-h) - 1.0)
        if self.lower_order_nums < 1 or first_order_final:
            x = (sigma_t_vp / sigma_s0_vp) * sample - phi * denoised
        else:
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            # h = 0 (a sigma_min to sigma_min step) gives inf/nan here, as in diffusers
            with np.errstate(divide="ignore", invalid="ignore"):
                r0 = (lambda_s0 - log_snr(self.sigmas[i - 1])) / h
                D1 = (1.0 / r0) * (m0 - m1)
            x = (sigma_t_vp / sigma_s0_vp) * sample - phi * m0 - 0.5 * phi * D1
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self._step_index += 1
        return x


class DPMSolverPP2MKarras(DPMSolverPP2M):
    """DPM-Solver++(2M) on Karras et al. 2022's rho = 7 noise levels."""
    name = "dpmpp_2m_karras"
    diffusers_kwargs = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}
    use_karras_sigmas = True


class UniPC(_Multistep):
    """UniPC-2 on the x_0 prediction, B(h) = expm1(h): UniP predictor, UniC corrector (Zhao et al. 2023, Alg. 1-2)."""
    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"  # its defaults: bh2, order 2, predict_x0
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                    trained_betas=None, prediction_type="epsilon", lower_order_final=True,
                    timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
                    rescale_betas_zero_snr=False)
    unsupported = {"thresholding": False, "use_flow_sigmas": False, "use_dynamic_shifting": False,
                   "shift_terminal": None}

    def _set_timesteps(self, n: int) -> None:
        super()._set_timesteps(n)
        self.last_sample: np.ndarray | None = None
        self.this_order = 1

    def _update(self, x: np.ndarray, s: int, order: int, model_t: np.ndarray | None) -> np.ndarray:
        """From sigmas[s] (the last stored x_0 prediction m0) to sigmas[s + 1]; UniC when model_t is given.

        Order 2 uses the stored prediction before m0, at sigmas[s - 1].
        """
        m0 = self.model_outputs[-1]
        sigma_t, sigma_s0 = self.sigmas[s + 1], self.sigmas[s]
        alpha_t, sigma_t_vp = alpha_sigma_from_sigma(sigma_t)
        _, sigma_s0_vp = alpha_sigma_from_sigma(sigma_s0)
        lambda_s0 = log_snr(sigma_s0)
        h = log_snr(sigma_t) - lambda_s0
        hh = -h  # predict_x0
        h_phi_1 = np.expm1(hh)  # h phi_1(h) = e^h - 1
        B_h = np.expm1(hh)  # bh2
        x_t = sigma_t_vp / sigma_s0_vp * x - alpha_t * h_phi_1 * m0
        D1 = None
        rks = [np.float32(1.0)]
        if order == 2:
            rk = (log_snr(self.sigmas[s - 1]) - lambda_s0) / h
            rks = [rk, np.float32(1.0)]
            with np.errstate(divide="ignore", invalid="ignore"):  # rk = 0 when sigma_t = 0: inf/nan as diffusers
                D1 = (self.model_outputs[-2] - m0) / rk
        if model_t is None:  # UniP: rho_p = 1/2 for order 2
            return x_t if D1 is None else x_t - alpha_t * B_h * (np.float32(0.5) * D1)
        # UniC: solve R rho = b for the corrector weights, R[k] = r^k, b[k] = k! phi_{k+1}(h) / B(h)
        h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
        for k in range(1, order + 1):
            b.append(h_phi_k * factorial / B_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        if order == 1:
            rhos_c = np.array([0.5], dtype=np.float32)
        else:
            R = np.stack([np.array(rks, dtype=np.float32) ** k for k in range(order)])
            rhos_c = np.linalg.solve(R, np.array(b, dtype=np.float32)).astype(np.float32)
        corr = rhos_c[-1] * (model_t - m0)
        if D1 is not None:
            corr = rhos_c[0] * D1 + corr
        return x_t - alpha_t * B_h * corr

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray,
             generator: np.random.Generator | None = None) -> np.ndarray:
        self._require_timesteps()
        model_output, sample = _f32(model_output), _f32(sample)
        i, n = self._index(t), len(self.timesteps)
        denoised = self._denoised(model_output, sample, self.sigmas[i])
        if i > 0 and self.last_sample is not None:
            # UniC: refine the sample the last predictor produced, using the new evaluation
            sample = self._update(self.last_sample, i - 1, self.this_order, model_t=denoised)
        self.model_outputs = [self.model_outputs[-1], denoised]
        order = min(2, n - i) if self.config.lower_order_final else 2
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up
        self.last_sample = sample
        x = self._update(sample, i, self.this_order, model_t=None)
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self._step_index += 1
        return x


# -- consistency samplers: one jump to x_0 per step, then re-noised to the next timestep ----------

class _Consistency(_AlphaIndexed):
    """Shared by LCM and TCD: the distillation grid (``original_inference_steps``), a step counter.

    Their diffusers classes accept but never read timestep_spacing, steps_offset and
    set_alpha_to_one; the grid depends on original_inference_steps and the step count only.
    """
    defaults = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    trained_betas=None, original_inference_steps=50, prediction_type="epsilon",
                    rescale_betas_zero_snr=False)
    # an explicit original_inference_steps lays the grid over every training timestep (TCD only)
    explicit_original_uses_every_timestep: ClassVar[bool] = False

    def set_timesteps(self, num_inference_steps: int, *, original_inference_steps: int | None = None,
                      strength: float = 1.0) -> None:
        """num_inference_steps of the distillation grid, as diffusers' set_timesteps with the same arguments.

        ``original_inference_steps`` (None: the config's) and ``strength`` are what diffusers'
        LCM pipelines pass; its SD pipelines pass neither.
        """
        self._start_run(num_inference_steps)
        c = self.config
        explicit = original_inference_steps is not None
        original = c.original_inference_steps if original_inference_steps is None else original_inference_steps
        every = explicit and self.explicit_original_uses_every_timestep
        ts = consistency_timesteps(int(num_inference_steps), c.num_train_timesteps, original, strength,
                                   every_timestep=every)
        self.timesteps = ts.astype(np.float32)
        self._step_index: int | None = None

    def _next_index(self, t: Any) -> int:
        """The position of this step() call: from the begin index, or where the first t sits."""
        if self._step_index is None:
            hits = np.flatnonzero(self.timesteps == np.float32(t))
            if self._begin_index is None and len(hits) == 0:
                raise ValueError(f"{self.name}: timestep {t!r} is not in the schedule {self.timesteps.tolist()}")
            self._step_index = self._begin_index if self._begin_index is not None else int(hits[0])
        if self._step_index >= len(self.timesteps):
            raise RuntimeError(f"{self.name}: step called more often than the {len(self.timesteps)} timesteps")
        self._step_index += 1
        return self._step_index - 1

    def _estimates(self, model_output: np.ndarray, sample: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        alpha_bar = self.alphas_cumprod[t]
        return denoised_and_eps(self.config.prediction_type, model_output, sample, (1 - alpha_bar) ** 0.5,
                                alpha_bar**0.5)


class LCM(_Consistency):
    """Multistep latent consistency sampling (Luo et al. 2023, Alg. 3): x_0 with the boundary scalings, re-noised.

    c_skip = s^2 / ((t * timestep_scaling)^2 + s^2), c_out = t * timestep_scaling / sqrt(...), s = 0.5;
    each step but the last draws one float32 standard normal array from ``generator``.
    img2img follows diffusers' LatentConsistencyModelImg2ImgPipeline: strength cuts the
    distillation grid, and every one of num_inference_steps runs.
    """
    name = "lcm"
    diffusers_class = "LCMScheduler"
    defaults = dict(_Consistency.defaults, clip_sample=False, clip_sample_range=1.0, timestep_scaling=10.0)
    unsupported = {"thresholding": False}
    sigma_data: ClassVar[float] = 0.5

    def boundary_scalings(self, t: Any) -> tuple[np.float32, np.float32]:
        """(c_skip, c_out) at discrete timestep t, float32 as diffusers computes them."""
        scaled = np.float32(t) * np.float32(self.config.timestep_scaling)
        s2 = np.float32(self.sigma_data**2)
        return s2 / (scaled**2 + s2), scaled / (scaled**2 + s2) ** np.float32(0.5)

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray,
             generator: np.random.Generator | None = None) -> np.ndarray:
        self._require_timesteps()
        model_output, sample = _f32(model_output), _f32(sample)
        c = self.config
        i = self._next_index(t)
        denoised, _ = self._estimates(model_output, sample, int(t))
        if c.clip_sample:
            denoised = np.clip(denoised, -c.clip_sample_range, c.clip_sample_range)
        c_skip, c_out = self.boundary_scalings(t)
        denoised = c_out * denoised + c_skip * sample
        if i == len(self.timesteps) - 1:
            return denoised
        alpha_bar_prev = self.alphas_cumprod[int(self.timesteps[i + 1])]
        rng = generator if generator is not None else np.random.default_rng()
        noise = rng.standard_normal(model_output.shape, dtype=np.float32)
        return alpha_bar_prev**0.5 * denoised + (1 - alpha_bar_prev) ** 0.5 * noise

    def img2img_timesteps(self, num_inference_steps: int, strength: float) -> np.ndarray:
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        self.set_timesteps(num_inference_steps, strength=strength)
        return self.timesteps


class TCD(_Consistency):
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024, Alg. 4).

    Each step jumps from t to s = floor((1 - eta) t_prev) along the predicted trajectory, then
    (eta > 0, not the last step) forward-noises from s to t_prev with one float32 standard normal
    array from ``generator``. eta = 0 is deterministic; eta = 1 is LCM-like multistep sampling.
    The last step lands at s = 0, not on x_0: the result keeps alpha_bar_0's sliver of noise, as
    in diffusers.

    What a user gets, matching diffusers: through ``Pipeline(..., eta=...)`` eta defaults to 0.0,
    the value diffusers' SD pipelines pass (TCD's own step() default, 0.3, applies only to direct
    step calls, here as there); the grid comes from the config's original_inference_steps (the SD
    pipelines never pass one), so 4 steps give [999, 759, 499, 259]. Passing original_inference_steps
    to set_timesteps, even the config's value, spaces the steps over all training timesteps instead
    ([999, 749, 499, 249]), a diffusers quirk kept here. img2img is StableDiffusionImg2ImgPipeline's
    (the tail of the schedule), as for the other schedulers.
    """
    name = "tcd"
    diffusers_class = "TCDScheduler"
    explicit_original_uses_every_timestep = True

    def step_kwargs(self, eta: Any) -> dict[str, Any]:
        _check_eta(eta)
        return {"eta": float(eta)}

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray,
             generator: np.random.Generator | None = None, eta: float = 0.3) -> np.ndarray:
        self._require_timesteps()
        _check_eta(eta)
        model_output, sample = _f32(model_output), _f32(sample)
        i = self._next_index(t)
        last = i == len(self.timesteps) - 1
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        s = int(np.floor(np.float32(1 - eta) * np.float32(prev_t)))
        alpha_bar_prev, alpha_bar_s = self.alphas_cumprod[prev_t], self.alphas_cumprod[s]
        denoised, eps = self._estimates(model_output, sample, int(t))
        noised = alpha_bar_s**0.5 * denoised + (1 - alpha_bar_s) ** 0.5 * eps  # x_s on the predicted trajectory
        if eta == 0 or last:
            return noised
        rng = generator if generator is not None else np.random.default_rng()
        noise = rng.standard_normal(model_output.shape, dtype=np.float32)
        ratio = alpha_bar_prev / alpha_bar_s
        return ratio**0.5 * noised + (1 - ratio) ** 0.5 * noise


# the one table of our names and their diffusers classes: each class carries its row
_CLASSES: dict[str, type[Scheduler]] = {cls.name: cls for cls in (
    DDIM, PNDM, Euler, EulerAncestral, DPMSolverPP2M, DPMSolverPP2MKarras, UniPC, LCM, TCD)}
SCHEDULERS: tuple[str, ...] = tuple(_CLASSES)


def scheduler_class(name: str) -> type[Scheduler]:
    """The class of scheduler ``name``; ValueError listing the valid names for an unknown one."""
    if name not in _CLASSES:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    return _CLASSES[name]


def scheduler_name_for(config: Mapping[str, Any]) -> str:
    """Our scheduler name for a diffusers scheduler config.

    Its ``_class_name`` (DDIMScheduler when absent) picks the candidates; among those, the one whose
    diffusers_kwargs the config agrees with most wins (use_karras_sigmas=True: dpmpp_2m_karras),
    the first listed on a tie. A class we have no port of falls back to 'ddim' with a warning: its
    schedule keys still apply.
    """
    class_name = config.get("_class_name", "DDIMScheduler")
    candidates = [cls for cls in _CLASSES.values() if cls.diffusers_class == class_name]
    if not candidates:
        logger.warning("scheduler class %s has no ldm_runtime equivalent; using 'ddim' with its config keys "
                       "(choose another with --scheduler at generation time)", class_name)
        return "ddim"

    def agreement(cls: type[Scheduler]) -> int:
        return sum(config.get(key) == value for key, value in cls.diffusers_kwargs.items())

    return max(candidates, key=agreement).name


def diffusers_config_for(name: str, base: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (a diffusers scheduler config) turned into one that selects scheduler ``name`` in diffusers."""
    cls = scheduler_class(name)
    return {**base, "_class_name": cls.diffusers_class, **cls.diffusers_kwargs}


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """A fresh scheduler ``name`` (one of SCHEDULERS) for a diffusers scheduler_config dict.

    Raises ValueError for an unknown name (listing the valid ones) and for a config value that
    cannot be honoured (naming key and value).
    """
    cls = scheduler_class(name)
    if not isinstance(config, Mapping):
        raise ValueError(f"scheduler config must be a dict, got {type(config).__name__}")
    return cls.from_config(config)
