"""This replica's view of the store: the table of current adapter versions and named compositions,
read by requests and listings, converging on the store at each sync (:meth:`StoreView.sync`).

The state is :class:`app.adapters.catalog.AdapterCatalog`'s (its base class): its fields are set
here and written only by the catalog's methods, here (what the store says) and in catalog.py (what
this replica changes).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from app.adapters.composition import Composition, MergeCache
from app.adapters.control import EngineControl
from app.adapters.host_tier import HostTier
from app.adapters.intake import Intake
from app.adapters.kinds import Adapter
from app.adapters.records import AdapterRecord, Task, Tier, Usage
from app.adapters.store import AdapterStore, Manifest, check_name
from app.adapters.tasks import ENDPOINTS
from app.errors import AdapterLoadFailed, AdapterNotFound, InvalidAdapter, InvalidRequest, TaskMismatch
from app.metrics import Metrics

log = logging.getLogger(__name__)
Scope = Callable[[str], bool]  # the adapter and composition names a request may use


def everything(name: str) -> bool:
    return True


class StoreView:
    """The catalog's state and its convergence on the store."""

    def __init__(
        self,
        intake: Intake,
        engine: EngineControl,
        metrics: Metrics,
        host_budget: int,
        pin_limit: int,
        pinned: Iterable[str] = (),
        ensemble_rows: int = 8,
    ) -> None:
        self.intake = intake
        self.store: AdapterStore = intake.store
        self.engine = engine
        self.metrics = metrics
        self.pin_limit = pin_limit  # names pinned at once (MAX_DEVICE_ADAPTERS - 1)
        self.ensemble_rows = ensemble_rows  # the most members of an ensemble generation
        self.configured_pins = frozenset(pinned)  # PIN: kept whatever the store says
        self._records: dict[str, AdapterRecord] = {}  # the current version of each name
        self._skipped: dict[str, int] = {}  # name -> store version not served here (other base, invalid)
        # name -> when this replica last changed it (time.monotonic()): a listing read before that
        # is stale for the name (an upload or delete made here after it must not be undone by it)
        self._changed_at: dict[str, float] = {}
        self._compositions: dict[str, Composition] = {}
        self._pinned: frozenset[str] = frozenset()  # replaced whole (read by other threads)
        self._usage: dict[int, Usage] = {}  # uid -> counters
        self.host = HostTier(host_budget, metrics, lambda name: name in self._pinned)
        self.merges = MergeCache(intake.max_rank, self.host, engine.retire, metrics)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.synced_at: float | None = None  # when the last sync with the store completed

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    # --- reading ------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._records

    def adapters(self) -> list[AdapterRecord]:
        return [self._records[n] for n in sorted(self._records)]

    def compositions(self) -> list[Composition]:
        return [self._compositions[n] for n in sorted(self._compositions)]

    def find(self, name: str) -> AdapterRecord | None:
        return self._records.get(name)

    def composition(self, name: str) -> Composition | None:
        return self._compositions.get(name)

    def get(self, name: str, scope: Scope = everything) -> AdapterRecord:
        """The current version of ``name``; 404 when there is none, or (the same answer, word for
        word) when ``scope`` does not admit the name."""
        record = self._records.get(name) if scope(name) else None
        if record is None:
            hint = self.did_you_mean(name, scope=scope)
            raise AdapterNotFound(
                f"adapter {name!r} not found{hint} (GET /v1/adapters lists them)", param="adapter"
            )
        return record

    def for_task(self, name: str, task: Task, scope: Scope = everything) -> AdapterRecord:
        record = self.get(name, scope)
        if record.task != task:
            raise TaskMismatch(
                f"adapter {name!r} is a {record.task} adapter; use {ENDPOINTS[record.task]}", param="adapter"
            )
        return record

    def pinned(self, name: str) -> bool:
        return name in self._pinned and name in self._records

    def did_you_mean(self, name: str, extra: tuple[str, ...] = (), scope: Scope = everything) -> str:
        """``; did you mean 'x'?`` for the adapter names in ``scope`` (and ``extra``) closest to
        ``name``, or ''."""
        names = [n for n in self._records if scope(n)]
        close = difflib.get_close_matches(name, [*names, *extra], n=3, cutoff=0.6)
        return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""

    def describe(self, record: AdapterRecord) -> dict[str, Any]:
        """``record``'s public description, its tier as the engine and the host tier report it now."""
        tier: Tier = (
            "device"
            if record.uid in self.engine.device_uids()
            else "host"
            if record.uid in self.host
            else "store"
        )
        return record.describe(tier, self.pinned(record.name), self._usage.get(record.uid))

    def describe_composition(self, comp: Composition) -> dict[str, Any]:
        """The public description: members with their current versions, the task they serve."""
        return comp.describe([self._records.get(n) for n in comp.names])

    async def lookup(self, name: str) -> None:
        """Before a request about ``name`` answers 404 here: look in the store (a worker thread)."""
        if name in self._records or name in self._compositions:
            return
        try:
            check_name(name)
        except InvalidRequest:  # no store holds such a name: the caller's 404
            return
        await asyncio.to_thread(self.refresh, name)
        if name not in self._records:
            self._adopt(name, await asyncio.to_thread(self.store.composition, name))

    # --- converging on the store ----------------------------------------------------------------
    def scan(self) -> None:
        """The first sync at start (adapters placed by hand are validated once, here)."""
        self.store.recover()
        self.sync()
        self.sync_compositions()

    def sync(self) -> None:
        """Adopt every adapter version and deletion the store holds that this replica has not seen
        (from any replica, or placed by hand). Idempotent; a worker thread."""
        start = time.perf_counter()
        listed_at = time.monotonic()
        state = self.store.state()
        for name in sorted({*state, *self._records}):
            self._apply(name, state.get(name), listed_at)
        self.synced_at = time.time()
        self.metrics.store_last_sync.set(self.synced_at)
        self.metrics.store_sync_seconds.observe(time.perf_counter() - start)
        self.metrics.store_generation.set(sum(manifest.version for manifest in state.values()))

    def refresh(self, name: str) -> None:
        """Look adapter ``name`` up in the store now (one uploaded through another replica a moment
        ago must not answer 404 here)."""
        try:
            check_name(name)
        except InvalidRequest:
            return
        listed_at = time.monotonic()
        self._apply(name, self.store.current(name), listed_at)

    def _apply(self, name: str, manifest: Manifest | None, listed_at: float) -> None:
        """Adopt ``manifest`` (the store's current version of ``name`` as listed at ``listed_at``;
        None: the name is gone) unless this replica changed the name since."""
        with self._lock(name):
            if self._changed_at.get(name, float("-inf")) > listed_at:
                return
            known = self._records.get(name)
            if manifest is None or manifest.deleted:
                self._skipped.pop(name, None)
                if known is not None:
                    self._forget(known)
                    log.info("adapter %s deleted in the store", name)
                return
            if (known is not None and known.version >= manifest.version) or self._skipped.get(
                name
            ) == manifest.version:
                return
            try:
                record = self.intake.record_of(manifest)
            except (InvalidAdapter, AdapterLoadFailed) as exc:
                log.warning(
                    "skipping adapter %s version %d in the store: %s", name, manifest.version, exc.message
                )
                record = None
            if record is None:  # another base's, or invalid: not served here
                self._skipped[name] = manifest.version
                if known is not None:
                    self._forget(known)
                return
            self._install(record, known)
            log.info("adapter %s version %d from the store", name, record.version)

    def _install(
        self, record: AdapterRecord, old: AdapterRecord | None, weights: Adapter | None = None
    ) -> None:
        """Make ``record`` the current version of its name (under the name's lock)."""
        self._records[record.name] = record
        self._changed_at[record.name] = time.monotonic()
        self._skipped.pop(record.name, None)
        if weights is not None:
            self.host.add(record, weights)
        if old is not None:
            self._retire(old)
        self._update_store_gauges()

    def _forget(self, record: AdapterRecord) -> None:
        """Drop ``record``'s name (under the name's lock); requests holding it finish on it."""
        del self._records[record.name]
        self._retire(record)
        self._update_store_gauges()

    def _retire(self, record: AdapterRecord) -> None:
        self.host.remove(record)
        self.engine.retire(record.handle)

    def _update_store_gauges(self) -> None:
        m = self.metrics
        m.adapters_resident.labels(tier="store").set(len(self._records))
        m.adapter_resident_bytes.labels(tier="store").set(sum(r.size_bytes for r in self._records.values()))

    def sync_compositions(self) -> None:
        """Adopt the store's composition records as of its last listing (after :meth:`sync`)."""
        versions = self.store.composition_versions
        for name in set(self._compositions) - set(versions):
            self._compositions.pop(name, None)
        for name, numbers in versions.items():
            self._adopt(name, self.store.composition_record(name, max(numbers)))

    def _adopt(self, name: str, record: dict[str, Any] | None) -> None:
        if record is None or record.get("deleted"):
            self._compositions.pop(name, None)
            return
        known = self._compositions.get(name)
        if known is not None and known.version >= int(record["version"]):
            return
        try:
            self._compositions[name] = comp = Composition.from_record(name, record)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping composition %s in the store: %s", name, exc)
            return
        log.info("composition %s version %d from the store", name, comp.version)
