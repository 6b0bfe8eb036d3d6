"""A/B of whole generations: pipeline settings alternated call by call in one process.

On a shared machine separate runs drift by 10-20%; alternating A B B A ... within one process
compares like with like. Each set is ``NAME:key=value,...`` where the keys are
``guidance_scale``, ``negative_cache`` (false: encode the negative prompt on every call) and any
engine option (``cpu_variant``, ``mem_pattern``, ``threads``, ...; sets with different engine
options get their own pipeline). Reports median seconds per image, time inside the engines, the
runtime overhead, and the ratio to the first set.

    python bench/ab_pipeline.py engines/bench-mid/bundle --steps 20 cache: nocache:negative_cache=false
    python bench/ab_pipeline.py B cfg: guidance1:guidance_scale=1
    python bench/ab_pipeline.py B variant: portable:cpu_variant=false
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench.runtime import PROMPT, parse_engine_options
from ldm_runtime.guidance import EmbeddingCache
from ldm_runtime.pipeline import Pipeline
from ldm_runtime.timing import instrument

CALL_KEYS = ("guidance_scale", "negative_cache")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("sets", nargs="+", help="NAME:key=value,... (see the module docstring)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    sets: dict[str, dict] = {}
    pipes: dict[str, tuple] = {}  # engine options (as JSON) -> (pipeline, clock)
    for spec in args.sets:
        name, _, opts = spec.partition(":")
        o = parse_engine_options([x for x in opts.split(",") if x])
        call = {k: o.pop(k) for k in CALL_KEYS if k in o}
        engine = {"threads": args.threads, **o}
        key = json.dumps(engine, sort_keys=True)
        if key not in pipes:
            pipe = Pipeline.load(args.bundle, **engine)
            pipes[key] = (pipe, instrument(pipe))
        sets[name] = {"call": call, "engine": engine, "key": key, "runs": []}

    def run(s: dict) -> tuple[float, float]:
        pipe, clock = pipes[s["key"]]
        cache = pipe.negative_cache
        if not s["call"].get("negative_cache", True):
            pipe.negative_cache = EmbeddingCache(0)
        clock.reset()
        t0 = time.perf_counter()
        pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=float(s["call"].get("guidance_scale", 7.5)),
             seed=0, output_type="np")
        wall = time.perf_counter() - t0
        pipe.negative_cache = cache
        return wall, clock.total

    for s in sets.values():  # warm-up (and fill the caches of the sets that keep one)
        run(s)
    order = list(sets)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            sets[name]["runs"].append(run(sets[name]))
    print(f"{args.bundle}: {args.steps} steps, {args.rounds} alternating rounds, medians\n")
    print("| set | settings | s/image | inside engines | overhead | vs first |\n|---|---|---|---|---|---|")
    first = None
    for name, s in sets.items():
        wall = statistics.median(w for w, _ in s["runs"])
        inside = statistics.median(i for _, i in s["runs"])
        over = statistics.median(w - i for w, i in s["runs"])
        pct = statistics.median(100 * (w - i) / w for w, i in s["runs"])
        first = first or wall
        s.update(seconds=wall, engine_seconds=inside, overhead_seconds=over, overhead_pct=pct)
        shown = {**s["call"], **{k: v for k, v in s["engine"].items() if k != "threads"}}
        print(f"| {name} | {json.dumps(shown)} | {wall:.3f} | {inside:.3f} | {1e3 * over:.1f} ms ({pct:.2f}%) | "
              f"{first / wall:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bundle": args.bundle, "steps": args.steps, "sets": {k: {kk: vv for kk, vv in v.items() if kk != "key"}
                                                                          for k, v in sets.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
