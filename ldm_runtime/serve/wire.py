"""What both wire formats share: the one error shape, bounded request bodies, and awaiting a job.

Every error is ``{"error": {"message", "type", "param", "code"}}`` (the OpenAI shape, which the
official client reads), ``param`` naming the offending field where there is one.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from ..cancel import Cancelled
from ..cliargs import one_line
from ..pipeline import PipelineInputError
from .core import (JOB_ID, MAX_IMAGES, GenerationRequest, GenerationService, JobIdInUse, JobResult, NotReady,
                   Overloaded)

MAX_BODY_BYTES = 1 << 20  # a request body beyond this is refused (413) before it is read further
DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is still there
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 408: "timeout", 409: "conflict",
               413: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
               500: "server_error", 503: "server_unavailable"}
Model = TypeVar("Model", bound=BaseModel)


class ApiError(Exception):
    """An HTTP error answered in the one error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def service_of(request: Request) -> GenerationService:
    """The app's service, or 503 while there is none or it is not ready."""
    service = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        why = "no service attached" if service is None else (service.error or "warming up")
        raise ApiError(503, f"the server is not ready ({why})", code="not_ready", headers={"Retry-After": "1"})
    return service


async def read_model(request: Request, model: type[Model]) -> Model:
    """The JSON body as ``model``: 413 past ``MAX_BODY_BYTES`` (by Content-Length, then while reading),
    400 for malformed JSON or a field that does not validate (``param`` names it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {declared} bytes; at most {MAX_BODY_BYTES} are accepted",
                       code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks) or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="malformed_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="malformed_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def validation_error(errors: Any) -> ApiError:
    """The first pydantic / FastAPI validation error as a 400 naming its field."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "header")]
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'request'}: {first.get('msg', 'invalid value')}", param=param,
                    code="invalid_value")


def check_count(n: int, param: str) -> None:
    if not 1 <= n <= MAX_IMAGES:
        raise ApiError(400, f"{param}: expected 1 to {MAX_IMAGES} images, got {n}", param=param,
                       code="invalid_value")


def check_size(service: GenerationService, width: int, height: int, param: str) -> None:
    f = service.pipeline.vae_scale_factor
    if width <= 0 or height <= 0 or width % f or height % f:
        raise ApiError(400, f"{param}: width and height must be positive multiples of {f} (the VAE's factor), "
                            f"got {width}x{height}", param=param, code="invalid_size")


def request_job_id(request: Request, chosen: str | None = None) -> str | None:
    """The job id a client chose (``X-Job-Id`` header, else ``chosen`` from the body), checked; None: pick one."""
    job_id = request.headers.get("x-job-id") or chosen
    if job_id is not None and not JOB_ID.fullmatch(job_id):
        raise ApiError(400, f"a job id must be 1 to 64 letters, digits or _.:-, got {job_id!r}", param="force_task_id",
                       code="invalid_value")
    if job_id is not None:
        request.state.job_id = job_id  # answered in the X-Job-Id header (app.JobIdHeader)
    return job_id


def client_of(request: Request) -> str | None:
    return request.client.host if request.client else None


async def run_job(request: Request, service: GenerationService, req: GenerationRequest,
                  job_id: str | None = None) -> tuple[str, JobResult]:
    """Submit ``req`` and await it, cancelling the job when the client goes, the task is cancelled (how Ray
    Serve cancels a request) or ``service.request_timeout_s`` passes; (job id, result) or an ``ApiError``."""
    try:
        job = service.submit(req, client=client_of(request), job_id=job_id)
    except Overloaded as e:
        raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after_s)}) from None
    except NotReady as e:
        raise ApiError(503, f"the server is not ready ({e})", code="not_ready", headers={"Retry-After": "1"}) from None
    except JobIdInUse as e:
        raise ApiError(409, str(e), param="force_task_id", code="job_id_in_use") from None
    except PipelineInputError as e:
        raise ApiError(400, one_line(e), code="invalid_value") from None
    request.state.job_id = job.id
    waiter = asyncio.wrap_future(job.future)
    waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # read even when nobody awaits it
    loop = asyncio.get_running_loop()
    deadline = loop.time() + service.request_timeout_s
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=max(0.0, min(DISCONNECT_POLL_S, deadline - loop.time())))
            if waiter.done():
                break
            if await request.is_disconnected():
                service.cancel(job.id)
                raise ApiError(499, "the client closed the connection", code="client_gone")
            if loop.time() >= deadline:
                service.cancel(job.id)
                raise ApiError(408, f"the request took longer than {service.request_timeout_s:g} s; its job was "
                                    "cancelled", code="timeout")
    except asyncio.CancelledError:
        service.cancel(job.id)
        raise
    return job.id, job_result(waiter)


def job_result(waiter: asyncio.Future) -> JobResult:
    """A finished job's result, or its error as an ``ApiError``."""
    try:
        return waiter.result()
    except Cancelled as e:
        raise ApiError(409, f"the job was cancelled ({e})", code="cancelled") from None
    except PipelineInputError as e:
        raise ApiError(400, one_line(e), code="invalid_value") from None
    except RuntimeError as e:  # NonFiniteOutputError, an engine's failure: one line, never a traceback
        raise ApiError(500, f"generation failed: {one_line(e)}", code="generation_failed") from None
