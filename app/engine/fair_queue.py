"""Fair admission: the waiting work of one lane, served by weighted fair queueing.

Two levels, both start-time fair queueing (virtual time): across tenants, each weighted by its
``weight``; within a tenant, across its adapters (the bare base counts as one), equally. Every flow
(tenant, or adapter within a tenant) has a virtual time that grows by the cost of the work it is
served divided by its weight; the next work comes from the flow with the smallest virtual time,
and within an adapter by ``priority`` (lower first) and then arrival. A flow that was idle starts at
the current virtual time (the start tag of the last work served), so idleness earns no credit that
could later starve the others, and a newly active flow is served next: a quiet tenant's request
joins the very next batch however long a flood's queue is. Costs are tokens (prompt and the most
it may generate; a classification's input tokens), so a short request costs little.

With ``fair=False`` it is first come, first served (one flow, arrival order: the scheduler before
tenants, kept for comparison in ``bench/noisy_neighbour.py``).

Only the engine thread uses a queue; ``on_leave`` is called for each work that leaves it (taken
into a batch or removed), so that the engine can count each tenant's waiting work.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from app.engine.types import ONE_FLOW, Flow


class Queued(Protocol):
    @property
    def flow(self) -> Flow: ...

    @property
    def cost(self) -> int: ...


W = TypeVar("W", bound=Queued)


@dataclass
class _Adapter(Generic[W]):
    vtime: float = 0.0
    heap: list[tuple[int, int, W]] = field(default_factory=list)  # (priority, arrival, work)


@dataclass
class _Tenant(Generic[W]):
    weight: float = 1.0
    vtime: float = 0.0
    clock: float = 0.0  # the virtual time of its adapters
    adapters: dict[str, _Adapter[W]] = field(default_factory=dict)
    count: int = 0


class FairQueue(Generic[W]):
    """Waiting work by tenant and adapter (see the module docstring); engine thread only."""

    def __init__(self, fair: bool = True, on_leave: Callable[[W], None] | None = None) -> None:
        self.fair = fair
        self._on_leave = on_leave or (lambda work: None)
        self._tenants: dict[str, _Tenant[W]] = {}
        self._clock = 0.0  # the tenants' virtual time
        self._arrivals = itertools.count()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[W]:
        """The waiting work in arrival order."""
        entries = [e for t in self._tenants.values() for a in t.adapters.values() for e in a.heap]
        return iter([work for _, _, work in sorted(entries, key=lambda e: e[1])])

    def waiting(self, tenant: str) -> int:
        """Work of ``tenant`` waiting here."""
        t = self._tenants.get(tenant)
        return t.count if t is not None else 0

    def append(self, work: W) -> None:
        flow = work.flow if self.fair else ONE_FLOW
        tenant = self._tenants.get(flow.tenant)
        if tenant is None:
            tenant = self._tenants[flow.tenant] = _Tenant(vtime=self._clock)
        elif tenant.count == 0:  # idle until now: no credit for the time it was away
            tenant.vtime = max(tenant.vtime, self._clock)
        tenant.weight = flow.weight  # (the tenants file may have changed it)
        adapter = tenant.adapters.get(flow.adapter)
        if adapter is None:
            adapter = tenant.adapters[flow.adapter] = _Adapter(vtime=tenant.clock)
        elif not adapter.heap:
            adapter.vtime = max(adapter.vtime, tenant.clock)
        heapq.heappush(adapter.heap, (flow.priority if self.fair else 0, next(self._arrivals), work))
        tenant.count += 1
        self._len += 1

    def extend(self, works: Iterable[W]) -> None:
        for work in works:
            self.append(work)

    def _next(self, skip: Collection[str] = ()) -> tuple[str, str] | None:
        """(tenant, adapter) of the work to serve next: the smallest virtual times, ties by arrival;
        tenants in ``skip`` are passed over."""
        best: tuple[float, int, str] | None = None
        for name, tenant in self._tenants.items():
            if name in skip:
                continue
            if tenant.count:
                candidate = (tenant.vtime, self._head(tenant), name)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        if best is None:
            return None
        tenant = self._tenants[best[2]]
        key = min(
            (a for a in tenant.adapters if tenant.adapters[a].heap),
            key=lambda a: (tenant.adapters[a].vtime, tenant.adapters[a].heap[0][1]),
        )
        return best[2], key

    @staticmethod
    def _head(tenant: _Tenant[W]) -> int:
        return min(a.heap[0][1] for a in tenant.adapters.values() if a.heap)

    def peek(self, skip: Collection[str] = ()) -> W | None:
        """The work to serve next, of a tenant not in ``skip`` (None: none); :meth:`pop` with the same
        ``skip`` takes it."""
        found = self._next(skip)
        if found is None:
            return None
        return self._tenants[found[0]].adapters[found[1]].heap[0][2]

    def pop(self, skip: Collection[str] = ()) -> W:
        """Take the work :meth:`peek` shows and charge its flows."""
        found = self._next(skip)
        if found is None:
            raise IndexError("pop from an empty queue")
        tenant = self._tenants[found[0]]
        adapter = tenant.adapters[found[1]]
        _, _, work = heapq.heappop(adapter.heap)
        cost = max(1, work.cost)
        self._clock = tenant.vtime
        tenant.vtime += cost / tenant.weight
        tenant.clock = adapter.vtime
        adapter.vtime += cost
        self._took(found[0], tenant, work)
        return work

    def remove_if(self, pred: Callable[[W], bool]) -> list[W]:
        """Remove (and return) the waiting work for which ``pred`` holds; charges nothing."""
        removed: list[tuple[int, W]] = []
        for name, tenant in list(self._tenants.items()):
            for adapter in list(tenant.adapters.values()):
                gone = [entry for entry in adapter.heap if pred(entry[2])]
                if gone:
                    adapter.heap = [entry for entry in adapter.heap if not pred(entry[2])]
                    heapq.heapify(adapter.heap)
                    for _, arrival, work in gone:
                        self._took(name, tenant, work)
                        removed.append((arrival, work))
        return [work for _, work in sorted(removed, key=lambda e: e[0])]

    def clear(self) -> list[W]:
        return self.remove_if(lambda work: True)

    def _took(self, name: str, tenant: _Tenant[W], work: W) -> None:
        tenant.count -= 1
        self._len -= 1
        if tenant.count == 0 and tenant.vtime <= self._clock:  # nothing to remember: forget it
            del self._tenants[name]
        else:
            for key in [k for k, a in tenant.adapters.items() if not a.heap and a.vtime <= tenant.clock]:
                del tenant.adapters[key]
        self._on_leave(work)
