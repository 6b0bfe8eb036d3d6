"""What an autoencoder keeps of the shapes data: the evaluator's reconstruction ceiling, per shape and size.

For each autoencoder folder (what `ldm train vae` writes under OUT/vae, or a checkpoint's vae/):
validation PSNR / SSIM of its posterior-mean reconstructions (as `ldm train vae` measures them), the
scorer's accuracies on those reconstructions (`training.evaluate.vae_reconstruction_scores`: no U-Net can
score above them), and the shape accuracy split by shape kind and by size, which says where shapes are
lost. Also the parameter count, the latent shape and the bytes of its weights.

    python -m training.vae_study checkpoints/default/vae runs/vae-study/*/vae --n 256 \
        --out docs/default-model/vae_study.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training.checkpoint import load_vae
from training.data.shapes import KINDS, SIZES
from training.evaluate import vae_reconstruction_scores
from training.train_vae import ImageSource, evaluate

log = logging.getLogger("vae_study")

SCORES = ("colour", "shape", "position", "size", "count")


@torch.no_grad()
def study(folder: str | Path, n: int = 256, image_size: int = 64, seed: int = 0) -> dict:
    """The figures above for one autoencoder folder (the same n validation images for every folder)."""
    folder = Path(folder)
    vae = load_vae(folder).eval()
    r = vae_reconstruction_scores(vae, image_size, n, seed, per_image=True)
    attrs = r["attrs"]
    latent_shape = tuple(vae.encode(torch.zeros(1, 3, image_size, image_size))[0].shape[1:])
    by_kind: dict[str, list[bool]] = {k: [] for k in KINDS}
    by_size: dict[str, list[bool]] = {s: [] for s in SIZES}
    for a, res in zip(attrs, r["per_image"]):
        for o, ok in zip(a.objects, res["shape"]):
            by_kind[o.kind].append(ok)
            by_size[o.size].append(ok)
    quality = evaluate(vae, ImageSource("shapes", image_size, n, seed, "val"), n)
    metrics_file = folder / "metrics.json"
    return {
        "folder": str(folder),
        "params": sum(p.numel() for p in vae.parameters()),
        "weights_bytes": os.path.getsize(folder / "model.safetensors"),
        "latent_shape": list(latent_shape),
        "block_out_channels": list(vae.config.block_out_channels),
        "psnr": round(quality["psnr"], 2), "ssim": round(quality["ssim"], 4),
        "recon": {k: round(r[k], 3) for k in SCORES},
        "shape_by_kind": {k: round(float(np.mean(v)), 3) for k, v in by_kind.items() if v},
        "shape_by_size": {k: round(float(np.mean(v)), 3) for k, v in by_size.items() if v},
        "n_images": n, "n_objects": r["n_objects"],
        "training": json.loads(metrics_file.read_text()) if metrics_file.is_file() else None,
    }


def table(rows: list[dict]) -> str:
    """A markdown table of `study` results, one row per autoencoder."""
    kinds = list(rows[0]["shape_by_kind"]) if rows else []
    head = ["autoencoder", "params", "latent", "PSNR dB", "SSIM", *SCORES[:2], *(f"shape {k}" for k in kinds),
            "shape small", "shape large"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["folder"], f"{r['params'] / 1e6:.2f}M", "x".join(map(str, r["latent_shape"])), f"{r['psnr']:.2f}",
                 f"{r['ssim']:.4f}", *(f"{r['recon'][k]:.3f}" for k in SCORES[:2]),
                 *(f"{r['shape_by_kind'].get(k, float('nan')):.3f}" for k in kinds),
                 *(f"{r['shape_by_size'].get(s, float('nan')):.3f}" for s in ("small", "large"))]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="autoencoder folders (config.json + model.safetensors)")
    p.add_argument("--n", type=int, default=256, help="validation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    missing = [str(f) for f in args.folders if not (f / "model.safetensors").is_file()]
    if missing:
        p.error(f"expected autoencoder folders holding model.safetensors; not found in: {', '.join(missing)}")
    rows = []
    for f in args.folders:
        t0 = time.perf_counter()
        rows.append(study(f, args.n, seed=args.seed))
        log.info("%s: %s (%.0f s)", f, rows[-1]["recon"], time.perf_counter() - t0)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
