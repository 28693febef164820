"""The registry of adapters: this replica's view of the store and the host-memory tier.

Tiers: the store (shared by every replica) holds every adapter; the host tier holds validated
weights of the most recently used versions within a byte budget (LRU); the device tier (the
engine's slots) holds what the forward passes read. Listing the store needs no weights: each
version's manifest carries its summary. The registry converges on the store: :meth:`sync` runs
every few hundred milliseconds and adopts new versions and deletions made through any replica, and
a name this replica does not know is looked up in the store before a 404 (:meth:`refresh`).
Weights are read on first use, by the request that needs them, off the engine thread; changes to
one name (upload, delete, sync, load) are serialized by a per-name lock and different names
proceed in parallel.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from app.adapters.archive import ArchiveLimits, extract_archive
from app.adapters.host_tier import HostTier
from app.adapters.info import AdapterInfo
from app.adapters.kinds import Adapter, load_adapter
from app.adapters.lora_format import CONFIG_FILE, WEIGHTS_FILE, file_sha256
from app.adapters.objects import MissingObject
from app.adapters.store import AdapterStore, Manifest, check_name
from app.adapters.summary import SUMMARY_KEYS, install_validated, summarize
from app.adapters.version import AdapterVersion
from app.errors import (
    AdapterLoadFailed,
    AdapterNotFound,
    Conflict,
    InvalidAdapter,
    InvalidRequest,
    TaskMismatch,
)
from app.metrics import Metrics
from app.models.base_lm import BaseSpec

__all__ = ["AdapterInfo", "AdapterRegistry"]

log = logging.getLogger(__name__)


class AdapterRegistry:
    """Maps names to the current :class:`AdapterInfo` and keeps the host tier within its budget."""

    def __init__(
        self,
        store: AdapterStore,
        spec: BaseSpec,
        max_rank: int,
        limits: ArchiveLimits,
        host_budget: int | None = None,
        device_budget: int | None = None,
        metrics: Metrics | None = None,
        pinned: list[str] | None = None,
    ) -> None:
        self.store = store
        self.spec = spec
        self.max_rank = max_rank
        self.limits = limits
        self.host_budget = host_budget if host_budget is not None else 1 << 62  # None: unlimited
        self.device_budget = device_budget if device_budget is not None else 1 << 62
        self.metrics = metrics or Metrics()
        self.pinned: set[str] = set(pinned or ())
        self.host = HostTier(self.host_budget, self.metrics)
        self._infos: dict[str, AdapterInfo] = {}
        self._skipped: dict[str, int] = {}  # name -> store version not served here (other base, invalid)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()  # protects the lock table
        self.synced_at: float | None = None  # when the last sync with the store completed
        # wired to the engine by the app: versions replaced or deleted, and the versions it holds
        self.on_retire: Callable[[AdapterVersion], None] = lambda version: None
        self.device_uids: Callable[[], frozenset[int]] = frozenset
        # asked before an upload or delete of a name (compositions refuse those that break them)
        self.guard: Callable[[str, Literal["upload", "delete"]], None] = lambda name, change: None

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    # --- converging on the store ------------------------------------------------------------
    def scan(self) -> None:
        """The first sync at start (adapters placed by hand are validated once, here)."""
        self.store.recover()
        self.sync()

    def sync(self) -> None:
        """Adopt every change the store holds that this replica has not seen: new versions (from
        any replica, or placed by hand) and deletions. Idempotent; any thread."""
        start = time.perf_counter()
        state = self.store.state()
        for name in sorted({*state, *self._infos}):
            self._apply(name, state.get(name))
        self.synced_at = time.time()
        m = self.metrics
        m.store_last_sync.set(self.synced_at)
        m.store_sync_seconds.observe(time.perf_counter() - start)
        m.store_generation.set(sum(manifest.version for manifest in state.values()))

    async def lookup(self, name: str) -> None:
        """Before a request about ``name`` answers 404 here: look in the store (a worker thread)."""
        if name not in self._infos:
            await asyncio.to_thread(self.refresh, name)

    def refresh(self, name: str) -> None:
        """Look ``name`` up in the store now (a request names an adapter this replica has not seen
        yet: one uploaded through another replica a moment ago must not answer 404)."""
        try:
            check_name(name)
        except InvalidRequest:
            return
        self._apply(name, self.store.current(name))

    def _apply(self, name: str, manifest: Manifest | None) -> None:
        with self._lock(name):
            known = self._infos.get(name)
            if manifest is None or manifest.deleted:
                self._skipped.pop(name, None)
                if known is not None:
                    self._forget(known)
                    log.info("adapter %s deleted in the store", name)
                return
            if known is not None and known.version >= manifest.version:
                return
            if self._skipped.get(name) == manifest.version:
                return
            try:
                info = self._info_of(manifest)
            except (InvalidAdapter, AdapterLoadFailed) as exc:
                log.warning(
                    "skipping adapter %s version %d in the store: %s", name, manifest.version, exc.message
                )
                info = None
            if info is None:
                self._skipped[name] = manifest.version
                if known is not None:  # its new version is not for this server
                    self._forget(known)
                return
            self._install(info, known)
            log.info("adapter %s version %d from the store", name, info.version)

    def _install(self, info: AdapterInfo, old: AdapterInfo | None, weights: Adapter | None = None) -> None:
        """Make ``info`` the current version of its name (under the name's lock)."""
        self._infos[info.name] = info
        self._skipped.pop(info.name, None)
        if old is not None:
            self.host.remove(old)
        if weights is not None:
            self.host.add(info, weights)
        self._update_store_gauges()
        if old is not None:
            self.on_retire(old.handle)

    def _forget(self, info: AdapterInfo) -> None:
        """Drop ``info``'s name (under the name's lock); requests holding it finish on it."""
        del self._infos[info.name]
        self.pinned.discard(info.name)
        self.host.remove(info)
        self._update_store_gauges()
        self.on_retire(info.handle)

    def _made_for(self, manifest: Manifest) -> str | None:
        """The base model a version names: its summary's, else (placed by hand, never validated
        here) the last part of PEFT's ``base_model_name_or_path``."""
        made_for = manifest.meta.get("base_model")
        if made_for is not None:
            return str(made_for)
        try:
            config = json.loads(self.store.objects.get(f"{manifest.prefix}{CONFIG_FILE}"))
            hint = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        except (MissingObject, ValueError):
            return None
        if not isinstance(hint, str):
            return None
        return Path(hint.rstrip("/")).name or None

    def _is_this_base(self, model: str) -> bool:
        return model.casefold() == self.spec.model_id.casefold()

    def _info_of(self, manifest: Manifest) -> AdapterInfo | None:
        """The record of a store version; None when it is another base model's."""
        meta = manifest.meta
        made_for = meta.get("base_model", self.spec.model_id)
        if not self._is_this_base(str(made_for)):
            log.info("adapter %s in the store is for the base model %s", manifest.name, made_for)
            return None
        if not all(k in meta for k in (*SUMMARY_KEYS, "sha256")):  # placed by hand: validate once
            folder = self.store.folder(manifest)
            try:
                adapter = load_adapter(folder, self.spec, self.max_rank)
            except InvalidAdapter:
                other = self._made_for(manifest)
                if other is not None and not self._is_this_base(other):
                    log.info("adapter %s in the store is for the base model %s", manifest.name, other)
                    return None
                raise
            meta = {
                **meta,
                **summarize(adapter),
                "sha256": file_sha256(folder / WEIGHTS_FILE),
                "base_model": self.spec.model_id,
                "version": manifest.version,
                "created_at": manifest.created_at or folder.stat().st_mtime,
            }
            if manifest.hand_placed:
                manifest = self.store.write_summary(manifest, meta)
        self._check_budget(int(meta["size_bytes"]))
        return AdapterInfo(
            name=manifest.name,
            version=manifest.version,
            created_at=float(meta.get("created_at", manifest.created_at)),
            sha256=str(meta["sha256"]),
            pinned=manifest.name in self.pinned,
            manifest=manifest,
            **{k: meta[k] for k in SUMMARY_KEYS},
        )

    def _check_budget(self, size: int) -> None:
        budget = min(self.host_budget, self.device_budget)
        if size > budget:
            raise InvalidAdapter(
                f"the adapter's weights take {size} bytes, more than the adapter memory budget of "
                f"{budget} bytes (MAX_HOST_ADAPTER_BYTES / MAX_DEVICE_ADAPTER_BYTES)",
                param="file",
            )

    # --- listing ----------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def list(self) -> list[AdapterInfo]:
        return [self._infos[n] for n in sorted(self._infos)]

    def find(self, name: str) -> AdapterInfo | None:
        return self._infos.get(name)

    def get(self, name: str) -> AdapterInfo:
        info = self._infos.get(name)
        if info is None:
            raise AdapterNotFound(
                f"adapter {name!r} not found{self.did_you_mean(name)} (GET /v1/adapters lists them)",
                param="adapter",
            )
        return info

    def did_you_mean(self, name: str, extra: tuple[str, ...] = ()) -> str:
        """``; did you mean 'x'?`` for the adapter names (and ``extra``) closest to ``name``, or ''."""
        close = difflib.get_close_matches(name, [*self._infos, *extra], n=3, cutoff=0.6)
        return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""

    def describe(self, info: AdapterInfo) -> dict[str, Any]:
        """``info``'s public description, its tier as the engine reports it now."""
        return info.describe(on_device=info.uid in self.device_uids())

    def for_task(self, name: str, task: Literal["classify", "generate"]) -> AdapterInfo:
        info = self.get(name)
        if info.task != task:
            endpoint = "/classify" if info.task == "classify" else "/generate"
            raise TaskMismatch(f"adapter {name!r} is a {info.task} adapter; use {endpoint}", param="adapter")
        return info

    # --- host tier --------------------------------------------------------------------------
    def cached(self, info: AdapterInfo) -> Adapter | None:
        """The host weights of ``info`` if resident (marks them recently used)."""
        return self.host.get(info)

    def load(
        self, name: str, task: Literal["classify", "generate"] | None = None
    ) -> tuple[AdapterInfo, Adapter]:
        """The current version of ``name`` and its weights, read from the store if not in host memory.

        Blocking (store reads); the caller runs it in a worker thread. Under the name's lock, so that
        the files read always belong to the version returned.
        """
        info = self.for_task(name, task) if task else self.get(name)
        weights = self.cached(info)
        if weights is not None:
            return info, weights
        with self._lock(name):
            info = self.for_task(name, task) if task else self.get(name)  # re-check under the lock
            weights = self.cached(info)
            if weights is None:
                start = time.perf_counter()
                assert info.manifest is not None
                try:
                    # validated in full when it entered the store (upload or first scan)
                    folder = self.store.folder(info.manifest)
                    weights = load_adapter(folder, self.spec, self.max_rank, check_values=False)
                except (InvalidAdapter, AdapterLoadFailed) as exc:
                    self.metrics.adapter_load_failures.inc()
                    raise AdapterLoadFailed(
                        f"adapter {name!r} in the store could not be loaded: {exc.message}", param="adapter"
                    ) from exc
                self.host.add(info, weights)
                self.metrics.adapter_loads.labels(tier="host").inc()
                self.metrics.adapter_load_seconds.labels(tier="host").observe(time.perf_counter() - start)
        return info, weights

    def _update_store_gauges(self) -> None:
        """After the set of adapters changed (sync, upload, delete); not on the request path."""
        m = self.metrics
        m.adapters_resident.labels(tier="store").set(len(self._infos))
        m.adapter_resident_bytes.labels(tier="store").set(sum(i.size_bytes for i in self._infos.values()))

    # --- changes ----------------------------------------------------------------------------
    def _check_same_base(self, name: str) -> None:
        """A name the store holds for another base model is not replaced from this server."""
        if name in self._infos:
            return
        current = self.store.current(name)
        if current is None or current.deleted:
            return
        made_for = self._made_for(current)
        if made_for is not None and not self._is_this_base(made_for):
            raise Conflict(
                f"the store's adapter {name!r} belongs to the base model {made_for!r}; this server "
                f"runs {self.spec.model_id!r}: choose another name",
                param="name",
            )

    def upload(self, name: str, archive: Path) -> AdapterInfo:
        """Validate an archive fully, then install it atomically as the next version of ``name``."""
        check_name(name)
        with self._lock(name):
            self.guard(name, "upload")
            self._check_same_base(name)
            staged = self.store.staging_folder()
            try:
                extract_archive(archive, staged, self.limits)
                adapter, manifest = install_validated(
                    self.store,
                    name,
                    staged,
                    self.spec,
                    self.max_rank,
                    check=lambda a: self._check_budget(a.nbytes),
                )
            finally:
                if staged.exists():
                    shutil.rmtree(staged, ignore_errors=True)
            info = AdapterInfo(
                name=name,
                version=manifest.version,
                created_at=manifest.created_at,
                sha256=manifest.meta["sha256"],
                pinned=name in self.pinned,
                manifest=manifest,
                **summarize(adapter),
            )
            self._install(info, self._infos.get(name), adapter)
        log.info("adapter %s version %d installed (%s, rank %d)", name, info.version, info.task, adapter.rank)
        return info

    def delete(self, name: str) -> None:
        with self._lock(name):
            info = self.get(name)
            self.guard(name, "delete")
            self.store.delete(name)
            if name in self.store.pins:
                self.store.set_pin(name, False)
            self._forget(info)
        log.info("adapter %s deleted", name)

    def check_pin(self, name: str, limit: int) -> AdapterInfo:
        """``name``'s record if it may be pinned: at most ``limit`` names are pinned (409 otherwise)."""
        info = self.get(name)
        if name not in self.pinned and len(self.pinned) >= limit:
            raise Conflict(
                f"at most {limit} adapters can be pinned (MAX_DEVICE_ADAPTERS - 1); unpin one first",
                param="name",
            )
        return info

    def set_pinned(self, name: str, pinned: bool) -> AdapterInfo:
        """Record ``name`` as pinned (never evicted from host memory) or not; the engine keeps the
        device side of the pin (see :meth:`app.engine.engine.Engine.pin`)."""
        with self._lock(name):
            info = self.get(name)
            (self.pinned.add if pinned else self.pinned.discard)(name)
            info.pinned = pinned
        return info

    def touch(self, info: AdapterInfo) -> None:
        info.last_used = time.time()
        info.request_count += 1
