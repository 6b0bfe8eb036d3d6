"""Everything GPU-side in one call (bench/device.sh runs this): the torch reference at SD 1.5 shape,
the runtime backends that can run on the machine, and the U-Net FLOP rate against the card's peak.

Rows of the table:

- ``torch eager <dtype>, SDPA``: our ``training.models`` U-Net / VAE / text encoder built from the
  SD 1.5 configs (random weights), 512x512, 30 steps, classifier-free guidance (U-Net batch 2),
  the PNDM schedule from ``ldm_runtime.schedulers`` (numpy, as the torch reference sampler
  drives it); per-step U-Net time (CUDA events) and the end-to-end time of one image.
- the same U-Net in ``channels_last`` (per step only): the layout cuDNN prefers for fp16 convs.
- ``onnxruntime CUDA``, ``TensorRT``: measured where present, else one "not available: why" row.
- ``onnxruntime CPU``: the U-Net exported to ONNX (fp32) and run through the runtime's own
  ``OnnxRuntimeEngine`` on all CPU cores, per step (a few steps: it is slow at this size).

FLOPs per U-Net step are counted with torch's FlopCounterMode on the meta device (math SDPA, so
attention is counted), cross-checked against the ONNX graph count (bench/flops.py) when the ONNX
row ran. The peak is the best of a large square matmul in the run's dtype on the device.

Without CUDA (or with ``--cpu-smoke``) everything runs on the CPU in fp32 with tiny models and
sizes, to test the script before a GPU is spent on it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ldm_runtime.schedulers import make_scheduler  # noqa: E402
from ldm_runtime.tokenizer import CLIPTokenizer  # noqa: E402
from training.models.text_encoder import CLIPTextEncoder, TextEncoderConfig  # noqa: E402
from training.models.unet import UNet, UNetConfig  # noqa: E402
from training.models.vae import AutoencoderKL, VAEConfig  # noqa: E402

log = logging.getLogger("device_bench")

CLIP_BPE = REPO / "tests" / "data" / "clip-bpe"
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "skip_prk_steps": True, "set_alpha_to_one": False,
                  "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading", "clip_sample": False}
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class Setup:
    name: str
    unet: UNetConfig
    text: TextEncoderConfig
    vae: VAEConfig
    size: int
    steps: int
    device: str
    dtype: torch.dtype
    step_repeats: int  # timed U-Net calls per per-step figure
    e2e_repeats: int
    ort_steps: int  # U-Net calls timed on onnxruntime CPU
    matmul_n: int
    guidance_scale: float = 7.5
    notes: list[str] = field(default_factory=list)


def sd15_setup(device: str) -> Setup:
    # UNetConfig(), TextEncoderConfig() and VAEConfig() defaults are SD 1.5's (860M / 123M / 84M)
    return Setup("SD 1.5 shape, random weights", UNetConfig(), TextEncoderConfig(), VAEConfig(), size=512, steps=30,
                 device=device, dtype=torch.float16, step_repeats=20, e2e_repeats=3, ort_steps=2, matmul_n=8192)


def smoke_setup() -> Setup:
    return Setup("CPU smoke: tiny models", UNetConfig(block_out_channels=(32, 64), attention=(True, False),
                                                      layers_per_block=1, num_heads=2, cross_attention_dim=32,
                                                      norm_num_groups=8),
                 TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
                 size=64, steps=2, device="cpu", dtype=torch.float32, step_repeats=2, e2e_repeats=1, ort_steps=2,
                 matmul_n=256)


# ---------------------------------------------------------------------------------------------
# timing and counting


def timed(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn``: CUDA events on a GPU (no host sync inside the timed region), else perf_counter."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def unet_flops(cfg: UNetConfig, batch: int, h: int, w: int, ctx_len: int = 77) -> int:
    """FLOPs (2 per multiply-add) of one U-Net call, counted on the meta device with math attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet(cfg)
        args = (torch.empty(batch, cfg.in_channels, h, w), torch.empty(batch),
                torch.empty(batch, ctx_len, cfg.cross_attention_dim))
    # the fused SDPA kernels are not all known to the counter (the CPU one is not); math SDPA is bmm
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(*args)
    return int(counter.get_total_flops())


def peak_matmul_tflops(device: str, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = min(timed(lambda: torch.mm(a, b), device, repeats, warmup=3))
    return 2 * n**3 / best / 1e12


# ---------------------------------------------------------------------------------------------
# rows


def build_models(s: Setup) -> tuple[UNet, CLIPTextEncoder, AutoencoderKL]:
    torch.manual_seed(0)
    with torch.device(s.device):  # initialise on the device: SD 1.5's 860M parameters init slowly on a CPU
        unet, text, vae = UNet(s.unet), CLIPTextEncoder(s.text), AutoencoderKL(s.vae)
    return tuple(m.to(s.dtype).eval().requires_grad_(False) for m in (unet, text, vae))  # type: ignore[return-value]


@torch.inference_mode()
def torch_reference(s: Setup, unet: UNet, text: CLIPTextEncoder, vae: AutoencoderKL) -> dict[str, Any]:
    """Per-step U-Net time at batch 2 (contiguous and channels_last) and one image end to end."""
    f = s.vae.spatial_factor
    h = w = s.size // f
    dev, dt = s.device, s.dtype
    tok = CLIPTokenizer(CLIP_BPE / "vocab.json", CLIP_BPE / "merges.txt")
    ids = torch.from_numpy(tok(["", PROMPT])).to(dev)  # [negative; prompt]
    cond = text(ids)  # (2, 77, D)
    x = torch.randn(2, s.unet.in_channels, h, w, device=dev, dtype=dt)
    t = torch.full((2,), 500.0, device=dev)
    step = timed(lambda: unet(x, t, cond), dev, s.step_repeats)

    unet_cl = unet.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    step_cl = timed(lambda: unet_cl(x_cl, t, cond), dev, s.step_repeats)
    unet.to(memory_format=torch.contiguous_format)

    latents0 = np.random.default_rng(0).standard_normal((1, s.unet.in_channels, h, w), dtype=np.float32)

    def one_image() -> np.ndarray:
        sched = make_scheduler("pndm", SD15_SCHEDULER)
        sched.set_timesteps(s.steps)
        emb = text(ids)
        z = latents0 * np.float32(sched.init_noise_sigma)
        for ts in sched.timesteps:
            xin = torch.from_numpy(np.asarray(sched.scale_model_input(z, ts), dtype=np.float32)).to(dev, dt)
            eps = unet(torch.cat([xin, xin]), torch.full((2,), float(ts), device=dev), emb).float()
            uncond, c = eps.chunk(2)
            guided = (uncond + s.guidance_scale * (c - uncond)).cpu().numpy()
            z = np.asarray(sched.step(guided, ts, z), dtype=np.float32)
        img = vae.decode(torch.from_numpy(z / np.float32(s.vae.scaling_factor)).to(dev, dt))
        return img.float().cpu().numpy()

    img = one_image()  # warm-up
    e2e = []
    for _ in range(s.e2e_repeats):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        img = one_image()
        e2e.append(time.perf_counter() - t0)
    return {"unet_step_s": statistics.median(step), "unet_step_channels_last_s": statistics.median(step_cl),
            "e2e_s": statistics.median(e2e), "image_nonfinite": int((~np.isfinite(img)).sum())}


def availability() -> dict[str, str | None]:
    """Why each runtime backend cannot run here (None: it can)."""
    out: dict[str, str | None] = {}
    try:
        import onnxruntime as ort

        prov = ort.get_available_providers()
        out["onnxruntime CPU"] = None
        out["onnxruntime CUDA"] = None if "CUDAExecutionProvider" in prov else (
            f"onnxruntime {ort.__version__} is a CPU build (providers {prov}); needs onnxruntime-gpu")
    except ImportError as e:
        out["onnxruntime CPU"] = out["onnxruntime CUDA"] = f"onnxruntime is not importable ({e})"
    if importlib.util.find_spec("tensorrt") is None:
        out["TensorRT"] = "the tensorrt module is not installed (pip install 'ldm-runtime[trt]')"
    elif not torch.cuda.is_available():
        out["TensorRT"] = "tensorrt is installed but there is no CUDA device"
    else:
        out["TensorRT"] = ("tensorrt is installed, but this script does not build engines (minutes at SD 1.5 size): "
                           "run `ldm build-engines` on an SD 1.5-shaped bundle and `ldm bench --backend tensorrt`")
    return out


def export_unet_onnx(unet: UNet, cfg: UNetConfig, h: int, w: int, folder: Path) -> Path:
    """The U-Net as fp32 ONNX (dynamic batch and size, as the bundle's); torch writes the weights as
    external data beside it when they pass protobuf's 2 GB (SD 1.5: 3.4 GB)."""
    m = unet.float().cpu().eval()
    args = (torch.randn(2, cfg.in_channels, h, w), torch.full((2,), 500.0), torch.randn(2, 77, cfg.cross_attention_dim))
    path = folder / "unet.onnx"
    torch.onnx.export(m, args, str(path), input_names=["sample", "timestep", "encoder_hidden_states"],
                      output_names=["out_sample"], opset_version=18, dynamo=False,
                      dynamic_axes={"sample": {0: "B", 2: "h", 3: "w"}, "timestep": {0: "B"},
                                    "encoder_hidden_states": {0: "B"}, "out_sample": {0: "B", 2: "h", 3: "w"}})
    return path


def ort_row(s: Setup, unet: UNet, device: str, folder: Path) -> dict[str, Any]:
    """The exported U-Net through the runtime's ``OnnxRuntimeEngine``: per-step seconds at batch 2."""
    from ldm_runtime.backends.onnxruntime import OnnxRuntimeEngine, OrtOptions
    from ldm_runtime.manifest import TensorSpec

    f = s.vae.spatial_factor
    h = w = s.size // f
    cfg = s.unet
    path = folder / "unet.onnx"
    t0 = time.perf_counter()
    if not path.exists():
        export_unet_onnx(unet, cfg, h, w, folder)
    export_s = time.perf_counter() - t0
    c, d = cfg.in_channels, cfg.cross_attention_dim
    inputs = (TensorSpec("sample", "float32", ("B", c, "h", "w")), TensorSpec("timestep", "float32", ("B",)),
              TensorSpec("encoder_hidden_states", "float32", ("B", 77, d)))
    outputs = (TensorSpec("out_sample", "float32", ("B", cfg.out_channels, "h", "w")),)
    t0 = time.perf_counter()
    threads = os.cpu_count() if device == "cpu" else None
    eng = OnnxRuntimeEngine(path, inputs, outputs, name="unet", device=device, options=OrtOptions(threads=threads))
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, c, h, w), dtype=np.float32), "timestep": np.full((2,), 500.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, d), dtype=np.float32)}
    times = timed(lambda: eng.run(feeds), "cpu", s.ort_steps, warmup=1)
    out: dict[str, Any] = {"unet_step_s": statistics.median(times), "export_s": export_s, "session_s": load_s,
                           "threads": threads}
    try:  # cross-check the FLOP count against the graph's
        from bench.flops import count_flops

        out["graph_flops"] = count_flops(path, {"sample": (2, c, h, w), "timestep": (2,),
                                                "encoder_hidden_states": (2, 77, d)})["total"]
    except Exception as e:  # noqa: BLE001 - the count is a cross-check; the row stands without it
        out["graph_flops_error"] = f"{type(e).__name__}: {e}"
    return out


# ---------------------------------------------------------------------------------------------


def run(s: Setup, skip_ort_cpu: bool = False, emit: Callable[[dict], None] = lambda r: None) -> dict[str, Any]:
    """All rows for ``s``; ``emit`` gets each row as it is measured (so a cut-off run still reports)."""
    f = s.vae.spatial_factor
    h = w = s.size // f
    res: dict[str, Any] = {"setup": s.name, "size": s.size, "steps": s.steps, "device": s.device,
                           "dtype": str(s.dtype).replace("torch.", ""), "torch": torch.__version__, "rows": []}
    if s.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    res["unet_flops_per_step"] = unet_flops(s.unet, 2, h, w)
    res["peak_matmul_tflops"] = peak_matmul_tflops(s.device, s.dtype, s.matmul_n)
    log.info("U-Net %.1f GFLOP per step (batch 2, %dx%d latents); %s matmul peak %.1f TFLOP/s",
             res["unet_flops_per_step"] / 1e9, h, w, res["dtype"], res["peak_matmul_tflops"])

    def add(row: dict[str, Any]) -> None:
        if row.get("unet_step_s"):
            rate = res["unet_flops_per_step"] / row["unet_step_s"] / 1e12
            row["unet_tflops"] = rate
            if row.get("dtype", res["dtype"]) == res["dtype"]:
                row["fraction_of_peak"] = rate / res["peak_matmul_tflops"]
        res["rows"].append(row)
        emit(row)

    t0 = time.perf_counter()
    unet, text, vae = build_models(s)
    log.info("models built in %.1f s", time.perf_counter() - t0)
    ref = torch_reference(s, unet, text, vae)
    add({"backend": f"torch eager {res['dtype']}, SDPA", "device": s.device, "dtype": res["dtype"],
         "unet_step_s": ref["unet_step_s"], "e2e_s": ref["e2e_s"], "note": f"image nonfinite {ref['image_nonfinite']}"})
    add({"backend": f"torch eager {res['dtype']}, SDPA, channels_last", "device": s.device, "dtype": res["dtype"],
         "unet_step_s": ref["unet_step_channels_last_s"], "note": "U-Net only"})
    avail = availability()
    with tempfile.TemporaryDirectory(prefix="device-bench-") as tmp:
        for backend, dev in (("onnxruntime CUDA", "cuda"), ("onnxruntime CPU", "cpu")):
            why = avail[backend]
            if why is None and backend == "onnxruntime CUDA" and s.device != "cuda":
                why = "no CUDA device"
            if why is None and backend == "onnxruntime CPU" and skip_ort_cpu:
                add({"backend": backend, "note": "skipped (--skip-ort-cpu)"})
                continue
            if why is not None:
                add({"backend": backend, "note": f"not available: {why}"})
                continue
            try:
                r = ort_row(s, unet, dev, Path(tmp))
            except Exception as e:  # noqa: BLE001 - report the failure as the row, keep the others
                add({"backend": backend, "note": f"failed: {type(e).__name__}: {e}"})
                continue
            finally:
                unet.to(s.device, s.dtype)  # the export moved it to the CPU in fp32
            note = f"fp32 graph, {r['threads'] or 'default'} threads; export {r['export_s']:.0f} s, session {r['session_s']:.0f} s"
            if "graph_flops" in r:
                res["graph_flops_per_step"] = r["graph_flops"]
                note += f"; graph FLOPs / torch count {r['graph_flops'] / res['unet_flops_per_step']:.4f}"
            add({"backend": backend, "device": dev, "dtype": "float32", "unet_step_s": r["unet_step_s"],
                 "note": note, **{k: v for k, v in r.items() if k != "unet_step_s"}})
    why = avail["TensorRT"] or ""
    add({"backend": "TensorRT", "note": ("not measured: " if why.startswith("tensorrt is installed, but") else
                                         "not available: ") + why})
    return res


def to_markdown(res: dict[str, Any]) -> str:
    head = (f"{res['setup']}: {res['size']}x{res['size']}, {res['steps']} steps, CFG (U-Net batch 2), "
            f"{res.get('gpu', res['device'])}, torch {res['torch']}. U-Net {res['unet_flops_per_step'] / 1e9:.1f} GFLOP/step; "
            f"{res['dtype']} matmul peak {res['peak_matmul_tflops']:.3g} TFLOP/s")
    lines = [head, "", "| backend | U-Net step | end to end | U-Net TFLOP/s | of peak | note |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        step = f"{1e3 * r['unet_step_s']:.2f} ms" if r.get("unet_step_s") else "-"
        e2e = f"{r['e2e_s']:.3f} s" if r.get("e2e_s") else "-"
        rate = f"{r['unet_tflops']:.3g}" if r.get("unet_tflops") else "-"
        frac = f"{100 * r['fraction_of_peak']:.1f}%" if r.get("fraction_of_peak") else "-"
        lines.append(f"| {r['backend']} | {step} | {e2e} | {rate} | {frac} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GPU benchmark (CPU smoke run without CUDA); see bench/device.sh.")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, even where CUDA is present")
    p.add_argument("--skip-ort-cpu", action="store_true", help="skip the onnxruntime CPU row (export + session: minutes at SD 1.5 size)")
    p.add_argument("--steps", type=int, default=None, help="override the step count")
    p.add_argument("--json", default=None, help="write the result here too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    log.info("python %s, torch %s, CUDA available: %s", sys.version.split()[0], torch.__version__,
             torch.cuda.is_available())
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # irrelevant to fp16; keeps any fp32 op on tensor cores
        s = sd15_setup("cuda")
    else:
        if not args.cpu_smoke:
            log.warning("no CUDA device: running the CPU smoke configuration")
        s = smoke_setup()
        s.notes.append("CPU smoke run: tiny models; figures test the script, they are not results")
    if args.steps:
        s.steps = args.steps
    res = run(s, skip_ort_cpu=args.skip_ort_cpu, emit=lambda r: log.info("row: %s", json.dumps(r, default=str)))
    res["notes"] = s.notes
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
