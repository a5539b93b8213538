"""Prometheus metrics of the API (prometheus_client), labelled by route template, never by the raw path."""

from __future__ import annotations

import os

from fastapi import FastAPI


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


def route_template(app: FastAPI, scope: dict) -> str:
    """The matched route's template (``/v1/score``), or ``unmatched``: never the raw path."""
    from starlette.routing import Match

    for route in app.router.routes:
        m, _ = route.matches(scope)
        if m in (Match.FULL, Match.PARTIAL):
            return getattr(route, "path", "unmatched")
    return "unmatched"
