"""Compositions: several adapters used as one, by request or by name.

A composition is weighted members and a method:

- ``mean``, ``vote``, ``logits`` (classification ensembles, :mod:`app.ensembles`) and ``average``
  (ensemble generation): every member runs as its own rows of the shared batches and the outputs
  are combined;
- ``cat``, ``linear``, ``ties`` (:mod:`app.adapters.merging`): the members' LoRA weights are merged
  into one adapter, computed once per distinct composition (members' versions included) and served
  as one slot; merged adapters live in the host tier like any version (LRU within its budget) and
  leave it, and their device slot, when a member is replaced or the composition changes.

Named compositions are records in the adapter store (``_compositions/<name>/``), so every replica
serves them; this replica adopts the store's records at each sync. A composition names its
members, not their versions: replacing a member makes its compositions use the new version; deleting
a member that a composition uses is refused (409) until the composition is deleted or changed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from app.adapters.info import AdapterInfo
from app.adapters.kinds import Adapter
from app.adapters.merging import MERGE_METHODS, merge_lora
from app.adapters.registry import AdapterRegistry
from app.adapters.store import check_name
from app.adapters.summary import summarize
from app.ensembles import shared_labels
from app.errors import AdapterNotFound, Conflict, IncompatibleMembers, InvalidRequest, TaskMismatch

if TYPE_CHECKING:
    from app.protocol.native import EnsembleMember

log = logging.getLogger(__name__)

Task = Literal["classify", "generate"]
Held = list[tuple[AdapterInfo, Adapter]]
Method = Literal["mean", "vote", "logits", "cat", "linear", "ties", "average"]
METHODS: dict[str, tuple[str, ...]] = {  # task -> the methods that serve it
    "classify": ("mean", "vote", "logits", *MERGE_METHODS),
    "generate": ("average", *MERGE_METHODS),
}
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
    def of(cls, members: Iterable[EnsembleMember], method: str, density: float) -> Composition:
        """A composition given in a request (``adapters``)."""
        return cls(tuple((m.name, m.weight) for m in members), method, density)  # type: ignore[arg-type]

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

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any]) -> Composition:
        return cls(
            members=tuple((str(m["name"]), float(m["weight"])) for m in record["members"]),
            method=record["method"],
            density=float(record.get("density", 1.0)),
            name=name,
            version=int(record.get("version", 0)),
            created_at=float(record.get("created_at", 0.0)),
        )


class Compositions:
    """This replica's view of the named compositions in the store, and the merged adapters."""

    def __init__(self, registry: AdapterRegistry, ensemble_rows: int = 8) -> None:
        self.registry = registry
        self.ensemble_rows = ensemble_rows  # the most members of an ensemble generation
        self.store = registry.store
        self._named: dict[str, Composition] = {}
        self._merged: OrderedDict[tuple[Any, ...], AdapterInfo] = OrderedDict()  # LRU first
        self._lock = threading.Lock()  # the merged table
        registry.guard = self._guard

    # --- named compositions -----------------------------------------------------------------
    def sync(self) -> None:
        """Adopt the store's records as of its last listing (after :meth:`AdapterRegistry.sync`)."""
        versions = self.store.composition_versions
        for name in set(self._named) - set(versions):
            self._named.pop(name, None)
        for name, numbers in versions.items():
            self._adopt(name, self.store.composition_record(name, max(numbers)))

    def _adopt(self, name: str, record: dict[str, Any] | None) -> Composition | None:
        if record is None or record.get("deleted"):
            self._named.pop(name, None)
            return None
        known = self._named.get(name)
        if known is not None and known.version >= int(record["version"]):
            return known
        try:
            comp = Composition.from_record(name, record)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("skipping composition %s in the store: %s", name, exc)
            return None
        self._named[name] = comp
        log.info("composition %s version %d from the store", name, comp.version)
        return comp

    def get(self, name: str) -> Composition | None:
        return self._named.get(name)

    async def lookup(self, name: str) -> Composition | None:
        """The named composition ``name``; one this replica has not seen is looked up in the store."""
        comp = self._named.get(name)
        if comp is None and name not in self.registry:
            try:
                check_name(name)
            except InvalidRequest:
                return None
            record = await asyncio.to_thread(self.store.composition, name)
            comp = self._adopt(name, record)
        return comp

    def all(self) -> list[Composition]:
        return [self._named[n] for n in sorted(self._named)]

    def describe(self, comp: Composition) -> dict[str, Any]:
        """The public description: members with their current versions, the task they serve."""
        infos = [self.registry.find(n) for n in comp.names]
        first = infos[0]
        return {
            "name": comp.label,
            "task": first.task if first is not None and all(infos) else None,
            "method": comp.method,
            "density": comp.density,
            "members": [
                {"name": n, "weight": w, "version": i.version if i is not None else None}
                for (n, w), i in zip(comp.members, infos, strict=True)
            ],
            "labels": (first.labels or None) if first is not None else None,
            "version": comp.version,
            "created_at": comp.created_at,
        }

    def users_of(self, adapter: str) -> list[str]:
        return sorted(n for n, c in self._named.items() if adapter in c.names)

    def save(self, comp: Composition) -> Composition:
        """Record ``comp`` (checked by the caller) as the next version of its name (blocking)."""
        assert comp.name is not None
        if comp.name in self.registry:
            raise Conflict(
                f"{comp.name!r} is an adapter's name; a composition needs a name of its own", param="name"
            )
        record = {**comp.record(), "created_at": time.time()}
        version = self.store.commit_composition(comp.name, record)
        saved = Composition.from_record(comp.name, {**record, "version": version})
        self._named[comp.name] = saved
        return saved

    def delete(self, name: str) -> None:
        """Delete composition ``name`` (blocking); 404 when there is none."""
        if name not in self._named:
            raise AdapterNotFound(f"composition {name!r} not found", param="name")
        self.store.commit_composition(name, {"deleted": True, "created_at": time.time()})
        self._named.pop(name, None)

    def _guard(self, name: str, change: Literal["upload", "delete"]) -> None:
        """The registry asks before an upload or a delete of adapter ``name``."""
        if change == "upload" and name in self._named:
            raise Conflict(
                f"{name!r} is a composition's name; an adapter needs a name of its own", param="name"
            )
        users = self.users_of(name) if change == "delete" else []
        if users:
            raise Conflict(
                f"adapter {name!r} is a member of the composition(s) {', '.join(users)}: delete or "
                "change them first (DELETE /admin/compositions/{name})",
                param="name",
            )

    # --- serving -----------------------------------------------------------------------------
    async def check(self, comp: Composition, task: Task | None = None) -> Task:
        """404/409/400 before any work: the members exist, serve one task (``task``, when given)
        that the method serves, and (classification) share their labels. Returns the task."""
        registry = self.registry
        for name in comp.names:
            await registry.lookup(name)
            if self.get(name) is not None:
                raise IncompatibleMembers(
                    f"{name!r} is a composition: members are adapters", param="adapters"
                )
        infos = [registry.get(name) for name in comp.names]
        wrong = [info for info in infos if task is not None and info.task != task]
        if wrong and task is not None and comp.name is None:
            registry.for_task(wrong[0].name, task)  # a request's own members: name the odd one
        tasks = {info.task for info in infos}
        if len(tasks) > 1:
            raise IncompatibleMembers(
                "a composition's members serve one task: " + ", ".join(f"{i.name} ({i.task})" for i in infos),
                param="adapters",
            )
        (own,) = tasks
        if task is not None and own != task:
            endpoint = "/classify" if own == "classify" else "/generate"
            raise TaskMismatch(f"{comp.label!r} is a {own} composition; use {endpoint}", param="adapter")
        if comp.method not in METHODS[own]:
            raise IncompatibleMembers(
                f"{comp.method!r} does not combine {own} adapters; use one of {', '.join(METHODS[own])}",
                param="method",
            )
        if own == "classify":
            shared_labels([(i.name, i.labels) for i in infos])
        if comp.method == "average" and len(infos) > self.ensemble_rows:
            raise IncompatibleMembers(
                "ensemble generation runs every member as a row of one batch, each in a device slot: "
                f"at most {self.ensemble_rows} members here (MAX_BATCH_SIZE, MAX_DEVICE_ADAPTERS)",
                param="adapters",
            )
        return own

    async def held(self, comp: Composition, task: Task) -> Held:
        """The members' current versions with their weights; a merge's one merged adapter."""
        held = [await current(self.registry, name, task) for name in comp.names]
        if comp.merges:
            return [await asyncio.to_thread(self.merged, comp, held)]
        return held

    # --- merged adapters --------------------------------------------------------------------
    def merged(
        self, comp: Composition, members: list[tuple[AdapterInfo, Adapter]]
    ) -> tuple[AdapterInfo, Adapter]:
        """The merged adapter of ``comp`` over these member versions: cached, else merged now
        (blocking; milliseconds). The previous merge of the same composition is retired."""
        uids = tuple((i.uid, w) for (i, _), w in zip(members, comp.weights, strict=True))
        key = (comp.label, comp.method, comp.density, uids)
        with self._lock:
            info = self._merged.get(key)
            if info is not None and info.weights is not None:
                self._merged.move_to_end(key)
                return info, info.weights
        start = time.perf_counter()
        weights = merge_lora(
            [(i.name, a, w) for (i, a), w in zip(members, comp.weights, strict=True)],
            comp.method,  # type: ignore[arg-type]
            self.registry.max_rank,
            comp.density,
        )
        info = AdapterInfo(
            name=comp.label,
            version=max(comp.version, 1),
            created_at=time.time(),
            sha256="",
            **summarize(weights),
        )
        metrics = self.registry.metrics
        metrics.adapter_merges.inc()
        metrics.adapter_merge_seconds.observe(time.perf_counter() - start)
        gone: list[AdapterInfo] = []
        with self._lock:
            gone = [old for k, old in self._merged.items() if k[0] == comp.label]
            self._merged = OrderedDict((k, v) for k, v in self._merged.items() if k[0] != comp.label)
            self._merged[key] = info
            while len(self._merged) > MAX_MERGES:
                gone.append(self._merged.popitem(last=False)[1])
        self.registry.host.add(info, weights)
        for old in gone:
            self.registry.host.remove(old)
            self.registry.on_retire(old.handle)
        log.info("merged %s (%s of %s)", comp.label, comp.method, ", ".join(comp.names))
        return info, weights


async def current(registry: AdapterRegistry, name: str, task: Task) -> tuple[AdapterInfo, Adapter]:
    """The current version of adapter ``name`` with its weights (read from the store on first use,
    in a worker thread; only the request that needs them waits)."""
    info = registry.for_task(name, task)
    weights = registry.cached(info)
    if weights is not None:
        return info, weights
    return await asyncio.to_thread(registry.load, name, task)
