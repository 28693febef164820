"""The registry of adapters: metadata of every adapter in the store and the host-memory tier.

Tiers: the store (disk) holds every adapter; the host tier holds validated weights of the most
recently used ones within a byte budget (LRU); the device tier (the engine's slots) holds what the
forward passes read. Listing the store needs no weights: the metadata written at upload time
(``adapterserve.json``) is enough. Weights are read on first use, by the request that needs them,
off the engine thread; changes to one name (upload, delete, load) are serialized by a per-name
lock and different names proceed in parallel.
"""

from __future__ import annotations

import difflib
import json
import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app.adapters.archive import ArchiveLimits, extract_archive
from app.adapters.kinds import Adapter, load_adapter
from app.adapters.lora_format import CONFIG_FILE, WEIGHTS_FILE, file_sha256
from app.adapters.store import AdapterStore, check_name
from app.adapters.summary import SUMMARY_KEYS, install_validated, summarize
from app.adapters.version import AdapterVersion
from app.errors import AdapterLoadFailed, AdapterNotFound, Conflict, InvalidAdapter, TaskMismatch
from app.metrics import Metrics
from app.models.base_lm import BaseSpec

log = logging.getLogger(__name__)


@dataclass
class AdapterInfo:
    """The registry's record of the current version of one adapter (API side; the engine gets the
    immutable :attr:`handle`). Written only by the registry under the name's lock, except the usage
    counters, which :meth:`AdapterRegistry.touch` bumps."""

    name: str
    version: int
    created_at: float
    task: Literal["classify", "generate"]
    rank: int
    alpha: float
    target_modules: list[str]
    labels: list[str]
    num_params: int
    size_bytes: int  # bytes of the validated weights in memory
    sha256: str
    kind: Literal["lora", "bottleneck"] = "lora"
    weights: Adapter | None = field(default=None, repr=False)  # set while in the host tier
    pinned: bool = False
    last_used: float | None = None
    request_count: int = 0
    handle: AdapterVersion = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.handle = AdapterVersion(
            name=self.name,
            version=self.version,
            task=self.task,
            kind=self.kind,
            labels=tuple(self.labels),
            size_bytes=self.size_bytes,
        )

    @property
    def uid(self) -> int:
        return self.handle.uid

    def describe(self, on_device: bool = False) -> dict[str, Any]:
        """The public description; ``on_device``: whether the engine reports this version resident."""
        tier = "device" if on_device else "host" if self.weights is not None else "store"
        return {
            "name": self.name,
            "task": self.task,
            "kind": self.kind,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": self.target_modules,
            "labels": self.labels or None,
            "num_params": self.num_params,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "version": self.version,
            "created_at": self.created_at,
            "tier": tier,
            "pinned": self.pinned,
            "last_used": self.last_used,
            "request_count": self.request_count,
        }


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
        self._infos: dict[str, AdapterInfo] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()  # protects the host LRU and the lock table
        self._host: OrderedDict[int, AdapterInfo] = OrderedDict()  # least recently used first
        self._host_bytes = 0
        # wired to the engine by the app: versions replaced or deleted, and the versions it holds
        self.on_retire: Callable[[AdapterVersion], None] = lambda version: None
        self.device_uids: Callable[[], frozenset[int]] = frozenset

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    # --- listing ----------------------------------------------------------------------------
    def scan(self) -> None:
        """List the store (metadata only); adapters without a complete summary are validated once."""
        self.store.recover()
        for name in self.store.names():
            made_for = self.store.meta(name).get("base_model", self.spec.model_id)
            if made_for != self.spec.model_id:  # a store shared by servers of several bases
                log.info("adapter %s in the store is for the base model %s, not this one", name, made_for)
                continue
            try:
                self._infos[name] = self._read_meta(name)
            except InvalidAdapter as exc:
                other = self._made_for(name)
                if other is not None and not self._is_this_base(other):
                    log.info("adapter %s in the store is for the base model %s, not this one", name, other)
                else:
                    log.warning("skipping adapter %s in the store: %s", name, exc.message)
        self._update_store_gauges()

    def _made_for(self, name: str) -> str | None:
        """The base model a store adapter names: its metadata's, else (placed by hand, never
        validated here) the last part of PEFT's ``base_model_name_or_path``."""
        made_for = self.store.meta(name).get("base_model")
        if made_for is not None:
            return str(made_for)
        try:
            config = json.loads((self.store.folder(name) / CONFIG_FILE).read_text())
            hint = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        except (OSError, ValueError):
            return None
        if not isinstance(hint, str):
            return None
        return Path(hint.rstrip("/")).name or None

    def _is_this_base(self, model: str) -> bool:
        return model.casefold() == self.spec.model_id.casefold()

    def _read_meta(self, name: str) -> AdapterInfo:
        """Metadata of a store adapter; its weights stay on disk until first used."""
        meta = self.store.meta(name)
        if not all(k in meta for k in (*SUMMARY_KEYS, "sha256")):  # placed by hand: validate once
            folder = self.store.folder(name)
            adapter = load_adapter(folder, self.spec, self.max_rank)
            meta = {
                **meta,
                **summarize(adapter),
                "sha256": file_sha256(folder / WEIGHTS_FILE),
                "base_model": self.spec.model_id,
            }
            meta.setdefault("version", 1)
            meta.setdefault("created_at", folder.stat().st_mtime)
            self.store.write_meta(name, meta)
        self._check_budget(int(meta["size_bytes"]))
        info = AdapterInfo(
            name=name,
            version=int(meta["version"]),
            created_at=float(meta["created_at"]),
            sha256=str(meta["sha256"]),
            pinned=name in self.pinned,
            **{k: meta[k] for k in SUMMARY_KEYS},
        )
        return info

    def _check_budget(self, size: int) -> None:
        budget = min(self.host_budget, self.device_budget)
        if size > budget:
            raise InvalidAdapter(
                f"the adapter's weights take {size} bytes, more than the adapter memory budget of "
                f"{budget} bytes (MAX_HOST_ADAPTER_BYTES / MAX_DEVICE_ADAPTER_BYTES)",
                param="file",
            )

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def list(self) -> list[AdapterInfo]:
        return [self._infos[n] for n in sorted(self._infos)]

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
        weights = info.weights
        if weights is not None:
            with self._guard:
                if info.uid in self._host:
                    self._host.move_to_end(info.uid)
        return weights

    def load(
        self, name: str, task: Literal["classify", "generate"] | None = None
    ) -> tuple[AdapterInfo, Adapter]:
        """The current version of ``name`` and its weights, read from the store if not in host memory.

        Blocking (disk reads); the caller runs it in a worker thread. Under the name's lock, so that
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
                try:
                    # validated in full when it entered the store (upload or first scan)
                    weights = load_adapter(
                        self.store.folder(name), self.spec, self.max_rank, check_values=False
                    )
                except InvalidAdapter as exc:
                    self.metrics.adapter_load_failures.inc()
                    raise AdapterLoadFailed(
                        f"adapter {name!r} in the store could not be loaded: {exc.message}", param="adapter"
                    ) from exc
                self._host_add(info, weights)
                self.metrics.adapter_loads.labels(tier="host").inc()
                self.metrics.adapter_load_seconds.labels(tier="host").observe(time.perf_counter() - start)
        return info, weights

    def _host_add(self, info: AdapterInfo, adapter: Adapter) -> None:
        with self._guard:
            info.weights = adapter
            self._host[info.uid] = info
            self._host_bytes += info.size_bytes
            self._evict_host(keep=info.uid)
        self._update_host_gauges()

    def _host_remove(self, info: AdapterInfo) -> None:
        """Drop the registry's reference (requests that hold the weights keep them until they finish)."""
        if self._host.pop(info.uid, None) is not None:
            self._host_bytes -= info.size_bytes
            info.weights = None

    def _evict_host(self, keep: int) -> None:
        for uid in list(self._host):
            if self._host_bytes <= self.host_budget:
                return
            info = self._host[uid]
            if uid == keep or info.pinned:
                continue
            self._host_remove(info)
            self.metrics.adapter_evictions.labels(tier="host").inc()
            log.debug("adapter %s v%d evicted from host memory", info.name, info.version)

    def _update_host_gauges(self) -> None:
        self.metrics.adapters_resident.labels(tier="host").set(len(self._host))
        self.metrics.adapter_resident_bytes.labels(tier="host").set(self._host_bytes)

    def _update_store_gauges(self) -> None:
        """After the set of adapters changed (scan, upload, delete); not on the request path."""
        m = self.metrics
        m.adapters_resident.labels(tier="store").set(len(self._infos))
        m.adapter_resident_bytes.labels(tier="store").set(sum(i.size_bytes for i in self._infos.values()))
        self._update_host_gauges()

    # --- changes ----------------------------------------------------------------------------
    def _check_same_base(self, name: str) -> None:
        """A name the store holds for another base model is not replaced from this server."""
        if name in self._infos or name not in self.store.names():
            return
        made_for = self._made_for(name)
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
            self._check_same_base(name)
            staged = self.store.staging_folder()
            try:
                extract_archive(archive, staged, self.limits)
                adapter, meta = install_validated(
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
                version=meta["version"],
                created_at=meta["created_at"],
                sha256=meta["sha256"],
                pinned=name in self.pinned,
                **summarize(adapter),
            )
            old = self._infos.get(name)
            self._infos[name] = info
            with self._guard:
                if old is not None:
                    self._host_remove(old)
            self._host_add(info, adapter)
        self._update_store_gauges()
        if old is not None:
            self.on_retire(old.handle)
        log.info("adapter %s version %d installed (%s, rank %d)", name, info.version, info.task, adapter.rank)
        return info

    def delete(self, name: str) -> None:
        with self._lock(name):
            info = self.get(name)
            self.store.delete(name)
            del self._infos[name]
            self.pinned.discard(name)
            with self._guard:
                self._host_remove(info)
        self._update_store_gauges()
        self.on_retire(info.handle)
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
