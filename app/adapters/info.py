"""The registry's record of one adapter version (API side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from app.adapters.kinds import Adapter
from app.adapters.store import Manifest
from app.adapters.version import AdapterVersion


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
    manifest: Manifest | None = field(default=None, repr=False)  # where its files are
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
