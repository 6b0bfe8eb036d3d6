"""``ldm serve`` on Ray Serve: the same app on N replicas, one ``GenerationService`` each.

Three ways in, one config: ``serve run deploy/ray-serve.yaml`` (one machine), the same YAML as a
KubeRay ``RayService``'s ``serveConfigV2`` (a cluster), or ``ldm serve BUNDLE --ray``. The YAML's
``args`` are ``ReplicaArgs``; Serve's own keys (replicas, autoscaling, resources, health checks)
sit under its ``deployments`` entry named ``LdmServer``.

Admission survives Ray's proxy: Ray routes a replica at most ``max_inflight + max_queue``
requests plus ``CONTROL_SLOTS`` (so health, progress and metrics reads never wait behind
generations); the replica's service runs ``max_inflight`` calls, holds ``max_queue`` waiting
requests and answers the next with 429 and ``Retry-After`` at once. Requests that find every
replica at Ray's bound wait in Ray's proxy, at most ``proxy_queue`` of them, and beyond that get
Ray's own 429 with ``Retry-After: retry_after_s``. A client that disconnects makes Serve cancel the
request's task; the endpoint turns that into the job's cancel token. Ray is imported only inside
the functions here: ``import ldm_runtime`` never needs it.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core import GenerationService

DEPLOYMENT = "LdmServer"  # the deployment's name, as the YAML's `deployments` entry names it
IMPORT_PATH = "ldm_runtime.serve.ray_app:build_app"
CONTROL_SLOTS = 2  # requests per replica beyond its generations: health, progress and metrics reads
SERVICE_KEYS = ("backend", "device", "max_inflight", "max_queue", "max_batch", "batch_wait_s", "request_timeout_s",
                "loras")
SERVICE_DEFAULTS = {k: p.default for k, p in inspect.signature(GenerationService).parameters.items()
                    if k in SERVICE_KEYS}


@dataclass(frozen=True)
class ReplicaArgs:
    """What one replica runs (the YAML's ``args``): the bundle and the service's options and bounds, how
    many requests Ray's proxy may hold (``proxy_queue``), the ``Retry-After`` of Ray's rejections, how
    many CPU cores each replica keeps to itself (onnxruntime sizes its threads to them; None: all of
    them), and how long a replica may take to open and warm its engines."""

    bundle: str
    backend: str = SERVICE_DEFAULTS["backend"]
    device: str = SERVICE_DEFAULTS["device"]
    max_inflight: int = SERVICE_DEFAULTS["max_inflight"]
    max_queue: int = SERVICE_DEFAULTS["max_queue"]
    max_batch: int = SERVICE_DEFAULTS["max_batch"]
    batch_wait_s: float = SERVICE_DEFAULTS["batch_wait_s"]
    request_timeout_s: float = SERVICE_DEFAULTS["request_timeout_s"]
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale) pairs, fused for every request (YAML: [[file, scale]])
    proxy_queue: int = 2
    retry_after_s: float = 1.0
    cpus_per_replica: int | None = None
    start_timeout_s: float = 600.0

    @classmethod
    def from_dict(cls, args: dict[str, Any] | None) -> ReplicaArgs:
        """``args`` checked: known keys only, and a bundle."""
        args = dict(args or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(args) - set(names))
        if unknown or "bundle" not in args:
            raise ValueError(f"ldm serve on Ray: args take {', '.join(names)} (bundle required); got "
                             f"{'unknown ' + ', '.join(unknown) if unknown else 'no bundle'}")
        if "loras" in args:  # YAML gives lists; a frozen dataclass keeps tuples (hashable, compared equal)
            loras = args["loras"]
            if not isinstance(loras, (list, tuple)) or not all(isinstance(x, (list, tuple)) for x in loras):
                raise ValueError(f"loras must be a list of [file, scale] pairs, got {loras!r}")
            args["loras"] = tuple(tuple(x) for x in loras)
        out = cls(**args)
        if not isinstance(out.proxy_queue, int) or out.proxy_queue < 1:
            raise ValueError(f"proxy_queue must be an int >= 1 (Ray's max_queued_requests), got {out.proxy_queue!r}")
        if out.cpus_per_replica is not None and (not isinstance(out.cpus_per_replica, int) or out.cpus_per_replica < 1):
            raise ValueError(f"cpus_per_replica must be None or an int >= 1, got {out.cpus_per_replica!r}")
        return out

    def service(self) -> GenerationService:
        return GenerationService(self.bundle, **{k: getattr(self, k) for k in SERVICE_KEYS})

    def deployment_options(self) -> dict[str, Any]:
        """Serve's options that carry the admission contract (a YAML ``deployments`` entry overrides them)."""
        from ray.serve.config import BackpressureConfig

        return {"max_ongoing_requests": self.max_inflight + self.max_queue + CONTROL_SLOTS,
                "max_queued_requests": self.proxy_queue,
                "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=self.retry_after_s)}


class LdmServer:
    """One replica: its service, opened and warm before the constructor returns (so Ray routes to it only
    then), the app over it, and ``check_health``, which fails once the engines cannot run."""

    def __init__(self, args: ReplicaArgs, local_rank: int | None = None):
        if args.cpus_per_replica is not None:
            pin_cores(local_rank or 0, args.cpus_per_replica)
        self.service = args.service()
        self.service.start()
        deadline = time.monotonic() + args.start_timeout_s
        while not self.service.ready and self.service.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.service.ready:
            self.service.close()
            raise RuntimeError(f"ldm serve: {args.bundle} did not open and warm up: "
                               f"{self.service.error or f'still not ready after {args.start_timeout_s} s'}")

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.service)

    async def check_health(self) -> None:
        """Raise when the replica cannot serve: the service closed or not open, or its text encoder failing to run."""
        await asyncio.to_thread(self.probe)

    def probe(self) -> None:
        service = self.service
        if service.pipe is None or not service.ready:
            raise RuntimeError(f"ldm serve: the service is not ready: {service.error or 'engines not open'}")
        service.pipe.encode_prompt([""])  # one text-encoder run: raises if the engine (or its device) is gone

    def stats(self) -> dict[str, Any]:
        """This replica's process id, counters and jobs generating now, for a deployment handle
        (``handle.broadcast("stats")``)."""
        m = self.service.metrics.registry
        return {"pid": os.getpid(), "cancellations": m.get_sample_value("ldm_cancellations_total") or 0.0,
                "rejections": m.get_sample_value("ldm_rejections_total") or 0.0,
                "in_flight": m.get_sample_value("ldm_in_flight") or 0.0}

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


def pin_cores(local_rank: int, n: int) -> None:
    """Keep this process on ``n`` of the cores it may use, the ``local_rank``-th block of them."""
    cores = sorted(os.sched_getaffinity(0))
    start = (local_rank * n) % len(cores)
    os.sched_setaffinity(0, [cores[(start + i) % len(cores)] for i in range(min(n, len(cores)))])


def _replica_class():
    """``LdmServer`` under ``@serve.ingress``; the rank of a replica is read where it starts."""
    from ray import serve

    class Replica(LdmServer):
        def __init__(self, args: ReplicaArgs):
            rank = serve.get_replica_context().rank
            super().__init__(args, local_rank=getattr(rank, "local_rank", rank))

    Replica.__name__ = Replica.__qualname__ = DEPLOYMENT
    return serve.ingress()(Replica)


def build_app(args: dict[str, Any]):
    """The Serve application ``serve run`` imports (``import_path: ldm_runtime.serve.ray_app:build_app``),
    its ``args`` as ``ReplicaArgs``; the YAML's ``deployments`` entry adds Serve's options."""
    return application(args)


def application(args: dict[str, Any], **deployment_options: Any):
    """``build_app`` with Serve's options (``num_replicas``, ``autoscaling_config``, ``ray_actor_options``,
    ...) over those that carry the admission contract."""
    from ray import serve

    replica_args = ReplicaArgs.from_dict(args)
    options = {**replica_args.deployment_options(), **deployment_options}
    return serve.deployment(_replica_class(), name=DEPLOYMENT).options(**options).bind(replica_args)


# -- ldm serve --ray -----------------------------------------------------------------------------
def app_from_config(path: str | os.PathLike, args: dict[str, Any], options: dict[str, Any]) -> tuple[Any, dict, str, str]:
    """The one application of a Serve config file, its ``args`` and deployment options updated with ``args``
    and ``options``: the app, the file's ``http_options``, the app's name and route prefix."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text()))
    if len(config.applications) != 1 or config.applications[0].import_path != IMPORT_PATH:
        raise ValueError(f"{path}: expected one application with import_path {IMPORT_PATH}, got "
                         f"{[a.import_path for a in config.applications]}")
    spec = config.applications[0]
    file_options: dict[str, Any] = {}
    for d in spec.deployments:
        if d.name != DEPLOYMENT:
            raise ValueError(f"{path}: the only deployment is {DEPLOYMENT!r}, got {d.name!r}")
        file_options = d.model_dump(exclude_unset=True, exclude={"name"})
    if "num_replicas" in options:  # a replica count replaces the file's autoscaling
        file_options.pop("autoscaling_config", None)
    app = application({**(spec.args or {}), **args}, **{**file_options, **options})
    return app, config.http_options.model_dump(exclude_unset=True), spec.name, spec.route_prefix or "/"


# ldm serve's flags -> ReplicaArgs keys
ARG_FLAGS = {"backend": "backend", "device": "device", "max_inflight": "max_inflight", "max_queue": "max_queue",
             "max_batch": "max_batch", "batch_wait_ms": "batch_wait_s", "request_timeout": "request_timeout_s",
             "lora": "loras"}


def given_flags(a: argparse.Namespace, only_changed: bool) -> dict[str, Any]:
    """``ldm serve``'s flags by name (``only_changed``: only those not at their defaults)."""
    from .cli import build_parser
    from .core import DEFAULT_MAX_BATCH

    parser = build_parser(DEFAULT_MAX_BATCH)
    return {k: v for k, v in vars(a).items() if not only_changed or v != parser.get_default(k)}


def replica_flags(bundle: str, flags: dict[str, Any]) -> dict[str, Any]:
    """``ldm serve``'s flags (``given_flags``) as ``ReplicaArgs`` keys, with the bundle."""
    args = {"bundle": str(bundle), **{key: flags[f] / 1000 if f == "batch_wait_ms" else flags[f]
                                      for f, key in ARG_FLAGS.items() if f in flags}}
    if "loras" in args:  # replicas may run in another folder: name the files absolutely
        args["loras"] = [(os.path.abspath(f), scale) for f, scale in args["loras"]]
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(a: argparse.Namespace) -> int:
    """``ldm serve BUNDLE --ray [--replicas N] [--ray-config FILE]``: start (or join, with ``RAY_ADDRESS``) a
    Ray cluster, run the app and serve until Ctrl-C or SIGTERM, then shut Serve down. With a config file,
    flags left at their defaults leave the file's values alone."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    flags = given_flags(a, only_changed=bool(a.ray_config))
    args = replica_flags(a.bundle, flags)
    options = {"num_replicas": flags["replicas"]} if "replicas" in flags else {}
    try:
        if a.ray_config:
            app, http, name, prefix = app_from_config(a.ray_config, args, options)
        else:
            app, http, name, prefix = application(args, **options), {}, "ldm", "/"
    except (ValueError, OSError) as e:
        print(f"ldm serve --ray: error: {e}", file=sys.stderr)
        return 2
    http.update({k: flags[k] for k in ("host", "port") if k in flags})
    where = HTTPOptions(**http)
    signal.signal(signal.SIGTERM, _interrupt)
    ray.init()
    try:
        serve.start(http_options=http)
        serve.run(app, name=name, route_prefix=prefix)
        print(f"ldm serve: {a.bundle} on Ray Serve at http://{where.host}:{where.port}{prefix}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
