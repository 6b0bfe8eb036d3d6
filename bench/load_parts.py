"""Where bundle load time goes, before and after each load-time change, in fresh processes.

Each variant runs in its own interpreter (``python -c``), alternating, ``--repeats`` times after
one warm-up round (page cache warm): the median seconds of

- ``verify``: hashing the manifest's files (``all``: every file of the bundle as exported, one
  after another, as ``Manifest.load`` does; ``in use``: only what the pipeline reads, in parallel
  threads, as ``Pipeline.load`` does);
- ``open``: creating the three sessions (``sequential`` as on first use; ``parallel`` as
  ``Pipeline.open_engines``), with the CPU variants or the portable graphs.

    python bench/load_parts.py engines/bench-mid/bundle --repeats 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import onnxruntime
from ldm_runtime.backends.onnxruntime import OrtOptions
from ldm_runtime.manifest import Manifest
from ldm_runtime.pipeline import Pipeline, files_in_use, verify_files
t0 = time.perf_counter()
if args["verify"] == "all":
    # what Manifest.load(verify=True) hashed before the CPU variants existed: every other file, in turn
    man = Manifest.load(args["bundle"], verify=False)
    man.verify_files([f for f in man.data["files"] if ".cpu.onnx" not in f])
else:
    man = Manifest.load(args["bundle"], verify=False)
    verify_files(man, files_in_use(man, Pipeline.required_components, "onnxruntime", "cpu", args["cpu_variant"]))
t1 = time.perf_counter()
pipe = Pipeline(man, options=OrtOptions(threads=2, cpu_variant=args["cpu_variant"]))
comps = ("text_encoder", "unet", "vae_decoder")
if args["open"] == "parallel":
    pipe.open_engines(comps)
else:
    for c in comps:
        pipe.engine(c)
t2 = time.perf_counter()
print("RESULT " + json.dumps({"verify_s": t1 - t0, "open_s": t2 - t1}))
"""

VARIANTS = {
    "before: verify all, open sequential, portable graphs": {"verify": "all", "open": "sequential", "cpu_variant": False},
    "verify all, open sequential, CPU variants": {"verify": "all", "open": "sequential", "cpu_variant": True},
    "verify in use, open sequential, CPU variants": {"verify": "in use", "open": "sequential", "cpu_variant": True},
    "after: verify in use, open parallel, CPU variants": {"verify": "in use", "open": "parallel", "cpu_variant": True},
}


def run(bundle: str, args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"bundle": bundle, **args})], capture_output=True,
                          text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(proc.stderr[-2000:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    runs: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    for r in range(a.repeats + 1):
        for name in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
            res = run(a.bundle, VARIANTS[name])
            if r:  # round 0 warms the page cache
                runs[name].append(res)
    print(f"{a.bundle}: medians of {a.repeats} fresh processes\n\n| variant | verify | open 3 engines | sum |\n|---|---|---|---|")
    out = {}
    for name, rs in runs.items():
        v, o = statistics.median(x["verify_s"] for x in rs), statistics.median(x["open_s"] for x in rs)
        out[name] = {"verify_s": v, "open_s": o, "runs": rs}
        print(f"| {name} | {v:.3f} s | {o:.3f} s | {v + o:.3f} s |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
