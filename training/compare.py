"""Side-by-side grid of several checkpoints on the same captions and seeds (one row per model).

    python -m training.compare checkpoints/default:20 checkpoints/default-lcm:4 --guidance 3 \
        --split heldout --n 8 --out docs/default-model/lcm_vs_teacher_heldout.png

Each ``CHECKPOINT:STEPS`` samples the first ``n`` captions of ``split`` with its own scheduler
(``training.sample``, seed ``--seed``), so row i and row j differ only by the model and its step count.
The captions go beside the grid in a ``.txt`` file, one per column, then one line per row naming the model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from training import common
from training.checkpoint import load_models
from training.data import ShapesDataset
from training.sample import sample


def parse_model(text: str) -> tuple[Path, int]:
    path, sep, steps = text.rpartition(":")
    if not sep or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"expected CHECKPOINT:STEPS with STEPS a positive integer, got {text!r}")
    return Path(path), int(steps)


@torch.no_grad()
def compare_grid(models: list[tuple[Path, int]], split: str, guidance_scale: float, n: int, seed: int,
                 out: Path) -> Path:
    """One row per (checkpoint, steps) on the first ``n`` captions of ``split``; writes ``out`` and ``out.txt``."""
    rows, captions = [], None
    for ckpt, steps in models:
        ld = load_models(ckpt)
        ds = ShapesDataset(split, size=ld.default_size[0], length=n, seed=seed)
        captions = [ds.attrs(i)[1] for i in range(n)]
        rows.append(sample(ld, captions, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed))
    common.save_grid(np.concatenate(rows), out, ncols=n)
    lines = [f"column {i + 1}: {c}" for i, c in enumerate(captions or [])]
    lines += [f"row {r + 1}: {ckpt} at {steps} steps, guidance {guidance_scale:g}, seed {seed}"
              for r, (ckpt, steps) in enumerate(models)]
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", type=parse_model, help="CHECKPOINT:STEPS, one row each")
    p.add_argument("--split", choices=("val", "heldout"), default="val")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--n", type=int, default=8, help="captions (columns)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    print(compare_grid(a.models, a.split, a.guidance, a.n, a.seed, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
