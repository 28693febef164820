"""Domain errors and the one table that maps them to HTTP status codes and JSON bodies."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class AdapterServeError(Exception):
    """Base of every error the service reports to a client."""

    type: str = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(AdapterServeError):
    type = "invalid_request"


class InvalidAdapter(AdapterServeError):
    """An adapter (upload or store folder) that cannot be served; the message names the field."""

    type = "invalid_adapter"


class AdapterNotFound(AdapterServeError):
    type = "adapter_not_found"


class TaskMismatch(AdapterServeError):
    type = "adapter_task_mismatch"


class UploadTooLarge(AdapterServeError):
    type = "upload_too_large"


class Unauthorized(AdapterServeError):
    type = "unauthorized"


class Forbidden(AdapterServeError):
    type = "forbidden"


class AdminDisabled(AdapterServeError):
    type = "admin_disabled"


class QueueFull(AdapterServeError):
    type = "queue_full"


class DeadlineExceeded(AdapterServeError):
    type = "deadline_exceeded"


class EngineFailure(AdapterServeError):
    type = "engine_error"


class NotReady(AdapterServeError):
    type = "not_ready"


class AdapterLoadFailed(AdapterServeError):
    """An adapter listed in the store whose files can no longer be read or validated."""

    type = "adapter_load_error"


class Conflict(AdapterServeError):
    type = "conflict"


STATUS: dict[type[AdapterServeError], int] = {
    InvalidRequest: 422,
    InvalidAdapter: 400,
    Unauthorized: 401,
    Forbidden: 403,
    AdminDisabled: 403,
    AdapterNotFound: 404,
    TaskMismatch: 409,
    Conflict: 409,
    UploadTooLarge: 413,
    EngineFailure: 500,
    AdapterLoadFailed: 500,
    QueueFull: 503,
    NotReady: 503,
    DeadlineExceeded: 504,
}

RETRY_AFTER_S = "1"


def error_body(type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "param": param}}


def status_of(exc: AdapterServeError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def to_response(exc: AdapterServeError) -> JSONResponse:
    status = status_of(exc)
    headers: dict[str, str] = {}
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc.type, exc.message, exc.param), status_code=status, headers=headers)


def _validation_param(exc: RequestValidationError) -> str | None:
    errors = exc.errors()
    if not errors or errors[0].get("type") == "json_invalid":
        return None
    loc = [str(p) for p in errors[0].get("loc", ()) if p not in ("body", "query", "path")]
    return ".".join(loc) or None


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}"
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def register_error_handlers(app: FastAPI) -> None:
    """Install the single mapping from exceptions to responses."""

    @app.exception_handler(AdapterServeError)
    async def _domain(_: Request, exc: AdapterServeError) -> JSONResponse:
        return to_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            error_body("invalid_request", _validation_message(exc), _validation_param(exc)), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(type_, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
