"""The server's core, free of any wire format: requests, jobs, admission, batching and cancellation.

A ``GenerationService`` owns one ``Pipeline`` (and an ``Img2ImgPipeline`` when the bundle has a
``vae_encoder``) and ``max_inflight`` worker threads; generation never runs on the caller's
thread. A job is admitted while fewer than ``max_inflight + max_queue`` jobs are waiting or
running (a batch counts once); beyond that ``submit`` raises ``Overloaded`` at once. Jobs that
wait together and share everything but prompt, negative prompt, guidance scale and seeds run as
one pipeline call of up to ``max_batch`` images; each image equals the one the job would get
alone. Each job has its own cancel token: a cancelled queued job never starts, and a running
batch stops at its next step once all its jobs are cancelled.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Callable

from ..backends import LORA_BACKENDS
from ..backends import engine_options as engine_opts
from ..cancel import Cancelled, CancelToken
from ..generate import png_parameters
from ..images import png_bytes
from ..lora import read_lora
from ..lora_apply import check_lora_specs
from ..pipeline import Img2ImgPipeline, Pipeline, PipelineInputError
from .metrics import Metrics

logger = logging.getLogger(__name__)

# measured on the default model, fp32 onnxruntime on a 2-core CPU (README "ldm serve"): batches of 4
# gave more images/s than batches of 2, and both more than one image per call
DEFAULT_MAX_BATCH = 4
MAX_IMAGES = 10  # images one request may ask for (the OpenAI Images API's bound on n)
JOB_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
KEEP_FINISHED = 256  # finished jobs kept for progress queries


class Overloaded(Exception):
    """Every slot and the queue are full; try again after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: int, message: str):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(Exception):
    """The service has not finished opening its engines and warming up (or failed to)."""


class JobIdInUse(ValueError):
    """A client-chosen job id that another job already has."""


@dataclass(frozen=True)
class GenerationRequest:
    """One request, whatever its wire format. Image i is generated with ``seeds[i]``; ``init_image`` (a PIL
    image) makes it image-to-image at ``strength``, at the image's size. None: the bundle's size and scheduler."""

    prompt: str
    seeds: tuple[int, ...]
    negative_prompt: str | None = None
    steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    eta: float = 0.0
    init_image: Any = None
    strength: float = 0.75

    @property
    def kind(self) -> str:
        return "txt2img" if self.init_image is None else "img2img"

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        return (self.kind, self.width, self.height, self.steps, self.scheduler, self.guidance_scale > 1.0, self.eta,
                None if self.init_image is None else self.strength)


@dataclass
class JobResult:
    """A finished job: one PNG per seed (each carrying its ``parameters`` chunk), and what the call used."""

    pngs: list[bytes]
    seeds: list[int]
    scheduler: str
    width: int
    height: int


@dataclass(eq=False)
class Job:
    """One admitted request: its id, the client that sent it, its cancel token, progress and result."""

    id: str
    request: GenerationRequest
    client: str | None
    token: CancelToken = field(default_factory=CancelToken)
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    step: int = 0  # inference steps done

    @property
    def total_steps(self) -> int:
        r = self.request
        return r.steps if r.init_image is None else max(1, int(r.steps * r.strength))

    @property
    def state(self) -> str:
        if self.future.done():
            return "cancelled" if isinstance(self.future.exception(), Cancelled) else "done"
        if self.token.cancelled:
            return "cancelled"
        return "queued" if self.started is None else "running"


class BatchToken:
    """The cancel token of one pipeline call over several jobs: set once every job's token is."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    @property
    def cancelled(self) -> bool:
        return all(j.token.cancelled for j in self.jobs)


def random_seed() -> int:
    """A seed for a request that gave none (reported back, so the image can be made again)."""
    return secrets.randbelow(2**31)


class GenerationService:
    """Generation for a server: ``start()``, then ``submit`` requests and await their jobs' futures.

    ``on_step(jobs, step)`` runs in the worker after every inference step of a call (tests use it to
    hold a generation at a known step). ``request_timeout_s`` is read by the HTTP layer.
    """

    def __init__(self, bundle: str, backend: str = "onnxruntime", device: str = "cpu", max_inflight: int = 1,
                 max_queue: int = 8, max_batch: int = DEFAULT_MAX_BATCH, batch_wait_s: float = 0.01,
                 request_timeout_s: float = 600.0, on_step: Callable[[list[Job], int], None] | None = None,
                 engine_options: dict[str, Any] | None = None, loras: Sequence[tuple[str, float]] = ()):
        for name, value, low in (("max_inflight", max_inflight, 1), ("max_queue", max_queue, 0),
                                 ("max_batch", max_batch, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not batch_wait_s >= 0 or not request_timeout_s > 0:
            raise ValueError(f"batch_wait_s must be >= 0 and request_timeout_s > 0, got {batch_wait_s!r} and "
                             f"{request_timeout_s!r}")
        self.bundle, self.backend, self.device = str(bundle), backend, device
        # fields of the backend's options (onnxruntime: OrtOptions, e.g. threads=2); checked here, not at start()
        self.engine_options = dict(engine_options or {})
        try:
            engine_opts(backend, None, **self.engine_options)
        except TypeError as e:  # an unknown option name
            raise ValueError(str(e)) from None
        # (file, scale) pairs fused into the weights for every request; each file is parsed now, so a bad
        # one is an error here, not a server that never gets ready (the bundle check comes at start())
        try:
            self.loras = check_lora_specs(list(loras))
        except TypeError as e:
            raise ValueError(str(e)) from None
        if self.loras and backend not in LORA_BACKENDS:
            raise ValueError(f"loras: LoRAs are applied on backends {', '.join(LORA_BACKENDS)}, not on {backend!r}")
        for path, _ in self.loras:
            read_lora(path)
        self.max_inflight, self.max_queue, self.max_batch = max_inflight, max_queue, max_batch
        self.batch_wait_s, self.request_timeout_s, self.on_step = batch_wait_s, request_timeout_s, on_step
        self.pipe: Pipeline | None = None
        self.img2img: Img2ImgPipeline | None = None
        self.ready = False
        self.error: str | None = None  # why start() failed
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._busy = 0  # workers inside a pipeline call
        self._running = 0  # jobs inside a pipeline call
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._latest: dict[str | None, str] = {}  # client -> id of its latest job
        self._mean_call_s: float | None = None
        self._closed = False
        self._threads: list[threading.Thread] = []
        self.metrics = Metrics(queue_depth=lambda: len(self._pending), in_flight=lambda: self._running)

    @property
    def pipeline(self) -> Pipeline:
        """The text-to-image pipeline; ``NotReady`` before ``start()`` opened it."""
        if self.pipe is None:
            raise NotReady(self.error or "the engines are still opening and warming up")
        return self.pipe

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the engines and warm up in a background thread; ``ready`` turns true once both are done."""
        t = threading.Thread(target=self._open_and_warm, name="ldm-serve-warmup", daemon=True)
        self._threads.append(t)
        t.start()

    def _open_and_warm(self) -> None:
        try:
            self.pipe = Pipeline.load(self.bundle, backend=self.backend, device=self.device,
                                      loras=self.loras or None, **self.engine_options)
            self.pipe.open_engines()
            if self.pipe.manifest.has("vae_encoder"):
                self.img2img = Img2ImgPipeline.load(self.bundle, backend=self.backend, device=self.device,
                                                    **self.engine_options)
                self.img2img.loras = self.pipe.loras  # fused once; the engines it shares carry them
                self.img2img.engines.update(self.pipe.engines)  # one engine per component for both
                self.img2img.open_engines()
            self.pipe("warm-up", num_inference_steps=2, seed=0, output_type="np")  # the default size
        except Exception as e:
            logger.exception("ldm serve: opening %s failed", self.bundle)
            self.error = f"{type(e).__name__}: {e}"
            return
        for i in range(self.max_inflight):
            t = threading.Thread(target=self._work, name=f"ldm-serve-worker-{i}", daemon=True)
            self._threads.append(t)
            t.start()
        self.ready = True

    def close(self) -> None:
        """Cancel every job and stop the workers."""
        with self._cond:
            self._closed = True
            jobs = list(self._jobs.values())
            self._cond.notify_all()
        for job in jobs:
            self.cancel(job.id)
        for t in self._threads:
            t.join(timeout=30)

    # -- jobs ------------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest, client: str | None = None, job_id: str | None = None) -> Job:
        """Admit ``req`` as a job (its id ``job_id`` if given) or raise ``Overloaded`` / ``NotReady`` at once."""
        if not self.ready:
            raise NotReady(self.error or "the engines are still opening and warming up")
        req = self._resolve(req)
        with self._cond:
            if self._closed:
                raise NotReady("the service is shutting down")
            if job_id is not None and job_id in self._jobs and not self._jobs[job_id].future.done():
                raise JobIdInUse(f"a job with id {job_id!r} is queued or running already")
            if len(self._pending) + self._busy >= self.max_inflight + self.max_queue:
                self.metrics.rejections.inc()
                raise Overloaded(self._retry_after_s(),
                                 f"the server is full: {self._busy} of {self.max_inflight} slots busy and "
                                 f"{len(self._pending)} of {self.max_queue} queue places taken")
            job = Job(id=job_id or uuid.uuid4().hex, request=req, client=client)
            self._pending.append(job)
            self._remember(job)
            self._cond.notify_all()
        return job

    def _resolve(self, req: GenerationRequest) -> GenerationRequest:
        """The bundle's defaults in place of None: size (img2img: the image's), scheduler."""
        if req.init_image is not None:
            if self.img2img is None:
                raise PipelineInputError("the bundle has no vae_encoder, so it cannot do image-to-image")
            width, height = req.init_image.size
        else:
            height, width = self.pipeline.manifest.default_size
            height, width = req.height or height, req.width or width
        return dataclasses.replace(req, width=width, height=height,
                                   scheduler=req.scheduler or self.pipeline.scheduler_name)

    def _remember(self, job: Job) -> None:
        """Keep ``job`` for lookups (a finished job's id may be reused), and at most ``KEEP_FINISHED`` others."""
        self._jobs.pop(job.id, None)
        self._jobs[job.id] = job
        self._latest[job.client] = job.id
        while len(self._jobs) > KEEP_FINISHED:
            old = next((j for j in self._jobs.values() if j.future.done()), None)
            if old is None:
                break
            del self._jobs[old.id]
            if self._latest.get(old.client) == old.id:
                del self._latest[old.client]

    def _retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the work ahead over the slots, at least 1."""
        ahead = (len(self._pending) + self._busy) / self.max_inflight
        return max(1, math.ceil(ahead * (self._mean_call_s or 1.0)))

    def job(self, job_id: str | None = None, client: str | None = None) -> Job | None:
        """The job with ``job_id``; without an id, ``client``'s latest job."""
        with self._cond:
            if job_id is None:
                job_id = self._latest.get(client)
            return self._jobs.get(job_id) if job_id is not None else None

    def cancel(self, job_id: str) -> bool:
        """Cancel a job: a queued one never starts, a running one stops at its next step. False: no such job,
        or it is finished or cancelled already."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.future.done() or job.token.cancelled:
                return False
            job.token.cancel()
            self.metrics.cancellations.inc()
            if job in self._pending:
                self._pending.remove(job)
                job.future.set_exception(Cancelled("cancelled before it started"))
            self._cond.notify_all()
        return True

    def progress(self, job_id: str) -> dict[str, Any] | None:
        """A job's state, steps done and total, and seconds since it was submitted; None: no such job."""
        job = self.job(job_id)
        if job is None:
            return None
        return {"id": job.id, "state": job.state, "step": job.step, "steps": job.total_steps,
                "progress": job.step / job.total_steps if job.state != "done" else 1.0,
                "queued_s": (job.started or time.monotonic()) - job.submitted,
                "running_s": 0.0 if job.started is None else time.monotonic() - job.started}

    # -- workers ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            try:
                self._run(jobs)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._running -= len(jobs)
                    self._cond.notify_all()

    def _next_batch(self) -> list[Job] | None:
        """Wait for jobs, give compatible ones ``batch_wait_s`` to gather, take a batch; None once closed."""
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                deadline = time.monotonic() + self.batch_wait_s
                while (self.max_batch > 1 and self._pending and self._batch_images() < self.max_batch
                       and not self._closed and (left := deadline - time.monotonic()) > 0):
                    self._cond.wait(left)
                jobs = self._take_batch()
                if jobs:
                    self._busy += 1
                    self._running += len(jobs)
                    return jobs

    def _compatible(self) -> list[Job]:
        """The first waiting job and those after it that can join its call, within ``max_batch`` images."""
        if not self._pending:
            return []
        first = self._pending[0]
        batch, images = [first], len(first.request.seeds)
        for job in list(self._pending)[1:]:
            n = len(job.request.seeds)
            if job.request.batch_key() == first.request.batch_key() and images + n <= self.max_batch:
                batch.append(job)
                images += n
        return batch

    def _batch_images(self) -> int:
        return sum(len(j.request.seeds) for j in self._compatible())

    def _take_batch(self) -> list[Job]:
        jobs = self._compatible()
        now = time.monotonic()
        for job in jobs:
            self._pending.remove(job)
            job.started = now
            self.metrics.queue_wait.observe(now - job.submitted)
        return jobs

    def _run(self, jobs: list[Job]) -> None:
        """One pipeline call for ``jobs``; each job's future gets its result or its error."""
        t0 = time.monotonic()
        try:
            results = self._generate(jobs)
        except PipelineInputError as e:
            if len(jobs) > 1:  # one bad member: each job alone, so each gets its own answer
                for job in jobs:
                    self._run([job])
                return
            return self._settle(jobs, error=e)
        except Exception as e:  # Cancelled, an engine's failure: every job of the call gets it
            if not isinstance(e, Cancelled):
                logger.exception("ldm serve: generation failed")
            return self._settle(jobs, error=e)
        elapsed = time.monotonic() - t0
        self.metrics.generation.observe(elapsed)
        self._mean_call_s = elapsed if self._mean_call_s is None else 0.8 * self._mean_call_s + 0.2 * elapsed
        for job, result in zip(jobs, results):
            if job.token.cancelled:  # left while its batch ran on: its images are dropped
                self._settle([job], error=Cancelled("cancelled while its batch ran"))
            else:
                self.metrics.images.labels(job.request.kind).inc(len(result.pngs))
                self._settle([job], result=result)

    def _settle(self, jobs: list[Job], result: JobResult | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            for job in jobs:
                if not job.future.done():
                    if error is None:
                        job.future.set_result(result)
                    else:
                        job.future.set_exception(error)

    def _generate(self, jobs: list[Job]) -> list[JobResult]:
        """The batched call: one prompt, negative prompt, guidance scale and seed per image."""
        first = jobs[0].request
        per_image = [(j.request, s) for j in jobs for s in j.request.seeds]
        negatives = [r.negative_prompt or "" for r, _ in per_image]

        def on_step(step: int, timestep: Any, latents: Any) -> None:
            for job in jobs:
                job.step = step + 1
            if self.on_step is not None:
                self.on_step(jobs, step)

        kwargs: dict[str, Any] = dict(
            negative_prompt=negatives if any(negatives) else None, num_inference_steps=first.steps,
            guidance_scale=[r.guidance_scale for r, _ in per_image], scheduler=first.scheduler,
            seed=[s for _, s in per_image], callback=on_step, eta=first.eta, cancel=BatchToken(jobs))
        prompts = [r.prompt for r, _ in per_image]
        if first.init_image is None:
            out = self.pipeline(prompts, height=first.height, width=first.width, **kwargs)
        else:
            assert self.img2img is not None
            out = self.img2img(prompts, image=[r.init_image for r, _ in per_image], strength=first.strength,
                               **kwargs)
        assert out.seeds is not None
        images = iter(zip(out.images, out.seeds))
        return [self._result(job.request, [next(images) for _ in job.request.seeds], out) for job in jobs]

    def _result(self, req: GenerationRequest, images: list[tuple[Any, int]], out: Any) -> JobResult:
        pngs = []
        for image, seed in images:
            params = png_parameters(self.pipeline, prompt=req.prompt, negative_prompt=req.negative_prompt, seed=seed,
                                    steps=req.steps, scheduler=out.scheduler, eta=req.eta,
                                    guidance_scale=req.guidance_scale, guidance_rescale=0.0, height=out.height,
                                    width=out.width, num_images=1)
            if req.init_image is not None:
                params["strength"] = req.strength
            pngs.append(png_bytes(image, {**params, "index": 0}))
        return JobResult(pngs=pngs, seeds=[s for _, s in images], scheduler=out.scheduler, width=out.width,
                         height=out.height)
