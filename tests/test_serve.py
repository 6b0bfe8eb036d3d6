"""``ldm serve``: the HTTP server over the tiny bundle, on 127.0.0.1 (port 0) in a background thread.

References: ``ldm generate`` (byte for byte), the same requests sent one by one, the OpenAI error
shape. Generations that must be caught at a known step are held there by the service's ``on_step``
hook (bounded waits), never by timing.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from ldm_runtime.cli import main as ldm_main  # noqa: E402
from ldm_runtime.serve.app import create_app  # noqa: E402
from ldm_runtime.serve.core import GenerationService  # noqa: E402

WAIT_S = 60  # bound of every wait in this file
PROMPT = "a red circle on a blue background"


class Server:
    """uvicorn serving ``create_app(service)`` on 127.0.0.1 in a thread."""

    def __init__(self, service: GenerationService | None):
        self.service = service
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to listen")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=WAIT_S)

    def start_service(self) -> None:
        self.service.start()
        wait_for(lambda: self.service.ready or self.service.error, "the service to warm up")
        assert self.service.ready, self.service.error

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        if self.service is not None:
            self.service.close()


def wait_for(cond, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def served(tiny_fp32_bundle):
    """Batches up to 4 images; readiness recorded before the warm-up started."""
    server = Server(GenerationService(str(tiny_fp32_bundle), max_queue=8, max_batch=4, batch_wait_s=0.05))
    server.ready_before = server.http.get("/health/ready")
    server.start_service()
    yield server
    server.close()


@pytest.fixture(scope="module")
def held(tiny_fp32_bundle):
    """One slot, a queue of 2, no batching: for generations held at a step by ``service.on_step``."""
    server = Server(GenerationService(str(tiny_fp32_bundle), max_inflight=1, max_queue=2, max_batch=1))
    server.start_service()
    yield server
    server.close()


@pytest.fixture
def hold(held):
    """Set a hook on the held server's service for one test; always removed and the generation released."""
    release = threading.Event()
    seen: list[tuple[list, int]] = []

    def set_hook(at_step: int = 0, until=None):
        def hook(jobs, step):  # holds the first job that reaches at_step
            seen.append((jobs, step))
            if step == at_step and jobs[0] is seen[0][0][0]:
                wait_for(lambda: until(jobs) if until else release.is_set(), "the test to release the hook")
        held.service.on_step = hook
        return seen

    yield set_hook, release
    release.set()
    held.service.on_step = None
    wait_for(lambda: metric(held, "ldm_in_flight") == 0 and metric(held, "ldm_queue_depth") == 0,
             "the held server to drain")


def txt2img(server: Server, timeout: float = WAIT_S, headers=None, **body) -> httpx.Response:
    return server.http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3, **body}, timeout=timeout,
                            headers=headers)


def png_of(response: httpx.Response, i: int = 0) -> bytes:
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["images"][i])


def assert_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["param"] == param, err
    assert "Traceback" not in err["message"]


def metric(server: Server, name: str, default: float | None = None) -> float:
    text = server.http.get("/metrics").text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values or default is not None, f"{name} not in /metrics"
    return values[0] if values else default


def test_readiness_503_before_warm_up(served, tiny_fp32_bundle):
    assert_error(served.ready_before, 503, None)
    assert served.http.get("/health/ready").status_code == 200
    unset = Server(None)  # a Ray replica sets app.state.service later
    try:
        assert_error(unset.http.get("/health/ready"), 503, None)
        assert unset.http.get("/health/live").status_code == 200
    finally:
        unset.close()


def test_openai_client_decodes_png_of_the_asked_size(served):
    from openai import BadRequestError, OpenAI
    from PIL import Image

    client = OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=WAIT_S)
    out = client.images.generate(prompt=PROMPT, size="64x48", n=2, response_format="b64_json",
                                 extra_body={"steps": 2, "seed": 11})
    assert len(out.data) == 2
    for item in out.data:
        with Image.open(io.BytesIO(base64.b64decode(item.b64_json))) as im:
            assert im.format == "PNG" and im.size == (64, 48)  # size is WIDTHxHEIGHT
    with pytest.raises(BadRequestError) as e:
        client.images.generate(prompt=PROMPT, size="60x64")  # not a multiple of the VAE factor, 8
    assert e.value.param == "size"


def test_a1111_fixed_seed_matches_ldm_generate(served, tiny_fp32_bundle, tmp_path):
    from ldm_runtime.images import read_parameters

    r = txt2img(served, seed=7, cfg_scale=7.5, batch_size=2)
    info = json.loads(r.json()["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8] and r.headers["x-job-id"] == info["job_id"]
    for i, seed in enumerate((7, 8)):  # image i is `ldm generate --seed <seed + i>`
        out = tmp_path / f"{seed}.png"
        assert ldm_main(["generate", str(tiny_fp32_bundle), PROMPT, "--seed", str(seed), "--steps", "3",
                         "--out", str(out)]) == 0
        assert png_of(r, i) == out.read_bytes()
        assert read_parameters(out)["seed"] == seed


@pytest.mark.parametrize("route,body,param", [
    ("/sdapi/v1/txt2img", b'{"prompt": "x", ', None),
    ("/sdapi/v1/txt2img", b'["not", "an", "object"]', None),
    ("/sdapi/v1/txt2img", {"sampler_name": "Heun++ Turbo"}, "sampler_name"),
    ("/sdapi/v1/txt2img", {"width": 60}, "width"),
    ("/sdapi/v1/txt2img", {"batch_size": 0}, "batch_size"),
    ("/sdapi/v1/txt2img", {"batch_size": 4, "n_iter": 3}, "n_iter"),
    ("/sdapi/v1/txt2img", {"steps": "many"}, "steps"),
    ("/sdapi/v1/txt2img", {"seed": -2}, "seed"),
    ("/sdapi/v1/img2img", {"init_images": [base64.b64encode(b"not an image").decode()]}, "init_images"),
    ("/sdapi/v1/img2img", {"init_images": ["%%% not base64"]}, "init_images"),
    ("/v1/images/generations", {"n": 0}, "n"),
    ("/v1/images/generations", {"n": 11}, "n"),
    ("/v1/images/generations", {"size": "64x60"}, "size"),
    ("/v1/images/generations", {"size": "big"}, "size"),
    ("/v1/images/generations", {"response_format": "url"}, "response_format"),
    ("/v1/images/generations", {"scheduler": "nope"}, "scheduler"),
    ("/v1/images/generations", {"prompt": 5}, "prompt"),
])
def test_bad_request_gets_400_naming_the_field(served, route, body, param):
    if isinstance(body, dict):
        r = served.http.post(route, json={"prompt": PROMPT, **body})
    else:
        r = served.http.post(route, content=body, headers={"content-type": "application/json"})
    assert_error(r, 400, param)
    assert served.http.get("/health/ready").status_code == 200  # and it keeps serving


def test_50_mb_prompt_gets_413_without_being_read(served):
    size = 50 << 20
    with socket.create_connection(("127.0.0.1", served.port), timeout=WAIT_S) as s:
        s.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {size}\r\n\r\n".encode() + b'{"prompt": "' + b"a" * 4096)
        reply = s.recv(65536).decode("latin-1")  # answered though 50 MB minus 4 KB were never sent
    head, _, body = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert txt2img(served, steps=1).status_code == 200


def test_img2img_serves_the_init_image_size(served):
    from PIL import Image

    init = base64.b64encode(png_of(txt2img(served, seed=1, width=48, height=32))).decode()
    r = served.http.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": [init], "steps": 4,
                                                     "denoising_strength": 0.5, "seed": 3})
    with Image.open(io.BytesIO(png_of(r))) as im:
        assert im.size == (48, 32)


def test_concurrent_seeded_requests_equal_serial_ones(served):
    bodies = [dict(seed=1, cfg_scale=7.5), dict(seed=2, cfg_scale=3.0, prompt="a green square"),
              dict(seed=3, cfg_scale=5.0, negative_prompt="blurry"), dict(seed=4, steps=2, sampler_name="Euler a")]
    with ThreadPoolExecutor(len(bodies)) as pool:
        concurrent = [png_of(r) for r in pool.map(lambda b: txt2img(served, **b), bodies)]
    serial = [png_of(txt2img(served, **b)) for b in bodies]
    assert concurrent == serial


def test_batched_pair_equals_unbatched_images(served):
    calls = []
    blocker, release = threading.Event(), threading.Event()

    def hook(jobs, step):
        calls.append([j.id for j in jobs])
        if jobs[0].id == "blocker" and step == 0:
            blocker.set()
            wait_for(release.is_set, "release")

    served.service.on_step = hook
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(txt2img, served, seed=9, steps=2, headers={"X-Job-Id": "blocker"})
            wait_for(blocker.is_set, "the blocker to run")
            pair = [pool.submit(txt2img, served, seed=s, cfg_scale=g, prompt=p, headers={"X-Job-Id": f"pair-{s}"})
                    for s, g, p in ((20, 7.5, PROMPT), (30, 4.0, "a green square"))]
            wait_for(lambda: all((served.service.progress(f"pair-{s}") or {}).get("state") == "queued"
                                 for s in (20, 30)), "the pair to queue")
            release.set()
            batched = [png_of(f.result(WAIT_S)) for f in pair]
            assert first.result(WAIT_S).status_code == 200
    finally:
        served.service.on_step = None
    assert ["pair-20", "pair-30"] in [sorted(c) for c in calls]  # one pipeline call for both
    alone = [png_of(txt2img(served, seed=s, cfg_scale=g, prompt=p))
             for s, g, p in ((20, 7.5, PROMPT), (30, 4.0, "a green square"))]
    assert batched == alone


def test_overload_gives_3_successes_and_5_fast_429s(held, hold):
    set_hook, release = hold
    set_hook(at_step=0)
    rejected_before = metric(held, "ldm_rejections_total")
    answered_429 = 'ldm_requests_total{route="/sdapi/v1/txt2img",status="429"}'
    answered_before = metric(held, answered_429, default=0.0)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(txt2img, held, seed=i) for i in range(8)]
        wait_for(lambda: sum(f.done() for f in futures) >= 5, "5 requests to be answered while the slot is held")
        done = [f.result() for f in futures if f.done()]
        assert [r.status_code for r in done] == [429] * 5
        for r in done:
            assert_error(r, 429, None)
            assert int(r.headers["retry-after"]) >= 1
        release.set()
        statuses = sorted(f.result(WAIT_S).status_code for f in futures)
    assert statuses == [200] * 3 + [429] * 5
    assert metric(held, "ldm_rejections_total") == rejected_before + 5
    assert metric(held, answered_429) == answered_before + 5


def test_disconnect_at_step_k_frees_the_slot_and_counts_a_cancellation(held, hold):
    set_hook, _ = hold
    k = 2
    seen = set_hook(at_step=k, until=lambda jobs: jobs[0].token.cancelled)  # held until the server notices
    cancelled_before = metric(held, "ldm_cancellations_total")
    body = json.dumps({"prompt": PROMPT, "steps": 50, "seed": 1}).encode()
    with socket.create_connection(("127.0.0.1", held.port), timeout=WAIT_S) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: any(step == k for _, step in seen), f"step {k}")
    job = seen[0][0][0]
    wait_for(job.future.done, "the job to stop")
    assert job.state == "cancelled" and job.step == k + 1  # stopped before step k + 2 began
    assert max(step for _, step in seen) == k
    assert metric(held, "ldm_cancellations_total") == cancelled_before + 1
    assert metric(held, "ldm_in_flight") == 0.0
    assert txt2img(held, seed=2).status_code == 200  # the slot is free


def raw_txt2img(server: Server, job_id: str, **body) -> socket.socket:
    """A txt2img request on a socket of its own (closing it is the client leaving)."""
    data = json.dumps({"prompt": PROMPT, "steps": 3, **body}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S)
    s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"X-Job-Id: %s\r\nContent-Length: %d\r\n\r\n" % (job_id.encode(), len(data)) + data)
    return s


def test_a_queued_job_whose_client_left_never_starts(held, hold):
    set_hook, release = hold
    seen = set_hook(at_step=0)
    first = raw_txt2img(held, "first", seed=1)
    wait_for(lambda: seen, "the first job to run")
    raw_txt2img(held, "leaver", seed=2).close()
    wait_for(lambda: (held.service.progress("leaver") or {}).get("state") == "cancelled", "the leaver's cancellation")
    release.set()
    assert first.recv(64).startswith(b"HTTP/1.1 200")
    first.close()
    assert "leaver" not in {job.id for jobs, _ in seen for job in jobs}


def test_a_cancelled_request_task_cancels_its_job(held, hold):
    import asyncio

    set_hook, _ = hold
    set_hook(at_step=0, until=lambda jobs: jobs[0].token.cancelled)

    async def cancel_mid_generation():  # how Ray Serve cancels a request: CancelledError in the handler's task
        transport = httpx.ASGITransport(app=create_app(held.service))
        async with httpx.AsyncClient(transport=transport, base_url="http://ray") as client:
            task = asyncio.ensure_future(client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3},
                                                     headers={"X-Job-Id": "ray-cancelled"}))
            deadline = time.monotonic() + WAIT_S
            while (held.service.progress("ray-cancelled") or {}).get("state") != "running":
                assert time.monotonic() < deadline, "the job did not start"
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(cancel_mid_generation())
    wait_for(lambda: held.service.progress("ray-cancelled")["state"] == "cancelled", "the job to stop")


def test_health_and_metrics_answer_while_a_generation_runs(held, hold):
    set_hook, release = hold
    seen = set_hook(at_step=0)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(txt2img, held, seed=5)
        wait_for(lambda: seen, "the generation to start")
        assert held.http.get("/health/live", timeout=10).status_code == 200
        assert held.http.get("/health/ready", timeout=10).status_code == 200
        assert metric(held, "ldm_in_flight") == 1.0
        release.set()
        assert running.result(WAIT_S).status_code == 200


def test_progress_and_interrupt_act_on_the_callers_own_job(held, hold):
    set_hook, release = hold
    seen = set_hook(at_step=1)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(txt2img, held, seed=6, steps=5, force_task_id="mine")
        wait_for(lambda: len(seen) >= 2, "step 1")
        mine = held.http.get("/sdapi/v1/progress", params={"id_task": "mine"})
        assert mine.headers["x-job-id"] == "mine"
        state = mine.json()["state"]
        assert state["job"] == "mine" and state["sampling_step"] == 2 and state["sampling_steps"] == 5
        other = held.http.get("/sdapi/v1/progress", headers={"X-Job-Id": "someone-else"})
        assert other.json()["state"]["job"] is None
        assert held.http.post("/sdapi/v1/interrupt", headers={"X-Job-Id": "someone-else"}).json()["interrupted"] is False
        r = held.http.post("/sdapi/v1/interrupt", headers={"X-Job-Id": "mine"})
        assert r.json() == {"job": "mine", "interrupted": True}
        release.set()
        assert_error(running.result(WAIT_S), 409, None)


def test_request_timeout_gives_408_and_cancels_the_job(held, hold):
    set_hook, _ = hold
    seen = set_hook(at_step=0, until=lambda jobs: jobs[0].token.cancelled)
    held.service.request_timeout_s = 0.5
    try:
        r = txt2img(held, seed=8)
    finally:
        held.service.request_timeout_s = 600.0
    assert_error(r, 408, None)
    wait_for(seen[0][0][0].future.done, "the job to stop")
    assert seen[0][0][0].state == "cancelled"


def test_ldm_serve_command_line(tmp_path, monkeypatch, capsys):
    import ldm_runtime.serve.cli as serve_cli

    assert ldm_main(["serve", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    def no_uvicorn(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(serve_cli, "import_module", no_uvicorn)
    assert ldm_main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'ldm-runtime[serve]'" in err


def test_runtime_and_generate_import_no_server_libraries():
    code = ("import sys, ldm_runtime, ldm_runtime.generate, ldm_runtime.cli; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'starlette') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_engine_options_reach_the_pipelines_and_bad_ones_fail_at_construction(tiny_fp32_bundle):
    service = GenerationService(str(tiny_fp32_bundle), engine_options={"threads": 1})
    service.start()
    try:
        wait_for(lambda: service.ready or service.error, "the service to open")
        assert service.error is None
        assert service.pipeline.options.threads == 1
        assert service.img2img is not None and service.img2img.options.threads == 1
    finally:
        service.close()
    with pytest.raises(ValueError, match=r"unknown onnxruntime engine options \['thread'\]"):
        GenerationService(str(tiny_fp32_bundle), engine_options={"thread": 1})


# -- LoRAs fused at start ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def style_lora(tiny_fp32_bundle, tmp_path_factory):
    """A kohya LoRA (random, rank 2) on every cross-attention value projection of the tiny U-Net."""
    import numpy as np

    from ldm_runtime.lora_apply import read_lora_map
    from ldm_runtime.manifest import Manifest
    from tests.lora_files import kohya_name, lora_pair, write_lora

    shapes = read_lora_map(Manifest.load(tiny_fp32_bundle, verify=False), "unet")
    rng = np.random.default_rng(11)
    tensors = {}
    for key, (shape, _) in shapes.items():
        if key.endswith("attn2.to_v.weight"):
            name = kohya_name("lora_unet_", key[len("unet."):-len(".weight")])
            down, up = lora_pair(rng, tuple(shape), 2)
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up * 4,
                            f"{name}.alpha": np.array(2.0, dtype=np.float32)})
    assert tensors, "the tiny U-Net should have cross-attention to put the LoRA on"
    return write_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", tensors)


@pytest.fixture(scope="module")
def served_lora(tiny_fp32_bundle, style_lora):
    server = Server(GenerationService(str(tiny_fp32_bundle), max_batch=1, loras=[(str(style_lora), 0.7)]))
    server.start_service()
    yield server
    server.close()


def test_a_lora_fused_at_start_serves_what_ldm_generate_gives_with_it(served_lora, served, style_lora,
                                                                      tiny_fp32_bundle, tmp_path):
    """``ldm serve --lora FILE:0.7``: every image is ``ldm generate --lora FILE:0.7``'s, byte for byte (a
    prompt's matching A1111 tag is removed first, as A1111 removes it), and differs from the plain
    server's; /sdapi/v1/loras names the file with its sha256 and scale."""
    import hashlib

    from ldm_runtime.images import read_parameters

    listed = served_lora.http.get("/sdapi/v1/loras").json()
    assert listed == [{"name": "style", "alias": "style", "path": str(style_lora), "metadata": {}, "scale": 0.7,
                       "sha256": hashlib.sha256(style_lora.read_bytes()).hexdigest()}]
    assert served.http.get("/sdapi/v1/loras").json() == []
    out = tmp_path / "lora.png"
    assert ldm_main(["generate", str(tiny_fp32_bundle), PROMPT, "--seed", "4", "--steps", "3",
                     "--lora", f"{style_lora}:0.7", "--out", str(out)]) == 0
    for prompt in (PROMPT, f"{PROMPT}<lora:style:0.7>"):
        r = txt2img(served_lora, prompt=prompt, seed=4, cfg_scale=7.5)
        assert png_of(r) == out.read_bytes(), prompt
        assert json.loads(r.json()["info"])["prompt"] == prompt  # the infotext keeps the tag, as A1111's does
    assert read_parameters(out)["loras"][0]["scale"] == 0.7
    plain = png_of(txt2img(served, seed=4, cfg_scale=7.5))
    assert plain != out.read_bytes()


@pytest.mark.parametrize("tag,words", [
    ("<lora:style:0.5>", "asks for scale 0.5, but it is fused at 0.7"),
    ("<lora:style>", "asks for scale 1, but it is fused at 0.7"),
    ("<lora:other:0.7>", "is not one of this server's LoRAs"),
    ("<lora:style:te=1:unet=0.7>", "expected <lora:NAME> or <lora:NAME:SCALE>"),
    ("<lora:style:nan>", "expected <lora:NAME> or <lora:NAME:SCALE>"),
])
def test_a_lora_tag_the_server_cannot_honour_is_a_400(served_lora, tag, words):
    r = txt2img(served_lora, prompt=f"{PROMPT} {tag}")
    assert_error(r, 400, "prompt")
    message = r.json()["error"]["message"]
    assert words in message and "fused: style:0.7" in message, message


def test_ldm_serve_refuses_a_bad_lora_in_one_line(tiny_fp32_bundle, tmp_path, capsys):
    not_lora = tmp_path / "x.safetensors"
    not_lora.write_bytes(b"\x80\x04 pickled, not safetensors")
    for args, words in ((["--lora", str(tmp_path / "missing.safetensors")], "missing.safetensors"),
                        (["--lora", str(not_lora)], "x.safetensors"),
                        (["--lora", str(not_lora), "--backend", "openvino"], "not on 'openvino'")):
        assert ldm_main(["serve", str(tiny_fp32_bundle), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
