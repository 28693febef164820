"""Structured logs: one JSON object per line, and the request log with its request id."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

ACCESS = logging.getLogger("adapterserve.access")
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def request_id(given: str | None) -> str:
    """The caller's ``X-Request-ID`` when it is a plain token, else a fresh one."""
    return given if given is not None and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields}`` per record, one line each."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, fmt: str) -> None:
    """Root logging for ``adapterserve serve``: JSON lines, or plain text for reading by eye."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def log_request(
    rid: str,
    method: str,
    endpoint: str,
    status: int,
    adapter: str | None,
    seconds: float,
    tenant: str | None = None,
    error: str | None = None,
) -> None:
    """The request log line: never headers or bodies (no token or key can leak into it); the
    tenant's name when the request was authenticated; the error's type when it failed."""
    ACCESS.info(
        "request",
        extra={
            "request_id": rid,
            "method": method,
            "endpoint": endpoint,
            "status": status,
            "adapter": adapter,
            "tenant": tenant,
            "error": error,
            "latency_ms": round(seconds * 1000, 2),
        },
    )
