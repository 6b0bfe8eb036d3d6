"""``ldm serve`` on Ray Serve (``ldm_runtime/serve/ray_app.py``): a real local Ray (2 CPUs, no GPU) runs
the app with 2 replicas over the tiny bundle on 127.0.0.1.

Checked against the single-process app: a seeded image is the same PNG; overload is answered with
429/503 and ``Retry-After`` while the admitted generations still run; a client that disconnects
cancels its job in the replica; a replica killed mid-load leaves no request without an answer, and
Ray's replacement serves again. The Ray-free tests check the config file against ``ReplicaArgs``,
``check_health`` against a broken engine, and that importing the module does not import Ray;
``bench/load.py`` runs against the single-process server.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ldm-runtime[ray]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install 'ldm-runtime[dev]')")
pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'ldm-runtime[serve]')")

from ldm_runtime.serve.ray_app import (CONTROL_SLOTS, DEPLOYMENT, LdmServer, ReplicaArgs, app_from_config,  # noqa: E402
                                       application, given_flags, replica_flags)

REPO = Path(__file__).resolve().parents[1]
REPLICAS = 2
ARGS = dict(max_inflight=1, max_queue=1, proxy_queue=1, retry_after_s=1.0)
CAPACITY = REPLICAS * (ARGS["max_inflight"] + ARGS["max_queue"])  # generations the replicas admit at once
BODY = {"prompt": "a red circle on a blue background", "seed": 7, "steps": 4, "size": "64x64"}
LONG_STEPS = 100  # a generation that outlasts the overload's rejections
TIMEOUT_S = 120.0  # bound on every request and every wait (generous: the machine is shared)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@pytest.fixture(scope="module")
def ray_url(tiny_fp32_bundle):
    """The app on 2 replicas behind Ray's proxy; Serve and Ray shut down after the module."""
    import ray

    port = free_port()
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application({"bundle": str(tiny_fp32_bundle), **ARGS}, num_replicas=REPLICAS,
                            ray_actor_options={"num_cpus": 0.5}, health_check_period_s=1),
                  name="ldm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_stats() -> list[dict]:
    """Every running replica's pid and counters."""
    return serve.get_deployment_handle(DEPLOYMENT, app_name="ldm").broadcast("stats").results()


def replaced(pid: int) -> bool:
    """True once REPLICAS replicas answer and none of them is ``pid``; False while a broadcast still reaches
    the killed replica (on a fast machine the load can end before Ray has dropped it from the handle)."""
    from ray.exceptions import RayActorError

    try:
        pids = {s["pid"] for s in replica_stats()}
    except RayActorError:
        return False
    return len(pids) == REPLICAS and pid not in pids


async def post_all(url: str, bodies: list[dict], timeout_s: float = TIMEOUT_S) -> list[tuple[int, float, dict]]:
    """POST every body at once: (status, seconds from the start to the answer, headers) each."""
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        t0 = time.monotonic()

        async def one(body):
            r = await client.post("/v1/images/generations", json=body)
            return r.status_code, time.monotonic() - t0, r.headers

        return await asyncio.gather(*(one(b) for b in bodies))


@pytest.mark.slow
def test_seeded_image_equals_single_process(ray_url, tiny_fp32_bundle):
    from fastapi.testclient import TestClient

    from ldm_runtime.serve.app import create_app

    single = ReplicaArgs.from_dict({"bundle": str(tiny_fp32_bundle), **ARGS})
    server = LdmServer(single)  # the service of one replica, here in this process
    try:
        with TestClient(create_app(server.service)) as client:
            expected = client.post("/v1/images/generations", json=BODY).json()["data"][0]["b64_json"]
    finally:
        server.service.close()
    got = httpx.post(f"{ray_url}/v1/images/generations", json=BODY, timeout=TIMEOUT_S)
    assert got.status_code == 200, got.text
    assert got.json()["data"][0]["b64_json"] == expected


@pytest.mark.slow
def test_overload_is_rejected_at_once_with_retry_after(ray_url):
    answers = asyncio.run(post_all(ray_url, [dict(BODY, steps=LONG_STEPS, seed=i) for i in range(3 * CAPACITY)]))
    ok = [t for status, t, _ in answers if status == 200]
    rejected = [(status, t, h) for status, t, h in answers if status != 200]
    assert {s for s, _, _ in rejected} <= {429, 503}, [s for s, _, _ in answers]
    assert REPLICAS <= len(ok) <= CAPACITY + REPLICAS, [s for s, _, _ in answers]  # a slot may free up meanwhile
    assert all(h.get("retry-after", "").isdigit() for _, _, h in rejected)
    assert max(t for _, t, _ in rejected) < min(ok)  # answered while every admitted generation still ran


@pytest.mark.slow
def test_client_disconnect_cancels_its_job(ray_url):
    wait_for(lambda: sum(s["in_flight"] for s in replica_stats()) == 0, "the replicas idle")  # earlier tests' jobs
    before = sum(s["cancellations"] for s in replica_stats())

    async def disconnect_once_it_runs():
        # the client goes away only once a replica is generating its job (a fixed client timeout raced Ray's
        # routing on a slow VM: the job had not reached a replica when the client left, so nothing was cancelled)
        async with httpx.AsyncClient(base_url=ray_url, timeout=TIMEOUT_S) as client:
            post = asyncio.create_task(client.post("/v1/images/generations",
                                                   json=dict(BODY, steps=900, size="256x256")))
            await asyncio.to_thread(wait_for, lambda: sum(s["in_flight"] for s in replica_stats()) > 0,
                                    "the job generating in a replica")
            assert not post.done(), "900 steps at 256x256 finished before the client could leave"
            post.cancel()  # httpx closes the connection of a cancelled request
            with pytest.raises(asyncio.CancelledError):
                await post

    asyncio.run(disconnect_once_it_runs())
    wait_for(lambda: sum(s["cancellations"] for s in replica_stats()) > before, "a cancellation in a replica")
    wait_for(lambda: sum(s["in_flight"] for s in replica_stats()) == 0, "the cancelled job leaving its slot")
    after = httpx.post(f"{ray_url}/v1/images/generations", json=BODY, timeout=TIMEOUT_S)
    assert after.status_code == 200, after.text  # and the replicas serve on


@pytest.mark.slow
def test_replica_killed_mid_load_answers_every_request(ray_url):
    pids = {s["pid"] for s in replica_stats()}
    assert len(pids) == REPLICAS

    async def load():
        async with httpx.AsyncClient(base_url=ray_url, timeout=TIMEOUT_S) as client:
            statuses: list[int] = []

            async def worker(k: int):
                for i in range(6):
                    r = await client.post("/v1/images/generations", json=dict(BODY, steps=40, seed=10 * k + i))
                    statuses.append(r.status_code)
                    if len(statuses) == 2:  # load is running on both replicas: kill one
                        os.kill(min(pids), signal.SIGKILL)

            await asyncio.gather(*(worker(k) for k in range(REPLICAS)))
            return statuses

    statuses = asyncio.run(load())  # an httpx error here (no answer at all) fails the test
    assert len(statuses) == 6 * REPLICAS
    assert all(s == 200 or 400 <= s < 600 for s in statuses), statuses
    assert statuses.count(200) >= len(statuses) // 2, statuses
    wait_for(lambda: replaced(min(pids)), "Ray replacing the killed replica")
    again = [httpx.post(f"{ray_url}/v1/images/generations", json=dict(BODY, seed=i), timeout=TIMEOUT_S).status_code
             for i in range(REPLICAS)]  # one after another: Ray counts a burst still being routed as queued
    assert again == [200] * REPLICAS


# -- without a Ray cluster -------------------------------------------------------------------------
def test_config_file_args_are_replica_args(tiny_fp32_bundle):
    import yaml

    path = REPO / "deploy" / "ray-serve.yaml"
    file_args = ReplicaArgs.from_dict(yaml.safe_load(path.read_text())["applications"][0]["args"])
    app, http, name, prefix = app_from_config(path, {"bundle": str(tiny_fp32_bundle)}, {})
    deployment = app._bound_deployment  # what Serve will run
    (args,) = deployment.init_args
    assert args == ReplicaArgs(**{**file_args.__dict__, "bundle": str(tiny_fp32_bundle)})
    assert deployment.max_ongoing_requests == args.max_inflight + args.max_queue + CONTROL_SLOTS
    assert deployment.max_queued_requests == args.proxy_queue
    assert deployment.backpressure_config.status_code == 429
    assert deployment._deployment_config.autoscaling_config.min_replicas >= 1
    assert http["host"] == "127.0.0.1" and (name, prefix) == ("ldm", "/")
    with pytest.raises(ValueError, match="unknown max_queu"):
        ReplicaArgs.from_dict({"bundle": "x", "max_queu": 2})


def test_loras_reach_each_replica_by_absolute_path(tiny_fp32_bundle, tmp_path, monkeypatch):
    """``ldm serve --ray --lora FILE:SCALE`` gives every replica the file by its absolute path (a replica may
    run in another folder) and the scale; YAML's [[file, scale]] lists give the same; a bad entry is refused."""
    from ldm_runtime.serve.cli import build_parser
    from ldm_runtime.serve.core import DEFAULT_MAX_BATCH
    from tests.lora_files import write_lora

    write_lora(tmp_path / "style.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight":
            np.zeros((1, 4), np.float32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.lora_up.weight":
            np.zeros((4, 1), np.float32)})
    monkeypatch.chdir(tmp_path)
    a = build_parser(DEFAULT_MAX_BATCH).parse_args([str(tiny_fp32_bundle), "--ray", "--lora", "style.safetensors:0.7"])
    args = ReplicaArgs.from_dict(replica_flags(a.bundle, given_flags(a, only_changed=True)))
    want = ((str(tmp_path / "style.safetensors"), 0.7),)
    assert args.loras == want
    assert ReplicaArgs.from_dict({"bundle": str(tiny_fp32_bundle), "loras": [[want[0][0], 0.7]]}) == args
    assert args.service().loras == list(want)  # the service parsed the file (it opens engines only at start)
    with pytest.raises(ValueError, match=r"loras must be a list of \[file, scale\] pairs, got 'style'"):
        ReplicaArgs.from_dict({"bundle": "x", "loras": "style"})


def test_check_health_fails_once_the_engine_cannot_run(tiny_fp32_bundle):
    server = LdmServer(ReplicaArgs.from_dict({"bundle": str(tiny_fp32_bundle), **ARGS}))
    try:
        asyncio.run(server.check_health())

        class LostEngine:
            inputs = server.service.pipe.engines["text_encoder"].inputs
            outputs = server.service.pipe.engines["text_encoder"].outputs

            def run(self, feeds):
                raise RuntimeError("device lost")

        server.service.pipe.engines["text_encoder"] = LostEngine()
        with pytest.raises(RuntimeError, match="device lost"):
            asyncio.run(server.check_health())
    finally:
        server.service.close()


def test_import_does_not_import_ray():
    code = "import sys, ldm_runtime.serve.ray_app; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_load_script_against_the_single_process_server(tiny_fp32_bundle, tmp_path):
    """bench/load.py starts ``ldm serve``, runs each level to its request bound and reports every answer."""
    cmd = [sys.executable, str(REPO / "bench" / "load.py"), str(tiny_fp32_bundle), "--targets", "single",
           "--concurrency", "1", "--requests", "3", "--steps", "2", "--max-queue", "1", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, cwd=REPO)
    rows = json.loads((tmp_path / "load.json").read_text())["levels"]
    assert [(r["target"], r["concurrency"]) for r in rows] == [("inprocess", 1), ("single", 1), ("single", 2),
                                                               ("single", 4)]  # 1, capacity 2, twice it
    assert all(r["requests"] == 3 and set(r["statuses"]) <= {"200", "429"} for r in rows), rows
    assert rows[1]["statuses"] == {"200": 3} and rows[1]["p50_s"] > 0


def test_ldm_serve_ray_refuses_a_bad_config_in_one_line(tiny_fp32_bundle, tmp_path, capsys):
    from ldm_runtime.cli import main

    config = (REPO / "deploy" / "ray-serve.yaml").read_text().replace("max_queue: 2", "max_queu: 2")
    (tmp_path / "bad.yaml").write_text(config)
    assert main(["serve", str(tiny_fp32_bundle), "--ray", "--ray-config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown max_queu" in err, err
