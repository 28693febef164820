"""Each tenant's share of the request queue: its waiting work counted from submission (any thread)
until it leaves the lanes' queues (the engine thread), refused beyond ``MAX_QUEUE × queue_share``
with 429 while other tenants are still admitted (docs/tenants.md)."""

from __future__ import annotations

import math
import threading
from collections import Counter

from app.engine.types import ONE_FLOW, Flow
from app.errors import RateLimited
from app.metrics import Metrics


class QueueShares:
    """Waiting work per tenant; any thread."""

    def __init__(self, max_queue: int, metrics: Metrics) -> None:
        self.max_queue = max_queue
        self.metrics = metrics
        self._lock = threading.Lock()
        self._waiting: Counter[str] = Counter()
        self._seen: set[str] = {ONE_FLOW.tenant}  # tenants with a queue-depth series (from the start)

    def enter(self, flow: Flow) -> None:
        """Count a tenant's new queued work, or raise :class:`RateLimited` beyond its share."""
        share = max(1, math.floor(self.max_queue * flow.queue_share))
        with self._lock:
            if self._waiting[flow.tenant] >= share:
                self.metrics.tenant_rejections.labels(tenant=flow.tenant, limit="queue").inc()
                raise RateLimited(
                    f"tenant {flow.tenant!r} has {share} requests waiting, its share of the queue; "
                    "retry when some are answered",
                    "queue",
                    {"Retry-After": "1"},
                )
            self._waiting[flow.tenant] += 1
            self._seen.add(flow.tenant)

    def left(self, flow: Flow) -> None:
        """A work item of ``flow`` left the queues (into a batch, or failed)."""
        with self._lock:
            self._waiting[flow.tenant] -= 1
            if self._waiting[flow.tenant] <= 0:
                del self._waiting[flow.tenant]

    def waiting(self, tenant: str) -> int:
        with self._lock:
            return self._waiting[tenant]

    def report(self) -> None:
        """Set every seen tenant's queue-depth gauge (0 when none of its work waits)."""
        with self._lock:
            waiting, tenants = dict(self._waiting), set(self._seen)
        for tenant in tenants:
            self.metrics.tenant_queue_depth.labels(tenant=tenant).set(waiting.get(tenant, 0))
