"""The scoring API (FastAPI): POST /v1/score, GET /v1/labels, POST /v1/reset, GET /healthz, /readyz, /metrics.

Concurrent requests are micro-batched into one encoder call. Images come only as request bytes (multipart parts
named ``files``, or base64 in JSON); the server never opens a path or URL a client sends, and decodes only
raster formats (no EPS/PDF that would run external programs).

Production shape: body parsing, header checks and decoding run in a small thread pool (never on the event loop,
so ``/healthz`` answers while images decode); every limit is checked from the image headers before any pixel is
decoded; the micro-batch queue is bounded (full -> 503 with ``Retry-After``), each request has a deadline
(-> 504), a model error is a JSON 500 with the request id (traceback in the log) and ``/readyz`` turns 503 after
``max_failures`` model errors in a row. Every error body is ``{"error": {"code", "message", "request_id", ...}}``.
Metrics are ``prometheus_client`` objects labelled by route template, HTTP method and status class, never by the
raw path (multi-process aggregation when ``PROMETHEUS_MULTIPROC_DIR`` is set, as ``--workers N`` does).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

logger = logging.getLogger("negvision.api")

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
UNCALIBRATED = "uncalibrated"

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_error",
          500: "internal_error", 503: "unavailable", 504: "timeout"}


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


class ApiError(Exception):
    """An HTTP error answered as ``{"error": {"code", "message", "request_id", **extra}}``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status_code, self.message = status, message
        self.code = code or _CODES.get(status, "error")
        self.headers = headers or {}
        self.extra = extra


def error_response(status: int, message: str, request_id: str | None, code: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The one JSON error shape of the API."""
    body = {"code": code or _CODES.get(status, "error"), "message": message, "request_id": request_id, **extra}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


# ---------------------------------------------------------------------- API keys
class ApiKeys:
    """Accepted keys (several at once, for rotation): from ``keys``, the ``NEGVISION_API_KEY`` environment variable
    (comma-separated) and ``key_file`` (one key a line, ``#`` comments), which is re-read when it changes, so a key
    is rotated by editing the file, without a restart."""

    ENV = "NEGVISION_API_KEY"

    def __init__(self, keys: Sequence[str] = (), key_file: str | Path | None = None, use_env: bool = True,
                 recheck_s: float = 1.0) -> None:
        self.recheck_s = recheck_s  # how often the key file's mtime is looked at
        self.static = [k.strip() for k in keys if k and k.strip()]
        if use_env and os.environ.get(self.ENV):
            self.static += [k.strip() for k in os.environ[self.ENV].split(",") if k.strip()]
        self.key_file = Path(key_file) if key_file else None
        self._file_keys: list[str] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self.key_file is not None:
            self._reload(force=True)

    @staticmethod
    def read_key_file(path: Path) -> list[str]:
        """Keys in ``path``; ``ValueError`` naming the file when it cannot be read or holds none."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {path}: cannot read it ({e})") from e
        keys = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not keys:
            raise ValueError(f"--api-key-file {path}: no key in it (one key a line)")
        return keys

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.recheck_s:
            return
        self._checked = now
        try:
            st = self.key_file.stat()
        except OSError:
            if force:
                raise ValueError(f"--api-key-file {self.key_file}: no such file") from None
            return  # keep the last good keys while the file is being replaced
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            keys = self.read_key_file(self.key_file)
        except ValueError:
            if force:
                raise
            logger.warning("API key file %s unreadable or empty; keeping the previous keys", self.key_file)
            return
        with self._lock:
            self._file_keys, self._stamp = keys, stamp

    @property
    def enabled(self) -> bool:
        return bool(self.static or self.key_file)

    def keys(self) -> list[str]:
        if self.key_file is not None:
            self._reload()
        with self._lock:
            return self.static + self._file_keys

    def check(self, sent: str) -> bool:
        """Constant-time comparison against every accepted key."""
        ok = False
        for k in self.keys():
            ok |= hmac.compare_digest(sent.encode(), k.encode())
        return ok


def _as_keys(api_key: Any) -> ApiKeys:
    if isinstance(api_key, ApiKeys):
        return api_key
    if not api_key:
        return ApiKeys((), use_env=False)
    return ApiKeys([api_key] if isinstance(api_key, str) else list(api_key), use_env=False)


def _check_key(request: Request, keys: ApiKeys) -> None:
    if not keys.enabled:
        return
    sent = request.headers.get("x-api-key")
    if sent is None:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            sent = auth[7:].strip()
    hdr = {"WWW-Authenticate": "Bearer"}
    if sent is None:
        raise ApiError(401, "missing API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'", headers=hdr)
    if not keys.check(sent):
        raise ApiError(401, "wrong API key", headers=hdr)


# ---------------------------------------------------------------------- images
@dataclass
class Upload:
    """One uploaded image: where it came from in the request, and its bytes."""

    index: int
    field: str
    filename: str | None
    data: bytes

    @property
    def name(self) -> str:
        return self.filename or f"{self.field}[{self.index}]"


def open_header(data: bytes, name: str, max_pixels: int):
    """Bytes -> a lazily decoded PIL image (header read only), or 413 / 415 / 400."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, f"{name}: empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{name}: image has too many pixels ({e})", limit=max_pixels) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ApiError(415, f"{name}: not a supported image ({', '.join(ALLOWED_FORMATS)})") from e
    w, h = im.size
    if w * h > max_pixels:
        raise ApiError(413, f"{name}: {w}x{h} = {w * h} pixels exceeds the per-image limit of {max_pixels}",
                       limit=max_pixels, limit_name="max_pixels")
    return im


def decode_opened(im, name: str):
    """Fully decode a header-checked image as RGB in its displayed orientation (EXIF), or 400 / 413."""
    from PIL import Image, ImageOps

    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{name}: image has too many pixels") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ApiError(400, f"{name}: truncated or corrupt image ({e})") from e


def decode_image(data: bytes, name: str, max_pixels: int):
    """Bytes -> RGB PIL image (EXIF applied), or 413 (too many pixels), 415 (not an image), 400 (corrupt)."""
    return decode_opened(open_header(data, name, max_pixels), name)


class PixelBudget:
    """At most ``capacity`` pixels decoded at once across all requests (bounds the decoders' memory)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> int:
        n = min(n, self.capacity)
        with self._cv:
            self._cv.wait_for(lambda: self.used + n <= self.capacity)
            self.used += n
        return n

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


# ---------------------------------------------------------------------- micro-batching
class QueueFullError(Exception):
    """The encoder queue holds ``max_queue`` images."""


@dataclass
class _Job:
    items: list
    fut: asyncio.Future
    request_id: str | None = None


@dataclass
class BatcherHealth:
    consecutive_failures: int = 0
    failures_total: int = 0
    last_error: str | None = None
    busy_since: float | None = None


class MicroBatcher:
    """Gathers concurrent requests (up to ``max_batch`` images or ``wait_ms``) into one call of ``fn`` in one
    worker thread (which also serialises updates of the ANTS state). The queue holds at most ``max_queue`` images;
    a request whose caller stopped waiting (timeout) is dropped before it reaches the model."""

    def __init__(self, fn: Callable[[list], list], max_batch: int = 64, wait_ms: float = 5.0, max_queue: int = 256,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ood-encoder")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pending = 0  # images queued, not yet taken by the worker
        self.health = BatcherHealth()
        self.batches = 0
        self.batch_images = 0
        self.batch_requests = 0
        self.compute_seconds = 0.0

    def ensure_worker(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            if self._task is not None and self._task.done() and not self._task.cancelled() and self._loop is loop:
                exc = self._task.exception()
                if exc is not None:
                    logger.error("micro-batch worker died (%r); restarting it", exc)
            self._loop = loop
            self._queue = asyncio.Queue()
            self.pending = 0
            self._task = loop.create_task(self._worker())
        return self._queue

    @property
    def alive(self) -> bool:
        """The worker task runs (or has not been needed yet)."""
        return self._task is None or not self._task.done()

    def room_for(self, n: int) -> bool:
        return self.pending + n <= self.max_queue

    async def submit(self, items: list, request_id: str | None = None) -> list:
        q = self.ensure_worker()
        if not self.room_for(len(items)):
            raise QueueFullError(f"{self.pending} images queued; the limit is {self.max_queue}")
        fut = asyncio.get_running_loop().create_future()
        self.pending += len(items)
        q.put_nowait(_Job(items, fut, request_id))
        try:
            return await fut
        except asyncio.CancelledError:
            fut.cancel()  # the worker skips it if it has not started it
            raise

    async def run_exclusive(self, fn):
        """Run ``fn()`` in the worker thread (serialised with scoring)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def _worker(self) -> None:
        q = self._queue
        loop = asyncio.get_running_loop()
        while True:
            first = await q.get()
            group = [first]
            n = len(first.items)
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
                n += len(nxt.items)
            self.pending -= n
            group = [j for j in group if not j.fut.done()]  # timed out while queued: never computed
            if not group:
                continue
            items = [it for j in group for it in j.items]
            t0 = time.perf_counter()
            self.health.busy_since = time.monotonic()
            try:
                out = await loop.run_in_executor(self.executor, self.fn, items)
                if len(out) != len(items):
                    raise RuntimeError(f"scoring returned {len(out)} results for {len(items)} images")
            except Exception as e:  # hand the error to every waiting request
                self.health.consecutive_failures += 1
                self.health.failures_total += 1
                self.health.last_error = f"{type(e).__name__}: {e}"
                ids = ", ".join(str(j.request_id) for j in group)
                logger.error("model error on a batch of %d images (requests %s)", len(items), ids, exc_info=e)
                for j in group:
                    if not j.fut.done():
                        j.fut.set_exception(e)
                continue
            finally:
                dt = time.perf_counter() - t0
                self.compute_seconds += dt
                self.health.busy_since = None
            self.health.consecutive_failures = 0
            self.batches += 1
            self.batch_images += len(items)
            self.batch_requests += len(group)
            if self.on_batch is not None:
                self.on_batch(len(items), dt)
            i = 0
            for j in group:
                if not j.fut.done():
                    j.fut.set_result(out[i : i + len(j.items)])
                i += len(j.items)


# ---------------------------------------------------------------------- metrics
class ApiMetrics:
    """The Prometheus metrics of one app (its own registry; aggregated over worker processes when
    ``PROMETHEUS_MULTIPROC_DIR`` is set)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("negvision_ood_requests", "HTTP requests by route template, method and status class.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("negvision_ood_request_seconds", "Request latency by route template.",
                                 ["route", "method"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = Histogram("negvision_ood_batch_images", "Images per micro-batched encoder call.",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.encoder_seconds = Histogram("negvision_ood_batch_seconds", "Seconds per encoder + scoring call.",
                                         registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.queue = Gauge("negvision_ood_queue_images", "Images waiting for the encoder.", registry=r,
                           multiprocess_mode="livesum")
        self.images = Counter("negvision_ood_images_scored", "Images scored.", registry=r)
        self.ood = Counter("negvision_ood_images_ood", "Images flagged OOD (with a threshold set).", registry=r)
        self.model_errors = Counter("negvision_ood_model_errors", "Encoder / scoring calls that raised.", registry=r)
        self.rejected = Counter("negvision_ood_rejected", "Requests refused before scoring, by error code.",
                                ["code"], registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self.multiprocess:
            from prometheus_client import multiprocess

            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            return generate_latest(reg), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _route_template(app: FastAPI, scope: dict) -> str:
    """The matched route's template (``/v1/score``), or ``unmatched``: never the raw path."""
    from starlette.routing import Match

    for route in app.router.routes:
        m, _ = route.matches(scope)
        if m in (Match.FULL, Match.PARTIAL):
            return getattr(route, "path", "unmatched")
    return "unmatched"


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


# ---------------------------------------------------------------------- body parsing (in the thread pool)
def parse_multipart(body: bytes, content_type: str, max_images: int) -> list[Upload]:
    """Multipart body -> uploads of the parts named ``files`` (python-multipart, in memory; 400 / 413)."""
    from python_multipart import parse_form
    from python_multipart.exceptions import FormParserError

    uploads: list[Upload] = []
    other = []

    class _TooMany(Exception):
        pass

    def on_file(f) -> None:
        fname = (f.field_name or b"").decode("utf-8", "replace")
        if fname != "files":
            other.append(fname)
            return
        if len(uploads) >= max_images:
            raise _TooMany
        fo = f.file_object
        fo.seek(0)
        name = f.file_name.decode("utf-8", "replace")[:200] if f.file_name else None
        uploads.append(Upload(len(uploads), "files", name, fo.read()))

    def on_field(f) -> None:
        name = (f.field_name or b"").decode("utf-8", "replace")
        if name == "files":
            raise ApiError(400, f"part 'files' #{len(uploads) + 1} is a text field, not a file")

    headers = {"Content-Type": content_type.encode("latin-1", "replace"), "Content-Length": str(len(body)).encode()}
    try:
        parse_form(headers, io.BytesIO(body), on_field, on_file)
    except _TooMany:
        raise ApiError(413, f"more than {max_images} images in one request; the limit is {max_images}",
                       limit=max_images, limit_name="max_images") from None
    except ApiError:
        raise
    except (FormParserError, ValueError, KeyError, AttributeError) as e:
        raise ApiError(400, f"bad multipart body: {e}") from e
    if not uploads:
        raise ApiError(400, "no image parts: send one or more multipart parts named 'files'")
    return uploads


def parse_json(body: bytes, max_images: int) -> list[Upload]:
    """``{"images": [base64 | {"name", "data"}, ...]}`` -> uploads (400 / 413); URLs and paths are refused."""
    import json

    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body is not valid JSON ({e})") from e
    items = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        raise ApiError(400, "JSON body must be {\"images\": [base64 string | {\"name\", \"data\"}, ...]}")
    if len(items) > max_images:
        raise ApiError(413, f"{len(items)} images in one request; the limit is {max_images}", limit=max_images,
                       limit_name="max_images")
    out = []
    for i, it in enumerate(items):
        fname = None
        if isinstance(it, dict):
            fname = str(it["name"])[:200] if it.get("name") else None
            it = it.get("data")
        name = fname or f"images[{i}]"
        if not isinstance(it, str):
            raise ApiError(400, f"{name}: expected a base64 string")
        s = it.strip()
        if s.lower().startswith(("http://", "https://", "ftp://", "file:", "s3://", "gs://", "/")):
            raise ApiError(400, f"{name}: URLs and paths are not accepted; send the image bytes as base64")
        if s.startswith("data:"):
            s = s.split(",", 1)[1] if "," in s else ""
        try:
            out.append(Upload(i, "images", fname, base64.b64decode(s, validate=True)))
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{name}: invalid base64 ({e})") from e
    return out


# ---------------------------------------------------------------------- the app
@dataclass
class _State:
    keys: ApiKeys
    limits: ApiLimits
    serve: ServeLimits
    threshold: float | None
    calibration: dict | None
    model_name: str
    loaded_at: float = field(default_factory=time.time)


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
        route = _route_template(app, request.scope)
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


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost (the server is reachable from this machine only)."""
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

