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


def test_a_response_body_gives_the_place_back_when_it_ends_or_is_dropped(clock: Clock) -> None:
    import asyncio
    import gc
    from collections.abc import AsyncIterator

    from app.main import released_after

    q, t = TenantQuotas(Metrics()), tenant(concurrent=1)

    async def body() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"

    async def read(chunks: AsyncIterator[bytes]) -> list[bytes]:
        return [c async for c in chunks]

    streamed = released_after(body(), q.admit(t))
    with pytest.raises(RateLimited):
        q.admit(t)
    assert asyncio.run(read(streamed)) == [b"data: 1\n\n"]
    dropped = released_after(body(), q.admit(t))  # never iterated: its client went away first
    with pytest.raises(RateLimited):
        q.admit(t)
    del dropped
    gc.collect()
    q.admit(t)
