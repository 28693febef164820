"""The registry of adapters known to the service: metadata, validated host weights, upload/delete."""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app.adapters.archive import ArchiveLimits, extract_archive
from app.adapters.lora import LoraAdapter, load_lora
from app.adapters.store import AdapterStore, check_name
from app.errors import AdapterNotFound, InvalidAdapter, TaskMismatch
from app.models.base import BaseSpec

log = logging.getLogger(__name__)
_uids = itertools.count(1)


@dataclass
class AdapterInfo:
    """One version of one adapter. ``uid`` is unique per loaded version in this process."""

    name: str
    version: int
    created_at: float
    adapter: LoraAdapter = field(repr=False)
    uid: int = field(default_factory=lambda: next(_uids))
    kind: Literal["lora"] = "lora"
    tier: Literal["store", "host", "device"] = "host"
    last_used: float | None = None
    request_count: int = 0

    @property
    def task(self) -> Literal["classify", "generate"]:
        return self.adapter.task

    def describe(self) -> dict[str, Any]:
        a = self.adapter
        return {
            "name": self.name,
            "task": a.task,
            "kind": self.kind,
            "rank": a.rank,
            "alpha": a.alpha,
            "target_modules": a.target_modules,
            "labels": a.labels or None,
            "num_params": a.num_params,
            "size_bytes": a.nbytes,
            "sha256": a.sha256,
            "version": self.version,
            "created_at": self.created_at,
            "tier": self.tier,
            "last_used": self.last_used,
            "request_count": self.request_count,
        }


class AdapterRegistry:
    """Maps names to the current :class:`AdapterInfo`; serializes changes to one name with a lock."""

    def __init__(self, store: AdapterStore, spec: BaseSpec, max_rank: int, limits: ArchiveLimits) -> None:
        self.store = store
        self.spec = spec
        self.max_rank = max_rank
        self.limits = limits
        self._infos: dict[str, AdapterInfo] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.on_retire: Callable[[AdapterInfo], None] = lambda info: None

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def _read(self, name: str) -> AdapterInfo:
        folder = self.store.folder(name)
        meta = self.store.meta(name)
        adapter = load_lora(folder, self.spec, self.max_rank)
        return AdapterInfo(
            name=name,
            version=int(meta.get("version", 1)),
            created_at=float(meta.get("created_at", folder.stat().st_mtime)),
            adapter=adapter,
        )

    def scan(self) -> None:
        """Load every valid adapter of the store; log and skip invalid ones."""
        self.store.recover()
        for name in self.store.names():
            try:
                self._infos[name] = self._read(name)
            except InvalidAdapter as exc:
                log.warning("skipping adapter %s in the store: %s", name, exc.message)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def list(self) -> list[AdapterInfo]:
        return [self._infos[n] for n in sorted(self._infos)]

    def get(self, name: str) -> AdapterInfo:
        info = self._infos.get(name)
        if info is None:
            raise AdapterNotFound(f"adapter {name!r} not found", param="adapter")
        return info

    def for_task(self, name: str, task: Literal["classify", "generate"]) -> AdapterInfo:
        info = self.get(name)
        if info.task != task:
            endpoint = "/classify" if info.task == "classify" else "/generate"
            raise TaskMismatch(f"adapter {name!r} is a {info.task} adapter; use {endpoint}", param="adapter")
        return info

    def upload(self, name: str, archive: Path) -> AdapterInfo:
        """Validate an archive fully, then install it atomically as the next version of ``name``."""
        check_name(name)
        with self._lock(name):
            staged = self.store.staging_folder()
            try:
                extract_archive(archive, staged, self.limits)
                adapter = load_lora(staged, self.spec, self.max_rank)
                meta = self.store.install(name, staged)
            finally:
                if staged.exists():
                    shutil.rmtree(staged, ignore_errors=True)
            info = AdapterInfo(
                name=name, version=meta["version"], created_at=meta["created_at"], adapter=adapter
            )
            old = self._infos.get(name)
            self._infos[name] = info
        if old is not None:
            self.on_retire(old)
        log.info("adapter %s version %d installed (%s, rank %d)", name, info.version, info.task, adapter.rank)
        return info

    def delete(self, name: str) -> None:
        with self._lock(name):
            info = self.get(name)
            self.store.delete(name)
            del self._infos[name]
        self.on_retire(info)
        log.info("adapter %s deleted", name)

    def touch(self, info: AdapterInfo) -> None:
        info.last_used = time.time()
        info.request_count += 1
