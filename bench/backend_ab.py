"""Two backends on the same bundle, component by component, calls alternating (A B B A ...) in one process.

``bench/flops.py`` times each backend's components one after another, so on a machine whose speed drifts
two runs can disagree on which backend is faster by more than the difference. Here both backends' engines
are open at once and every round runs one call of each, in alternating order, on the same random feeds:
drift hits both alike. Reported per component: each backend's median and min seconds per call, and
the ratio of the medians (> 1: backend A is faster).

    python bench/backend_ab.py engines/bench-mid/bundle --threads 2 --rounds 20 \
        --b openvino --b-option precision=f32
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.proc import machine_info  # noqa: E402
from bench.runtime import component_feeds  # noqa: E402
from ldm_runtime.cliargs import parse_engine_options  # noqa: E402
from ldm_runtime.pipeline import Pipeline  # noqa: E402


def alternate(engines: list, feeds: dict, rounds: int) -> list[list[float]]:
    """Seconds of each engine's call per round, the order reversed every other round (after one warm-up each)."""
    for e in engines:
        e.run(feeds)
    times: list[list[float]] = [[] for _ in engines]
    for r in range(rounds):
        for i in (range(len(engines)) if r % 2 == 0 else reversed(range(len(engines)))):
            t0 = time.perf_counter()
            engines[i].run(feeds)
            times[i].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--a", default="onnxruntime", help="backend A (default onnxruntime)")
    p.add_argument("--a-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--b", default="openvino", help="backend B (default openvino)")
    p.add_argument("--b-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch", type=int, default=1, help="images per call (the U-Net runs 2x rows with CFG)")
    args = p.parse_args(argv)
    pipes = [Pipeline.load(args.bundle, backend=args.a, threads=args.threads, **parse_engine_options(args.a_option)),
             Pipeline.load(args.bundle, backend=args.b, threads=args.threads, **parse_engine_options(args.b_option))]
    h, w = pipes[0].manifest.default_size
    report = {"machine": machine_info(), "bundle": args.bundle, "a": f"{args.a} {args.a_option}",
              "b": f"{args.b} {args.b_option}", "threads": args.threads, "rounds": args.rounds, "components": {}}
    for key, feeds in component_feeds(pipes[0], h, w, args.batch).items():
        if key == "unet_B":
            continue
        comp = "unet" if key.startswith("unet") else key
        engines = [pipe.engine(comp) for pipe in pipes]
        dtypes = {s.name: s.dtype for s in engines[0].inputs}
        times = alternate(engines, {k: v.astype(dtypes[k]) for k, v in feeds.items()}, args.rounds)
        med = [statistics.median(t) for t in times]
        report["components"][key] = {"a_median_s": med[0], "b_median_s": med[1], "a_min_s": min(times[0]),
                                     "b_min_s": min(times[1]), "b_over_a": med[1] / med[0]}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
