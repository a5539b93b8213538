"""The FastAPI app: routes, middleware (request id, metrics, JSON 500s), limits, back-pressure, timeouts."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .batcher import MicroBatcher, QueueFullError
from .errors import ApiError, error_response
from .keys import ApiKeys, _as_keys, _check_key
from .metrics import ApiMetrics, route_template
from .uploads import PixelBudget, Upload, decode_opened, open_header, parse_json, parse_multipart

logger = logging.getLogger("negvision.api")

UNCALIBRATED = "uncalibrated"


@dataclass
class ApiLimits:
    """Per-request limits, all checked before decoding; exceeding one gives a 4xx naming the limit."""

    max_images: int = 32
    max_request_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000  # one image (decompression bombs)
    max_request_pixels: int = 64_000_000  # all images of one request together


@dataclass
class ServeLimits:
    """Back-pressure and failure handling of one server process."""

    max_queue: int = 256  # images waiting for the encoder; more -> 503 + Retry-After
    timeout_s: float = 30.0  # one request, from arrival to answer; more -> 504
    max_failures: int = 3  # consecutive model errors before /readyz says 503
    decode_threads: int = 2  # threads parsing bodies and decoding images
    retry_after_s: int = 1


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


@dataclass
class _State:
    keys: ApiKeys
    limits: ApiLimits
    serve: ServeLimits
    threshold: float | None
    calibration: dict | None
    model_name: str


def create_app(scorer: Any, *, api_key: str | Sequence[str] | ApiKeys | None = None, threshold: float | None = None,
               calibration: dict | None = None, limits: ApiLimits | None = None, serve: ServeLimits | None = None,
               max_batch: int = 64, batch_wait_ms: float = 5.0, top_k: int = 5, model_name: str | None = None,
               keep_images: bool | None = None) -> FastAPI:
    """A FastAPI app scoring images with ``scorer`` (an ``OODScorer``); see the module docstring.

    ``threshold``: a fixed ``is_ood = score < threshold``; ``calibration``: a checked ``calibration.json`` dict
    (its threshold is used); neither: results carry ``is_ood: null`` and ``"threshold": "uncalibrated"``.
    ``keep_images``: hand PIL images to the scorer (an ANTS describer that looks at images); default: only when the
    scorer's describer needs them.
    """
    if threshold is not None and calibration is not None:
        raise ValueError("give a threshold or a calibration, not both")
    limits = limits or ApiLimits()
    serve = serve or ServeLimits()
    thr = float(calibration["threshold"]) if calibration is not None else threshold
    st = _State(_as_keys(api_key), limits, serve, thr, calibration,
                model_name or getattr(scorer.encoder, "cache_key", type(scorer.encoder).__name__).split("|")[0])
    app = FastAPI(title="negvision OOD scoring API", version="1",
                  description="Zero-shot OOD scores with CLIP and negative labels (NegLabel / ANTS).")
    metrics = ApiMetrics()
    if keep_images is None:
        describer = getattr(getattr(scorer, "ants", None), "describer", None)
        keep_images = describer is not None and bool(getattr(describer, "needs_images", True))
    preprocess = scorer.encoder.preprocess
    decode_pool = ThreadPoolExecutor(max_workers=max(1, serve.decode_threads), thread_name_prefix="ood-decode")
    budget = PixelBudget(max(limits.max_pixels, 2 * max(1, serve.decode_threads) * 4_000_000))

    def _score_batch(items: list) -> list[dict]:
        import torch

        pixels = torch.stack([t for t, _ in items])
        images = [im for _, im in items] if keep_images else None
        r = scorer.score_pixels(pixels, images=images, top_neg=top_k)
        return [{"score": float(r.scores[i]), **scorer.describe(r, i, top_k)} for i in range(len(items))]

    def _on_batch(n: int, dt: float) -> None:
        metrics.batch_size.observe(n)
        metrics.encoder_seconds.observe(dt)

    batcher = MicroBatcher(_score_batch, max_batch=max_batch, wait_ms=batch_wait_ms, max_queue=serve.max_queue,
                           on_batch=_on_batch)
    app.state.batcher, app.state.scorer, app.state.metrics, app.state.settings = batcher, scorer, metrics, st

    def _prepare(body: bytes, ctype: str) -> tuple[list[Upload], list]:
        """In a pool thread: parse, check every header against the limits, then decode + preprocess one by one."""
        ups = parse_multipart(body, ctype, limits.max_images) if ctype.startswith("multipart/") else \
            parse_json(body, limits.max_images)
        opened = [open_header(u.data, u.name, limits.max_pixels) for u in ups]
        total = sum(im.size[0] * im.size[1] for im in opened)
        if total > limits.max_request_pixels:
            raise ApiError(413, f"{len(ups)} images of {total} pixels in all exceed the per-request limit of "
                           f"{limits.max_request_pixels} pixels", limit=limits.max_request_pixels,
                           limit_name="max_request_pixels")
        items = []
        for u, im in zip(ups, opened, strict=True):
            n = budget.acquire(im.size[0] * im.size[1])
            try:
                rgb = decode_opened(im, u.name)
                tensor = preprocess(rgb)
                small = None
                if keep_images:
                    small = rgb.copy()
                    small.thumbnail((768, 768))
            finally:
                budget.release(n)
            items.append((tensor, small))
            u.data = b""  # the bytes are no longer needed
        return ups, items

    def _ready() -> tuple[bool, dict]:
        h = batcher.health
        stuck = h.busy_since is not None and time.monotonic() - h.busy_since > max(2 * serve.timeout_s, 10.0)
        info = {"model_loaded": scorer is not None, "worker_alive": batcher.alive and not stuck,
                "consecutive_failures": h.consecutive_failures, "max_failures": serve.max_failures,
                "queue_images": batcher.pending, "max_queue": serve.max_queue}
        ok = info["model_loaded"] and info["worker_alive"] and h.consecutive_failures < serve.max_failures
        if h.last_error and not ok:
            info["last_error"] = h.last_error
        return ok, info

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        rid = request.headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID_OK.match(rid) else uuid.uuid4().hex
        request.state.request_id = rid
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as e:  # anything unexpected: a JSON 500, logged with its traceback
            logger.error("unhandled error in %s %s (request %s)", request.method, request.url.path, rid, exc_info=e)
            response = error_response(500, f"internal error ({type(e).__name__}); see the server log for request {rid}",
                                      rid)
        route = route_template(app, request.scope)
        method = request.method if request.method in ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE") else "other"
        metrics.requests.labels(route, method, f"{response.status_code // 100}xx").inc()
        metrics.latency.labels(route, method).observe(time.perf_counter() - t0)
        response.headers["X-Request-ID"] = rid
        return response

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        rid = getattr(request.state, "request_id", None)
        if exc.status_code >= 400 and request.url.path == "/v1/score":
            metrics.rejected.labels(exc.code).inc()
        return error_response(exc.status_code, exc.message, rid, exc.code, exc.headers, **exc.extra)

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

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

    async def _read_body(request: Request) -> bytes:
        cl = request.headers.get("content-length")
        lim = limits.max_request_bytes
        if cl is not None:
            try:
                n = int(cl)
            except ValueError as e:
                raise ApiError(400, "bad Content-Length header") from e
            if n > lim:
                raise ApiError(413, f"request body of {n} bytes exceeds the limit of {lim}", limit=lim,
                               limit_name="max_request_bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > lim:
                raise ApiError(413, f"request body exceeds the limit of {lim} bytes", limit=lim,
                               limit_name="max_request_bytes")
        return bytes(body)

    def _busy(msg: str) -> ApiError:
        return ApiError(503, msg, "overloaded", headers={"Retry-After": str(serve.retry_after_s)})

    async def _handle(request: Request, rid: str) -> dict:
        ctype = request.headers.get("content-type", "").lower()
        if not (ctype.startswith("multipart/form-data") or ctype.startswith("application/json")):
            raise ApiError(415, "send multipart/form-data (parts named 'files') or application/json with base64 images")
        if not batcher.room_for(1):
            raise _busy(f"the scoring queue is full ({batcher.pending} images); retry later")
        body = await _read_body(request)
        loop = asyncio.get_running_loop()
        ups, items = await loop.run_in_executor(decode_pool, _prepare, body, request.headers.get("content-type", ""))
        del body
        metrics.queue.set(batcher.pending)
        try:
            results = await batcher.submit(items, rid)
        except QueueFullError as e:
            raise _busy(f"the scoring queue is full ({e}); retry later") from None
        except Exception as e:
            metrics.model_errors.inc()
            raise ApiError(500, f"the model failed on this batch ({type(e).__name__}); see the server log for "
                           f"request {rid}", "model_error") from e
        finally:
            metrics.queue.set(batcher.pending)
        out = []
        n_ood = 0
        for u, r in zip(ups, results, strict=True):
            is_ood = None if st.threshold is None else bool(r["score"] < st.threshold)
            n_ood += bool(is_ood)
            out.append({"index": u.index, "field": u.field, "filename": u.filename, "name": u.name,
                        "score": r["score"], "is_ood": is_ood, "top_classes": r["top_classes"],
                        "nearest_negatives": r["nearest_negatives"]})
        metrics.images.inc(len(out))
        metrics.ood.inc(n_ood)
        return {"model": st.model_name, "method": scorer.method,
                "threshold": UNCALIBRATED if st.threshold is None else st.threshold,
                "threshold_source": ("calibration" if calibration is not None else
                                     "fixed" if st.threshold is not None else None),
                "request_id": rid, "results": out}

    @app.post("/v1/score", openapi_extra=_SCORE_BODY, summary="Score images (multipart 'files' or JSON base64)")
    async def score(request: Request) -> dict:
        _check_key(request, st.keys)
        rid = request.state.request_id
        try:
            return await asyncio.wait_for(_handle(request, rid), serve.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"request not answered within {serve.timeout_s:g} s; retry later or raise --timeout",
                           limit=serve.timeout_s, limit_name="timeout_s") from None

    @app.get("/v1/labels", summary="ID class names and negative labels in use")
    async def labels(request: Request) -> dict:
        _check_key(request, st.keys)
        out: dict[str, Any] = {"method": scorer.method, "id_labels": scorer.id_labels,
                               "negative_labels": scorer.negatives.words,
                               "threshold": UNCALIBRATED if st.threshold is None else st.threshold}
        if hasattr(scorer, "settings"):
            out["settings"] = scorer.settings()
        if calibration is not None:
            out["calibration"] = {k: v for k, v in calibration.items() if k != "labels"}
        if scorer.ants is not None:
            out["ants"] = {"far_sentences": len(scorer.ants.far_texts), "near_labels": scorer.ants.near_texts,
                           "lambda": scorer.ants.lambda_, "tau": scorer.ants.tau, "scope": "this worker process"}
        return out

    @app.post("/v1/reset", summary="Reset the ANTS test-time state (of this worker process)")
    async def reset(request: Request) -> dict:
        _check_key(request, st.keys)
        if scorer.ants is None:
            raise ApiError(409, f"method '{scorer.method}' has no test-time state to reset")
        await batcher.run_exclusive(scorer.ants.reset)
        return {"reset": True, "pid": os.getpid()}

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "ok", "method": scorer.method, "id_classes": len(scorer.id_labels), "pid": os.getpid()}

    @app.get("/readyz", summary="Readiness: model loaded, worker alive, no run of model errors")
    async def readyz(request: Request):
        batcher.ensure_worker()
        ok, info = _ready()
        if ok:
            return {"status": "ready", **info}
        return error_response(503, "not ready: " + ("model errors in a row" if info["consecutive_failures"] >=
                                                    serve.max_failures else "scoring worker not running"),
                              getattr(request.state, "request_id", None), **info)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics_page(request: Request) -> Response:
        _check_key(request, st.keys)
        metrics.queue.set(batcher.pending)
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    return app
