"""The FastAPI app: the wiring of an ``OODService`` (``service.py``) to routes, middleware and error handlers."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ApiError, error_response
from .keys import ApiKeys
from .metrics import route_template
from .service import ApiLimits, ApiSettings, OODService, ServeLimits

logger = logging.getLogger("negvision.api")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

_SCORE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}, "required": ["files"]}},
            "application/json": {"schema": {"type": "object", "properties": {"images": {"type": "array", "items": {
                "oneOf": [{"type": "string", "description": "base64 image bytes (data: URI prefix allowed)"},
                          {"type": "object", "properties": {"name": {"type": "string"}, "data": {"type": "string"}},
                           "required": ["data"]}]}}}, "required": ["images"]}},
        },
    }
}


def create_app(scorer: Any, *, api_key: str | Sequence[str] | ApiKeys | None = None, threshold: float | None = None,
               calibration: dict | None = None, limits: ApiLimits | None = None, serve: ServeLimits | None = None,
               max_batch: int = 64, batch_wait_ms: float = 5.0, top_k: int = 5, model_name: str | None = None,
               keep_images: bool | None = None) -> FastAPI:
    """A FastAPI app scoring images with ``scorer`` (an ``OODScorer``) through an ``OODService``.

    ``threshold``: a fixed ``is_ood = score < threshold``; ``calibration``: a checked ``calibration.json`` dict
    (its threshold is used); neither: results carry ``is_ood: null`` and ``"threshold": "uncalibrated"``.
    ``keep_images``: hand PIL images to the scorer (an ANTS describer that looks at images); default: only when the
    scorer's describer needs them. The other arguments are ``ApiSettings`` fields.
    """
    settings = ApiSettings(keys=ApiKeys.of(api_key), threshold=threshold, calibration=calibration,
                           limits=limits or ApiLimits(), serve=serve or ServeLimits(), max_batch=max_batch,
                           batch_wait_ms=batch_wait_ms, top_k=top_k, model_name=model_name, keep_images=keep_images)
    service = OODService(scorer, settings)
    app = FastAPI(title="negvision OOD scoring API", version="1",
                  description="Zero-shot OOD scores with CLIP and negative labels (NegLabel / ANTS).")
    app.state.service = service
    app.state.batcher, app.state.scorer, app.state.metrics, app.state.settings = (
        service.batcher, scorer, service.metrics, settings)
    _observe_requests(app, service)
    _answer_errors_as_json(app, service)

    @app.post("/v1/score", openapi_extra=_SCORE_BODY, summary="Score images (multipart 'files' or JSON base64)")
    async def score(request: Request) -> dict:
        service.authorize(request)
        return await service.handle(request)

    @app.get("/v1/labels", summary="ID class names and negative labels in use")
    async def labels(request: Request) -> dict:
        service.authorize(request)
        return service.labels()

    @app.post("/v1/reset", summary="Reset the ANTS test-time state (of this worker process)")
    async def reset(request: Request) -> dict:
        service.authorize(request)
        return await service.reset()

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict:
        return service.health()

    @app.get("/readyz", summary="Readiness: model loaded, worker alive, no run of model errors")
    async def readyz():
        return service.ready()

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics_page(request: Request) -> Response:
        service.authorize(request)
        body, ctype = service.metrics_page()
        return Response(body, media_type=ctype)

    return app


def request_id(request: Request) -> str:
    """The client's ``X-Request-ID`` when it is a safe token (letters, digits, ``._:-``, at most 64), else a new one."""
    rid = request.headers.get("x-request-id", "")
    return rid if _REQUEST_ID_OK.match(rid) else uuid.uuid4().hex


def _observe_requests(app: FastAPI, service: OODService) -> None:
    """Middleware: a request id on every request and response, a JSON 500 for anything unexpected (traceback in
    the log), the request counted and timed by route template."""

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        rid = request_id(request)
        request.state.request_id = rid
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as e:  # anything unexpected: a JSON 500, logged with its traceback
            logger.error("unhandled error in %s %s (request %s)", request.method, request.url.path, rid, exc_info=e)
            response = error_response(500, f"internal error ({type(e).__name__}); see the server log for request {rid}",
                                      rid)
        service.observe_request(route_template(app, request.scope), request.method, response.status_code,
                                time.perf_counter() - t0)
        response.headers["X-Request-ID"] = rid
        return response


def _answer_errors_as_json(app: FastAPI, service: OODService) -> None:
    """Exception handlers: every error in the one JSON shape (``errors.error_response``) with the request id."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        rid = getattr(request.state, "request_id", None)
        if exc.status_code >= 400 and request.url.path == "/v1/score":
            service.count_rejected(exc.code)
        return error_response(exc.status_code, exc.message, rid, exc.code, exc.headers, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            msg = "no such route (see /docs)"
        return error_response(exc.status_code, msg, getattr(request.state, "request_id", None),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid request", getattr(request.state, "request_id", None),
                              details=[{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()])
