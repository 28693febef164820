"""Tenants: which keys belong to which app or team, which adapters it may use and administer.

The tenants file (``ADAPTERSERVE_TENANTS_FILE``, YAML; docs/tenants.md) maps each tenant to the
sha256 of its keys, the adapter and composition names it may use and those it may administer (names
or glob patterns such as ``acme-*``), its limits and its scheduling weight. Keys are never stored
or logged in clear: a request's bearer key is hashed and compared with every listed hash. The file
is read again when it changes (checked at most once a second); a file that does not parse keeps the
tenants read before (logged). Without a tenants file every request is the tenant
:data:`EVERYONE`, which may use and administer everything (``API_KEYS`` and ``ADMIN_TOKEN`` still
guard the routes as before).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

RECHECK_S = 1.0  # how often the file's modification time is looked at


@dataclass(frozen=True)
class Limits:
    """A tenant's limits (None: none)."""

    requests_per_second: float | None = None
    tokens_per_minute: int | None = None
    concurrent: int | None = None


@dataclass(frozen=True)
class Tenant:
    name: str
    uses: tuple[str, ...] = ("*",)  # adapter and composition names or patterns it may use
    administers: tuple[str, ...] = ()  # names or patterns it may upload, replace, pin, delete, compose
    limits: Limits = field(default_factory=Limits)
    weight: float = 1.0
    queue_share: float = 1.0  # the fraction of MAX_QUEUE its waiting requests may fill

    def may_use(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.uses)

    def may_administer(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.administers)


EVERYONE = Tenant("default", uses=("*",), administers=("*",))


def key_hash(key: str) -> str:
    """What the tenants file stores of a key: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _names(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{what} must be a name or a list of names (glob patterns allowed)")
    return tuple(value)


def parse_tenants(text: str) -> dict[str, Tenant]:
    """Key hash → tenant, from the tenants file's text; ValueError naming what is wrong."""
    data = yaml.safe_load(text) or {}
    tenants = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(tenants, dict) or not tenants:
        raise ValueError("the tenants file needs a 'tenants' mapping of tenant names to their settings")
    by_hash: dict[str, Tenant] = {}
    for name, spec in tenants.items():
        if not isinstance(spec, dict):
            raise ValueError(f"tenant {name!r}: expected a mapping")
        unknown = set(spec) - {"keys", "adapters", "admin", "limits", "weight"}
        if unknown:
            raise ValueError(f"tenant {name!r}: unknown settings {sorted(unknown)}")
        limits = spec.get("limits") or {}
        if not isinstance(limits, dict) or set(limits) - {
            "requests_per_second",
            "tokens_per_minute",
            "concurrent",
        }:
            raise ValueError(
                f"tenant {name!r}: limits take requests_per_second, tokens_per_minute, concurrent"
            )
        tenant = Tenant(
            name=str(name),
            uses=_names(spec.get("adapters", []), f"tenant {name!r}: adapters")
            if spec.get("adapters")
            else (),
            administers=_names(spec["admin"], f"tenant {name!r}: admin") if spec.get("admin") else (),
            limits=Limits(**limits),
            weight=float(spec.get("weight", 1.0)),
        )
        if tenant.weight <= 0:
            raise ValueError(f"tenant {name!r}: weight must be positive")
        for digest in _names(spec.get("keys", []), f"tenant {name!r}: keys"):
            if not digest.startswith("sha256:") or len(digest) != 71:
                raise ValueError(
                    f"tenant {name!r}: keys are listed as sha256:<64 hex digits> of the key "
                    "(adapterserve tenant-key KEY prints it), never in clear"
                )
            if digest in by_hash:
                raise ValueError(f"tenant {name!r}: a key is listed twice")
            by_hash[digest.lower()] = tenant
    # each tenant may fill the queue in proportion to its weight (the tenant of API_KEYS: all of it)
    total = sum(t.weight for t in {t.name: t for t in by_hash.values()}.values())
    return {d: replace(t, queue_share=t.weight / total) for d, t in by_hash.items()}


class TenantDirectory:
    """The tenants file as last read; any thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._by_hash: dict[str, Tenant] = {}
        self._load(strict=True)

    def _load(self, strict: bool = False) -> None:
        stat = self.path.stat()
        stamp = (stat.st_mtime, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            by_hash = parse_tenants(self.path.read_text())
        except (OSError, ValueError, yaml.YAMLError) as exc:
            if strict:
                raise ValueError(f"ADAPTERSERVE_TENANTS_FILE {self.path}: {exc}") from exc
            log.error(
                "the tenants file %s was not reloaded (the tenants read before stay): %s", self.path, exc
            )
        else:
            self._by_hash = by_hash
            log.info("tenants file %s: %d tenants", self.path, len({t.name for t in by_hash.values()}))
        self._stamp = stamp

    def refresh(self) -> None:
        """Read the file again if it changed (at most once per :data:`RECHECK_S`)."""
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                self._load()
            except OSError as exc:
                log.error(
                    "the tenants file %s cannot be read (the tenants read before stay): %s", self.path, exc
                )

    def tenant_of(self, key: str) -> Tenant | None:
        """The tenant whose key this is, or None (every listed hash is compared, in constant time)."""
        self.refresh()
        digest = key_hash(key)
        found = None
        for listed, tenant in self._by_hash.items():
            if hmac.compare_digest(digest, listed):
                found = tenant
        return found
