"""ldm_runtime.schedulers against diffusers' own schedulers, whole trajectories step by step.

Both sides get the same fake denoiser (numpy, nonlinear in x, dependent on t) evaluated on their
own current latents, so any divergence in a step propagates and shows. Tolerance on every step:
max|ours - diffusers| <= 1e-5 * max|diffusers| + 4e-7 * (largest |latent| so far); the second term
only matters where a step cancels large terms (see assert_trajectories_match). Measured: plain
max|a - b| / max|b| <= 2.3e-6 on all cases but three: 3-step zero-SNR Euler / Euler-a (first step
from sigma 4096) and 2-step v-prediction Euler-a reach 9.6e-5 / 8.3e-5 / 1.5e-5, which is at most
6.1e-8 x the largest latent; with the stated tolerance the worst case uses 2.2e-6 of 1e-5.
The stochastic ones (euler_a, lcm, tcd) get diffusers' ``randn_tensor`` replaced by draws from the
same seeded numpy stream as ours (``patch_noise``). lcm and tcd, over every case here: at most
7.5e-7 and 1.1e-6 of the scaled tolerance measure.
"""
from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import DDIMScheduler  # noqa: E402

from ldm_runtime.schedulers import (  # noqa: E402
    SCHEDULERS,
    diffusers_config_for,
    make_scheduler,
    scheduler_class,
    scheduler_name_for,
)
from ldm_runtime.noise_schedule import linspace_f32  # noqa: E402

# diffusers converts torch tensors with np.array(..., copy=False), which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

RTOL = 1e-5
ATOL_OPERAND = 4e-7  # ~3.4 float32 eps of the largest latent so far; see assert_trajectories_match

# the contract, from the runtime's one table: name -> diffusers class and the keyword arguments the name fixes
ORACLE = {name: (getattr(diffusers, scheduler_class(name).diffusers_class), scheduler_class(name).diffusers_kwargs)
          for name in SCHEDULERS}

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SUPPORTS_SAMPLE = ("ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
STEPS = (1, 2, 3, 5, 10, 25, 50)


def fake_denoiser(x: np.ndarray, t) -> np.ndarray:
    """Deterministic stand-in for the U-Net: nonlinear in x, depends on t."""
    t = np.float32(t)
    return (np.float32(0.3) * np.tanh(x) + np.float32(0.01) * (t / np.float32(1000)) * x
            + np.float32(0.02) * np.cos(t / np.float32(100))).astype(np.float32)


def initial_latents(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, 8, 8), dtype=np.float32)


def diffusers_scheduler(name: str, config: dict):
    cls, fixed = ORACLE[name]
    return cls.from_config(config, **fixed)


CONSISTENCY = ("lcm", "tcd")  # their grid is a subset of original_inference_steps (50 by default)
STOCHASTIC = ("euler_a", "lcm", "tcd")  # tcd: at its step() default, eta 0.3, on both sides


def patch_noise(monkeypatch, name: str, seed: int) -> list:
    """diffusers' stochastic schedulers draw their noise from the same numpy stream as ours (a generator
    seeded ``seed``, float32 standard normals of the model output's shape, in step order). Returns the
    list of the shapes diffusers draws, filled as it runs."""
    rng, shapes = np.random.default_rng(seed), []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        shapes.append(tuple(shape))
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))

    if name in STOCHASTIC:
        monkeypatch.setattr(sys.modules[ORACLE[name][0].__module__], "randn_tensor", randn_tensor)
    return shapes


def run_ours(sched, x: np.ndarray, timesteps, seed: int = 7, **step_kwargs) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    inputs, outputs = [], []
    for t in timesteps:
        inp = sched.scale_model_input(x, t)
        x = sched.step(fake_denoiser(inp, t), t, x, generator=rng, **step_kwargs)
        assert x.dtype == np.float32
        inputs.append(inp)
        outputs.append(x)
    return inputs, outputs


def run_diffusers(sched, x: np.ndarray, timesteps, **step_kwargs) -> tuple[list, list]:
    x = torch.from_numpy(x)
    inputs, outputs = [], []
    for t in timesteps:
        inp = sched.scale_model_input(x, t)
        eps = torch.from_numpy(fake_denoiser(inp.numpy(), float(t)))
        x = sched.step(eps, t, x, **step_kwargs).prev_sample
        inputs.append(inp.numpy())
        outputs.append(x.numpy())
    return inputs, outputs


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def assert_trajectories_match(ours: tuple[list, list], ref: tuple[list, list], x_init: np.ndarray, what: str) -> float:
    """Every step's latents, and every scaled model input, agree.

    Tolerance for the latents after step i: max|a - b| <= RTOL * max|b| + ATOL_OPERAND * M_i, where
    M_i is the largest |latent| diffusers has had up to step i. The second term is a few float32
    ulps of the largest operand so far: when sigma drops by orders of magnitude in one step
    (zero-SNR sigma_max = 4096, cosine 20291, or 2-step ancestral), x_{i+1} is a small difference of
    large terms, and diffusers' own float32 result (its torch sqrt is not correctly rounded) carries
    that much rounding noise. The model input c_in(sigma_i) x_i gets the same allowance, times c_in.
    """
    xs = [x_init] + list(ref[1])  # xs[i]: diffusers' latents going into step i
    worst, M = 0.0, 0.0
    for i in range(len(ref[1])):
        x_max = float(np.max(np.abs(xs[i]), where=np.isfinite(xs[i]), initial=0.0))
        M = max(M, x_max)
        c_in = float(np.max(np.abs(ref[0][i]), where=np.isfinite(ref[0][i]), initial=0.0)) / x_max
        for kind, a, b, allowance in (("input", ours[0][i], ref[0][i], ATOL_OPERAND * M * c_in),
                                      ("latents", ours[1][i], ref[1][i], ATOL_OPERAND * M)):
            finite = np.isfinite(b)
            if not finite.all():  # diffusers produced inf/nan: we must produce it at the same places
                assert np.array_equal(np.isfinite(a), finite), f"{what}: non-finite pattern differs at step {i}"
                a, b = a[finite], b[finite]
                if b.size == 0:
                    continue
            d = float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + allowance / RTOL))
            worst = max(worst, d)
            assert d <= RTOL, f"{what}: {kind} at step {i} differ by {d:.2e} (scaled max rel)"
    assert len(ours[1]) == len(ref[1])
    print(f"{what}: max scaled rel diff {worst:.2e} over {len(ref[1])} steps")
    return worst


def oracle_config(config: dict) -> dict:
    """The config diffusers gets: without the algorithm keys our names fix, so that ORACLE's keyword
    arguments and the class defaults decide them (as make_scheduler does)."""
    fixed_by_name = {"solver_order", "solver_type", "use_karras_sigmas", "algorithm_type"}
    return {k: v for k, v in config.items() if k not in fixed_by_name}


def check_generation(name: str, config: dict, steps: int, monkeypatch, **step_kwargs) -> float:
    """txt2img: set_timesteps, z_T * init_noise_sigma, then every step on both sides; returns the
    largest scaled difference (see assert_trajectories_match)."""
    seed = 7
    patch_noise(monkeypatch, name, seed)
    ours, ref = make_scheduler(name, config), diffusers_scheduler(name, oracle_config(config))
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    if runs_off_the_end(ref):
        check_repeated_first_timestep(ours, ref)
        return 0.0
    ref_sigma = float(ref.init_noise_sigma)
    assert abs(ours.init_noise_sigma - ref_sigma) <= 1e-6 * ref_sigma
    z = initial_latents()
    x_ours = z * np.float32(ours.init_noise_sigma)
    x_ref = (torch.from_numpy(z) * ref.init_noise_sigma).numpy()
    np.testing.assert_allclose(x_ours, x_ref, rtol=1e-6)
    return assert_trajectories_match(run_ours(ours, x_ours, ours.timesteps, seed, **step_kwargs),
                                     run_diffusers(ref, x_ref, ref.timesteps, **step_kwargs), x_ref,
                                     f"{name} {steps} steps {step_kwargs or ''}")


def runs_off_the_end(ref) -> bool:
    """diffusers looks the first timestep up and takes its second copy when it repeats (Karras sigmas
    rounding to [999, 999, ...]); its last step then indexes past the sigmas and raises IndexError."""
    ts = ref.timesteps
    return hasattr(ref, "index_for_timestep") and len(ts) > 1 and bool(ts[0] == ts[1])


def check_repeated_first_timestep(ours, ref) -> None:
    """Same schedule as diffusers; where diffusers cannot finish, ours starts at the first copy and does."""
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6)
    with pytest.raises(IndexError):
        run_diffusers(ref, initial_latents() * float(ref.init_noise_sigma), ref.timesteps)
    _, xs = run_ours(ours, initial_latents() * np.float32(ours.init_noise_sigma), ours.timesteps)
    assert len(xs) == len(ours.timesteps) and np.all(np.isfinite(xs[-1]))


# -- the grid: every scheduler x 2 prediction types x 3 spacings x 7 step counts ----------------

@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_trajectory_matches_diffusers(name, prediction_type, spacing, steps, monkeypatch):
    config = dict(SD15, prediction_type=prediction_type, timestep_spacing=spacing)
    check_generation(name, config, steps, monkeypatch)


# -- more configs: SD 1.5's, each class's defaults, and every listed key away from its default ----

ALL = SCHEDULERS
SIGMA_FINAL = ("euler", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
CONFIGS = {  # id -> (config, the schedulers whose diffusers class reads what it varies)
    "sd15": (SD15, ALL),
    "class_defaults": ({}, ALL),  # each class's own defaults (linear betas, DDIM clip_sample=True, ...)
    "clip_sample": (dict(SD15, clip_sample=True, clip_sample_range=0.5, set_alpha_to_one=True), ALL),
    "cosine": ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "steps_offset": 1}, ALL),
    "linear_trailing": ({"beta_schedule": "linear", "timestep_spacing": "trailing"}, ALL),
    "zero_snr_v": (dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        prediction_type="v_prediction"), ALL),
    "trained_betas": ({"trained_betas": np.linspace(1e-4, 0.03, 500).tolist(), "num_train_timesteps": 500,
                       "timestep_spacing": "trailing"}, ALL),
    "sigma_min_final": (dict(SD15, final_sigmas_type="sigma_min", lower_order_final=False), SIGMA_FINAL),
    "euler_at_final": (dict(SD15, euler_at_final=True, lower_order_final=False, timestep_spacing="trailing"),
                       SIGMA_FINAL[1:]),
    "log_linear": (dict(SD15, interpolation_type="log_linear"), ("euler",)),
    # an SDXL-style Euler config and a DPM++ Karras order-3 config: the name decides the algorithm
    "sdxl_euler": (dict(SD15, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
                        use_karras_sigmas=False, sample_max_value=1.0, timestep_spacing="leading"), ALL),
    "dpm_karras_cfg": (dict(SD15, _class_name="DPMSolverMultistepScheduler", solver_order=3,
                            use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_type="heun"), ALL),
}


@pytest.mark.parametrize("steps", [3, 25])
@pytest.mark.parametrize("name,config_id", [(n, c) for c, (_, names) in CONFIGS.items() for n in names])
def test_configs_match_diffusers(name, config_id, steps, monkeypatch):
    check_generation(name, CONFIGS[config_id][0], steps, monkeypatch)


@pytest.mark.parametrize("source", sorted({cls for cls, _ in ORACLE.values()}, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("saved", [False, True], ids=["in_memory", "saved"])
def test_full_config_of_any_class_is_accepted(name, source, saved, monkeypatch, tmp_path):
    # every key of the source class, at SD 1.5's schedule with v-prediction: the in-memory .config
    # (which lists the keys its class defaulted) or the scheduler_config.json save_config writes
    sched = source.from_config(dict(SD15, prediction_type="v_prediction"))
    config = dict(sched.config)
    if saved:
        sched.save_config(tmp_path)
        config = json.loads((tmp_path / "scheduler_config.json").read_text())
        assert "_use_default_values" not in config and "timestep_spacing" in config
    check_generation(name, config, 10, monkeypatch)


def test_clip_sample_is_active():
    # the clip_sample case above only tests something if clipping changes DDIM's trajectory
    z = initial_latents()
    finals = []
    for clip in (True, False):
        s = make_scheduler("ddim", dict(CONFIGS["clip_sample"][0], clip_sample=clip))
        s.set_timesteps(10)
        finals.append(run_ours(s, z, s.timesteps)[1][-1])
    d = rel_diff(finals[0], finals[1])
    print(f"clip_sample changes the final latents by {d:.2e} (max rel)")
    assert d > 1e-2


@pytest.mark.parametrize("steps", [1, 5, 25])
@pytest.mark.parametrize("name", SUPPORTS_SAMPLE)
def test_sample_prediction_matches_diffusers(name, steps, monkeypatch):
    check_generation(name, dict(SD15, prediction_type="sample", timestep_spacing="trailing"), steps, monkeypatch)


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc"])
def test_zero_snr_epsilon_matches_diffusers(name, monkeypatch):
    # the sigma schedulers replace alpha_bar_T = 0 by 2^-24, so epsilon stays finite (DDIM would divide by 0)
    config = dict(SD15, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    check_generation(name, config, 10, monkeypatch)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_karras_squaredcos_truncates_timesteps(steps):
    # diffusers skips rounding for squaredcos_cap_v2 and truncates the fractional timesteps to int64
    config = {"beta_schedule": "squaredcos_cap_v2"}
    ours, ref = make_scheduler("dpmpp_2m_karras", config), diffusers_scheduler("dpmpp_2m_karras", config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    assert runs_off_the_end(ref)
    check_repeated_first_timestep(ours, ref)


# -- few-step samplers: LCM, TCD, and Turbo-style Euler ---------------------------------------

FEW_STEPS = (1, 2, 4, 8)


@pytest.mark.parametrize("steps", FEW_STEPS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_eta_matches_diffusers(eta, prediction_type, steps, monkeypatch):
    # eta = 0: deterministic, no draws; eta > 0: one draw per step but the last, the same noise on both sides
    check_generation("tcd", dict(SD15, prediction_type=prediction_type), steps, monkeypatch, eta=eta)


@pytest.mark.parametrize("steps", FEW_STEPS)
@pytest.mark.parametrize("name,original", [("lcm", 25), ("lcm", 50), ("tcd", 50), ("tcd", 8)])
def test_explicit_original_inference_steps_matches_diffusers(name, original, steps, monkeypatch):
    # LCM: the explicit value replaces the config's; TCD: any explicit value spaces the grid over all
    # 1000 training timesteps (diffusers' quirk), though it still bounds the step count
    seed = 7
    patch_noise(monkeypatch, name, seed)
    ours, ref = make_scheduler(name, SD15), diffusers_scheduler(name, SD15)
    ours.set_timesteps(steps, original_inference_steps=original)
    ref.set_timesteps(steps, original_inference_steps=original)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    z = initial_latents()
    assert_trajectories_match(run_ours(ours, z, ours.timesteps, seed), run_diffusers(ref, z, ref.timesteps), z,
                              f"{name} {steps} steps, original_inference_steps={original}")


def test_consistency_grids():
    # closed form: k = 1000 // 50 = 20, grid 19, 39, ..., 999; 4 steps take indices 0, 12, 25, 37 from the top
    lcm, tcd = make_scheduler("lcm", {}), make_scheduler("tcd", {})
    lcm.set_timesteps(4)
    tcd.set_timesteps(4)
    assert lcm.timesteps.tolist() == tcd.timesteps.tolist() == [999, 759, 499, 259]
    tcd.set_timesteps(4, original_inference_steps=50)
    assert tcd.timesteps.tolist() == [999, 749, 499, 249]
    lcm.set_timesteps(1)
    assert lcm.timesteps.tolist() == [999]
    assert lcm.img2img_timesteps(2, 0.5).tolist() == [499, 259]  # grid 19, ..., 499 (25 entries)


@pytest.mark.parametrize("steps", FEW_STEPS)
@pytest.mark.parametrize("config", [{"timestep_scaling": 0.005, "original_inference_steps": 20},
                                    dict(SD15, clip_sample=True, clip_sample_range=0.5, prediction_type="sample")],
                         ids=["timestep_scaling", "clip_sample"])
def test_lcm_config_keys_match_diffusers(config, steps, monkeypatch):
    check_generation("lcm", config, steps, monkeypatch)


def test_lcm_config_keys_change_the_result():
    # the two cases above only test something if the keys change LCM's trajectory (c_skip is ~0 unless
    # t * timestep_scaling is near sigma_data = 0.5: the default 10 only matters at t = 0)
    z = initial_latents()
    finals = []
    for config in ({}, {"timestep_scaling": 0.005}, {"clip_sample": True, "clip_sample_range": 0.5}):
        s = make_scheduler("lcm", config)
        s.set_timesteps(4)
        finals.append(run_ours(s, z, s.timesteps)[1][-1])
    assert min(rel_diff(finals[1], finals[0]), rel_diff(finals[2], finals[0])) > 1e-3


@pytest.mark.parametrize("name", ["euler", "euler_a"])
@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_trailing_starts_at_the_last_training_timestep(name, steps):
    # SD-Turbo's scheduler config: trailing spacing, so one step runs at t = 999 from z_T * sigma_max
    config = dict(SD15, timestep_spacing="trailing")
    ours, ref = make_scheduler(name, config), diffusers_scheduler(name, config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps[0] == 999 == ref.timesteps[0]
    sigma_max = float(ours.train_sigmas[-1])
    assert ours.init_noise_sigma == sigma_max == float(ours.sigmas[0])
    assert abs(float(ref.init_noise_sigma) - sigma_max) <= 1e-6 * sigma_max


class CountingGenerator:
    """A numpy generator that counts the standard-normal arrays drawn from it."""

    def __init__(self, seed: int):
        self.rng, self.shapes = np.random.default_rng(seed), []

    def standard_normal(self, shape, dtype=np.float64):
        self.shapes.append(tuple(shape))
        return self.rng.standard_normal(shape, dtype=dtype)


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("name,eta", [("euler_a", None), ("lcm", None), ("tcd", 0.3), ("tcd", 0.0)])
def test_noise_draws_match_diffusers(name, eta, steps, monkeypatch):
    # the stream advances exactly as diffusers': euler_a draws on every step, the last included (its
    # sigma_up is 0 there); lcm and tcd (eta > 0) on every step but the last; tcd at eta 0 never
    kw = {} if eta is None else {"eta": eta}
    config = dict(SD15, timestep_spacing="trailing")
    drawn = patch_noise(monkeypatch, name, 7)
    ours, ref = make_scheduler(name, config), diffusers_scheduler(name, config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    gen = CountingGenerator(7)
    z = initial_latents()
    for t in ours.timesteps:
        z = ours.step(fake_denoiser(ours.scale_model_input(z, t), t), t, z, generator=gen, **kw)
    run_diffusers(ref, initial_latents() * float(ref.init_noise_sigma), ref.timesteps, **kw)
    expected = steps if name == "euler_a" else 0 if eta == 0.0 else steps - 1
    assert gen.shapes == drawn == [(2, 4, 8, 8)] * expected


# -- the schedule arrays ------------------------------------------------------------------------

def test_linspace_f32_is_torch_linspace():
    rng = np.random.default_rng(0)
    mismatches = 0
    for _ in range(300):
        start, end = rng.uniform(-3, 3, 2) * 10 ** rng.uniform(-5, 2)
        num = int(rng.integers(1, 2000))
        mismatches += int(np.sum(linspace_f32(start, end, num) != torch.linspace(start, end, num).numpy()))
    print(f"linspace_f32 vs torch.linspace: {mismatches} differing values")
    assert mismatches == 0


@pytest.mark.parametrize("config_id", ["sd15", "class_defaults", "cosine", "trained_betas", "zero_snr_v"])
def test_alphas_cumprod_match_diffusers(config_id):
    config = CONFIGS[config_id][0]
    ours, ref = make_scheduler("ddim", config), DDIMScheduler.from_config(config)
    a, b = ours.alphas_cumprod, ref.alphas_cumprod.numpy()
    d = float(np.max(np.abs(a - b) / np.maximum(b, 1e-30)))
    print(f"{config_id}: alphas_cumprod max rel diff {d:.2e}")
    if config_id == "zero_snr_v":
        # torch's float32 sqrt is off by 1 ulp at times (numpy's is correctly rounded), and the rescale
        # subtracts sqrt(alpha_bar_T), which amplifies that near t = T where alpha_bar -> 0
        assert d <= 1e-5
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_cached_alphas_cumprod_equal_a_fresh_computation(schedule, zero_snr):
    from ldm_runtime.noise_schedule import (alphas_cumprod_from_betas, make_betas, rescale_zero_terminal_snr,
                                            training_alphas_cumprod)

    betas = make_betas(1000, 0.00085, 0.012, schedule)
    fresh = alphas_cumprod_from_betas(rescale_zero_terminal_snr(betas) if zero_snr else betas)
    first = training_alphas_cumprod(1000, 0.00085, 0.012, schedule, None, zero_snr)
    first[-1] = 0.5  # a scheduler may change its copy (the zero-SNR sigma schedulers do)
    again = training_alphas_cumprod(1000, 0.00085, 0.012, schedule, None, zero_snr)
    np.testing.assert_array_equal(again, fresh)
    assert again.dtype == np.float32 and again.flags.writeable and again is not first
    trained = tuple(float(b) for b in betas)
    np.testing.assert_array_equal(training_alphas_cumprod(1000, 0.0, 0.0, "linear", trained, False),
                                  alphas_cumprod_from_betas(betas))


# -- add_noise, img2img ----------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULERS)
def test_add_noise_matches_diffusers(name):
    ours, ref = make_scheduler(name, SD15), diffusers_scheduler(name, SD15)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    x0, noise = initial_latents(seed=1), initial_latents(seed=2)
    worst = 0.0
    for k in (0, 3, 10, len(ref.timesteps) - 1):
        t_ref = ref.timesteps[k:k + 1].repeat(2)
        a = ours.add_noise(x0, noise, ours.timesteps[k:k + 1].repeat(2))
        b = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t_ref).numpy()
        worst = max(worst, rel_diff(a, b))
    print(f"{name}: add_noise max rel diff {worst:.2e}")
    assert worst <= 1e-6


@functools.cache
def diffusers_get_timesteps():
    """StableDiffusionImg2ImgPipeline.get_timesteps, diffusers' own code, without importing the pipeline
    module (it pulls in transformers, a slow import for four lines we need)."""
    path = Path(diffusers.__file__).parent / "pipelines" / "stable_diffusion" / "pipeline_stable_diffusion_img2img.py"
    tree = ast.parse(path.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_timesteps")
    namespace: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["get_timesteps"]


def reference_img2img(name: str, ref, steps: int, strength: float):
    """diffusers' img2img timesteps and step count: LatentConsistencyModelImg2ImgPipeline's for lcm
    (strength cuts the distillation grid: set_timesteps(steps, strength=...)), else
    StableDiffusionImg2ImgPipeline's (set_timesteps, then get_timesteps' tail and begin index)."""
    if name == "lcm":
        ref.set_timesteps(steps, strength=strength)
        return ref.timesteps, steps
    ref.set_timesteps(steps)
    return diffusers_get_timesteps()(types.SimpleNamespace(scheduler=ref), steps, strength, "cpu")


@pytest.mark.parametrize("steps,strength", [(10, 0.75), (25, 0.3), (25, 1.0), (4, 0.5), (2, 0.1), (8, 0.9)])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_img2img_matches_diffusers(name, steps, strength, monkeypatch):
    """The img2img timesteps, the begin index, add_noise at the first kept step, then every step."""
    seed = 7
    patch_noise(monkeypatch, name, seed)
    ours, ref = make_scheduler(name, SD15), diffusers_scheduler(name, SD15)
    if name == "lcm" and steps > int(50 * strength):  # the cut grid is shorter than the steps: both refuse
        with pytest.raises(ValueError, match=f"strength {strength} keeps"):
            ours.img2img_timesteps(steps, strength)
        with pytest.raises(ValueError):
            reference_img2img(name, ref, steps, strength)
        return
    if name != "lcm" and int(steps * strength) == 0:  # no user step would run (diffusers: none, or PNDM's
        with pytest.raises(ValueError, match="no denoising step would run"):  # repeated timestep alone)
            ours.img2img_timesteps(steps, strength)
        return
    ts = ours.img2img_timesteps(steps, strength)
    np.testing.assert_array_equal(ours.run_timesteps, ts)
    ref_ts, _ = reference_img2img(name, ref, steps, strength)
    np.testing.assert_array_equal(ts, ref_ts.numpy().astype(np.float32))
    x0, noise = initial_latents(seed=1), initial_latents(seed=2)
    x_ours = ours.add_noise(x0, noise, ts[:1].repeat(2))
    x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref_ts[:1].repeat(2)).numpy()
    assert rel_diff(x_ours, x_ref) <= 1e-6
    assert_trajectories_match(run_ours(ours, x_ours, ts, seed), run_diffusers(ref, x_ref, ref_ts), x_ref,
                              f"img2img {name} {steps} steps strength {strength}")


# -- the name table and the steps a callback sees ----------------------------------------------

@pytest.mark.parametrize("name", SCHEDULERS)
def test_diffusers_config_round_trips_to_the_name(name):
    # the diffusers class built from the config our table writes saves a config that maps back to the name
    config = diffusers_config_for(name, SD15)
    saved = dict(getattr(diffusers, config["_class_name"]).from_config(config).config)
    assert scheduler_name_for(saved) == name


def test_unknown_diffusers_class_falls_back_to_ddim(caplog):
    assert scheduler_name_for(dict(SD15, _class_name="LMSDiscreteScheduler")) == "ddim"
    assert "LMSDiscreteScheduler" in caplog.text
    assert scheduler_name_for({}) == "ddim"  # no _class_name: DDIM's config


def progress_bar_steps(num_timesteps: int, num_inference_steps: int, order: int) -> np.ndarray:
    """Where StableDiffusionPipeline's denoising loop updates its progress bar and calls its callback."""
    num_warmup = num_timesteps - num_inference_steps * order
    return np.array([i == num_timesteps - 1 or (i + 1 > num_warmup and (i + 1) % order == 0)
                     for i in range(num_timesteps)], dtype=bool)


@pytest.mark.parametrize("steps", [1, 5, 61])  # trailing spacing lays out 62 timesteps for 61 steps
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_user_steps_are_diffusers_progress_steps(name, spacing, steps):
    config = dict(SD15, timestep_spacing=spacing)
    ours, ref = make_scheduler(name, config), diffusers_scheduler(name, oracle_config(config))
    if name in CONSISTENCY and steps > 50:  # more than original_inference_steps: both refuse
        with pytest.raises(ValueError, match="num_inference_steps=61 is more than original_inference_steps=50"):
            ours.set_timesteps(steps)
        with pytest.raises(ValueError):
            ref.set_timesteps(steps)
        return
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(ours.user_steps, progress_bar_steps(len(ref.timesteps), steps, ref.order))
    # img2img: the timesteps diffusers' img2img pipeline runs, with the step count it shows
    if name != "lcm" and int(steps * 0.6) == 0:
        with pytest.raises(ValueError, match="no denoising step would run"):
            ours.img2img_timesteps(steps, 0.6)
        return
    ours.img2img_timesteps(steps, 0.6)
    ref_ts, ref_steps = reference_img2img(name, ref, steps, 0.6)
    np.testing.assert_array_equal(ours.user_steps, progress_bar_steps(len(ref_ts), ref_steps, ref.order))


# -- the API's edges and errors ------------------------------------------------------------------

def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        make_scheduler("lms", SD15)
    assert "'lms'" in str(e.value) and all(n in str(e.value) for n in SCHEDULERS)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "foo"), ("prediction_type", "bar"), ("timestep_spacing", "middle"),
    ("final_sigmas_type", "max"), ("interpolation_type", "cubic"), ("clip_sample", "yes"),
    ("num_train_timesteps", 0), ("steps_offset", -1), ("beta_start", "small"),
    ("original_inference_steps", 0), ("timestep_scaling", "big"),
])
def test_bad_config_value_names_key_and_value(name, key, value):
    with pytest.raises(ValueError) as e:
        make_scheduler(name, dict(SD15, **{key: value}))
    assert key in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("name,key,value", [
    ("pndm", "prediction_type", "sample"),  # diffusers' PNDM has no x_0 parameterization
    ("euler_a", "prediction_type", "sample"),
    ("ddim", "thresholding", True),
    ("dpmpp_2m", "variance_type", "learned_range"),
    ("unipc", "use_flow_sigmas", True),
    ("euler", "timestep_type", "continuous"),
    ("lcm", "thresholding", True),
])
def test_unsupported_value_for_this_scheduler_raises(name, key, value):
    with pytest.raises(ValueError) as e:
        make_scheduler(name, dict(SD15, **{key: value}))
    assert key in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("name", ["euler", "pndm"])
def test_keys_of_other_classes_are_ignored(name):
    # thresholding is DDIM's, clip_sample is not PNDM's or Euler's: both ignore them, as from_config does
    config = dict(SD15, thresholding=True, clip_sample=True, foo_bar=3)
    ours, ref = make_scheduler(name, config), diffusers_scheduler(name, config)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    z = initial_latents()
    assert_trajectories_match(run_ours(ours, z, ours.timesteps), run_diffusers(ref, z, ref.timesteps), z,
                              f"{name} with foreign keys")


@pytest.mark.parametrize("name", CONSISTENCY)
def test_more_steps_than_original_inference_steps_are_refused(name):
    s = make_scheduler(name, dict(SD15, original_inference_steps=8))
    with pytest.raises(ValueError, match=r"num_inference_steps=9 is more than original_inference_steps=8"):
        s.set_timesteps(9)
    with pytest.raises(ValueError, match=r"original_inference_steps=1001 is more than num_train_timesteps=1000"):
        s.set_timesteps(4, original_inference_steps=1001)
    s.set_timesteps(8)
    assert len(s.timesteps) == 8


def test_eta_is_taken_by_tcd_only():
    tcd = make_scheduler("tcd", SD15)
    assert tcd.step_kwargs(0.5) == {"eta": 0.5} and tcd.step_kwargs(0) == {"eta": 0.0}
    for bad in (-0.1, 1.5, "0.3", None, True, float("nan")):
        with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\], got"):
            tcd.step_kwargs(bad)
    tcd.set_timesteps(2)
    x = initial_latents()
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\], got 1.5"):
        tcd.step(x, tcd.timesteps[0], x, eta=1.5)
    for name in SCHEDULERS:
        if name != "tcd":
            s = make_scheduler(name, SD15)
            assert s.step_kwargs(0.0) == {}
            message = "deterministic DDIM" if name == "ddim" else f"scheduler '{name}' takes no eta"
            with pytest.raises(ValueError, match=message):
                s.step_kwargs(0.2)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_before_set_timesteps_and_bad_steps(name):
    s = make_scheduler(name, SD15)
    x = initial_latents()
    with pytest.raises(RuntimeError):
        s.step(x, 999.0, x)
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError):
            s.set_timesteps(bad)


def test_runtime_does_not_import_torch():
    code = "import sys, ldm_runtime.schedulers; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_leading_spacing_past_the_schedule_is_refused():
    # 1000 steps of 1000 with steps_offset 1 would start at timestep 1000 (diffusers: an IndexError)
    from ldm_runtime.noise_schedule import spaced_timesteps

    assert spaced_timesteps(999, 1000, "leading", 1)[0] == 999  # the last that fits
    with pytest.raises(ValueError, match=r"reach timestep 1000, past the schedule's last \(999\)"):
        spaced_timesteps(1000, 1000, "leading", 1)
