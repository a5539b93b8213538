"""The scoring API (FastAPI): POST /v1/score, GET /v1/labels, GET /healthz, GET /metrics, POST /v1/reset.

Concurrent requests are micro-batched into one encoder call. Images come only as request bytes (multipart parts
named ``files``, or base64 in JSON); the server never opens a path or URL a client sends, and decodes only
raster formats (no EPS/PDF that would run external programs).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass
class ApiLimits:
    """Per-request limits; exceeding one gives a 4xx with a clear message."""

    max_images: int = 32
    max_request_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000


class ApiError(HTTPException):
    """An HTTP error whose JSON body is ``{"detail": message}``."""


def decode_image(data: bytes, name: str, max_pixels: int):
    """Bytes -> RGB PIL image, or 413 (too many pixels), 415 (not an image) or 400 (truncated / corrupt)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, f"{name}: empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{name}: image has too many pixels ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ApiError(415, f"{name}: not a supported image ({', '.join(ALLOWED_FORMATS)})") from e
    w, h = im.size
    if w * h > max_pixels:  # checked from the header, before decoding (decompression bombs)
        raise ApiError(413, f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    try:
        im.load()
        return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{name}: image has too many pixels") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ApiError(400, f"{name}: truncated or corrupt image ({e})") from e


class MicroBatcher:
    """Gathers concurrent requests (up to ``max_batch`` images or ``wait_ms``) into one call of ``fn`` in one
    worker thread (which also serialises updates of the ANTS state)."""

    def __init__(self, fn, max_batch: int = 64, wait_ms: float = 5.0) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ood-encoder")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.batch_images = 0
        self.batch_requests = 0
        self.compute_seconds = 0.0

    def _ensure_worker(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._worker())
        return self._queue

    async def submit(self, items: list) -> list:
        fut = asyncio.get_running_loop().create_future()
        await self._ensure_worker().put((items, fut))
        return await fut

    async def run_exclusive(self, fn):
        """Run ``fn()`` in the worker thread (serialised with scoring)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _worker(self) -> None:
        q = self._queue
        loop = asyncio.get_running_loop()
        while True:
            first = await q.get()
            group = [first]
            n = len(first[0])
            deadline = loop.time() + self.wait_s
            while n < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(q.get(), timeout)
                except asyncio.TimeoutError:
                    break
                group.append(nxt)
                n += len(nxt[0])
            items = [it for g in group for it in g[0]]
            t0 = time.perf_counter()
            try:
                out = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception as e:  # hand the error to every waiting request
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            finally:
                self.compute_seconds += time.perf_counter() - t0
            self.batches += 1
            self.batch_images += len(items)
            self.batch_requests += len(group)
            i = 0
            for g_items, fut in group:
                if not fut.done():
                    fut.set_result(out[i : i + len(g_items)])
                i += len(g_items)


def _check_key(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    sent = request.headers.get("x-api-key")
    if sent is None:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            sent = auth[7:].strip()
    if sent is None:
        raise ApiError(401, "missing API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(sent.encode(), api_key.encode()):
        raise ApiError(401, "wrong API key", headers={"WWW-Authenticate": "Bearer"})


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


def create_app(scorer: Any, *, api_key: str | None = None, threshold: float = 0.5, limits: ApiLimits | None = None,
               max_batch: int = 64, batch_wait_ms: float = 5.0, top_k: int = 5, model_name: str | None = None) -> FastAPI:
    """A FastAPI app scoring images with ``scorer`` (an ``OODScorer``); see the module docstring."""
    limits = limits or ApiLimits()
    app = FastAPI(title="negvision OOD scoring API", version="1",
                  description="Zero-shot OOD scores with CLIP and negative labels (NegLabel / ANTS).")
    stats: dict[str, Any] = {"requests": Counter(), "images": 0, "ood": 0, "latency_sum": 0.0, "latency_count": 0}
    lock = threading.Lock()
    model_name = model_name or getattr(scorer.encoder, "cache_key", type(scorer.encoder).__name__).split("|")[0]

    def _score_batch(images: list) -> list[dict]:
        r = scorer.score_images(images, top_neg=top_k)
        return [{"score": float(r.scores[i]), **scorer.describe(r, i, top_k)} for i in range(len(images))]

    batcher = MicroBatcher(_score_batch, max_batch=max_batch, wait_ms=batch_wait_ms)
    app.state.batcher = batcher
    app.state.scorer = scorer
    app.state.stats = stats

    @app.middleware("http")
    async def _count(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
        finally:
            with lock:
                stats["requests"][(request.url.path, status)] += 1
                if request.url.path == "/v1/score":
                    stats["latency_sum"] += time.perf_counter() - t0
                    stats["latency_count"] += 1
        return response

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def _read_body(request: Request) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                if int(cl) > limits.max_request_bytes:
                    raise ApiError(413, f"request body of {cl} bytes exceeds the limit of {limits.max_request_bytes}")
            except ValueError as e:
                raise ApiError(400, "bad Content-Length header") from e
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_request_bytes:
                raise ApiError(413, f"request body exceeds the limit of {limits.max_request_bytes} bytes")
        return bytes(body)

    def _too_many(n: int) -> None:
        if n > limits.max_images:
            raise ApiError(413, f"{n} images in one request; the limit is {limits.max_images}")

    async def _images_from_multipart(request: Request, body: bytes) -> list[tuple[str, bytes]]:
        from starlette.formparsers import MultiPartException

        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        req = Request(request.scope, receive=replay)
        try:
            form = await req.form(max_files=limits.max_images + 1, max_fields=limits.max_images + 16)
        except MultiPartException as e:
            raise ApiError(413 if "Too many" in str(e) else 400, f"bad multipart body: {e}") from e
        files = form.getlist("files")
        if not files:
            raise ApiError(400, "no image parts: send one or more multipart parts named 'files'")
        _too_many(len(files))
        out = []
        for i, f in enumerate(files):
            if isinstance(f, str):
                raise ApiError(400, f"part 'files' #{i + 1} is a text field, not a file")
            out.append((f.filename or f"files[{i}]", await f.read()))
        return out

    def _images_from_json(body: bytes) -> list[tuple[str, bytes]]:
        import json

        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body is not valid JSON ({e})") from e
        items = payload.get("images") if isinstance(payload, dict) else None
        if not isinstance(items, list) or not items:
            raise ApiError(400, "JSON body must be {\"images\": [base64 string | {\"name\", \"data\"}, ...]}")
        _too_many(len(items))
        out = []
        for i, it in enumerate(items):
            name = f"images[{i}]"
            if isinstance(it, dict):
                name = str(it.get("name") or name)[:200]
                it = it.get("data")
            if not isinstance(it, str):
                raise ApiError(400, f"{name}: expected a base64 string")
            s = it.strip()
            if s.lower().startswith(("http://", "https://", "ftp://", "file:", "s3://", "gs://", "/")):
                raise ApiError(400, f"{name}: URLs and paths are not accepted; send the image bytes as base64")
            if s.startswith("data:"):
                s = s.split(",", 1)[1] if "," in s else ""
            try:
                out.append((name, base64.b64decode(s, validate=True)))
            except (binascii.Error, ValueError) as e:
                raise ApiError(400, f"{name}: invalid base64 ({e})") from e
        return out

    @app.post("/v1/score", openapi_extra=_SCORE_BODY, summary="Score images (multipart 'files' or JSON base64)")
    async def score(request: Request) -> dict:
        _check_key(request, api_key)
        ctype = request.headers.get("content-type", "").lower()
        if not (ctype.startswith("multipart/form-data") or ctype.startswith("application/json")):
            raise ApiError(415, "send multipart/form-data (parts named 'files') or application/json with base64 images")
        body = await _read_body(request)
        raw = await _images_from_multipart(request, body) if ctype.startswith("multipart/") else _images_from_json(body)
        images = [decode_image(data, name, limits.max_pixels) for name, data in raw]
        results = await batcher.submit(images)
        out = []
        for (name, _), r in zip(raw, results, strict=False):
            out.append({"name": name, "score": r["score"], "is_ood": r["score"] < threshold,
                        "top_classes": r["top_classes"], "nearest_negatives": r["nearest_negatives"]})
        with lock:
            stats["images"] += len(out)
            stats["ood"] += sum(o["is_ood"] for o in out)
        return {"model": model_name, "method": scorer.method, "threshold": threshold, "results": out}

    @app.get("/v1/labels", summary="ID class names and negative labels in use")
    async def labels(request: Request) -> dict:
        _check_key(request, api_key)
        out: dict[str, Any] = {"method": scorer.method, "id_labels": scorer.id_labels,
                               "negative_labels": scorer.negatives.words}
        if scorer.ants is not None:
            out["ants"] = {"far_sentences": len(scorer.ants.far_texts), "near_labels": scorer.ants.near_texts,
                           "lambda": scorer.ants.lambda_, "tau": scorer.ants.tau}
        return out

    @app.post("/v1/reset", summary="Reset the ANTS test-time state")
    async def reset(request: Request) -> dict:
        _check_key(request, api_key)
        if scorer.ants is None:
            raise ApiError(409, f"method '{scorer.method}' has no test-time state to reset")
        await batcher.run_exclusive(scorer.ants.reset)
        return {"reset": True}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict:
        return {"status": "ok", "method": scorer.method, "id_classes": len(scorer.id_labels)}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics(request: Request) -> str:
        _check_key(request, api_key)
        lines = ["# HELP negvision_ood_requests_total HTTP requests by path and status.",
                 "# TYPE negvision_ood_requests_total counter"]
        with lock:
            for (path, status), n in sorted(stats["requests"].items()):
                lines.append(f'negvision_ood_requests_total{{path="{path}",status="{status}"}} {n}')
            gauges = [
                ("images_scored_total", "counter", "Images scored.", stats["images"]),
                ("images_ood_total", "counter", "Images flagged OOD.", stats["ood"]),
                ("encoder_batches_total", "counter", "Micro-batched encoder calls.", batcher.batches),
                ("encoder_batch_images_total", "counter", "Images over all encoder calls.", batcher.batch_images),
                ("encoder_batch_requests_total", "counter", "Requests over all encoder calls.", batcher.batch_requests),
                ("encoder_seconds_total", "counter", "Seconds in encoder + scoring.", round(batcher.compute_seconds, 6)),
                ("score_request_seconds_sum", "counter", "Total /v1/score latency.", round(stats["latency_sum"], 6)),
                ("score_request_seconds_count", "counter", "Number of /v1/score requests.", stats["latency_count"]),
            ]
        for name, kind, help_, v in gauges:
            lines += [f"# HELP negvision_ood_{name} {help_}", f"# TYPE negvision_ood_{name} {kind}",
                      f"negvision_ood_{name} {v}"]
        return "\n".join(lines) + "\n"

    return app
