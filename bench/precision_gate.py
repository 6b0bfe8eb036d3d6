"""The reduced-precision quality gate for any bundle and backend: image PSNR against the fp32 bundle on onnxruntime.

``ldm quantize`` judges an int8 bundle by ``export.quantize.judge`` (one prompt, 8 seeds, 20 steps, CFG 7.5,
PSNR pooled over every pixel). This applies the same gate to a precision that is chosen at load instead of
written into the bundle (OpenVINO bf16), or to an int8 bundle on another backend:

    python bench/precision_gate.py engines/bench-mid/bundle --backend openvino --engine-option precision=bf16
    python bench/precision_gate.py engines/bench-mid/bundle --candidate engines/bench-mid/bundle-int8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.proc import machine_info  # noqa: E402
from export.quantize import QualityGate, judge  # noqa: E402
from ldm_runtime.cliargs import parse_engine_options  # noqa: E402
from ldm_runtime.pipeline import Pipeline  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fp32", help="the fp32 bundle: the reference, run on onnxruntime")
    p.add_argument("--candidate", default=None, help="the bundle judged (default: the fp32 bundle itself)")
    p.add_argument("--backend", default="onnxruntime", help="the candidate's backend")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="the candidate's engine options (precision=bf16, ...), repeatable")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-psnr", type=float, default=QualityGate.min_psnr_db)
    p.add_argument("--steps", type=int, default=QualityGate.steps)
    args = p.parse_args(argv)
    options = {"threads": args.threads, **parse_engine_options(args.engine_option)}
    ref = Pipeline.load(args.fp32, threads=args.threads)
    candidate = Pipeline.load(args.candidate or args.fp32, backend=args.backend, **options)
    figures = judge(ref, candidate, QualityGate(min_psnr_db=args.min_psnr, steps=args.steps))
    print(json.dumps({"machine": machine_info(), "fp32": args.fp32, "candidate": args.candidate or args.fp32,
                      "backend": args.backend, "engine_options": options, **figures}, indent=1))
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
