"""Domain errors and the one table that maps them to HTTP status codes and JSON bodies."""

from __future__ import annotations

import logging
from collections.abc import Mapping
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


class RateLimited(AdapterServeError):
    """A tenant over one of its limits (``limit``: requests, tokens, concurrent, queue); ``headers``
    carry ``Retry-After`` and the ``x-ratelimit-*`` values (app/quotas.py)."""

    type = "rate_limit_exceeded"

    def __init__(self, message: str, limit: str, headers: Mapping[str, str]) -> None:
        super().__init__(message)
        self.limit = limit
        self.headers = dict(headers)


class TooManyStreams(AdapterServeError):
    type = "too_many_streams"


class DeadlineExceeded(AdapterServeError):
    type = "deadline_exceeded"

    @classmethod
    def after(cls, seconds: float) -> DeadlineExceeded:
        return cls(f"request did not finish within {seconds:g} s (REQUEST_TIMEOUT_S)")


class EngineFailure(AdapterServeError):
    type = "engine_error"


class GenerationUnsupported(AdapterServeError):
    """The served base model is an encoder: it classifies, it cannot generate."""

    type = "generation_unsupported"


class ExplainRefused(AdapterServeError):
    """Token attributions cannot be computed for this request (a base without gradients, a path
    beyond the limits)."""

    type = "explain_refused"


class IncompatibleMembers(AdapterServeError):
    """The adapters of an ensemble cannot be combined (different label sets)."""

    type = "incompatible_members"


class NotReady(AdapterServeError):
    type = "not_ready"


class AdapterLoadFailed(AdapterServeError):
    """An adapter listed in the store whose files can no longer be read or validated."""

    type = "adapter_load_error"


class Conflict(AdapterServeError):
    type = "conflict"


class DeviceBusy(AdapterServeError):
    """No device slot can be freed now: every resident adapter is in use or pinned (transient)."""

    type = "device_busy"


class PinFailed(AdapterServeError):
    """The adapter to pin cannot be loaded from the store (its files are damaged); re-upload it."""

    type = "pin_failed"


STATUS: dict[type[AdapterServeError], int] = {
    InvalidRequest: 422,
    InvalidAdapter: 400,
    GenerationUnsupported: 400,
    ExplainRefused: 400,
    IncompatibleMembers: 400,
    Unauthorized: 401,
    Forbidden: 403,
    AdminDisabled: 403,
    AdapterNotFound: 404,
    TaskMismatch: 409,
    Conflict: 409,
    PinFailed: 409,
    DeviceBusy: 503,
    UploadTooLarge: 413,
    EngineFailure: 500,
    AdapterLoadFailed: 500,
    QueueFull: 503,
    RateLimited: 429,
    TooManyStreams: 503,
    NotReady: 503,
    DeadlineExceeded: 504,
}

RETRY_AFTER_S = "1"


def error_body(type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "param": param}}


# OpenAI-compatible routes answer in OpenAI's error shape, so that its clients raise their own
# exception types: {"error": {"message", "type", "param", "code"}}, 400 (not 422) for bad parameters.
# Every /v1/ path but adapterserve's own /v1/adapters.
_OPENAI_PARAM = {"adapter": "model", "max_new_tokens": "max_tokens"}
_OPENAI_CODE = {"adapter_not_found": "model_not_found", "unauthorized": "invalid_api_key"}


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") and not path.startswith("/v1/adapters")


def openai_error_body(type_: str, message: str, param: str | None, status: int) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 401:
        kind = "authentication_error"
    elif status == 403:
        kind = "permission_error"
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": _OPENAI_PARAM.get(param, param) if param else None,
            "code": _OPENAI_CODE.get(type_, type_),
        }
    }


def status_of(exc: AdapterServeError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _respond(
    type_: str,
    message: str,
    param: str | None,
    status: int,
    openai: bool,
    headers: Mapping[str, str] | None = None,
    openai_type: str | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if status in (429, 503):
        headers.setdefault("Retry-After", RETRY_AFTER_S)
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    if openai:
        status = 400 if status == 422 else status
        body = openai_error_body(type_, message, param, status)
        if openai_type is not None:
            body["error"]["type"] = openai_type
        return JSONResponse(body, status, headers=headers)
    return JSONResponse(error_body(type_, message, param), status_code=status, headers=headers)


def to_response(exc: AdapterServeError, openai: bool = False) -> JSONResponse:
    if isinstance(exc, RateLimited):  # OpenAI's shape: "type" names the limit (requests, tokens)
        return _respond(exc.type, exc.message, None, 429, openai, exc.headers, exc.limit)
    return _respond(exc.type, exc.message, exc.param, status_of(exc), openai)


def _validation_param(exc: RequestValidationError) -> str | None:
    errors = exc.errors()
    if not errors or errors[0].get("type") == "json_invalid":
        return None
    if errors[0].get("type") == "invalid_unicode":  # app.protocol.strict: the string's own path
        return str(errors[0].get("ctx", {}).get("field")) or None
    loc = [str(p) for p in errors[0].get("loc", ()) if p not in ("body", "query", "path")]
    return ".".join(loc) or None


_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")
_NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "model_type"}


def _json_position(body: object, pos: object) -> str:
    """``at line L, column C`` of a JSON decode error at character ``pos`` of ``body``."""
    if not isinstance(pos, int):
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    if not isinstance(text, str):
        return f" at character {pos + 1}"
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f" at line {line}, column {column} (character {pos + 1})"


def _validation_message(exc: RequestValidationError, content_type: str) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc_parts = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            where = _json_position(getattr(exc, "body", None), loc_parts[1] if len(loc_parts) > 1 else None)
            reason = err.get("ctx", {}).get("error", "decode error")
            return f"the request body is not valid JSON: {reason}{where}"
        if err.get("type") in _NOT_AN_OBJECT and loc_parts == ("body",):
            if "json" not in content_type:
                sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
                if content_type.startswith("application/x-www-form-urlencoded"):
                    sent += ", curl's default for -d: add -H 'Content-Type: application/json'"
                return f"send the request body as JSON with Content-Type: application/json (got {sent})"
            return "the request body must be a JSON object"
        msg = str(err.get("msg", ""))
        for prefix in _PYDANTIC_PREFIXES:
            msg = msg.removeprefix(prefix)
        loc = ".".join(str(p) for p in loc_parts if p != "body")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def register_error_handlers(app: FastAPI) -> None:
    """Install the single mapping from exceptions to responses."""

    def openai(request: Request) -> bool:
        return is_openai_path(request.url.path)

    # each handler notes the error's type (request.state.error) for the request log line

    @app.exception_handler(AdapterServeError)
    async def _domain(request: Request, exc: AdapterServeError) -> JSONResponse:
        request.state.error = exc.type
        return to_response(exc, openai(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        message, param = _validation_message(exc, content_type), _validation_param(exc)
        request.state.error = "invalid_request"
        body = exc.body
        if isinstance(body, dict):  # the log names what the refused request asked for
            asked = body.get("adapter", body.get("model"))
            request.state.asked = asked if isinstance(asked, str) else None
        return _respond("invalid_request", message, param, 422, openai(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body FastAPI could not parse (bad encoding): a validation error
            message = f"the request body could not be parsed: {exc.detail}"
            request.state.error = "invalid_request"
            return _respond("invalid_request", message, None, 422, openai(request))
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404 and request.scope.get("route") is None:  # no route: say which
            message = f"no route {request.method} {request.url.path} (GET /openapi.json lists them)"
        request.state.error = type_
        return _respond(type_, message, None, exc.status_code, openai(request), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        request.state.error = "internal_error"
        return _respond("internal_error", "internal server error", None, 500, openai(request))
