"""Tenant quotas on this replica: requests per second, tokens per minute, concurrent requests.

Requests and tokens are token buckets. Requests: holds one second's worth (at least 1), refills at
``requests_per_second``; each request takes one. Tokens: holds ``tokens_per_minute``, refills at a
sixtieth of it per second; a request is admitted while the bucket is not empty and is charged the
tokens it used (prompt and generated) when it finishes, so a long generation may overdraw it and
the next requests wait until it refilled. Concurrent: requests admitted and not yet answered (a
stream counts until its last event). Over a limit: :class:`RateLimited` (429) with ``Retry-After``
and OpenAI's ``x-ratelimit-*`` headers; those headers also go on every admitted response of a
tenant with limits. With several replicas each one counts alone (docs/tenants.md).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from app.errors import RateLimited
from app.metrics import Metrics
from app.tenants import Limits, Tenant


def duration(seconds: float) -> str:
    """OpenAI's form of a reset time: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest):d}s"


def _number(value: float) -> str:
    return f"{value:g}"


@dataclass
class Bucket:
    capacity: float
    rate: float  # per second
    level: float = 0.0
    at: float = 0.0

    def __post_init__(self) -> None:
        self.level, self.at = self.capacity, time.monotonic()

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
            self.at = now

    def wait(self, need: float = 1.0) -> float:
        """Seconds until it holds ``need``."""
        return max(0.0, (need - self.level) / self.rate)

    def reset(self) -> float:
        """Seconds until it is full."""
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass
class _Account:
    limits: Limits
    requests: Bucket | None
    tokens: Bucket | None
    in_flight: int = 0

    @classmethod
    def of(cls, limits: Limits) -> _Account:
        rps, tpm = limits.requests_per_second, limits.tokens_per_minute
        return cls(
            limits,
            Bucket(max(1.0, rps), rps) if rps else None,
            Bucket(float(tpm), tpm / 60.0) if tpm else None,
        )


class Ticket:
    """An admitted request: its rate-limit headers, and its concurrency slot until released."""

    def __init__(self, quotas: TenantQuotas | None, tenant: str, headers: dict[str, str]) -> None:
        self._quotas = quotas
        self.tenant = tenant
        self.headers = headers

    def release(self) -> None:
        """The request was answered (idempotent)."""
        if self._quotas is not None:
            self._quotas.release(self.tenant)
            self._quotas = None


class TenantQuotas:
    """Each tenant's buckets and in-flight count on this replica; any thread."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}

    def _account(self, tenant: Tenant) -> _Account:
        account = self._accounts.get(tenant.name)
        if account is None or account.limits != tenant.limits:  # new, or the file changed its limits
            fresh = _Account.of(tenant.limits)
            if account is not None:
                fresh.in_flight = account.in_flight
            account = self._accounts[tenant.name] = fresh
        return account

    def admit(self, tenant: Tenant) -> Ticket:
        """Admit one request of ``tenant`` or raise :class:`RateLimited` (nothing is taken then)."""
        limits = tenant.limits
        if limits == Limits():
            return Ticket(None, tenant.name, {})
        now = time.monotonic()
        with self._lock:
            account = self._account(tenant)
            for bucket in (account.requests, account.tokens):
                if bucket is not None:
                    bucket.refill(now)
            headers = self._headers(account)
            refused = self._refusal(tenant.name, account)
            if refused is not None:
                limit, message, wait = refused
                self.metrics.tenant_rejections.labels(tenant=tenant.name, limit=limit).inc()
                headers["Retry-After"] = str(max(1, math.ceil(wait)))
                raise RateLimited(message, limit, headers)
            if account.requests is not None:
                account.requests.level -= 1
            account.in_flight += 1
            return Ticket(self, tenant.name, self._headers(account))

    @staticmethod
    def _refusal(name: str, account: _Account) -> tuple[str, str, float] | None:
        limits = account.limits
        if account.requests is not None and account.requests.level < 1:
            rate = f"{_number(limits.requests_per_second or 0)} requests per second"
            return "requests", f"tenant {name!r} is over its limit of {rate}", account.requests.wait()
        if account.tokens is not None and account.tokens.level < 1:
            rate = f"{limits.tokens_per_minute} tokens per minute"
            return "tokens", f"tenant {name!r} is over its limit of {rate}", account.tokens.wait()
        if limits.concurrent is not None and account.in_flight >= limits.concurrent:
            message = f"tenant {name!r} has {limits.concurrent} requests running, its limit"
            return "concurrent", message, 1.0
        return None

    @staticmethod
    def _headers(account: _Account) -> dict[str, str]:
        headers: dict[str, str] = {}
        if account.requests is not None:
            headers["x-ratelimit-limit-requests"] = _number(account.requests.capacity)
            headers["x-ratelimit-remaining-requests"] = str(max(0, math.floor(account.requests.level)))
            headers["x-ratelimit-reset-requests"] = duration(account.requests.reset())
        if account.tokens is not None:
            headers["x-ratelimit-limit-tokens"] = _number(account.tokens.capacity)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(account.tokens.level)))
            headers["x-ratelimit-reset-tokens"] = duration(account.tokens.reset())
        return headers

    def release(self, tenant: str) -> None:
        with self._lock:
            account = self._accounts.get(tenant)
            if account is not None and account.in_flight > 0:
                account.in_flight -= 1

    def charge(self, tenant: str, tokens: int) -> None:
        """Tokens a finished request of ``tenant`` used (called by the engine thread)."""
        with self._lock:
            account = self._accounts.get(tenant)
            if account is not None and account.tokens is not None:
                account.tokens.refill(time.monotonic())
                account.tokens.level -= tokens
