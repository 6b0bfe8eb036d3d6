"""``ldm bench``'s result as markdown tables and as a plot."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def fmt_time(s: float) -> str:
    return f"{1e3 * s:.1f} ms" if s < 1.0 else f"{s:.2f} s"


def _header(result: dict[str, Any]) -> str:
    m, b = result["machine"], result["bundle_info"]
    return (f"{m['cpu']}, {m['cores']} cores, load {m.get('loadavg_1m', '?')} -> {m.get('loadavg_1m_end', '?')}, "
            f"onnxruntime {m.get('onnxruntime', '?')}, {m['date']}; bundle {b['precision']} {b['sha256']}, "
            f"scheduler {b['scheduler']}; "
            + "".join(f"LoRA {x['file']} (sha256 {x['sha256'][:12]}) at {x['scale']:g}; " for x in b.get("loras", []))
            + f"engine options {json.dumps(result['engine_options'])}, graphs "
            f"{', '.join(b['graphs'])}; medians of {result['config']['repeats']} runs after "
            f"{result['config']['warmup']} warm-up")


def _component_table(components: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| size | text encoder | U-Net step, batch 2B | U-Net step, batch B | VAE decode |", "|---|---|---|---|---|"]
    for size, rows in components.items():
        lines.append(f"| {size} | {fmt_time(rows['text_encoder']['median_s'])} | {fmt_time(rows['unet_2B']['median_s'])} "
                     f"(B={rows['unet_2B']['batch'] // 2}) | {fmt_time(rows['unet_B']['median_s'])} | "
                     f"{fmt_time(rows['vae_decoder']['median_s'])} |")
    return lines


def _end_to_end_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| size | steps | end to end (s/image) | inside engines | runtime overhead | per step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['height']}x{r['width']} | {r['steps']} | {r['seconds']:.3f} | {r['engine_seconds']:.3f} | "
                     f"{fmt_time(r['overhead_seconds'])} ({r['overhead_pct']:.2f}%) | {r['overhead_per_step_ms']:.3f} ms |")
    return lines


def _startup_table(st: dict[str, Any]) -> list[str]:
    return ["| import ldm_runtime | + pipeline & onnxruntime | bundle load + engines | import + load | "
            f"first image ({st['generate_steps']} steps) | peak RSS |", "|---|---|---|---|---|---|",
            f"| {fmt_time(st['import_ldm_runtime_s'])} | {fmt_time(st['import_pipeline_s'])} | {fmt_time(st['load_s'])} | "
            f"{fmt_time(st['import_plus_load_s'])} | {fmt_time(st.get('first_image_s', float('nan')))} | "
            f"{st['peak_rss_mb']:.0f} MiB |"]


def to_markdown(result: dict[str, Any]) -> str:
    """The result as markdown tables (components, end to end, start-up)."""
    lines = [f"### ldm bench `{result['bundle']}`", "", _header(result), "",
             *_component_table(result["components"]), "", *_end_to_end_table(result["end_to_end"])]
    if result.get("startup"):
        lines += ["", *_startup_table(result["startup"])]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | os.PathLike) -> str | None:
    """Latency against steps and against resolution as a PNG; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: matplotlib is not importable ({e}); pip install matplotlib"
    default = "x".join(map(str, result["bundle_info"]["default_size"]))
    e2e = result["end_to_end"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    rows = sorted((r for r in e2e if f"{r['height']}x{r['width']}" == default), key=lambda r: r["steps"])
    a.plot([r["steps"] for r in rows], [r["seconds"] for r in rows], "o-", label="end to end")
    a.plot([r["steps"] for r in rows], [r["engine_seconds"] for r in rows], "s--", label="inside engines")
    a.set(xlabel="steps", ylabel="seconds per image", title=f"latency vs steps ({default})")
    a.legend()
    comps = result["components"]
    px = [int(k.split("x")[0]) * int(k.split("x")[1]) for k in comps]
    order = np.argsort(px)
    keys = [list(comps)[i] for i in order]
    for key, label in (("unet_2B", "U-Net step, 2B"), ("unet_B", "U-Net step, B"), ("vae_decoder", "VAE decode")):
        b.plot([int(np.sqrt(px[i])) for i in order], [comps[k][key]["median_s"] for k in keys], "o-", label=label)
    b.set(xlabel="image side (sqrt of pixels)", ylabel="seconds", title="latency vs resolution", yscale="log")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
