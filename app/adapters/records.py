"""The catalog's immutable records: one adapter version (:class:`AdapterRecord`), and what a request
runs on once its adapter or composition name is resolved (:class:`Target`).

A record is made once, when a version enters this replica's catalog (an upload here, or the store's
listing), and never written after; the engine is handed its :attr:`AdapterRecord.handle`. What
changes about a version lives beside the record, each with one writer (docs/architecture.md, the
catalog's state table): its usage counters (:class:`Usage`, the event loop), its host residency
(:class:`app.adapters.host_tier.HostTier`) and its device residency (the engine thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from app.adapters.kinds import Adapter
from app.adapters.methods import Method
from app.adapters.store import Manifest
from app.adapters.tasks import AdapterKind, Task
from app.adapters.version import AdapterVersion

Tier = Literal["device", "host", "store"]


@dataclass(frozen=True)
class AdapterRecord:
    """One version of one adapter as this replica serves it (the store's summary of it)."""

    name: str
    version: int
    created_at: float
    task: Task
    kind: AdapterKind
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    labels: tuple[str, ...]
    num_params: int
    size_bytes: int  # bytes of the validated weights in memory
    sha256: str  # "" for a merged adapter (never in the store)
    manifest: Manifest | None  # where its files are (None: a merged adapter)
    handle: AdapterVersion  # what the engine is handed (its uid keys every residency)

    @classmethod
    def of(
        cls,
        name: str,
        version: int,
        created_at: float,
        summary: dict[str, Any],
        sha256: str = "",
        manifest: Manifest | None = None,
    ) -> AdapterRecord:
        """A record from the store's summary of a version (:func:`app.adapters.summary.summarize`)."""
        labels = tuple(summary["labels"] or ())
        handle = AdapterVersion(
            name=name,
            version=version,
            task=summary["task"],
            kind=summary["kind"],
            labels=labels,
            size_bytes=int(summary["size_bytes"]),
        )
        return cls(
            name=name,
            version=version,
            created_at=created_at,
            task=summary["task"],
            kind=summary["kind"],
            rank=int(summary["rank"]),
            alpha=float(summary["alpha"]),
            target_modules=tuple(summary["target_modules"]),
            labels=labels,
            num_params=int(summary["num_params"]),
            size_bytes=int(summary["size_bytes"]),
            sha256=sha256,
            manifest=manifest,
            handle=handle,
        )

    @property
    def uid(self) -> int:
        return self.handle.uid

    def describe(self, tier: Tier, pinned: bool, usage: Usage | None) -> dict[str, Any]:
        """The public description (``AdapterOut``), with what lives beside the record."""
        return {
            "name": self.name,
            "task": self.task,
            "kind": self.kind,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "labels": list(self.labels) or None,
            "num_params": self.num_params,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "version": self.version,
            "created_at": self.created_at,
            "tier": tier,
            "pinned": pinned,
            "last_used": usage.last_used if usage else None,
            "request_count": usage.request_count if usage else 0,
        }


@dataclass
class Usage:
    """How much a version was used; written only by the event loop (:meth:`AdapterCatalog.touch`)."""

    last_used: float | None = None
    request_count: int = 0


@dataclass(frozen=True)
class Held:
    """One adapter version with its weights, and its weight within a composition."""

    record: AdapterRecord
    weights: Adapter  # held by the request: host eviction cannot take them away
    weight: float = 1.0


@dataclass(frozen=True)
class Target:
    """What one request runs on, resolved once from its ``adapter``/``model`` name or ``adapters``:
    the bare base (no members), one adapter or a merged adapter (one member), or an ensemble whose
    members each run as rows of the same batches and whose outputs are combined (``ensemble``).
    Every member is one fixed version: a replace after resolving does not change this request."""

    label: str | None  # the adapter's or composition's name; members joined by '+' (ad hoc); None: base
    members: tuple[Held, ...] = ()
    ensemble: bool = False
    method: Method = "mean"  # how an ensemble's outputs combine (mean, vote, logits; average)
    composition: bool = False  # named or ad hoc: a request's metrics carry its label

    @property
    def single(self) -> Held | None:
        """The one adapter (or merged adapter) of a plain target; None for the base or an ensemble."""
        return self.members[0] if self.members and not self.ensemble else None
