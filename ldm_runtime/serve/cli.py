"""``ldm serve BUNDLE [--host 127.0.0.1] [--port 8000] ...``: the HTTP server, one process (``--ray``: Ray Serve).

The engines open and warm up after the server starts listening; ``/health/ready`` answers 503
until then. Bad arguments or an unreadable bundle give one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module

from ..backends import BACKENDS
from ..cliargs import ArgumentParser, UsageError, one_line
from ..generate import lora_arg

SERVE_EXTRA = "pip install 'ldm-runtime[serve]'"


def build_parser(max_batch: int) -> argparse.ArgumentParser:
    p = ArgumentParser(prog="ldm serve", description="Serve a bundle over HTTP (OpenAI Images and A1111 APIs).")
    p.add_argument("bundle", help="bundle folder (with manifest.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-inflight", type=int, default=1, help="generations running at once (default 1)")
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting beyond those; more get 429 (default 8)")
    p.add_argument("--max-batch", type=int, default=max_batch,
                   help=f"images of compatible waiting requests run as one call (default {max_batch})")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a request waits for compatible ones to batch with (default 10)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds before a request gets 408 and its job is cancelled (default 600)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime threads per engine (default: the backend's, all cores)")
    p.add_argument("--lora", action="append", type=lora_arg, default=[], metavar="FILE[:SCALE]",
                   help="a LoRA safetensors file fused into the weights for every request, at SCALE (default 1.0); "
                        "repeatable. A1111 prompts may name it as <lora:NAME:SCALE> (NAME: the file's stem)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve replicas instead of in this process")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: the number of replicas (default 1)")
    p.add_argument("--ray-config", default=None, help="with --ray: a Serve config YAML file")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        for name in ("fastapi", "uvicorn", "prometheus_client"):
            import_module(name)
    except ModuleNotFoundError as e:
        print(f"ldm serve: needs {e.name}, which is not installed: {SERVE_EXTRA}", file=sys.stderr)
        return 2
    from .core import DEFAULT_MAX_BATCH

    try:
        a = build_parser(DEFAULT_MAX_BATCH).parse_args(argv)
    except UsageError as e:
        print(f"ldm serve: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if a.ray:
        return serve_on_ray(a)
    return serve(a)


def serve_on_ray(a: argparse.Namespace) -> int:
    try:
        ray_app = import_module("ldm_runtime.serve.ray_app")
    except ModuleNotFoundError as e:
        missing = "this version has no Ray Serve app" if e.name == "ldm_runtime.serve.ray_app" else \
            f"needs {e.name}, which is not installed: pip install 'ldm-runtime[ray]'"
        print(f"ldm serve --ray: {missing}", file=sys.stderr)
        return 2
    return int(ray_app.main(a) or 0)


def serve(a: argparse.Namespace) -> int:
    """Listen on ``a.host``:``a.port`` until interrupted; the engines open and warm up meanwhile."""
    import uvicorn

    from ..manifest import Manifest
    from .app import create_app
    from .core import GenerationService

    try:
        Manifest.load(a.bundle, verify=False)  # a bad bundle is one line now, not a server that never gets ready
        service = GenerationService(a.bundle, backend=a.backend, device=a.device, max_inflight=a.max_inflight,
                                    max_queue=a.max_queue, max_batch=a.max_batch, batch_wait_s=a.batch_wait_ms / 1000,
                                    request_timeout_s=a.request_timeout, loras=a.lora,
                                    engine_options={} if a.threads is None else {"threads": a.threads})
    except (ValueError, OSError) as e:
        print(f"ldm serve: error: {one_line(e)}", file=sys.stderr)
        return 2
    service.start()
    try:
        uvicorn.run(create_app(service), host=a.host, port=a.port, log_level=a.log_level)
    finally:
        service.close()
    return 0
