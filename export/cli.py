"""``ldm export``: parse arguments, call ``export.bundle.export_bundle``, report one line on failure.

``ldm build-engines`` lives in ``export.tensorrt`` and ``ldm quantize`` in ``export.quantize``;
``build_engines_main`` and ``quantize_main`` here only forward to them, so the ``ldm`` dispatcher finds
every export command in this module.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback

from ldm_runtime.cliargs import ArgumentParser, UsageError, one_line, parse_size
from ldm_runtime.manifest import COMPONENTS, BundleError


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="ldm export", description="Export a checkpoint or diffusers folder to an ONNX bundle.")
    p.add_argument("src", help="our checkpoint folder or a diffusers pipeline folder")
    p.add_argument("out", help="the bundle folder to write (an existing bundle is replaced)")
    p.add_argument("--precision", default="fp32", help="fp32 or fp16 (default fp32)")
    p.add_argument("--components", default=None,
                   help=f"comma-separated subset of {','.join(COMPONENTS)} (default: all the source has)")
    p.add_argument("--size", type=parse_size, default=None,
                   help="HEIGHTxWIDTH in pixels where models are traced and checked (default: the model's default size)")
    p.add_argument("--no-cpu-variants", action="store_true",
                   help="fp32 only: skip the onnxruntime-CPU variants (fused attention)")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    p.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    return p


def export_main(argv: list[str] | None = None) -> int:
    """``ldm export SRC OUT [...]``; returns the exit status (0 ok, 1 failed export, 2 bad input).

    Every failure is one line on stderr; an unexpected internal error names its type (exit 1),
    and ``--debug`` adds its traceback.
    """
    from training.checkpoint import CheckpointError

    from .bundle import ExportError, export_bundle
    from .onnx_export import ParityError
    from .specs import ProfileError

    parser = _parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"ldm export: error: {e} (see ldm export --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    _setup_logging(logging.WARNING if args.quiet else logging.INFO)
    try:
        out = export_bundle(args.src, args.out, precision=args.precision, components=args.components,
                            size=args.size, cpu_variants=not args.no_cpu_variants)
    except ParityError as e:
        print(f"ldm export: parity check failed, no bundle written: {one_line(e)}", file=sys.stderr)
        return 1
    except (ExportError, CheckpointError, ProfileError, BundleError, OSError) as e:
        print(f"ldm export: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"ldm export: internal error: {type(e).__name__}: {one_line(e)}"
              f"{'' if args.debug else ' (rerun with --debug for the traceback)'}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _setup_logging(level: int) -> None:
    root = logging.getLogger()
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(level)
    # the graph passes log every merged initializer at INFO
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def quantize_main(argv: list[str] | None = None) -> int:
    """``ldm quantize BUNDLE [--out DIR] [...]`` (see ``export.quantize``)."""
    from .quantize import quantize_main as main

    _setup_logging(logging.INFO)
    return int(main(argv))


def build_engines_main(argv: list[str] | None = None) -> int:
    """``ldm build-engines BUNDLE [...]`` (see ``export.tensorrt``)."""
    from .tensorrt import build_engines_main as main

    return int(main(argv))
