"""The OpenAI Images API: ``POST /v1/images/generations``, as the official ``openai`` client speaks it.

Takes ``prompt``, ``n``, ``size`` ("WxH" or "auto": the bundle's size), ``response_format``
(``b64_json`` only), ``model`` and ``user`` (accepted, not used), and the extras ``negative_prompt``,
``steps``, ``guidance_scale``, ``seed`` (image i gets ``seed + i``; none: one picked and used) and
``scheduler`` (our scheduler names). Returns ``{"created", "data": [{"b64_json"}]}``.
"""
from __future__ import annotations

import base64
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..schedulers import SCHEDULERS
from .core import GenerationRequest, GenerationService, random_seed
from .wire import ApiError, check_count, check_size, read_model, request_job_id, run_job, service_of

router = APIRouter()


class ImageGenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    n: int = 1
    size: str | None = None
    response_format: str | None = None
    model: str | None = None
    user: str | None = None
    negative_prompt: str | None = None
    steps: int = Field(30, ge=1)
    guidance_scale: float = 7.5
    seed: int | None = Field(None, ge=0)
    scheduler: str | None = None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"WxH"`` -> (width, height); None or "auto": (None, None), the bundle's size."""
    if size is None or size == "auto":
        return None, None
    w, sep, h = size.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise ApiError(400, f"size: expected 'WIDTHxHEIGHT' in pixels (e.g. 512x512) or 'auto', got {size!r}",
                       param="size", code="invalid_size")
    return int(w), int(h)


def to_generation(body: ImageGenerationBody, service: GenerationService) -> GenerationRequest:
    """The body as a ``GenerationRequest``, or a 400 naming the bad field."""
    check_count(body.n, "n")
    if body.response_format not in (None, "b64_json"):
        raise ApiError(400, f"response_format: only 'b64_json' is served, got {body.response_format!r}",
                       param="response_format", code="invalid_value")
    if body.scheduler is not None and body.scheduler not in SCHEDULERS:
        raise ApiError(400, f"scheduler: unknown {body.scheduler!r}; expected one of {', '.join(SCHEDULERS)}",
                       param="scheduler", code="invalid_value")
    dh, dw = service.pipeline.manifest.default_size
    width, height = parse_size(body.size)
    width, height = width or dw, height or dh
    check_size(service, width, height, "size")
    seed = random_seed() if body.seed is None else body.seed
    return GenerationRequest(prompt=body.prompt, seeds=tuple(seed + i for i in range(body.n)),
                             negative_prompt=body.negative_prompt or None, steps=body.steps,
                             guidance_scale=body.guidance_scale, scheduler=body.scheduler,
                             width=width, height=height)


@router.post("/v1/images/generations")
async def images_generations(request: Request) -> JSONResponse:
    service = service_of(request)
    job_id = request_job_id(request)
    body = await read_model(request, ImageGenerationBody)
    req = to_generation(body, service)
    _, result = await run_job(request, service, req, job_id)
    data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in result.pngs]
    return JSONResponse({"created": int(time.time()), "data": data})
