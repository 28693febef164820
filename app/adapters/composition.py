"""Compositions: several adapters used as one, by request (``adapters``) or by name.

A composition is weighted members and a method (:mod:`app.adapters.methods`):

- ``mean``, ``vote``, ``logits`` (classification ensembles, :mod:`app.serving.ensembles`) and
  ``average`` (ensemble generation): every member runs as its own rows of the shared batches and the
  outputs are combined;
- ``cat``, ``linear``, ``ties`` (:mod:`app.adapters.merging`): the members' LoRA weights are merged
  into one adapter, computed once per distinct composition (members' versions included) and served
  as one slot (:class:`MergeCache`).

A composition names its members, not their versions; the catalog resolves them to the versions
current when a request arrives (:meth:`app.adapters.catalog.AdapterCatalog.resolve`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from app.adapters.host_tier import HostTier
from app.adapters.kinds import Adapter
from app.adapters.merging import merge_lora
from app.adapters.methods import MERGE_METHODS, METHODS, Method, is_merge
from app.adapters.records import AdapterRecord, Held, Task
from app.adapters.summary import summarize
from app.adapters.tasks import ENDPOINTS
from app.adapters.version import AdapterVersion
from app.errors import IncompatibleMembers, TaskMismatch
from app.metrics import Metrics

log = logging.getLogger(__name__)

MAX_MERGES = 64  # merged adapters kept (host tier budget permitting)


@dataclass(frozen=True)
class Composition:
    members: tuple[tuple[str, float], ...]  # (adapter name, weight)
    method: Method
    density: float = 1.0  # ties: the share of each member's values kept
    name: str | None = None  # named compositions
    version: int = 0
    created_at: float = 0.0

    @classmethod
    def of(cls, members: Iterable[tuple[str, float]], method: Method, density: float) -> Composition:
        """A composition given in a request (``adapters``: names and weights)."""
        return cls(tuple(members), method, density)

    @property
    def label(self) -> str:
        """Its name, or (by request) its members joined by '+'."""
        return self.name or "+".join(n for n, _ in self.members)

    @property
    def merges(self) -> bool:
        return self.method in MERGE_METHODS

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.members]

    @property
    def weights(self) -> list[float]:
        return [w for _, w in self.members]

    def record(self) -> dict[str, Any]:
        return {
            "members": [{"name": n, "weight": w} for n, w in self.members],
            "method": self.method,
            "density": self.density,
            "created_at": self.created_at,
        }

    def describe(self, records: Sequence[AdapterRecord | None]) -> dict[str, Any]:
        """The public description with the members' current ``records`` (None: a member is gone)."""
        first = records[0]
        return {
            "name": self.label,
            "task": first.task if first is not None and all(records) else None,
            "method": self.method,
            "density": self.density,
            "members": [
                {"name": n, "weight": w, "version": r.version if r is not None else None}
                for (n, w), r in zip(self.members, records, strict=True)
            ],
            "labels": (list(first.labels) or None) if first is not None else None,
            "version": self.version,
            "created_at": self.created_at,
        }

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any]) -> Composition:
        method = record["method"]
        if method not in METHODS["classify"] + METHODS["generate"]:
            raise ValueError(f"unknown method {method!r}")
        return cls(
            members=tuple((str(m["name"]), float(m["weight"])) for m in record["members"]),
            method=method,
            density=float(record.get("density", 1.0)),
            name=name,
            version=int(record.get("version", 0)),
            created_at=float(record.get("created_at", 0.0)),
        )


def shared_labels(members: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """The label set every member shares, in the first member's order; 400 naming a mismatch."""
    first_name, first = members[0]
    for name, labels in members[1:]:
        if set(labels) != set(first) or len(labels) != len(first):
            missing = sorted(set(first) - set(labels))
            extra = sorted(set(labels) - set(first))
            raise IncompatibleMembers(
                f"ensemble members must share one label set: {name!r} differs from {first_name!r} "
                f"(missing {missing}, extra {extra})",
                param="adapters",
            )
    return list(first)


def check_members(
    comp: Composition, records: Sequence[AdapterRecord], task: Task | None, ensemble_rows: int
) -> Task:
    """400/409 before any work: the members (these versions, one per name) serve one task (``task``,
    when given) that the method serves, and (classification) share their labels. Returns the task."""
    wrong = [r for r in records if task is not None and r.task != task]
    if wrong and task is not None and comp.name is None:  # a request's own members: name the odd one
        raise TaskMismatch(
            f"adapter {wrong[0].name!r} is a {wrong[0].task} adapter; use {ENDPOINTS[wrong[0].task]}",
            param="adapter",
        )
    tasks = {r.task for r in records}
    if len(tasks) > 1:
        raise IncompatibleMembers(
            "a composition's members serve one task: " + ", ".join(f"{r.name} ({r.task})" for r in records),
            param="adapters",
        )
    (own,) = tasks
    if task is not None and own != task:
        raise TaskMismatch(f"{comp.label!r} is a {own} composition; use {ENDPOINTS[own]}", param="adapter")
    if comp.method not in METHODS[own]:
        raise IncompatibleMembers(
            f"{comp.method!r} does not combine {own} adapters; use one of {', '.join(METHODS[own])}",
            param="method",
        )
    if own == "classify":
        shared_labels([(r.name, r.labels) for r in records])
    if comp.method == "average" and len(records) > ensemble_rows:
        raise IncompatibleMembers(
            "ensemble generation runs every member as a row of one batch, each in a device slot: "
            f"at most {ensemble_rows} members here (MAX_BATCH_SIZE, MAX_DEVICE_ADAPTERS)",
            param="adapters",
        )
    return own


class MergeCache:
    """Merged adapters by composition and member versions, most recently used last; their weights
    live in the host tier like any version's, and a superseded merge is retired from the device."""

    def __init__(
        self, max_rank: int, host: HostTier, retire: Callable[[AdapterVersion], None], metrics: Metrics
    ) -> None:
        self.max_rank = max_rank
        self.host = host
        self.retire = retire
        self.metrics = metrics
        self._lock = threading.Lock()
        self._merged: OrderedDict[tuple[Any, ...], AdapterRecord] = OrderedDict()

    def held(self, comp: Composition, members: Sequence[Held]) -> Held:
        """The merged adapter of ``comp`` over these member versions: cached, else merged now
        (blocking; milliseconds)."""
        key = self.key(comp, members)
        record = self.get(key)
        weights = self.host.get(record) if record is not None else None
        if record is not None and weights is not None:
            return Held(record, weights)
        start = time.perf_counter()
        record, weights = self.merge(comp, members)
        self.metrics.adapter_merges.inc()
        self.metrics.adapter_merge_seconds.observe(time.perf_counter() - start)
        self.host.add(record, weights)
        for old in self.put(key, record):
            self.host.remove(old)
            self.retire(old.handle)
        log.info("merged %s (%s of %s)", comp.label, comp.method, ", ".join(comp.names))
        return Held(record, weights)

    @staticmethod
    def key(comp: Composition, members: Sequence[Held]) -> tuple[Any, ...]:
        return (comp.label, comp.method, comp.density, tuple((h.record.uid, h.weight) for h in members))

    def get(self, key: tuple[Any, ...]) -> AdapterRecord | None:
        with self._lock:
            record = self._merged.get(key)
            if record is not None:
                self._merged.move_to_end(key)
            return record

    def merge(self, comp: Composition, members: Sequence[Held]) -> tuple[AdapterRecord, Adapter]:
        """Merge now (blocking; milliseconds): the merged record and weights (400 on members that
        do not merge)."""
        method = comp.method
        assert is_merge(method), "only merges are merged"
        weights = merge_lora(
            [(h.record.name, h.weights, h.weight) for h in members], method, self.max_rank, comp.density
        )
        record = AdapterRecord.of(comp.label, max(comp.version, 1), time.time(), summarize(weights))
        return record, weights

    def put(self, key: tuple[Any, ...], record: AdapterRecord) -> list[AdapterRecord]:
        """Keep ``record`` under ``key``; returns the records it supersedes (the same composition's
        earlier merges, and the least recently used beyond :data:`MAX_MERGES`)."""
        with self._lock:
            gone = [old for k, old in self._merged.items() if k[0] == key[0]]
            self._merged = OrderedDict((k, v) for k, v in self._merged.items() if k[0] != key[0])
            self._merged[key] = record
            while len(self._merged) > MAX_MERGES:
                gone.append(self._merged.popitem(last=False)[1])
        return gone
