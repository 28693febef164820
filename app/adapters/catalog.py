"""The catalog: the one owner of this replica's adapter state, and the answer to "what happens when
an adapter is uploaded, replaced, pinned, deleted, composed".

It owns the name→version table (immutable :class:`AdapterRecord` per name), the named compositions,
the pins and the merged adapters, and is the only writer of them; the engine's control surface
(:class:`EngineControl`: load, pin, unpin, retire, resident versions) is given to its constructor.

- **upload** (:meth:`upload`, a worker thread, under the name's lock): the archive is validated in
  full and installed in the store as the next version; its record replaces the name's in the table
  and the old version is retired (the engine frees its slot once no running work uses it; requests
  that resolved the old record finish on it).
- **replace through another replica**: :meth:`follow_store` (every ``STORE_SYNC_INTERVAL_S``)
  adopts the store's new versions, deletions, compositions and fleet-wide pins; a name this replica
  has not seen yet is looked up in the store before a 404 (:meth:`lookup`).
- **pin** (:meth:`pin`): loaded into a device slot first, recorded after (in the store first with
  ``fleet``, so that a sync in between pins rather than unpins); on failure nothing changes.
- **delete** (:meth:`delete`): refused (409) while a named composition uses the adapter; the store
  records a tombstone, the pin goes, the version is retired.
- **compose** (:meth:`compose`): checked as a request using it would be (a merge is computed now) and
  recorded in the store, so every replica serves it.
- **a request** resolves its name once (:meth:`resolve`) to a :class:`Target`: fixed versions with
  their weights, read from the store on first use in a worker thread (only that request waits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from app.adapters.archive import ArchiveLimits
from app.adapters.composition import Composition, check_members
from app.adapters.control import DetachedEngine
from app.adapters.intake import Intake
from app.adapters.kinds import Adapter
from app.adapters.records import AdapterRecord, Held, Target, Task, Usage
from app.adapters.store import AdapterStore, check_name
from app.adapters.store_view import Scope, StoreView, everything
from app.errors import (
    AdapterLoadFailed,
    AdapterNotFound,
    AdapterServeError,
    Conflict,
    IncompatibleMembers,
    PinFailed,
)
from app.models.base_lm import BaseSpec

log = logging.getLogger(__name__)


class AdapterCatalog(StoreView):
    """Adapters, compositions and pins of one replica; see the module docstring."""

    @classmethod
    def detached(
        cls, store: AdapterStore, spec: BaseSpec, host_budget: int = 1 << 62, pin_limit: int = 1
    ) -> AdapterCatalog:
        """A catalog of ``store`` for ``spec``'s base with no engine (read with :meth:`hold`)."""
        intake = Intake(store, spec, max_rank=256, limits=ArchiveLimits(16, 1 << 30), budget=host_budget)
        return cls(intake, DetachedEngine(), intake.metrics, host_budget, pin_limit)

    # --- resolving a request ------------------------------------------------------------------
    async def resolve(
        self, name: str | None, task: Task, adhoc: Composition | None = None, scope: Scope = everything
    ) -> Target:
        """What a request naming ``name`` (an adapter, a named composition; None: the bare base) or
        giving ``adhoc`` runs on: its versions looked up once, checked (404, 409, 400) and held
        with their weights. A name outside ``scope`` (the tenant's), or a composition with a member
        outside it, answers exactly as a missing adapter does."""
        if adhoc is None and name is None:
            return Target(None)
        if adhoc is None:
            assert name is not None
            await self.lookup(name)
            if name not in self._compositions or not scope(name):
                record = self.for_task(name, task, scope)
                return Target(name, (Held(record, await self._weights(record)),))
        comp = adhoc if adhoc is not None else self._compositions[name]  # type: ignore[index]
        records = await self._members(comp, scope)
        check_members(comp, records, task, self.ensemble_rows)
        held = [Held(r, await self._weights(r), w) for r, w in zip(records, comp.weights, strict=True)]
        if comp.merges:
            merged = await asyncio.to_thread(self.merges.held, comp, held)
            return Target(comp.label, (merged,), composition=True)
        method = comp.method if task == "classify" else "average"
        return Target(comp.label, tuple(held), ensemble=True, method=method, composition=True)

    def touch(self, target: Target) -> None:
        """Count a request on ``target``'s versions (the event loop is the only writer)."""
        now = time.time()
        for held in target.members:
            usage = self._usage.setdefault(held.record.uid, Usage())
            usage.last_used = now
            usage.request_count += 1

    async def _members(self, comp: Composition, scope: Scope = everything) -> list[AdapterRecord]:
        for name in comp.names:
            await self.lookup(name)
            if name in self._compositions and scope(name):
                raise IncompatibleMembers(
                    f"{name!r} is a composition: members are adapters", param="adapters"
                )
        return [self.get(name, scope) for name in comp.names]

    def hold(self, name: str) -> Held:
        """The current version of ``name`` with its weights (blocking: store reads on first use)."""
        record = self.get(name)
        return Held(record, self.host.get(record) or self._read(record))

    async def _weights(self, record: AdapterRecord) -> Adapter:
        weights = self.host.get(record)
        return weights if weights is not None else await asyncio.to_thread(self._read, record)

    def _read(self, record: AdapterRecord) -> Adapter:
        """``record``'s weights from the store (a worker thread; once per version: under its name's lock)."""
        with self._lock(record.name):
            weights = self.host.get(record)
            if weights is None:
                weights = self.intake.load(record)
                if self._records.get(record.name) is record:  # a replaced version: its requests hold it
                    self.host.add(record, weights)
            return weights

    async def follow_store(self) -> None:
        """A sync: versions, deletions and compositions; then the fleet-wide pins (pin here what the
        store records as pinned, unpin what it no longer does; PIN names stay). A pin that cannot
        be taken now (no free slot) is retried at the next sync."""
        await asyncio.to_thread(self.sync)
        self.sync_compositions()
        self._pinned = frozenset(n for n in self._pinned if n in self._records)  # deleted names
        live = {r.uid for r in self._records.values()}
        self._usage = {uid: usage for uid, usage in self._usage.items() if uid in live}
        wanted = {n for n in self.store.pins if n in self._records}
        for name in sorted(wanted - self._pinned):
            try:
                await self.pin(name)
                log.info("adapter %s pinned (pinned through another replica)", name)
            except AdapterServeError as exc:
                log.info(
                    "adapter %s is pinned in the store but cannot be pinned here yet: %s", name, exc.message
                )
        for name in sorted(self._pinned - wanted - self.configured_pins):
            await self.unpin(name)
            log.info("adapter %s unpinned (unpinned through another replica)", name)

    # --- changes ------------------------------------------------------------------------------
    def upload(self, name: str, archive: Path) -> AdapterRecord:
        """Validate an archive fully, then install it atomically as the next version of ``name``
        (blocking: a worker thread)."""
        check_name(name)
        with self._lock(name):
            if name in self._compositions:
                raise Conflict(
                    f"{name!r} is a composition's name; an adapter needs a name of its own", param="name"
                )
            if name not in self._records:
                self.intake.check_same_base(name)
            record, weights = self.intake.install(name, archive)
            self._install(record, self._records.get(name), weights)
        log.info(
            "adapter %s version %d installed (%s, rank %d)", name, record.version, record.task, record.rank
        )
        return record

    async def delete(self, name: str) -> None:
        """Delete adapter ``name``: 404 when unknown, 409 while a composition uses it; requests
        already running on it finish."""
        await self.lookup(name)
        await asyncio.to_thread(self._delete, name)
        self._pinned = self._pinned - {name}
        await self.engine.unpin(name)
        log.info("adapter %s deleted", name)

    def _delete(self, name: str) -> None:
        with self._lock(name):
            record = self.get(name)
            users = sorted(n for n, c in self._compositions.items() if name in c.names)
            if users:
                raise Conflict(
                    f"adapter {name!r} is a member of the composition(s) {', '.join(users)}: delete or "
                    "change them first (DELETE /admin/compositions/{name})",
                    param="name",
                )
            self.store.delete(name)
            if name in self.store.pins:
                self.store.set_pin(name, False)
            self._forget(record)
            self._changed_at[name] = time.monotonic()  # a listing read before the delete is stale

    async def pin(self, name: str, fleet: bool = False) -> AdapterRecord:
        """Pin ``name``: loaded into a device slot now and kept in host and device memory. Recorded
        only once loaded: 409 (:class:`PinFailed`, too many pins) or 503 (:class:`DeviceBusy`, no
        slot can be freed) change nothing. ``fleet``: also in the store, for every replica."""
        await self.lookup(name)
        record = self.get(name)
        if name not in self._pinned and len(self._pinned & self._records.keys()) >= self.pin_limit:
            raise Conflict(
                f"at most {self.pin_limit} adapters can be pinned (MAX_DEVICE_ADAPTERS - 1); unpin one first",
                param="name",
            )
        if fleet:  # first in the store: a sync in between then pins rather than unpins
            await asyncio.to_thread(self.store.set_pin, name, True)
        try:
            try:
                weights = await self._weights(record)
            except AdapterLoadFailed as exc:
                raise PinFailed(f"cannot pin: {exc.message}; upload the adapter again", param="name") from exc
            await self.engine.pin(record.handle, weights)
        except BaseException:
            if fleet:
                await asyncio.to_thread(self.store.set_pin, name, False)
            raise
        self._pinned = self._pinned | {name}
        return record

    async def unpin(self, name: str, fleet: bool = False) -> AdapterRecord:
        """Unpin ``name``: it stays resident until least recently used (``fleet``: on every replica)."""
        await self.lookup(name)
        record = self.get(name)
        if fleet:
            await asyncio.to_thread(self.store.set_pin, name, False)
        self._pinned = self._pinned - {name}
        await self.engine.unpin(name)
        return record

    async def load_on_device(self, name: str) -> AdapterRecord:
        """Bring the current version of ``name`` into host memory and a device slot now (PRELOAD)."""
        record = self.get(name)
        await self.engine.load(record.handle, await self._weights(record))
        return record

    async def compose(self, comp: Composition) -> Composition:
        """Record the named composition ``comp`` as the next version of its name, after checking it as
        a request using it would be (a merge is computed now)."""
        assert comp.name is not None
        check_name(comp.name)
        if comp.name in self._records:
            raise Conflict(f"{comp.name!r} is an adapter's name; a composition needs its own", param="name")
        records = await self._members(comp)
        task = check_members(comp, records, None, self.ensemble_rows)
        await self.resolve(None, task, comp)
        record = {**comp.record(), "created_at": time.time()}
        version = await asyncio.to_thread(self.store.commit_composition, comp.name, record)
        self._compositions[comp.name] = saved = Composition.from_record(
            comp.name, {**record, "version": version}
        )
        return saved

    async def delete_composition(self, name: str) -> None:
        """Delete composition ``name`` (its members stay); 404 when there is none."""
        await self.lookup(name)
        if name not in self._compositions:
            raise AdapterNotFound(f"composition {name!r} not found", param="name")
        await asyncio.to_thread(
            self.store.commit_composition, name, {"deleted": True, "created_at": time.time()}
        )
        self._compositions.pop(name, None)
