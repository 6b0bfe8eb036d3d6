"""The AUTOMATIC1111 web UI's API (``/sdapi/v1/...``), as Open WebUI, SD.Next clients and scripts speak it.

``txt2img`` / ``img2img`` take ``prompt``, ``negative_prompt``, ``steps`` (50), ``cfg_scale`` (7),
``sampler_name`` (A1111's names, see ``SAMPLERS``; none: the bundle's scheduler), ``seed``
(-1: random; image i gets ``seed + i``), ``width`` / ``height`` (none: the bundle's size),
``batch_size`` x ``n_iter`` images, ``eta``, ``force_task_id`` (the job's id); img2img adds
``init_images`` (one base64 image, whose size the output takes) and ``denoising_strength`` (0.75).
They return ``{"images", "parameters", "info"}``, ``info`` a JSON string with the seeds used and the
job id. ``progress`` and ``interrupt`` act on the caller's own job only: the one named by the
``X-Job-Id`` header or the ``id_task`` query field, else the caller's address's latest job; an
interrupted generation answers 409 (code ``cancelled``), with no images.

LoRAs: the ones ``ldm serve --lora FILE:SCALE`` fused into the weights at start apply to every
request (``/sdapi/v1/loras`` lists them). A prompt may name them as A1111 does, ``<lora:NAME>`` or
``<lora:NAME:SCALE>`` (NAME the file's stem, SCALE 1 when left out): a tag is removed from the
prompt, as A1111 removes it, when it names a fused LoRA at its fused scale; any other tag is a 400
that says what the server fuses, since weights fused at start cannot change per request.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..schedulers import SCHEDULERS
from .core import GenerationRequest, GenerationService, Job, JobResult, random_seed
from .wire import (ApiError, check_count, check_size, client_of, read_model, request_job_id, run_job,
                   service_of)

router = APIRouter(prefix="/sdapi/v1")

# A1111's sampler names -> our scheduler names (the ones a bundle can run: see schedulers.SCHEDULERS)
SAMPLERS = {"Euler": "euler", "Euler a": "euler_a", "DDIM": "ddim", "PNDM": "pndm", "PLMS": "pndm",
            "DPM++ 2M": "dpmpp_2m", "DPM++ 2M Karras": "dpmpp_2m_karras", "UniPC": "unipc", "LCM": "lcm",
            "TCD": "tcd"}
assert set(SAMPLERS.values()) <= set(SCHEDULERS), "a sampler maps to a scheduler the runtime lacks"


class Txt2ImgBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1)
    sampler_name: str | None = None
    sampler_index: str | None = None  # older clients' name for sampler_name
    scheduler: str | None = None  # A1111 >= 1.9: "Karras" with "DPM++ 2M"; "Automatic" or none otherwise
    steps: int = Field(50, ge=1)
    cfg_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None
    force_task_id: str | None = None


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(default_factory=list)
    denoising_strength: float = 0.75
    mask: str | None = None


def scheduler_for(body: Txt2ImgBody) -> str | None:
    """Our scheduler for the body's sampler (and A1111 scheduler), or a 400 naming the field."""
    name = body.sampler_name or body.sampler_index
    if name is None:
        return None
    if body.scheduler == "Karras" and name == "DPM++ 2M":
        name = "DPM++ 2M Karras"
    elif body.scheduler not in (None, "", "Automatic"):
        raise ApiError(400, f"scheduler: only 'Automatic', or 'Karras' with 'DPM++ 2M', is served, got "
                            f"{body.scheduler!r}", param="scheduler", code="invalid_value")
    if name in SAMPLERS:
        return SAMPLERS[name]
    if name in SCHEDULERS:  # our own names work too
        return name
    raise ApiError(400, f"sampler_name: unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}",
                   param="sampler_name", code="invalid_value")


LORA_TAG = re.compile(r"<lora:([^>]*)>")


def fused_loras(service: GenerationService) -> dict[str, float]:
    """The LoRAs fused at start by name (the file's stem) -> scale."""
    return {Path(path).stem: scale for path, scale in service.loras}


def strip_lora_tags(prompt: str, service: GenerationService) -> str:
    """``prompt`` without its ``<lora:...>`` tags, each checked against the fused LoRAs; or a 400."""
    fused = fused_loras(service)
    have = ", ".join(f"{n}:{s:g}" for n, s in fused.items()) or "none"
    for m in LORA_TAG.finditer(prompt):
        parts = m.group(1).split(":")
        try:
            if len(parts) > 2:
                raise ValueError
            scale = float(parts[1]) if len(parts) == 2 else 1.0
            if not math.isfinite(scale):
                raise ValueError
        except ValueError:
            raise ApiError(400, f"prompt: {m.group(0)}: expected <lora:NAME> or <lora:NAME:SCALE> with SCALE a "
                                f"number (fused: {have})", param="prompt", code="invalid_value") from None
        name = parts[0]
        if name not in fused or abs(scale - fused[name]) > 1e-6:
            what = "is not one of this server's LoRAs" if name not in fused else \
                f"asks for scale {scale:g}, but it is fused at {fused[name]:g}"
            raise ApiError(400, f"prompt: {m.group(0)} {what}; this server fuses its LoRAs into the weights at start, "
                                f"for every request (fused: {have}; start ldm serve with --lora FILE:SCALE for "
                                f"others)", param="prompt", code="invalid_value")
    return LORA_TAG.sub("", prompt)


def decode_image(init_images: list[str]) -> Any:
    """The one base64 image of ``init_images`` (a data URL prefix allowed) as an RGB PIL image, or a 400."""
    from PIL import Image, UnidentifiedImageError

    if len(init_images) != 1:
        raise ApiError(400, f"init_images: expected one base64-encoded image, got {len(init_images)}",
                       param="init_images", code="invalid_image")
    text = init_images[0].split(",", 1)[1] if init_images[0].startswith("data:") else init_images[0]
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
            return im.convert("RGB")
    except (binascii.Error, ValueError, OSError, UnidentifiedImageError) as e:
        raise ApiError(400, f"init_images: not a base64-encoded image ({type(e).__name__})", param="init_images",
                       code="invalid_image") from None


def to_generation(body: Txt2ImgBody, service: GenerationService, init_image: Any = None) -> GenerationRequest:
    """The body as a ``GenerationRequest``, or a 400 naming the bad field."""
    check_count(body.batch_size, "batch_size")
    check_count(body.batch_size * body.n_iter, "n_iter")
    scheduler = scheduler_for(body)
    if init_image is None:
        dh, dw = service.pipeline.manifest.default_size
        width, height, param = body.width or dw, body.height or dh, "width"
    else:
        (width, height), param = init_image.size, "init_images"
    check_size(service, width, height, param)
    seed = random_seed() if body.seed == -1 else body.seed
    strength = body.denoising_strength if isinstance(body, Img2ImgBody) else 0.75
    if not 0.0 < strength <= 1.0:
        raise ApiError(400, f"denoising_strength: expected a value in (0, 1], got {strength}",
                       param="denoising_strength", code="invalid_value")
    return GenerationRequest(prompt=strip_lora_tags(body.prompt, service), seeds=tuple(seed + i for i in range(body.batch_size * body.n_iter)),
                             negative_prompt=body.negative_prompt or None, steps=body.steps,
                             guidance_scale=body.cfg_scale, scheduler=scheduler, width=width, height=height,
                             eta=body.eta or 0.0, init_image=init_image, strength=strength)


def response(body: Txt2ImgBody, req: GenerationRequest, job_id: str, result: JobResult) -> JSONResponse:
    sampler = body.sampler_name or body.sampler_index or result.scheduler
    infotexts = [f"{body.prompt}\nNegative prompt: {req.negative_prompt or ''}\nSteps: {req.steps}, Sampler: {sampler}, "
                 f"CFG scale: {req.guidance_scale:g}, Seed: {seed}, Size: {result.width}x{result.height}"
                 for seed in result.seeds]
    info = {"job_id": job_id, "seed": result.seeds[0], "all_seeds": result.seeds, "prompt": body.prompt,
            "negative_prompt": req.negative_prompt or "", "steps": req.steps, "cfg_scale": req.guidance_scale,
            "sampler_name": sampler, "scheduler": result.scheduler, "width": result.width, "height": result.height,
            "infotexts": infotexts}
    parameters = body.model_dump(exclude={"init_images"})
    return JSONResponse({"images": [base64.b64encode(png).decode("ascii") for png in result.pngs],
                         "parameters": parameters, "info": json.dumps(info)})


@router.post("/txt2img")
async def txt2img(request: Request) -> JSONResponse:
    service = service_of(request)
    body = await read_model(request, Txt2ImgBody)
    job_id = request_job_id(request, body.force_task_id)
    req = to_generation(body, service)
    job_id, result = await run_job(request, service, req, job_id)
    return response(body, req, job_id, result)


@router.post("/img2img")
async def img2img(request: Request) -> JSONResponse:
    service = service_of(request)
    body = await read_model(request, Img2ImgBody)
    job_id = request_job_id(request, body.force_task_id)
    if body.mask is not None:
        raise ApiError(400, "mask: inpainting is not served", param="mask", code="invalid_value")
    if service.img2img is None:
        raise ApiError(400, "init_images: the bundle has no vae_encoder, so it cannot do image-to-image",
                       param="init_images", code="invalid_value")
    req = to_generation(body, service, decode_image(body.init_images))
    job_id, result = await run_job(request, service, req, job_id)
    return response(body, req, job_id, result)


def callers_job(request: Request, service: GenerationService) -> Job | None:
    """The job the caller names (``X-Job-Id`` header, ``id_task`` query field), else its address's latest job."""
    job_id = request.headers.get("x-job-id") or request.query_params.get("id_task")
    return service.job(job_id) if job_id else service.job(client=client_of(request))


@router.get("/progress")
async def progress(request: Request) -> JSONResponse:
    service = service_of(request)
    job = callers_job(request, service)
    p = service.progress(job.id) if job is not None else None
    if job is None or p is None:
        return JSONResponse({"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                             "state": {"job": None, "job_count": 0, "interrupted": False, "skipped": False,
                                       "sampling_step": 0, "sampling_steps": 0}})
    request.state.job_id = job.id
    running = p["running_s"]
    eta = running / p["progress"] - running if p["progress"] > 0 else 0.0
    return JSONResponse({"progress": p["progress"], "eta_relative": eta, "current_image": None,
                         "textinfo": p["state"],
                         "state": {"job": job.id, "job_count": int(p["state"] in ("queued", "running")),
                                   "interrupted": p["state"] == "cancelled", "skipped": False,
                                   "sampling_step": p["step"], "sampling_steps": p["steps"]}})


@router.post("/interrupt")
async def interrupt(request: Request) -> JSONResponse:
    service = service_of(request)
    job = callers_job(request, service)
    if job is None:
        return JSONResponse({"job": None, "interrupted": False})
    request.state.job_id = job.id
    return JSONResponse({"job": job.id, "interrupted": service.cancel(job.id)})


@router.get("/sd-models")
async def sd_models(request: Request) -> JSONResponse:
    service = service_of(request)
    m = service.pipeline.manifest
    name = m.root.name
    return JSONResponse([{"title": f"{name} [{m.sha256[:10]}]", "model_name": name, "hash": m.sha256[:10],
                          "sha256": m.sha256, "filename": str(m.root), "config": None}])


@router.get("/samplers")
async def samplers(request: Request) -> JSONResponse:
    return JSONResponse([{"name": name, "aliases": [ours], "options": {}} for name, ours in SAMPLERS.items()])


@router.get("/loras")
async def loras(request: Request) -> JSONResponse:
    """The LoRAs fused at start (A1111's fields, with the scale and the file's sha256 added)."""
    service = service_of(request)
    fused = service.pipeline.loras
    applied = fused.applied if fused is not None else ()
    return JSONResponse([{"name": Path(a.path).stem, "alias": Path(a.path).stem, "path": str(a.path), "metadata": {},
                          "scale": a.scale, "sha256": a.sha256} for a in applied])
