"""The ASGI app of ``ldm serve``: both wire formats, health, metrics, and the one error shape.

Routes read the ``GenerationService`` from ``request.app.state.service``, which may be set after
the app is built (a Ray Serve replica does so in its ``__init__``); until it is set and warm,
``/health/ready`` and the generation routes answer 503.
"""
from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import a1111_api, openai_api
from .core import GenerationService
from .wire import ApiError, error_response, service_of, validation_error

logger = logging.getLogger(__name__)


def create_app(service: GenerationService | None = None) -> FastAPI:
    """The app over ``service`` (None: set ``app.state.service`` later)."""
    app = FastAPI(title="ldm-runtime", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    routers = (openai_api.router, a1111_api.router, health_router)
    for router in routers:
        app.include_router(router)
    add_error_handlers(app)
    app.add_middleware(RequestAccounting, routes=frozenset(r.path for router in routers for r in router.routes
                                                        if isinstance(r, APIRoute)))
    return app


health_router = APIRouter()


@health_router.get("/health/live")
async def live() -> JSONResponse:
    return JSONResponse({"status": "live"})


@health_router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    service_of(request)  # 503 until there is a service and it is warm
    return JSONResponse({"status": "ready"})


@health_router.get("/metrics")
async def metrics(request: Request) -> Response:
    service = request.app.state.service
    return Response(b"" if service is None else service.metrics.exposition(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


def add_error_handlers(app: FastAPI) -> None:
    """Every error in the one shape: ours, FastAPI's validation (400, not 422), HTTP errors, and 500 without
    a traceback."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = validation_error(e.errors())
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        logger.exception("ldm serve: unexpected error on %s", request.url.path)
        return error_response(500, f"internal error ({type(e).__name__})", code="internal_error")


class RequestAccounting:
    """ASGI middleware: counts every answer by route and status, and adds the ``X-Job-Id`` header of the
    request's job (set in ``request.state.job_id``)."""

    def __init__(self, app, routes: frozenset[str]):
        self.app, self.routes = app, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_with_job_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                job_id = scope.get("state", {}).get("job_id")
                if job_id is not None:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-job-id", job_id.encode("ascii"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_job_id)
        except asyncio.CancelledError:  # the server or Ray Serve gave up on the request
            status[0] = 499
            raise
        finally:
            service = scope["app"].state.service if "app" in scope else None
            if service is not None:
                route = scope["path"] if scope["path"] in self.routes else "other"
                service.metrics.requests.labels(route, str(status[0])).inc()
