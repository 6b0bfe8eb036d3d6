"""The shipped default model and its 4-step student: small, loadable, sharing what distillation leaves alone;
and the side-by-side grid script that shows them (``training/compare.py``)."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = ROOT / "checkpoints" / "default", ROOT / "checkpoints" / "default-lcm"
LIMIT_BYTES = 20_000_000  # the brief: the shipped default model, all of it, well under 25 MB


def _files(folder: Path) -> dict[Path, int]:
    """Every file under ``folder`` by its resolved path (a shared file counts once), with its size."""
    return {p.resolve(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.skipif(not STUDENT.exists(), reason="checkpoints/default-lcm is not in this checkout")
def test_teacher_and_student_fit_the_size_limit_together():
    files = {**_files(TEACHER), **_files(STUDENT)}
    assert sum(files.values()) < LIMIT_BYTES, f"{sum(files.values())} bytes shipped"


@pytest.mark.skipif(not STUDENT.exists(), reason="checkpoints/default-lcm is not in this checkout")
def test_student_is_the_teacher_with_a_distilled_unet():
    from training.checkpoint import load_models

    for part in ("text_encoder", "vae", "tokenizer"):  # distillation trains the U-Net only
        for f in sorted((TEACHER / part).iterdir()):
            assert _digest(STUDENT / part / f.name) == _digest(f), f"{part}/{f.name} differs from the teacher's"
    student = load_models(STUDENT)
    teacher = load_models(TEACHER)
    assert student.unet_config.time_cond_proj_dim == 256
    assert getattr(teacher.unet_config, "time_cond_proj_dim", None) is None
    assert student.scheduler_config["_class_name"] == "LCMScheduler"
    assert student.default_size == teacher.default_size


def test_parse_model_refuses_a_missing_step_count():
    from training.compare import parse_model

    assert parse_model("runs/x:4") == (Path("runs/x"), 4)
    for bad in ("runs/x", "runs/x:0", "runs/x:four"):
        with pytest.raises(argparse.ArgumentTypeError, match="CHECKPOINT:STEPS"):
            parse_model(bad)


def test_compare_grid_rows_are_each_models_samples(tiny_checkpoint_dir, tmp_path, one_torch_thread):
    """Row r of the grid is exactly ``training.sample`` of model r on the split's first captions."""
    from training.checkpoint import load_models
    from training.compare import compare_grid
    from training.data import ShapesDataset
    from training.sample import sample

    out = compare_grid([(tiny_checkpoint_dir, 1), (tiny_checkpoint_dir, 2)], "heldout", 3.0, n=2, seed=5,
                       out=tmp_path / "grid.png")
    grid = np.asarray(Image.open(out), dtype=np.float32) / 255
    ld = load_models(tiny_checkpoint_dir)
    size = ld.default_size[0]
    captions = [ShapesDataset("heldout", size=size, length=2, seed=5).attrs(i)[1] for i in range(2)]
    assert grid.shape == (2 * (size + 2), 2 * (size + 2), 3)
    for row, steps in enumerate((1, 2)):
        want = sample(ld, captions, num_inference_steps=steps, guidance_scale=3.0, seed=5)
        for col in range(2):
            y, x = row * (size + 2) + 1, col * (size + 2) + 1
            got = grid[y:y + size, x:x + size]
            assert np.abs(got - want[col].clip(0, 1)).max() <= 0.5 / 255 + 1e-6  # one uint8 rounding
    text = out.with_suffix(".txt").read_text()
    assert captions[0] in text and "at 2 steps, guidance 3, seed 5" in text
