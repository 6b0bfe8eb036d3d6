"""Load test of ``ldm serve``: images/s, latency percentiles and answers by status, per concurrency.

    python bench/load.py BUNDLE [--targets single,ray1,ray2] [--concurrency 1,2,4] [--requests 16]
                                [--level-seconds 120] [--steps 20] [--out runs/bench/load]

Each target is a server this script starts on 127.0.0.1 and stops: ``single`` is ``ldm serve`` in
one process, ``rayN`` is ``ldm serve --ray --ray-config deploy/ray-serve.yaml --replicas N``. Beside
them, ``inprocess`` generates the same images one by one with ``Pipeline`` in this process (the
baseline for the server's overhead). At each concurrency c (the given ones, the target's capacity
and twice it), c clients send OpenAI ``/v1/images/generations`` requests back to back until
``--requests`` have been sent or ``--level-seconds`` have passed; a rejected client (429/503) waits
``--reject-pause`` before its next request. Latency percentiles are of the successful requests;
rejection latency is of the 429/503 answers. Prints a table; writes ``load.json`` and ``load.md``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RAY_CONFIG = REPO / "deploy" / "ray-serve.yaml"
PROMPT = "a small red circle in the top left on a blue background"
READY_TIMEOUT_S = 600.0


@dataclass
class Level:
    """One target at one concurrency: what was sent, what came back and how long it took."""

    target: str
    concurrency: int
    wall_s: float
    statuses: dict[str, int]
    ok_latency_s: list[float] = field(repr=False)
    reject_latency_s: list[float] = field(repr=False)

    @property
    def images_per_s(self) -> float:
        return len(self.ok_latency_s) / self.wall_s if self.wall_s > 0 else 0.0

    def row(self) -> dict:
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
        return {"target": self.target, "concurrency": self.concurrency, "requests": sum(self.statuses.values()),
                "statuses": self.statuses, "images_per_s": self.images_per_s, "wall_s": self.wall_s,
                "p50_s": pct(self.ok_latency_s, 50), "p95_s": pct(self.ok_latency_s, 95),
                "p99_s": pct(self.ok_latency_s, 99), "reject_p50_s": pct(self.reject_latency_s, 50),
                "reject_p95_s": pct(self.reject_latency_s, 95)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(args: argparse.Namespace, seed: int) -> dict:
    return {"prompt": PROMPT, "n": 1, "steps": args.steps, "guidance_scale": args.guidance_scale, "seed": seed,
            **({"size": args.size} if args.size else {})}


# -- the baseline: one by one, in this process ------------------------------------------------------
def in_process(args: argparse.Namespace) -> Level:
    """The same images, one ``Pipeline`` call each, in this process."""
    from ldm_runtime import Pipeline

    pipe = Pipeline.load(args.bundle)
    size = dict(zip(("width", "height"), map(int, args.size.split("x")))) if args.size else {}
    call = lambda seed: pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,  # noqa: E731
                             seed=seed, **size)
    call(0)  # warm-up, as the server's
    latencies = []
    t0 = time.perf_counter()
    for seed in range(args.requests):
        t = time.perf_counter()
        call(seed)
        latencies.append(time.perf_counter() - t)
    return Level("inprocess", 1, time.perf_counter() - t0, {"200": args.requests}, latencies, [])


# -- servers ---------------------------------------------------------------------------------------
@dataclass
class Server:
    """A server subprocess on 127.0.0.1 and how many generations it lets in at once."""

    name: str
    url: str
    capacity: int
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """SIGINT (the server shuts down cleanly), then SIGKILL to its process group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def server_command(target: str, args: argparse.Namespace, port: int) -> tuple[list[str], int]:
    """The ``ldm serve`` command line of ``target`` and its capacity (generations admitted at once)."""
    cmd = [sys.executable, "-m", "ldm_runtime", "serve", str(args.bundle), "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning"]
    if target == "single":
        return cmd + ["--max-inflight", "1", "--max-queue", str(args.max_queue)], 1 + args.max_queue
    if target.startswith("ray") and target[3:].isdigit():
        import yaml

        from ldm_runtime.serve.ray_app import ReplicaArgs

        replicas = int(target[3:])
        r = ReplicaArgs.from_dict(yaml.safe_load(RAY_CONFIG.read_text())["applications"][0]["args"])
        capacity = replicas * (r.max_inflight + r.max_queue)
        return cmd + ["--ray", "--ray-config", str(RAY_CONFIG), "--replicas", str(replicas)], capacity
    raise SystemExit(f"load.py: unknown target {target!r}; expected single or rayN (ray1, ray2, ...)")


def start_server(target: str, args: argparse.Namespace) -> Server:
    """Start ``target`` and wait until ``/health/ready`` answers 200."""
    import httpx

    port = free_port()
    cmd, capacity = server_command(target, args, port)
    log = args.out / f"server-{target}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    server = Server(target, f"http://127.0.0.1:{port}", capacity, proc, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"load.py: {target} exited ({proc.returncode}) before it was ready; see {log}")
        try:
            if httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.stop()
    raise SystemExit(f"load.py: {target} not ready after {READY_TIMEOUT_S} s; see {log}")


async def run_level(server: Server, concurrency: int, args: argparse.Namespace) -> Level:
    """``concurrency`` clients back to back until ``args.requests`` are sent or the level's time is up."""
    import httpx

    statuses: Counter[str] = Counter()
    ok, rejected = [], []
    sent = 0
    deadline = time.monotonic() + args.level_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=args.level_seconds, limits=limits) as client:

        async def worker():
            nonlocal sent
            while sent < args.requests and time.monotonic() < deadline:
                seed, sent = sent, sent + 1
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/images/generations", json=body(args, seed))
                    status = str(r.status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                elapsed = time.perf_counter() - t
                statuses[status] += 1
                if status == "200":
                    ok.append(elapsed)
                elif status in ("429", "503"):
                    rejected.append(elapsed)
                    await asyncio.sleep(args.reject_pause)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return Level(server.name, concurrency, wall, dict(statuses), ok, rejected)


def levels_of(server: Server, concurrency: list[int]) -> list[int]:
    return sorted(set(concurrency) | {server.capacity, 2 * server.capacity})


def load_target(target: str, args: argparse.Namespace) -> list[Level]:
    server = start_server(target, args)
    try:
        asyncio.run(run_level(server, 1, argparse.Namespace(**{**vars(args), "requests": 2})))  # warm connections
        out = []
        for c in levels_of(server, args.concurrency):
            level = asyncio.run(run_level(server, c, args))
            print(f"  {target} c={c}: {level.statuses} {level.images_per_s:.2f} img/s", flush=True)
            out.append(level)
        return out
    finally:
        server.stop()


# -- report ----------------------------------------------------------------------------------------
def to_markdown(rows: list[dict], machine: dict) -> str:
    ms = lambda s: "-" if s is None else f"{s * 1000:.0f}"  # noqa: E731
    lines = [f"machine: {machine.get('cpu')} ({machine.get('cores')} cores), load {machine.get('loadavg_1m')} "
             f"at the start, {machine.get('date')}", "",
             "| target | concurrency | requests | answers | images/s | p50 ms | p95 ms | p99 ms | reject p50 ms "
             "| reject p95 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        lines.append(f"| {r['target']} | {r['concurrency']} | {r['requests']} | {answers} | {r['images_per_s']:.2f} "
                     f"| {ms(r['p50_s'])} | {ms(r['p95_s'])} | {ms(r['p99_s'])} | {ms(r['reject_p50_s'])} "
                     f"| {ms(r['reject_p95_s'])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--targets", default="single,ray1,ray2", help="comma-separated: single, ray1, ray2, ...")
    p.add_argument("--concurrency", default="1,2,4", help="levels besides the capacity and twice it")
    p.add_argument("--requests", type=int, default=16, help="requests per level (and in-process images)")
    p.add_argument("--level-seconds", type=float, default=120.0, help="no new requests after this long per level")
    p.add_argument("--reject-pause", type=float, default=0.1, help="seconds a rejected client waits")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--size", default=None, help="WxH (default: the bundle's)")
    p.add_argument("--max-queue", type=int, default=2, help="single: queue places (the Ray config's max_queue: 2)")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process baseline")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "load")
    a = p.parse_args(argv)
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    a.targets = [t for t in a.targets.split(",") if t]
    if a.requests < 1 or a.level_seconds <= 0 or min(a.concurrency) < 1:
        p.error("--requests, --level-seconds and every --concurrency must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    from bench.proc import machine_info

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    levels = [] if args.no_inprocess else [in_process(args)]
    for target in args.targets:
        print(f"{target}: starting", flush=True)
        levels += load_target(target, args)
    rows = [lv.row() for lv in levels]
    md = to_markdown(rows, machine)
    print(md)
    (args.out / "load.md").write_text(md)
    (args.out / "load.json").write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in
                                                                                  vars(args).items()},
                                                    "levels": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
