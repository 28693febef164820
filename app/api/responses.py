"""The documented error responses of each route (OpenAPI): the status codes it may answer with and
the error body's shape, so that clients and schema-driven tests know every answer in advance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """adapterserve's own error body."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """The error body of the OpenAI-compatible routes (OpenAI's shape)."""

    error: OpenAIErrorDetail


_WHY = {
    400: "invalid parameters (OpenAI routes), an adapter that cannot be served, or generation asked of "
    "an encoder base",
    401: "missing or invalid bearer token or API key",
    403: "wrong admin token, or admin routes disabled",
    404: "adapter or model not found",
    409: "adapter of the other task, or a conflicting change",
    413: "upload larger than the limit",
    422: "invalid request",
    500: "the inference engine failed for this request",
    503: "queue full, too many streams, starting or shutting down (retry after Retry-After seconds)",
    504: "the request did not finish within the deadline",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}

INFERENCE = (400, 401, 404, 409, 422, 500, 503, 504)
OPENAI = (400, 401, 404, 409, 500, 503, 504)
READ = (401, 404, 503)
ADMIN = (400, 401, 403, 404, 409, 413, 422, 500, 503)


def error_responses(codes: tuple[int, ...], openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route or router: each code with its error body (and Retry-After on 503)."""
    model = OpenAIErrorResponse if openai else ErrorResponse
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": model, "description": _WHY[code]}
        if code == 503:
            out[code]["headers"] = _RETRY_AFTER
    return out


def drop_validation_422(schema: dict[str, Any], where: Callable[[str], bool]) -> dict[str, Any]:
    """FastAPI documents a 422 on every route with parameters; the paths ``where`` selects answer
    invalid parameters with 400 instead (OpenAI's convention), so their 422 is removed."""
    for path, operations in schema.get("paths", {}).items():
        if where(path):
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
    return schema
