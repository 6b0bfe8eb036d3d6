"""A/B of engine options on one component: open it once per option set, then time calls alternately.

Alternating (A B B A ...) in one process keeps slow drifts of a shared machine out of the
comparison. Reports per option set: the time to open the engine, the median and min call time,
the RSS the engine added (opened and after its runs) and the max abs difference of its output
from the first set's.

    python bench/ab_engines.py engines/bench-mid/bundle unet base:cpu_variant=false fused:cpu_variant=true
    python bench/ab_engines.py B unet all:opt_level=all ext:opt_level=extended --batch 2 --rounds 10
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from bench.runtime import component_feeds, parse_engine_options
from ldm_runtime.backends import engine_options, load_engine
from ldm_runtime.manifest import Manifest
from ldm_runtime.pipeline import Pipeline


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("component", choices=("text_encoder", "unet", "vae_decoder"))
    p.add_argument("sets", nargs="+", help="NAME:key=value,key=value (engine options; threads=2 unless given)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the bundle's)")
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (2: one guided image)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    man = Manifest.load(args.bundle, verify=False)
    h = w = args.size or man.default_size[0]

    all_feeds = component_feeds(Pipeline(man), h, w, batch=max(1, args.batch // 2))
    feeds = all_feeds["unet_2B" if args.component == "unet" and args.batch % 2 == 0 else
                      "unet_B" if args.component == "unet" else args.component]
    engines, info = {}, {}
    for spec in args.sets:
        name, _, opts = spec.partition(":")
        options = {"threads": 2, **parse_engine_options([o for o in opts.split(",") if o])}
        r0, t0 = rss_mb(), time.perf_counter()
        engines[name] = load_engine(man, args.component, "onnxruntime", "cpu", engine_options("onnxruntime", **options))
        info[name] = {"options": options, "open_s": time.perf_counter() - t0, "rss_open_mb": rss_mb() - r0}
    ref = None
    for name, eng in engines.items():
        r0 = rss_mb()
        out = next(iter(eng.run(feeds).values()))
        eng.run(feeds)
        info[name]["rss_run_mb"] = rss_mb() - r0
        ref = out if ref is None else ref
        info[name]["max_abs_diff"] = float(np.abs(out - ref).max())
    times: dict[str, list[float]] = {n: [] for n in engines}
    order = list(engines)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            engines[name].run(feeds)
            times[name].append(time.perf_counter() - t0)
    print(f"{args.component} at {h}x{w}, batch {next(iter(feeds.values())).shape[0]}, {args.rounds} alternating rounds")
    print("| set | options | open | median | min | RSS opened / +run | max abs diff |\n|---|---|---|---|---|---|---|")
    base = None
    for name in order:
        i = info[name]
        i["median_s"], i["min_s"] = statistics.median(times[name]), min(times[name])
        base = base or i["median_s"]
        print(f"| {name} | {json.dumps(i['options'])} | {i['open_s']:.2f} s | {1e3 * i['median_s']:.1f} ms "
              f"({base / i['median_s']:.2f}x) | {1e3 * i['min_s']:.1f} ms | {i['rss_open_mb']:.0f} / +{i['rss_run_mb']:.0f} MiB | "
              f"{i['max_abs_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bundle": args.bundle, "component": args.component, "size": [h, w], "sets": info,
                       "times_s": times}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
