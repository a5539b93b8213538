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

The parts: ``service`` (``OODService``: one request in order, from the upload to the response, limits,
back-pressure, readiness; ``ApiSettings``), ``app`` (``create_app``: routes, middleware and error handlers wired to
the service), ``uploads`` (body parsing, header checks, decoding), ``batcher`` (micro-batching), ``keys`` (API keys),
``metrics`` (Prometheus), ``errors`` (the JSON error shape).
"""

from .app import create_app
from .batcher import MicroBatcher, QueueFullError
from .errors import ApiError, error_response
from .keys import ApiKeys, is_loopback
from .service import UNCALIBRATED, ApiLimits, ApiSettings, OODService, ServeLimits
from .uploads import ALLOWED_FORMATS, Upload, decode_image, open_header, parse_json, parse_multipart

__all__ = ["ALLOWED_FORMATS", "UNCALIBRATED", "ApiError", "ApiKeys", "ApiLimits", "ApiSettings", "MicroBatcher",
           "OODService", "QueueFullError", "ServeLimits", "Upload", "create_app", "decode_image", "error_response",
           "is_loopback", "open_header", "parse_json", "parse_multipart"]
