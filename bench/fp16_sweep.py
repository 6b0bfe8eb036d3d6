"""fp16 error and NaN/Inf sweep: torch fp32 vs the fp16 ONNX export, over seeds, sizes and latent scales.

Exports each component to fp16 ONNX (export.onnx_export.export_onnx: the same path as
``ldm export --precision fp16``, without the gate) and runs it on onnxruntime's CPU provider
twice: as shipped (``ort``: the CPU kernels compute most fp16 ops in fp32) and through the twin
that rounds every fp16 tensor (``emulated``: what a strongly typed fp16 engine stores). Each
seed draws fresh inputs; U-Net and decoder latents are also scaled by each ``--scales`` value
(3 stresses overflow). Prints one JSON summary on stdout (progress on stderr).

    python bench/fp16_sweep.py --config sd15 --seeds 50            # SD 1.5 shapes, random weights
    python bench/fp16_sweep.py --src path/to/checkpoint --seeds 50  # a trained model

Configs: ``sd15``: SD 1.5 shapes (U-Net 320/640/1280/1280, 2 layers per block, 860M
parameters; VAE 128/256/512/512; CLIP-L text encoder). ``sd15-lite``: the same widths with one
resnet per level (about 60% of the U-Net). ``tiny``: the test configs, to try the script.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.fp16 import policy_for  # noqa: E402
from export.onnx_export import export_onnx, ort_runner, wrap  # noqa: E402
from export.parity import parity_metrics  # noqa: E402
from export.specs import component_spec, dims_from_models, sample_inputs  # noqa: E402

log = logging.getLogger("fp16_sweep")


def build_models(config: str, seed: int = 0):
    from training.checkpoint import LatentDiffusion
    from training.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
    from training.models.unet import UNet, UNetConfig
    from training.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(seed)
    if config == "sd15":
        u, v, t = UNetConfig(), VAEConfig(), TextEncoderConfig()
    elif config == "sd15-lite":
        u, v, t = UNetConfig(layers_per_block=1), VAEConfig(layers_per_block=1), TextEncoderConfig()
    elif config == "tiny":
        u = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention=(True, False), num_heads=2,
                       cross_attention_dim=32, norm_num_groups=8)
        v = VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
        t = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    else:
        raise ValueError(f"unknown config {config!r}; expected sd15, sd15-lite or tiny")
    unet, vae, text = UNet(u), AutoencoderKL(v), CLIPTextEncoder(t)
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    bpe = Path(__file__).resolve().parents[1] / "tests" / "data" / "clip-bpe"
    return LatentDiffusion(unet=unet, vae=vae, text_encoder=text, tokenizer_dir=bpe,
                           tokenizer_config={"model_max_length": 77}, scheduler_config={}, default_size=(512, 512))


def _sizes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in part.split("x")) for part in s.split(",")]  # type: ignore[misc]


def _stats(xs: list[float]) -> dict[str, float]:
    a = np.array([x for x in xs if math.isfinite(x)], dtype=np.float64)
    if not a.size:
        return {"n": len(xs), "finite": 0}
    return {"n": len(xs), "min": float(a.min()), "mean": float(a.mean()), "median": float(np.median(a)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def sweep(component: str, ld, dims, work: Path, seeds: int, sizes: list[tuple[int, int]], scales: list[float],
          batch: int, text_ctx, decoder_fp32_tail: bool = False, release=lambda: None) -> dict:
    """Export ``component`` to fp16 and compare with torch on ``seeds`` inputs per size and scale."""
    spec = component_spec(component, dims)
    module = wrap(component, ld)
    scratch = work / f".{component}.scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path, _, nodes, fp16_info, secs, _ = export_onnx(component, module, spec, dims, "fp16", work, scratch,
                                                  (sizes[0][0] * dims.vae_scale_factor, sizes[0][1] * dims.vae_scale_factor),
                                                  policy=policy_for(component, len(ld.vae_config.block_out_channels),
                                                                    decoder_fp32_tail))
    log.info("%s: fp16 export %.0f s %s, kept fp32: %s", component, time.perf_counter() - t0,
             {k: round(v, 1) for k, v in secs.items()}, fp16_info["fp32_op_types"])
    metric = "psnr_db" if component == "vae_decoder" else "rel_l2"
    f = dims.vae_scale_factor
    # 1. every input and its torch fp32 reference first, so that the torch model can be dropped
    #    before the (big) onnxruntime sessions open, one at a time
    batches: list[tuple[str, dict[str, np.ndarray], np.ndarray]] = []
    ref_nonfinite = 0
    t0 = time.perf_counter()
    for (h, w) in sizes:
        for scale in (scales if component in ("unet", "vae_decoder") else [1.0]):
            key = f"{h}x{w}" + (f"@x{scale:g}" if component in ("unet", "vae_decoder") else "")
            for start in range(0, seeds, batch):
                b = min(batch, seeds - start)
                feeds = sample_inputs(spec, dims, b, h * f, w * f, seed=1000 + start)
                for name in ("sample", "latent"):
                    if name in feeds:
                        feeds[name] = feeds[name] * np.float32(scale)
                if component == "unet":
                    feeds["timestep"] = np.random.default_rng(start).uniform(0, 999, b).astype(np.float32)
                    feeds["timestep"][0] = 999.0
                    feeds["encoder_hidden_states"] = text_ctx(b, start)
                feeds16 = {k: v.astype(np.float16) if v.dtype == np.float32 and k != "timestep" else v for k, v in feeds.items()}
                with torch.no_grad():
                    ref = module(*(torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v)
                                   for v in feeds16.values()))
                ref = (ref if torch.is_tensor(ref) else ref[0]).numpy()
                ref_nonfinite += int((~np.isfinite(ref)).sum())
                batches.append((key, feeds16, ref))
    log.info("%s: %d torch references in %.0f s", component, len(batches), time.perf_counter() - t0)
    del module
    release()

    # 2. each onnxruntime runner over every batch
    factories = {"ort": lambda: ort_runner(path), "emulated": lambda: ort_runner(path, scratch=scratch, emulate=True)}
    per: dict[str, dict[str, list[float]]] = {r: {} for r in factories}
    nonfinite = {r: 0 for r in factories}
    for rname, factory in factories.items():
        t0 = time.perf_counter()
        run = factory()
        for key, feeds16, ref in batches:
            got = run(feeds16)[0]
            nonfinite[rname] += int((~np.isfinite(got)).sum())
            for i in range(got.shape[0]):  # one figure per seed
                per[rname].setdefault(key, []).append(parity_metrics(component, ref[i:i + 1], got[i:i + 1])[metric])
        del run
        shutil.rmtree(scratch, ignore_errors=True)  # the emulated twin's files
        worst = {k: (min(v) if metric == "psnr_db" else max(v)) for k, v in per[rname].items()}
        log.info("%s %s: %.0f s, worst per case %s, non-finite %d", component, rname, time.perf_counter() - t0,
                 {k: f"{v:.3g}" for k, v in worst.items()}, nonfinite[rname])
    return {"metric": metric, "nodes": nodes, "fp32_op_types": fp16_info["fp32_op_types"],
            "casts_added": fp16_info["casts_added"], "export_seconds": secs,
            "nonfinite": nonfinite, "torch_fp32_nonfinite": ref_nonfinite,
            "all": {r: _stats([x for v in per[r].values() for x in v]) for r in factories},
            "by_case": {r: {k: _stats(v) for k, v in per[r].items()} for r in factories}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="sd15", help="sd15 | sd15-lite | tiny (random weights)")
    p.add_argument("--src", default=None, help="a checkpoint or diffusers folder instead of a random config")
    p.add_argument("--components", default="text_encoder,unet,vae_decoder")
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--unet-sizes", type=_sizes, default=_sizes("32x32,24x40,40x24"), help="latent HxW list")
    p.add_argument("--vae-sizes", type=_sizes, default=_sizes("16x16,24x16"), help="latent HxW list for the decoder")
    p.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 3.0])
    p.add_argument("--batch", type=int, default=5, help="seeds per model call")
    p.add_argument("--decoder-fp32-tail", action="store_true",
                   help="keep the VAE decoder's last up-block and conv_out in fp32 (to compare policies)")
    p.add_argument("--work", default=None, help="folder for the ONNX files (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_grad_enabled(False)

    if args.src:
        from training.checkpoint import load_models

        ld, what = load_models(args.src), f"src {args.src}"
    else:
        ld, what = build_models(args.config), f"config {args.config} (random weights)"
    dims = dims_from_models(ld)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in (("unet", ld.unet), ("vae", ld.vae), ("text_encoder", ld.text_encoder))}
    log.info("%s: parameters %s", what, params)
    comps = [c.strip() for c in args.components.split(",") if c.strip()]
    text_spec = component_spec("text_encoder", dims)

    def text_ctx(b: int, start: int) -> np.ndarray:
        # real text-encoder outputs (fp32 torch) for random token ids, like the runtime's [uncond, cond]
        ids = sample_inputs(text_spec, dims, b, 64, 64, seed=5000 + start)["input_ids"]
        return ld.text_encoder(torch.from_numpy(ids)).numpy()

    summary: dict = {"model": what, "parameters": params, "seeds": args.seeds, "scales": args.scales,
                     "runtime": "onnxruntime CPU", "components": {}}
    with tempfile.TemporaryDirectory(prefix="fp16-sweep-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for c in comps:
            sizes = args.unet_sizes if c in ("unet", "vae_encoder") else args.vae_sizes if c == "vae_decoder" else [(8, 8)]

            def release(c: str = c) -> None:  # the U-Net is not needed after its references (3.4 GB)
                if c == "unet":
                    ld.unet = None  # type: ignore[assignment]

            summary["components"][c] = sweep(c, ld, dims, work, args.seeds, sizes, args.scales, args.batch, text_ctx,
                                             args.decoder_fp32_tail, release)
            summary["components"][c]["sizes"] = [f"{h}x{w}" for h, w in sizes]
            (work / f"{c}.onnx").unlink(missing_ok=True)
            (work / f"{c}.weights").unlink(missing_ok=True)
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
