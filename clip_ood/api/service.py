"""The scoring service behind the API: one ``OODService`` per app, its methods in the order a request meets them.

Construction prepares what every request needs (the scorer's preprocessing, the decode threads, the pixel budget,
the metrics, the micro-batcher). ``handle`` answers one ``POST /v1/score`` within its deadline: content type and
queue room, ``read_body``, ``decode`` (in a decode thread: ``parse``, ``check_headers`` against the limits, then
``decode_one`` image at a time), ``submit`` to the micro-batcher, whose worker thread runs ``score_batch`` (encoder
and score on the gathered images), then ``response``. The other endpoints: ``labels``, ``reset``, ``health``,
``ready``, ``metrics_page``; ``authorize`` checks the API key. ``clip_ood.api.app.create_app`` wires these methods
to FastAPI routes; the scorer comes loaded (``clip_ood.serve.build_app`` loads the model, labels and negatives).
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

from .batcher import MicroBatcher, QueueFullError
from .errors import ApiError
from .keys import ApiKeys
from .metrics import ApiMetrics
from .uploads import PixelBudget, Upload, decode_opened, open_header, parse_json, parse_multipart

if TYPE_CHECKING:
    from PIL import Image

UNCALIBRATED = "uncalibrated"
HTTP_METHODS = ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE")  # metric labels; any other method is "other"


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


@dataclass
class ApiSettings:
    """How one app serves (``create_app``'s keyword arguments): keys, threshold, limits, batching.

    Args:
        keys: the accepted API keys (none enabled: no auth).
        threshold: ``is_ood = score < threshold``; set from ``calibration`` when one is given (giving both is a
            ``ValueError``); None: ``is_ood`` is null and the threshold reads ``"uncalibrated"``.
        calibration: a checked ``calibration.json`` dict.
        limits: per-request limits (``ApiLimits``).
        serve: back-pressure, deadline and failure handling (``ServeLimits``).
        max_batch: images per micro-batched encoder call.
        batch_wait_ms: how long the micro-batcher gathers concurrent requests.
        top_k: top ID classes and nearest negative labels per result.
        model_name: the model named in responses (default: from the encoder).
        keep_images: hand PIL images to the scorer (an ANTS describer that looks at images); None: only when the
            scorer's describer needs them.
    """

    keys: ApiKeys = field(default_factory=lambda: ApiKeys.of(None))
    threshold: float | None = None
    calibration: dict | None = None
    limits: ApiLimits = field(default_factory=ApiLimits)
    serve: ServeLimits = field(default_factory=ServeLimits)
    max_batch: int = 64
    batch_wait_ms: float = 5.0
    top_k: int = 5
    model_name: str | None = None
    keep_images: bool | None = None

    def __post_init__(self) -> None:
        if self.calibration is not None:
            if self.threshold is not None:
                raise ValueError("give a threshold or a calibration, not both")
            self.threshold = float(self.calibration["threshold"])

    @property
    def threshold_source(self) -> str | None:
        """Where the threshold comes from: ``"calibration"``, ``"fixed"`` or None (no threshold)."""
        return "calibration" if self.calibration is not None else "fixed" if self.threshold is not None else None

    @property
    def shown_threshold(self) -> float | str:
        """The threshold as responses show it (``"uncalibrated"`` without one)."""
        return UNCALIBRATED if self.threshold is None else self.threshold


def describer_needs_images(scorer: Any) -> bool:
    """The scorer's test-time state has a describer that looks at the images (not only at their features)."""
    describer = getattr(getattr(scorer, "state", None), "describer", None)
    return describer is not None and bool(getattr(describer, "needs_images", True))


class OODService:
    """Scores uploaded images with ``scorer`` (an ``OODScorer``) under ``settings``; one per app.

    Args:
        scorer: a loaded ``clip_ood.scorer.OODScorer`` (its encoder's ``preprocess`` is taken once, here).
        settings: keys, threshold, limits and batching (default: ``ApiSettings()``).
    """

    def __init__(self, scorer: Any, settings: ApiSettings | None = None) -> None:
        self.scorer = scorer
        self.settings = s = settings or ApiSettings()
        encoder = scorer.encoder
        self.model_name = s.model_name or getattr(encoder, "cache_key", type(encoder).__name__).split("|")[0]
        self.keep_images = describer_needs_images(scorer) if s.keep_images is None else s.keep_images
        self.preprocess = encoder.preprocess
        self.metrics = ApiMetrics()
        threads = max(1, s.serve.decode_threads)
        self.decode_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ood-decode")
        # decoded pixels held at once, over all decode threads (one image of max_pixels always fits)
        self.budget = PixelBudget(max(s.limits.max_pixels, 2 * threads * 4_000_000))
        self.batcher = MicroBatcher(self.score_batch, max_batch=s.max_batch, wait_ms=s.batch_wait_ms,
                                    max_queue=s.serve.max_queue, on_batch=self.observe_batch)

    # ------------------------------------------------------------------ one request, in order
    def authorize(self, request: Request) -> None:
        """401 ``ApiError`` unless ``request`` sends an accepted key (or no key is set)."""
        self.settings.keys.authorize(request)

    async def handle(self, request: Request) -> dict:
        """``POST /v1/score``: one request answered within ``timeout_s`` (else a 504)."""
        rid = request.state.request_id
        timeout = self.settings.serve.timeout_s
        try:
            return await asyncio.wait_for(self.answer(request, rid), timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, f"request not answered within {timeout:g} s; retry later or raise --timeout",
                           limit=timeout, limit_name="timeout_s") from None

    async def answer(self, request: Request, rid: str) -> dict:
        """The steps of one request: refuse early, read the body, decode it in a thread, score, build the response."""
        self.check_content_type(request)
        if not self.batcher.room_for(1):
            raise self.busy(f"the scoring queue is full ({self.batcher.pending} images); retry later")
        body = await self.read_body(request)
        loop = asyncio.get_running_loop()
        uploads, items = await loop.run_in_executor(self.decode_pool, self.decode, body,
                                                    request.headers.get("content-type", ""))
        del body  # only the model-sized tensors wait in the queue
        results = await self.submit(items, rid)
        return self.response(uploads, results, rid)

    @staticmethod
    def check_content_type(request: Request) -> None:
        """415 unless the body is multipart/form-data or JSON."""
        ctype = request.headers.get("content-type", "").lower()
        if not (ctype.startswith("multipart/form-data") or ctype.startswith("application/json")):
            raise ApiError(415, "send multipart/form-data (parts named 'files') or application/json with base64 images")

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it is known to exceed ``max_request_bytes``."""
        lim = self.settings.limits.max_request_bytes
        cl = request.headers.get("content-length")
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

    def decode(self, body: bytes, content_type: str) -> tuple[list[Upload], list]:
        """In a decode thread: parse, check every header against the limits, then decode + preprocess one by one.
        Returns the uploads and one ``(tensor, small PIL image or None)`` item per upload."""
        uploads = self.parse(body, content_type)
        headers = self.check_headers(uploads)
        items = []
        for u, im in zip(uploads, headers, strict=True):
            items.append(self.decode_one(u, im))
            u.data = b""  # the bytes are no longer needed
        return uploads, items

    def parse(self, body: bytes, content_type: str) -> list[Upload]:
        """The uploads of a multipart or JSON body (at most ``max_images``)."""
        max_images = self.settings.limits.max_images
        if content_type.startswith("multipart/"):
            return parse_multipart(body, content_type, max_images)
        return parse_json(body, max_images)

    def check_headers(self, uploads: list[Upload]) -> list[Image.Image]:
        """Every upload opened from its header only, checked against ``max_pixels`` one by one and
        ``max_request_pixels`` together (413), before any pixel is decoded."""
        limits = self.settings.limits
        opened = [open_header(u.data, u.name, limits.max_pixels) for u in uploads]
        total = sum(im.size[0] * im.size[1] for im in opened)
        if total > limits.max_request_pixels:
            raise ApiError(413, f"{len(uploads)} images of {total} pixels in all exceed the per-request limit of "
                           f"{limits.max_request_pixels} pixels", limit=limits.max_request_pixels,
                           limit_name="max_request_pixels")
        return opened

    def decode_one(self, upload: Upload, im: Image.Image) -> tuple[Any, Image.Image | None]:
        """Decode one opened image within the shared pixel budget: the model's input tensor, and a thumbnail when
        the scorer looks at the images."""
        n = self.budget.acquire(im.size[0] * im.size[1])
        try:
            rgb = decode_opened(im, upload.name)
            tensor = self.preprocess(rgb)
            small = None
            if self.keep_images:
                small = rgb.copy()
                small.thumbnail((768, 768))
        finally:
            self.budget.release(n)
        return tensor, small

    async def submit(self, items: list, rid: str) -> list[dict]:
        """Queue the items into the micro-batcher and wait for their results (503 when the queue is full, 500 when
        the model fails on the batch)."""
        self.metrics.queue.set(self.batcher.pending)
        try:
            return await self.batcher.submit(items, rid)
        except QueueFullError as e:
            raise self.busy(f"the scoring queue is full ({e}); retry later") from None
        except Exception as e:
            self.metrics.model_errors.inc()
            raise ApiError(500, f"the model failed on this batch ({type(e).__name__}); see the server log for "
                           f"request {rid}", "model_error") from e
        finally:
            self.metrics.queue.set(self.batcher.pending)

    def score_batch(self, items: list) -> list[dict]:
        """In the batcher's worker thread: one encoder + score call on the items of every gathered request."""
        import torch

        top_k = self.settings.top_k
        pixels = torch.stack([t for t, _ in items])
        images = [im for _, im in items] if self.keep_images else None
        r = self.scorer.score_pixels(pixels, images=images, top_neg=top_k)
        return [{"score": float(r.scores[i]), **self.scorer.describe(r, i, top_k)} for i in range(len(items))]

    def response(self, uploads: list[Upload], results: list[dict], rid: str) -> dict:
        """The JSON answer: one result per upload (``is_ood`` against the threshold), counted in the metrics."""
        threshold = self.settings.threshold
        out = []
        n_ood = 0
        for u, r in zip(uploads, results, strict=True):
            is_ood = None if threshold is None else bool(r["score"] < threshold)
            n_ood += bool(is_ood)
            out.append({"index": u.index, "field": u.field, "filename": u.filename, "name": u.name,
                        "score": r["score"], "is_ood": is_ood, "top_classes": r["top_classes"],
                        "nearest_negatives": r["nearest_negatives"]})
        self.metrics.images.inc(len(out))
        self.metrics.ood.inc(n_ood)
        return {"model": self.model_name, "method": self.scorer.method, "threshold": self.settings.shown_threshold,
                "threshold_source": self.settings.threshold_source, "request_id": rid, "results": out}

    def busy(self, message: str) -> ApiError:
        """A 503 telling the client when to retry."""
        return ApiError(503, message, "overloaded", headers={"Retry-After": str(self.settings.serve.retry_after_s)})

    # ------------------------------------------------------------------ the other endpoints
    def labels(self) -> dict:
        """``GET /v1/labels``: ID classes, negative labels, threshold, scorer settings, this process's ANTS state."""
        sc = self.scorer
        out: dict[str, Any] = {"method": sc.method, "id_labels": sc.id_labels, "negative_labels": sc.negatives.words,
                               "threshold": self.settings.shown_threshold}
        if hasattr(sc, "settings"):
            out["settings"] = sc.settings()
        if self.settings.calibration is not None:
            out["calibration"] = {k: v for k, v in self.settings.calibration.items() if k != "labels"}
        if sc.state is not None:
            out["ants"] = {"far_sentences": len(sc.state.far_texts), "near_labels": sc.state.near_texts,
                           "lambda": sc.state.lambda_, "tau": sc.state.tau, "scope": "this worker process"}
        return out

    async def reset(self) -> dict:
        """``POST /v1/reset``: forget the test-time state (in the worker thread, between batches); 409 without one."""
        if self.scorer.state is None:
            raise ApiError(409, f"method '{self.scorer.method}' has no test-time state to reset")
        await self.batcher.run_exclusive(self.scorer.state.reset)
        return {"reset": True, "pid": os.getpid()}

    def health(self) -> dict:
        """``GET /healthz``: the process answers."""
        return {"status": "ok", "method": self.scorer.method, "id_classes": len(self.scorer.id_labels),
                "pid": os.getpid()}

    def ready(self) -> dict:
        """``GET /readyz``: model loaded, worker alive (restarted if it died) and not stuck, fewer than
        ``max_failures`` model errors in a row; else a 503 carrying the same fields."""
        serve, batcher = self.settings.serve, self.batcher
        batcher.ensure_worker()
        h = batcher.health
        stuck = h.busy_since is not None and time.monotonic() - h.busy_since > max(2 * serve.timeout_s, 10.0)
        info = {"model_loaded": self.scorer is not None, "worker_alive": batcher.alive and not stuck,
                "consecutive_failures": h.consecutive_failures, "max_failures": serve.max_failures,
                "queue_images": batcher.pending, "max_queue": serve.max_queue}
        ok = info["model_loaded"] and info["worker_alive"] and h.consecutive_failures < serve.max_failures
        if ok:
            return {"status": "ready", **info}
        if h.last_error:
            info["last_error"] = h.last_error
        why = "model errors in a row" if h.consecutive_failures >= serve.max_failures else "scoring worker not running"
        raise ApiError(503, "not ready: " + why, **info)

    def metrics_page(self) -> tuple[bytes, str]:
        """``GET /metrics``: the Prometheus text and its content type."""
        self.metrics.queue.set(self.batcher.pending)
        return self.metrics.render()

    # ------------------------------------------------------------------ metrics the app reports
    def observe_request(self, route: str, method: str, status_code: int, seconds: float) -> None:
        """Count one HTTP request by route template, method and status class, and its latency."""
        method = method if method in HTTP_METHODS else "other"
        self.metrics.requests.labels(route, method, f"{status_code // 100}xx").inc()
        self.metrics.latency.labels(route, method).observe(seconds)

    def observe_batch(self, n: int, seconds: float) -> None:
        """Record one micro-batched encoder call (the batcher calls it)."""
        self.metrics.batch_size.observe(n)
        self.metrics.encoder_seconds.observe(seconds)

    def count_rejected(self, code: str) -> None:
        """Count a scoring request refused with error ``code``."""
        self.metrics.rejected.labels(code).inc()
