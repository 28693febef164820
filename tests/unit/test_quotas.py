"""Tenant quotas (app/quotas.py) with a clock the test moves: pure logic, no model."""

from __future__ import annotations

import pytest

from app import quotas as quotas_module
from app.errors import RateLimited
from app.metrics import Metrics
from app.quotas import TenantQuotas, duration
from app.tenants import Limits, Tenant


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(quotas_module.time, "monotonic", c)
    return c


def tenant(**limits: float) -> Tenant:
    return Tenant("acme", limits=Limits(**limits))  # type: ignore[arg-type]


def test_reset_times_read_as_openai_writes_them() -> None:
    assert duration(0.0171) == "18ms" and duration(1.5) == "1.5s" and duration(360) == "6m0s"


def test_requests_per_second_refuse_then_recover(clock: Clock) -> None:
    q, t = TenantQuotas(Metrics()), tenant(requests_per_second=2)
    first = q.admit(t)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "500ms"
    q.admit(t)
    with pytest.raises(RateLimited) as refused:
        q.admit(t)
    assert refused.value.limit == "requests" and refused.value.headers["Retry-After"] == "1"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += 0.5  # one request's worth refilled
    assert q.admit(t).headers["x-ratelimit-remaining-requests"] == "0"


def test_tokens_are_charged_after_and_may_overdraw(clock: Clock) -> None:
    q, t = TenantQuotas(Metrics()), tenant(tokens_per_minute=600)  # 10 per second
    assert q.admit(t).headers["x-ratelimit-remaining-tokens"] == "600"
    q.charge("acme", 650)  # a long generation
    with pytest.raises(RateLimited) as refused:
        q.admit(t)
    assert refused.value.limit == "tokens" and refused.value.headers["Retry-After"] == "6"
    clock.now += 5.0  # 50 of the 51 tokens it needs to hold one again
    with pytest.raises(RateLimited):
        q.admit(t)
    clock.now += 0.2
    assert q.admit(t).headers["x-ratelimit-reset-tokens"] == "59.8s"


def test_concurrent_requests_until_released(clock: Clock) -> None:
    q, t = TenantQuotas(Metrics()), tenant(concurrent=1)
    ticket = q.admit(t)
    with pytest.raises(RateLimited) as refused:
        q.admit(t)
    assert refused.value.limit == "concurrent"
    ticket.release()
    ticket.release()  # once only
    q.admit(t)
    with pytest.raises(RateLimited):
        q.admit(t)


def test_a_refused_request_takes_nothing_and_other_tenants_are_apart(clock: Clock) -> None:
    q = TenantQuotas(Metrics())
    t = tenant(requests_per_second=1, concurrent=1)
    ticket = q.admit(t)
    clock.now += 1
    with pytest.raises(RateLimited):  # concurrent: the request bucket keeps its refill
        q.admit(t)
    ticket.release()
    assert q.admit(t).headers["x-ratelimit-remaining-requests"] == "0"
    assert q.admit(Tenant("other", limits=Limits(requests_per_second=1))).headers
    assert q.admit(Tenant("free")).headers == {}  # no limits: no headers, nothing counted


def test_changed_limits_apply_at_once_and_keep_the_running_count(clock: Clock) -> None:
    q = TenantQuotas(Metrics())
    q.admit(tenant(concurrent=2))
    with pytest.raises(RateLimited):
        q.admit(tenant(concurrent=1))


def test_the_request_middleware_gives_the_place_back_when_the_response_ends_or_fails(clock: Clock) -> None:
    from collections.abc import AsyncIterator

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from app.api.middleware import RequestMiddleware

    q, t = TenantQuotas(Metrics()), tenant(concurrent=1)
    held: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        try:
            q.admit(t)
        except RateLimited:
            held.append(True)  # the place is still taken while the body streams
        yield b"data: 1\n\n"

    async def stream(request: Request) -> Response:
        request.state.ticket = q.admit(t)
        return StreamingResponse(body())

    async def broken(request: Request) -> Response:
        request.state.ticket = q.admit(t)
        raise RuntimeError("the route failed")

    app = Starlette(routes=[Route("/stream", stream), Route("/broken", broken)])
    app.state.draining = False
    app.add_middleware(RequestMiddleware, metrics=Metrics())
    client = TestClient(app, raise_server_exceptions=False)
    streamed = client.get("/stream")
    assert streamed.text == "data: 1\n\n" and streamed.headers["x-request-id"] and held == [True]
    q.admit(t).release()  # given back when the stream ended
    assert client.get("/broken").status_code == 500
    q.admit(t).release()  # and when the route failed
