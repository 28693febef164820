"""The host tier: validated weights of the most recently used adapter versions in host memory,
within a byte budget (LRU; versions of pinned names are never evicted). It is the one writer of host
residency: any thread may call it (a lock guards its table)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from app.adapters.kinds import Adapter
from app.adapters.records import AdapterRecord
from app.metrics import Metrics

log = logging.getLogger(__name__)


class HostTier:
    """Weights by version uid; ``pinned(name)`` says which names are never evicted."""

    def __init__(self, budget: int, metrics: Metrics, pinned: Callable[[str], bool]) -> None:
        self.budget = budget
        self.metrics = metrics
        self.pinned = pinned
        self._lock = threading.Lock()
        # least recently used first: uid -> (record, weights)
        self._lru: OrderedDict[int, tuple[AdapterRecord, Adapter]] = OrderedDict()
        self._bytes = 0

    def __contains__(self, uid: object) -> bool:
        return uid in self._lru

    def get(self, record: AdapterRecord) -> Adapter | None:
        """The weights of ``record`` if resident (marks them recently used)."""
        with self._lock:
            held = self._lru.get(record.uid)
            if held is None:
                return None
            self._lru.move_to_end(record.uid)
            return held[1]

    def add(self, record: AdapterRecord, adapter: Adapter) -> None:
        with self._lock:
            if record.uid not in self._lru:
                self._bytes += record.size_bytes
            self._lru[record.uid] = (record, adapter)
            self._evict(keep=record.uid)
        self._update_gauges()

    def remove(self, record: AdapterRecord) -> None:
        """Drop the tier's reference (requests that hold the weights keep them until they finish)."""
        with self._lock:
            if self._lru.pop(record.uid, None) is not None:
                self._bytes -= record.size_bytes
        self._update_gauges()

    def _evict(self, keep: int) -> None:
        for uid in list(self._lru):
            if self._bytes <= self.budget:
                return
            record = self._lru[uid][0]
            if uid == keep or self.pinned(record.name):
                continue
            del self._lru[uid]
            self._bytes -= record.size_bytes
            self.metrics.adapter_evictions.labels(tier="host").inc()
            log.debug("adapter %s v%d evicted from host memory", record.name, record.version)

    def _update_gauges(self) -> None:
        self.metrics.adapters_resident.labels(tier="host").set(len(self._lru))
        self.metrics.adapter_resident_bytes.labels(tier="host").set(self._bytes)
