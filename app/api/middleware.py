"""Around every request: its id (``X-Request-ID`` in and out), the drain switch, a tenant's
rate-limit headers and concurrency place, the request metrics and the request log.

A plain ASGI middleware. Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) runs the
route in a task of its own and passes every response body chunk through a memory stream; a
streamed one-token chat completion spent about a fifth of its event-loop time there.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.adapters.catalog import AdapterCatalog
from app.errors import NotReady, is_openai_path, to_response
from app.logs import REQUEST_ID_HEADER, log_request, request_id
from app.metrics import Metrics
from app.quotas import Ticket

UNMEASURED = frozenset({"/metrics"})
ALWAYS_OPEN = frozenset({"/metrics", "/healthz", "/readyz"})
# the routes whose requests run on an adapter: only their requests carry an ``adapter`` label
# (other routes get the empty value, which PromQL treats as no label)
INFERENCE_ROUTES = frozenset({"/classify", "/generate", "/v1/completions", "/v1/chat/completions"})


class RequestMiddleware:
    """Per request: the request id, metrics and the request log (duration: until the response's
    last byte is sent, streams included); a tenant with limits gets its ``x-ratelimit-*`` headers,
    and its concurrency place back when the response ends, fails, or its client goes away."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        rid = request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        state["request_id"] = rid
        path = scope["path"]
        if scope["app"].state.draining and path not in ALWAYS_OPEN:  # shutting down: admit nothing
            message = "the server is shutting down; retry on another replica"
            response = to_response(NotReady(message), is_openai_path(path))
            response.headers[REQUEST_ID_HEADER] = rid
            await response(scope, receive, send)
            return
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = rid
                ticket: Ticket | None = state.get("ticket")
                if ticket is not None:  # a tenant with limits: its headers
                    headers.update(ticket.headers)
            await send(message)

        if path in UNMEASURED:
            await self.app(scope, receive, send_with_headers)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            ticket = state.get("ticket")
            if ticket is not None:
                ticket.release()
            self._record(scope, state, rid, status, time.perf_counter() - start)

    def _record(self, scope: Scope, state: dict[str, Any], rid: str, status: int, elapsed: float) -> None:
        metrics = self.metrics
        endpoint = str(getattr(scope.get("route"), "path", "unmatched"))  # a bounded label
        adapter: str | None = state.get("adapter")
        catalog: AdapterCatalog | None = getattr(scope["app"].state, "catalog", None)
        label = _adapter_label(catalog, metrics, adapter) if endpoint in INFERENCE_ROUTES else ""
        metrics.requests.labels(endpoint=endpoint, adapter=label, status=str(status)).inc()
        metrics.request_duration.labels(endpoint=endpoint).observe(elapsed)
        composition = _composition_label(catalog, label, adapter)
        if composition is not None:
            metrics.composition_duration.labels(endpoint=endpoint, composition=composition).observe(elapsed)
        tenant = getattr(state.get("tenant"), "name", None)
        if tenant is not None:
            metrics.tenant_requests.labels(tenant=tenant, status=str(status)).inc()
            if endpoint in INFERENCE_ROUTES:
                metrics.tenant_request_duration.labels(tenant=tenant).observe(elapsed)
        asked = adapter if adapter is not None else state.get("asked")
        log_request(rid, scope["method"], endpoint, status, asked, elapsed, tenant, state.get("error"))


def _adapter_label(catalog: AdapterCatalog | None, metrics: Metrics, adapter: str | None) -> str:
    """The bounded ``adapter`` label of an inference request: its adapter or named composition,
    ``base``, ``ad-hoc`` for a composition given in the request, or ``unknown`` for a name the
    store does not hold (404s must not create a series per made-up name)."""
    if adapter is not None and "+" in adapter:  # adapter names have no '+'
        return "ad-hoc"
    known = adapter is not None and (
        catalog is not None and (adapter in catalog or catalog.composition(adapter) is not None)
    )
    return metrics.adapter_label(adapter) if (known or adapter is None) else "unknown"


def _composition_label(catalog: AdapterCatalog | None, label: str, adapter: str | None) -> str | None:
    """The ``composition`` label of a request that used one: a named composition's (bounded) label,
    'ad-hoc' for one given in the request (members joined by '+'), None otherwise."""
    if adapter is None:
        return None
    if "+" in adapter:  # adapter names have no '+'
        return "ad-hoc"
    return label if catalog is not None and catalog.composition(adapter) is not None else None
