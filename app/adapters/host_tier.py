"""The host tier: validated weights of the most recently used adapter versions in host memory,
within a byte budget (LRU; pinned adapters are never evicted)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

from app.adapters.kinds import Adapter
from app.metrics import Metrics

if TYPE_CHECKING:
    from app.adapters.registry import AdapterInfo

log = logging.getLogger(__name__)


class HostTier:
    """Holds ``info.weights`` for the versions it keeps; thread-safe."""

    def __init__(self, budget: int, metrics: Metrics) -> None:
        self.budget = budget
        self.metrics = metrics
        self._lock = threading.Lock()
        self._lru: OrderedDict[int, AdapterInfo] = OrderedDict()  # least recently used first
        self._bytes = 0

    def get(self, info: AdapterInfo) -> Adapter | None:
        """The weights of ``info`` if resident (marks them recently used)."""
        weights = info.weights
        if weights is not None:
            with self._lock:
                if info.uid in self._lru:
                    self._lru.move_to_end(info.uid)
        return weights

    def add(self, info: AdapterInfo, adapter: Adapter) -> None:
        with self._lock:
            info.weights = adapter
            if info.uid not in self._lru:
                self._bytes += info.size_bytes
            self._lru[info.uid] = info
            self._evict(keep=info.uid)
        self._update_gauges()

    def remove(self, info: AdapterInfo) -> None:
        """Drop the tier's reference (requests that hold the weights keep them until they finish)."""
        with self._lock:
            if self._lru.pop(info.uid, None) is not None:
                self._bytes -= info.size_bytes
            info.weights = None
        self._update_gauges()

    def _evict(self, keep: int) -> None:
        for uid in list(self._lru):
            if self._bytes <= self.budget:
                return
            info = self._lru[uid]
            if uid == keep or info.pinned:
                continue
            del self._lru[uid]
            self._bytes -= info.size_bytes
            info.weights = None
            self.metrics.adapter_evictions.labels(tier="host").inc()
            log.debug("adapter %s v%d evicted from host memory", info.name, info.version)

    def _update_gauges(self) -> None:
        self.metrics.adapters_resident.labels(tier="host").set(len(self._lru))
        self.metrics.adapter_resident_bytes.labels(tier="host").set(self._bytes)
