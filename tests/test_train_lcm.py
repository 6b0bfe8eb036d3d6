"""`ldm train lcm` (training/train_lcm.py): latent consistency distillation of the tiny checkpoint.

References: the closed-form DDIM step and the runtime's own `ddim` scheduler (the solver), the
runtime's `lcm` scheduler (the boundary scalings), the teacher (the student at step 0), an
uninterrupted run (resume), and training/sample.py on the torch student (the exported bundle).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm_runtime.guidance import guidance_scale_embedding
from ldm_runtime.schedulers import make_scheduler
from training.checkpoint import load_models
from training.cli import main as cli_main
from training.common import parse_config
from training.train_lcm import (Batch, DDIMSolver, Distiller, LCMTrainConfig, boundary_scalings, build_student,
                                guidance_embedding, student_scheduler_config, train, update_target,
                                x0_and_eps)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COND_DIM = 32
PARITY_TOL = 2e-3  # pipelines: max abs on the "np" output (CONTRACT.md)


def tiny_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return [f"--teacher={teacher}", f"--out_dir={out}", "--train_length=16", "--batch_size=4", "--log_every=1",
            "--ckpt_every=2", f"--time_cond_proj_dim={COND_DIM}", "--warmup_steps=1",
            "--progress=false", *extra]


@pytest.fixture(scope="module")
def teacher(tiny_checkpoint_dir):
    return load_models(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def distiller(teacher, tiny_checkpoint_dir):
    cfg, _ = parse_config(LCMTrainConfig, [f"--teacher={tiny_checkpoint_dir}", f"--time_cond_proj_dim={COND_DIM}"])
    student = build_student(teacher.unet, COND_DIM)
    empty_ids = torch.zeros(77, dtype=torch.int64)
    return cfg, student, Distiller(cfg, teacher, student, empty_ids, torch.device("cpu"))


def test_ddim_solver_step_is_the_closed_form_and_the_runtime_ddim_step(teacher, tiny_checkpoint_dir):
    cfg, _ = parse_config(LCMTrainConfig, [f"--teacher={tiny_checkpoint_dir}"])
    sc = student_scheduler_config(teacher.scheduler_config, cfg)
    ab = torch.from_numpy(make_scheduler("lcm", sc).alphas_cumprod)
    solver = DDIMSolver(ab, 50)
    assert solver.k == 20 and solver.timesteps[0] == 19 and solver.timesteps[-1] == 999
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn((3, 4, 8, 8), generator=g), torch.randn((3, 4, 8, 8), generator=g)
    ddim = make_scheduler("ddim", {**sc, "_class_name": "DDIMScheduler", "timestep_spacing": "trailing",
                                   "set_alpha_to_one": False})
    ddim.set_timesteps(50)  # trailing: the same grid 999, 979, ..., 19, then alpha_bar_0
    assert ddim.timesteps.astype(int).tolist() == solver.timesteps.flip(0).tolist()
    for n in (0, 1, 24, 49):
        t = int(solver.timesteps[n])
        x0, eps = x0_and_eps("epsilon", out, x, ab[t].expand(3))
        got = solver.step(x0, eps, torch.full((3,), n))
        ab_prev = float(ab[t - 20]) if t >= 20 else float(ab[0])
        closed = ab_prev ** 0.5 * (x - (1 - ab[t]) ** 0.5 * out) / ab[t] ** 0.5 + (1 - ab_prev) ** 0.5 * out
        ref = torch.from_numpy(np.asarray(ddim.step(out.numpy(), t, x.numpy())))
        print(f"t={t}: solver vs closed form {float((got - closed).abs().max()):.1e}, "
              f"vs runtime ddim {float((got - ref).abs().max()):.1e}")
        torch.testing.assert_close(got, closed, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_v_prediction_estimates_invert_the_forward_process():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn((2, 4, 4, 4), generator=g), torch.randn((2, 4, 4, 4), generator=g)
    ab = torch.tensor([0.3, 0.0])  # 0: zero terminal SNR, where only v-prediction is defined
    a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
    got_x0, got_eps = x0_and_eps("v_prediction", a * eps - s * x0, a * x0 + s * eps, ab)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-6)


def test_boundary_scalings_are_the_runtime_lcm_schedulers():
    lcm = make_scheduler("lcm", {"timestep_scaling": 10.0})
    t = torch.tensor([0, 19, 259, 499, 759, 979, 999])
    c_skip, c_out = boundary_scalings(t, 10.0)
    ref = np.array([lcm.boundary_scalings(int(v)) for v in t], dtype=np.float32)  # (n, 2)
    np.testing.assert_allclose(c_skip.flatten().numpy(), ref[:, 0], rtol=1e-6, atol=0)
    np.testing.assert_allclose(c_out.flatten().numpy(), ref[:, 1], rtol=1e-6, atol=0)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0  # f(x, 0) = x


def test_student_starts_as_the_teacher_and_reads_the_runtime_guidance(teacher):
    from training.sample import guided_eps

    student = build_student(teacher.unet, COND_DIM).eval()
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 77, 32), generator=g)
    t = torch.tensor([999.0, 259.0])
    w_emb = guidance_embedding(torch.tensor([2.0, 6.5]), COND_DIM)
    with torch.no_grad():
        d = float((student(x, t, ctx, timestep_cond=w_emb) - teacher.unet(x, t, ctx)).abs().max())
    print(f"student at step 0 vs teacher: max abs {d:.1e}")
    assert d <= 1e-6
    # the runtime's guidance_scale G reaches the student as w = G - 1
    np.testing.assert_array_equal(w_emb.numpy(), guidance_scale_embedding(np.array([3.0, 7.5]), COND_DIM))
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(generator=g)
        ours = student(x[:1], t[:1], ctx[:1], timestep_cond=w_emb[:1])
        ref = guided_eps(student, x[:1], 999.0, ctx[:1], 3.0, 0.0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_consistency_loss_decreases_on_a_fixed_batch(distiller):
    cfg, _, base = distiller
    student = build_student(base.unet, COND_DIM)
    dist = copy.copy(base)  # a fresh target, the frozen teacher shared
    dist.target = build_student(base.unet, COND_DIM).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    batch = Batch(z0=torch.randn((4, 4, 8, 8), generator=g), noise=torch.randn((4, 4, 8, 8), generator=g),
                  index=torch.tensor([5, 20, 35, 49]), w=torch.tensor([1.0, 3.0, 5.0, 7.0]),
                  input_ids=torch.randint(0, 1000, (4, 77), generator=g))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = dist.loss(student, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_target(dist.target, student, cfg.ema_decay)
        losses.append(loss.item())
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    print(f"fixed batch, 20 steps: loss {first:.4f} (steps 1-3) -> {last:.4f} (steps 18-20), x{first / last:.1f}")
    assert last < first / 2


def test_config_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["train", "lcm", "--w_min=5", "--w_max=1"]) == 2
    assert "expected 0 <= w_min <= w_max, got 5.0 and 1.0" in capsys.readouterr().err
    assert cli_main(["train", "lcm", "--loss=l1"]) == 2
    assert "--loss: expected one of huber, l2, got 'l1'" in capsys.readouterr().err
    assert cli_main(["train", "lcm", f"--teacher={tmp_path}", f"--out_dir={tmp_path / 'o'}"]) == 2
    assert f"--teacher={tmp_path}" in capsys.readouterr().err


def _state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "train_state.safetensors"))


def test_resume_gives_the_uninterrupted_state(tmp_path, tiny_checkpoint_dir):
    ref = tmp_path / "ref"
    cfg, _ = parse_config(LCMTrainConfig, tiny_args(tiny_checkpoint_dir, ref, "--max_steps=4", "--eval_prompts=0"))
    train(cfg)
    out = tmp_path / "resumed"
    cfg, _ = parse_config(LCMTrainConfig, tiny_args(tiny_checkpoint_dir, out, "--max_steps=2", "--eval_prompts=0"))
    train(cfg)
    cfg, resume = parse_config(LCMTrainConfig, [f"--out_dir={out}", "--max_steps=4", "--resume"])
    assert train(cfg, resume=resume)["step"] == 4
    a, b = _state(ref), _state(out)
    assert a.keys() == b.keys() and any(k.startswith("model/target/") for k in a)
    differ = [k for k in a if not k.startswith("rng/") and not torch.equal(a[k], b[k])]
    print(f"resumed at step 2 to 4: {len(a)} tensors, {len(differ)} differ")
    assert not differ, differ[:5]
    losses = [[r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for p in (ref, out)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


@pytest.mark.slow
def test_student_exports_and_the_runtime_matches_the_reference_sampler(tmp_path, tiny_checkpoint_dir):
    from export.bundle import export_bundle
    from ldm_runtime import Pipeline
    from training.sample import sample

    run = tmp_path / "run"
    cfg, _ = parse_config(LCMTrainConfig, tiny_args(tiny_checkpoint_dir, run, "--max_steps=3", "--lr=1e-3",
                                                                 "--eval_prompts=2"))
    result = train(cfg)
    ckpt = Path(result["checkpoint"])
    assert {"eval_colour", "eval_shape"} <= set(result) and (run / "samples" / "step_000003.png").is_file()
    # the teacher's text encoder and VAE, unchanged; the target network's weights; an lcm scheduler
    for name in ("text_encoder", "vae"):
        a, b = load_file(str(ckpt / name / "model.safetensors")), load_file(
            str(tiny_checkpoint_dir / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    unet = load_file(str(ckpt / "unet" / "model.safetensors"))
    state = _state(run)
    assert all(torch.equal(v, state[f"model/target/{k}"]) for k, v in unet.items())
    assert float(unet["time_embedding.cond_proj.weight"].abs().max()) > 0  # it trained
    student = load_models(ckpt)
    assert student.scheduler_name == "lcm" and student.unet_config.time_cond_proj_dim == COND_DIM
    assert student.scheduler_config["original_inference_steps"] == 50

    pipe = Pipeline.load(export_bundle(ckpt, tmp_path / "bundle", precision="fp32"))
    assert pipe.scheduler_name == "lcm"  # the default the bundle's manifest names
    kw = dict(prompt=["a red circle", "a green square"], num_inference_steps=4, guidance_scale=3.0, seed=7)
    ref = sample(student, **kw)
    ours = pipe(**kw, output_type="np").images
    d = float(np.abs(ours - ref).max())
    print(f"distilled student, reference sampler vs runtime, lcm 4 steps: max abs diff {d:.2e}")
    assert ours.shape == ref.shape and d <= PARITY_TOL
