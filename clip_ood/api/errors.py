"""The API's one error shape: ``{"error": {"code", "message", "request_id", ...}}``."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_error",
          500: "internal_error", 503: "unavailable", 504: "timeout"}


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
